"""A small X.509 certificate authority for the three parties.

``privmed certs init CA_DIR`` makes a CA key and self-signed certificate; ``issue`` signs a
certificate for one party name (CN and DNS SAN = the name, e.g. ``model-owner``). Each TLS
connection requires both sides to present a certificate signed by the session CA and checks
that the peer's name is the role it expects. ``ephemeral_session`` makes a fresh CA and the
three party certificates in a temporary directory for one local run. Keys are ECDSA P-256.
"""

from __future__ import annotations

import datetime as dt
import os
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from privmed.errors import ConfigError

ROLES = ("data-owner", "model-owner", "dealer")


@dataclass(frozen=True)
class Identity:
    """Files one party needs for mutual TLS."""

    name: str
    cert: Path
    key: Path
    ca: Path


def write_private(path: Path, data: bytes) -> None:
    """Write a secret file that is mode 0600 from its first byte (a fresh file created with that
    mode, then renamed over ``path``: no window in which another user can read it)."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.unlink(missing_ok=True)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(data)
    os.replace(tmp, path)


def _write_key(key: ec.EllipticCurvePrivateKey, path: Path) -> None:
    write_private(path, key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))


def init_ca(ca_dir: Path, name: str = "privmed session CA", days: int = 365) -> Path:
    """Create ca.key / ca.pem in ``ca_dir``; returns the certificate path."""
    ca_dir.mkdir(parents=True, exist_ok=True)
    if (ca_dir / "ca.key").exists():
        raise ConfigError(f"{ca_dir}: a CA already exists here (ca.key); refusing to overwrite")
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = dt.datetime.now(dt.timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(False, False, False, False, False, True, True, False, False), critical=True
        )
        .sign(key, hashes.SHA256())
    )
    _write_key(key, ca_dir / "ca.key")
    (ca_dir / "ca.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return ca_dir / "ca.pem"


def issue(ca_dir: Path, name: str, out_dir: Path | None = None, days: int = 365) -> Identity:
    """Sign a certificate for party ``name`` with the CA in ``ca_dir``."""
    out_dir = out_dir or ca_dir
    try:
        ca_key = serialization.load_pem_private_key((ca_dir / "ca.key").read_bytes(), None)
        ca_cert = x509.load_pem_x509_certificate((ca_dir / "ca.pem").read_bytes())
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{ca_dir}: cannot read CA (ca.key, ca.pem): {exc}") from exc
    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(name)]), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .sign(ca_key, hashes.SHA256())  # type: ignore[arg-type]
    )
    out_dir.mkdir(parents=True, exist_ok=True)
    _write_key(key, out_dir / f"{name}.key")
    (out_dir / f"{name}.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return Identity(name, out_dir / f"{name}.pem", out_dir / f"{name}.key", ca_dir / "ca.pem")


def ephemeral_session(directory: Path) -> dict[str, Identity]:
    """A fresh CA and one certificate per role, for a single local run."""
    init_ca(directory, name="privmed ephemeral CA", days=2)
    return {role: issue(directory, role, days=2) for role in ROLES}
