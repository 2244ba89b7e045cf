"""Each organisation keeps its own key: certificate requests, signing, fingerprints.

``request`` makes an ECDSA P-256 key and a certificate signing request (CSR) on the party's own
host; the key is written mode 0600 from its first byte and never leaves that host. ``sign``
is what the CA operator runs: it signs a *request* for a role the operator names, so it never
sees a private key.

The role is bound in the certificate three ways, all set by the CA operator, never taken from
the requester: the subject common name and the DNS subject-alternative name are the role
(``net.tls`` checks both: a server's SAN by hostname verification, a client's CN by the
listener), and the extended key usage allows only what the role does in TLS (a data owner only
connects out: client authentication only, so OpenSSL refuses its certificate from any server).
A request that asks for another role than the operator's ``--role`` is refused, so a hospital
cannot slip a dealer certificate past an inattentive operator. The requester chooses only its
organisation name (subject O), which services may use in an allow-list; the SHA-256 fingerprint
of the certificate is the stronger allow-list entry.
"""

from __future__ import annotations

import datetime as dt
import hashlib
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from privmed.crypto.certs import ROLES, write_private
from privmed.errors import ConfigError

MAX_ORG_CHARS = 64
# what each role does in TLS: the data owner only connects; the dealer only listens
ROLE_USAGE = {
    "data-owner": [ExtendedKeyUsageOID.CLIENT_AUTH],
    "model-owner": [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH],
    "dealer": [ExtendedKeyUsageOID.SERVER_AUTH],
}


def _check_role(role: str) -> None:
    if role not in ROLES:
        raise ConfigError(f"unknown role {role!r}: expected one of {', '.join(ROLES)}")


def _check_org(org: str) -> None:
    if not org or len(org) > MAX_ORG_CHARS or not org.isprintable():
        raise ConfigError(f"organisation name must be 1..{MAX_ORG_CHARS} printable characters, got {org!r}")


def request(role: str, org: str, out_dir: Path) -> tuple[Path, Path]:
    """Write ``out_dir/ROLE.key`` (0600) and ``out_dir/ROLE.csr``; returns (key, csr) paths.

    Refuses to overwrite an existing key (it may be the one a CA already certified)."""
    _check_role(role)
    _check_org(org)
    out_dir.mkdir(parents=True, exist_ok=True)
    key_path, csr_path = out_dir / f"{role}.key", out_dir / f"{role}.csr"
    if key_path.exists():
        raise ConfigError(f"{key_path}: a key already exists here; refusing to overwrite it")
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, role), x509.NameAttribute(NameOID.ORGANIZATION_NAME, org)])
    csr = x509.CertificateSigningRequestBuilder().subject_name(name).sign(key, hashes.SHA256())
    write_private(key_path, key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
    csr_path.write_bytes(csr.public_bytes(serialization.Encoding.PEM))
    return key_path, csr_path


def _only(name: x509.Name, oid: x509.ObjectIdentifier, what: str, where: Path) -> str:
    values = name.get_attributes_for_oid(oid)
    if len(values) != 1:
        raise ConfigError(f"{where}: the request must name exactly one {what}, it names {len(values)}")
    return str(values[0].value)


def sign(ca_dir: Path, csr_path: Path, role: str, out: Path, days: int = 365) -> x509.Certificate:
    """Sign the request at ``csr_path`` for ``role`` with the CA in ``ca_dir``; write ``out``.

    The request's signature must verify (the requester holds the key) and its common name
    must be ``role``; only its organisation name is copied."""
    _check_role(role)
    if not 1 <= days <= 3650:
        raise ConfigError(f"--days must be 1..3650, got {days}")
    try:
        csr = x509.load_pem_x509_csr(csr_path.read_bytes())
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{csr_path}: not a readable PEM certificate request ({exc})") from exc
    if not csr.is_signature_valid:
        raise ConfigError(f"{csr_path}: the request's signature does not verify")
    if not isinstance(csr.public_key(), ec.EllipticCurvePublicKey):
        raise ConfigError(f"{csr_path}: expected an ECDSA key (made by privmed certs request)")
    asked = _only(csr.subject, NameOID.COMMON_NAME, "role (common name)", csr_path)
    if asked != role:
        raise ConfigError(f"{csr_path}: the request asks for role {asked!r}, not {role}; refusing to sign")
    org = _only(csr.subject, NameOID.ORGANIZATION_NAME, "organisation (O)", csr_path)
    _check_org(org)
    try:
        ca_key = serialization.load_pem_private_key((ca_dir / "ca.key").read_bytes(), None)
        ca_cert = x509.load_pem_x509_certificate((ca_dir / "ca.pem").read_bytes())
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{ca_dir}: cannot read CA (ca.key, ca.pem): {exc}") from exc
    now = dt.datetime.now(dt.timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, role), x509.NameAttribute(NameOID.ORGANIZATION_NAME, org)]))
        .issuer_name(ca_cert.subject)
        .public_key(csr.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(min(now + dt.timedelta(days=days), ca_cert.not_valid_after_utc))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(role)]), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage(ROLE_USAGE[role]), critical=True)
        .sign(ca_key, hashes.SHA256())  # type: ignore[arg-type]
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return cert


def fingerprint_der(der: bytes) -> str:
    """``sha256:<hex>`` of a certificate's DER bytes (what ``openssl x509 -fingerprint
    -sha256`` shows, lower case without colons)."""
    return "sha256:" + hashlib.sha256(der).hexdigest()


def fingerprint_file(path: Path) -> str:
    try:
        cert = x509.load_pem_x509_certificate(path.read_bytes())
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{path}: not a readable PEM certificate ({exc})") from exc
    return fingerprint_der(cert.public_bytes(serialization.Encoding.DER))


def certificate_role(path: Path) -> tuple[str, str]:
    """(role, organisation) named by a certificate file: its common name and subject O."""
    try:
        cert = x509.load_pem_x509_certificate(path.read_bytes())
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{path}: not a readable PEM certificate ({exc})") from exc
    cn = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    org = cert.subject.get_attributes_for_oid(NameOID.ORGANIZATION_NAME)
    return (str(cn[0].value) if cn else "", str(org[0].value) if org else "")


def check_own_role(cert: Path, role: str, what: str = "") -> None:
    """Refuse to start as ``role`` with a certificate issued for another role (one line, at
    start: not after a peer's timeout). An unreadable file is left to the TLS loader, which
    names all three files."""
    try:
        own, org = certificate_role(cert)
    except ConfigError:
        return
    if own != role:
        raise ConfigError(f"{cert}: a certificate for {own!r}{f' ({org})' if org else ''}, not for {role}; "
                          f"a {what or role} needs a {role} certificate")
