"""`privmed certs request / sign / fingerprint`: each organisation keeps its own private key."""

from __future__ import annotations

import argparse
from pathlib import Path

ROLE_CHOICES = ["data-owner", "model-owner", "dealer"]


def register_certs(csub: argparse._SubParsersAction) -> None:
    r = csub.add_parser("request", help="on the party's own host: make a private key (0600) and a certificate request")
    r.add_argument("--role", required=True, choices=ROLE_CHOICES)
    r.add_argument("--org", required=True, help="your organisation's name (subject O; services may allow-list it)")
    r.add_argument("--out", type=Path, default=Path("."), help="directory for ROLE.key and ROLE.csr (default .)")
    r.set_defaults(func=cmd_certs_request)
    s = csub.add_parser("sign", help="CA operator: sign a certificate request for the role you name")
    s.add_argument("ca_dir", type=Path)
    s.add_argument("request", type=Path, help="the party's ROLE.csr")
    s.add_argument("--role", required=True, choices=ROLE_CHOICES, help="the role you certify (must match the request)")
    s.add_argument("--out", required=True, type=Path, help="certificate file to write (send it back with ca.pem)")
    s.add_argument("--days", type=int, default=365)
    s.set_defaults(func=cmd_certs_sign)
    f = csub.add_parser("fingerprint", help="a certificate's SHA-256 fingerprint (for a service's allow-list)")
    f.add_argument("cert", type=Path)
    f.set_defaults(func=cmd_certs_fingerprint)


def cmd_certs_request(args: argparse.Namespace) -> int:
    from privmed.crypto.csr import request

    key, csr = request(args.role, args.org, args.out)
    print(f"{args.role} ({args.org}): private key {key} (mode 0600, never leaves this host), request {csr} (send it to the CA)")
    return 0


def cmd_certs_sign(args: argparse.Namespace) -> int:
    from cryptography.hazmat.primitives import serialization

    from privmed.crypto.csr import certificate_role, fingerprint_der, sign

    cert = sign(args.ca_dir, args.request, args.role, args.out, args.days)
    _role, org = certificate_role(args.out)
    fp = fingerprint_der(cert.public_bytes(serialization.Encoding.DER))
    print(f"{args.role} certificate {args.out} for {org!r}, valid until {cert.not_valid_after_utc:%Y-%m-%d}, fingerprint {fp}")
    return 0


def cmd_certs_fingerprint(args: argparse.Namespace) -> int:
    from privmed.crypto.csr import certificate_role, fingerprint_file

    role, org = certificate_role(args.cert)
    print(f"{fingerprint_file(args.cert)}  {role} {org!r}")
    return 0
