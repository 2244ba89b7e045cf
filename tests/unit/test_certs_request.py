"""Each organisation keeps its own key: `privmed certs request/sign`, role binding, service files."""

from __future__ import annotations

import socket
import stat
import threading
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from privmed.cli.main import main
from privmed.crypto.certs import Identity, init_ca
from privmed.crypto.csr import fingerprint_file, request, sign
from privmed.errors import ConfigError, PeerError
from privmed.net.tls import connect
from privmed.net.tls_listen import server_context, server_handshake
from privmed.runtime.service_config import load_service_config


def _signed(tmp_path: Path, role: str, org: str) -> Identity:
    if not (tmp_path / "ca" / "ca.key").exists():
        init_ca(tmp_path / "ca")
    _key, csr = request(role, org, tmp_path / org)
    sign(tmp_path / "ca", csr, role, tmp_path / org / f"{role}.pem")
    return Identity(role, tmp_path / org / f"{role}.pem", tmp_path / org / f"{role}.key", tmp_path / "ca" / "ca.pem")


def test_request_writes_a_0600_key_and_sign_binds_the_role(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # Execute: the hospital's host makes the key; the CA operator signs only the request
    assert main(["certs", "request", "--role", "data-owner", "--org", "St Mary Hospital", "--out", str(tmp_path / "h")]) == 0
    assert main(["certs", "init", str(tmp_path / "ca")]) == 0
    assert main(["certs", "sign", str(tmp_path / "ca"), str(tmp_path / "h" / "data-owner.csr"), "--role", "data-owner",
                 "--out", str(tmp_path / "h" / "data-owner.pem")]) == 0  # fmt: skip
    out = capsys.readouterr().out
    # Assert
    assert stat.S_IMODE((tmp_path / "h" / "data-owner.key").stat().st_mode) == 0o600
    assert not (tmp_path / "ca" / "data-owner.key").exists()
    cert = x509.load_pem_x509_certificate((tmp_path / "h" / "data-owner.pem").read_bytes())
    assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "data-owner"
    assert cert.subject.get_attributes_for_oid(NameOID.ORGANIZATION_NAME)[0].value == "St Mary Hospital"
    assert list(cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value) == [ExtendedKeyUsageOID.CLIENT_AUTH]
    assert fingerprint_file(tmp_path / "h" / "data-owner.pem") in out


def test_sign_refuses_a_request_for_another_role_and_request_never_overwrites_a_key(tmp_path: Path) -> None:
    init_ca(tmp_path / "ca")
    _key, csr = request("data-owner", "St Mary Hospital", tmp_path / "h")
    with pytest.raises(ConfigError, match="asks for role 'data-owner', not dealer; refusing to sign"):
        sign(tmp_path / "ca", csr, "dealer", tmp_path / "h" / "dealer.pem")
    assert not (tmp_path / "h" / "dealer.pem").exists()
    with pytest.raises(ConfigError, match="a key already exists here"):
        request("data-owner", "St Mary Hospital", tmp_path / "h")


def test_a_hospital_certificate_cannot_serve_tls_even_named_as_another_role(tmp_path: Path) -> None:
    # Prepare: a listener that presents the hospital's certificate (client-auth only)
    hospital = _signed(tmp_path, "data-owner", "St Mary Hospital")
    vendor = _signed(tmp_path, "model-owner", "Acme Imaging AI")
    lsock = socket.create_server(("127.0.0.1", 0))
    port = lsock.getsockname()[1]

    def serve_once() -> None:
        raw, _ = lsock.accept()
        try:
            server_handshake(server_context(hospital), raw, 5).close()
        except OSError:
            raw.close()

    t = threading.Thread(target=serve_once, daemon=True)
    t.start()
    # Execute / Assert: the vendor connecting to "data-owner" refuses the certificate's purpose
    with pytest.raises(PeerError, match="not valid for the session CA/role: unsuitable certificate purpose"):
        connect(vendor, "data-owner", "127.0.0.1", port, 5)
    t.join(5)
    lsock.close()


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("conect_timeout_s = 5", "unknown key 'conect_timeout_s'"),
        ('timeout_s = "60s"', "'timeout_s' must be int or float, got '60s'"),
        ("port = 70000", "'port' must be 0..65535, got 70000"),
        ('allow = ["St Mary"]', "allow entry 'St Mary' is not '*', 'sha256:<64 hex digits>' or 'O=<organisation>'"),
    ],
)
def test_service_file_mistakes_are_one_line_each(tmp_path: Path, line: str, message: str) -> None:
    _signed(tmp_path, "dealer", "Helper")
    base = {"host": '"127.0.0.1"', "port": "7101", "ca": '"../ca/ca.pem"', "cert": '"dealer.pem"', "key": '"dealer.key"', "allow": '["*"]'}
    key = line.split("=")[0].strip()
    body = [f"{k} = {v}" for k, v in base.items() if k != key] + [line]
    path = tmp_path / "Helper" / "service.toml"
    path.write_text("[service]\n" + "\n".join(body) + "\n")
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)").replace("*", r"\*")):
        load_service_config(path, "dealer")
    path.write_text("[service]\n" + "\n".join(f"{k} = {v}" for k, v in base.items()) + "\n")
    assert load_service_config(path, "dealer").port == 7101


SESSION = """[session]
ca = "ca/ca.pem"
timeout_s = 60
connect_timeout_s = 30

[data-owner]
cert = "h/data-owner.pem"
key = "h/data-owner.key"

[model-owner]
host = "127.0.0.1"
port = 7100
cert = "-"
key = "-"

[dealer]
host = "127.0.0.1"
port = 7101
cert = "-"
key = "-"
"""


@pytest.mark.parametrize(
    ("old", "new", "message"),
    [
        ("timeout_s = 60", 'timeout_s = "60s"', "[session]: 'timeout_s' must be int or float, got '60s'"),
        ("port = 7100", "port = 70000", "[model-owner]: 'port' must be 0..65535, got 70000"),
        ("connect_timeout_s = 30", "conect_timeout_s = 30", "[session]: unknown key 'conect_timeout_s'"),
        ("[dealer]", "[dealers]", "unknown table [dealers]"),
        ("timeout_s = 60", "timeout_s = 0", "[session]: 'timeout_s' must be positive, got 0"),
    ],
)
def test_session_file_mistakes_are_one_line_each(tmp_path: Path, old: str, new: str, message: str) -> None:
    from privmed.runtime.config import load_config

    path = tmp_path / "session.toml"
    path.write_text(SESSION.replace(old, new, 1))
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert message in str(err.value) and "\n" not in str(err.value), err.value
    path.write_text(SESSION)
    assert load_config(path).endpoints["dealer"].port == 7101


def test_a_party_with_another_roles_certificate_stops_at_start(tmp_path: Path) -> None:
    from privmed.runtime.config import load_config
    from privmed.runtime.party import connect_role

    _signed(tmp_path, "dealer", "h")  # the helper's certificate, at the hospital's paths
    (tmp_path / "h" / "dealer.pem").rename(tmp_path / "h" / "data-owner.pem")
    (tmp_path / "h" / "dealer.key").rename(tmp_path / "h" / "data-owner.key")
    (tmp_path / "session.toml").write_text(SESSION)
    with pytest.raises(ConfigError, match="a certificate for 'dealer' \\(h\\), not for data-owner; a data-owner needs a data-owner certificate"):
        connect_role("data-owner", load_config(tmp_path / "session.toml"))


def test_a_host_name_that_resolves_to_loopback_is_refused_and_ipv6_listens(tmp_path: Path) -> None:
    from privmed.net.tls_listen import Listener, listening_socket

    name = socket.gethostname()
    resolved = socket.getaddrinfo(name, 0, type=socket.SOCK_STREAM)[0][4][0]
    if resolved.startswith("127.") or resolved == "::1":
        with pytest.raises(ConfigError, match=f"host {name!r} resolves to {resolved} \\(loopback\\) on this machine"):
            listening_socket("dealer", name, 0, 1)
    listening_socket("dealer", "localhost", 0, 1).close()  # a loopback name: meant
    try:
        socket.socket(socket.AF_INET6).bind(("::1", 0))
    except OSError:
        pytest.skip("no IPv6 loopback here")
    hospital = _signed(tmp_path, "data-owner", "St Mary Hospital")
    vendor = _signed(tmp_path, "model-owner", "Acme Imaging AI")
    lst = Listener(vendor, "::1", 0)
    got: list[str] = []
    t = threading.Thread(target=lambda: got.append(lst.accept({"data-owner"}, 10)[0]), daemon=True)
    t.start()
    connect(hospital, "model-owner", "::1", lst.port, 10).close()
    t.join(10)
    lst.close()
    assert got == ["data-owner"]
