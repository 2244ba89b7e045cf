"""DICOM TLS (PS3.15 B.9) to a real Orthanc that requires it, with certificates on both sides.

A CA made here signs Orthanc's certificate (for 127.0.0.1) and privmed's client certificate;
Orthanc accepts only TLS associations from certificates of that CA. The ``[pacs]`` table of a
TOML file names the CA and our certificate. Checked: echo, store, find and get over TLS; a
plain association and a PACS certificate from another CA are refused with one line.
"""

from __future__ import annotations

import datetime
import ipaddress
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pydicom
import pytest

from privmed.data.dicom_make import write_ct_series

from .conftest import error_message
from .orthanc import Orthanc, start_orthanc, stop_orthanc


def make_pki(folder: Path, tag: str) -> None:
    """``{tag}ca.pem``, ``{tag}server.pem/.key`` (SAN 127.0.0.1), ``{tag}client.pem/.key``."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    now = datetime.datetime.now(datetime.timezone.utc)
    ca_key = ec.generate_private_key(ec.SECP256R1())

    def name(cn: str) -> x509.Name:
        return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])

    def build(subject: str, key: ec.EllipticCurvePrivateKey, ca: bool, san: list[x509.GeneralName]) -> x509.Certificate:
        builder = (x509.CertificateBuilder().subject_name(name(subject)).issuer_name(name(f"{tag}test PACS CA"))
                   .public_key(key.public_key()).serial_number(x509.random_serial_number())
                   .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=1))
                   .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))  # fmt: skip
        if san:
            builder = builder.add_extension(x509.SubjectAlternativeName(san), critical=False)
        return builder.sign(ca_key, hashes.SHA256())

    def write(stem: str, cert: x509.Certificate, key: ec.EllipticCurvePrivateKey | None) -> None:
        (folder / f"{tag}{stem}.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        if key is not None:
            (folder / f"{tag}{stem}.key").write_bytes(key.private_bytes(
                serialization.Encoding.PEM, serialization.PrivateFormat.TraditionalOpenSSL, serialization.NoEncryption()))  # fmt: skip

    write("ca", build(f"{tag}test PACS CA", ca_key, True, []), None)
    for stem, san in (("server", [x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), ("client", [x509.DNSName("privmed")])):
        key = ec.generate_private_key(ec.SECP256R1())
        write(stem, build(stem, key, False, san), key)


def pacs_toml(folder: Path, tag: str, ca_tag: str) -> Path:
    path = folder / f"{tag}{ca_tag}pacs.toml"
    path.write_text(f'[pacs]\nhost = "127.0.0.1"\nport = 4242\naet = "ORTHANC"\ntimeout = 10\n'
                    f'tls_ca = "{ca_tag}ca.pem"\ntls_cert = "{tag}client.pem"\ntls_key = "{tag}client.key"\n')  # fmt: skip
    return path


@pytest.fixture(scope="module")
def tls_orthanc(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Orthanc, Path]]:
    pki = tmp_path_factory.mktemp("pki")
    make_pki(pki, "")
    make_pki(pki, "rogue-")
    tls = {"DicomTlsEnabled": True, "DicomTlsCertificate": str(pki / "server.pem"),
           "DicomTlsPrivateKey": str(pki / "server.key"), "DicomTlsTrustedCertificates": str(pki / "ca.pem"),
           "DicomTlsRemoteCertificateRequired": True}  # fmt: skip
    server = start_orthanc(tmp_path_factory.mktemp("orthanc_tls"), extra_config=tls,
                           probe=["--pacs-config", str(pacs_toml(pki, "", ""))])  # fmt: skip
    try:
        yield server, pki
    finally:
        stop_orthanc(server)


def test_store_find_get_over_dicom_tls_and_refusals_without_it(tls_orthanc: tuple[Orthanc, Path], tmp_path: Path) -> None:
    # Prepare
    server, pki = tls_orthanc
    good = ["--pacs-config", str(pacs_toml(pki, "", ""))]
    files = write_ct_series(tmp_path / "ct", np.zeros((2, 16, 16), np.int16), (2.0, 1.0, 1.0))
    # Execute
    stored = server.run(["pacs", "store", files[0].parent, *good])
    found = server.run(["pacs", "find", "--level", "series", "--modality", "CT", *good])
    got = server.run(["pacs", "get", "--study", found.stdout.splitlines()[-1].split("\t")[0], "--out", tmp_path / "back", *good])
    plain = server.run(["pacs", "echo", "--pacs", "127.0.0.1:4242", "--pacs-timeout", "10"])
    rogue_client = server.run(["pacs", "echo", "--pacs-config", str(pacs_toml(pki, "rogue-", ""))])
    rogue_server = server.run(["pacs", "echo", "--pacs-config", str(pacs_toml(pki, "", "rogue-"))])
    # Assert: over TLS everything works
    assert stored.returncode == 0 and "stored 2 objects into PACS ORTHANC@127.0.0.1:4242" in stored.stdout, stored.stderr
    assert found.returncode == 0 and len(found.stdout.splitlines()) == 2, found.stderr
    assert got.returncode == 0 and "retrieved 2 objects" in got.stdout, got.stderr
    assert sorted(p.name for p in (tmp_path / "back").rglob("*.dcm")) == sorted(f"{pydicom.dcmread(f).SOPInstanceUID}.dcm" for f in files)
    # Assert: without TLS, with a client certificate of another CA, or trusting another CA: refused
    pacs = "PACS ORTHANC@127.0.0.1:4242: "
    assert error_message(plain.stderr) == pacs + "closed the connection without an association (does it require TLS?)"
    assert error_message(rogue_client.stderr) == pacs + "closed the connection without an association (does it accept our TLS certificate?)"
    assert error_message(rogue_server.stderr).startswith(pacs + "its TLS certificate is not trusted (")  # OpenSSL's reason
