"""Real sites with Flower's deployment engine: certificates, the Flower App, command lines.

Roles and processes (Flower 1.41; all traffic over HTTPS with the run's own CA):

- server: ``flower-superlink`` (Fleet, Control and ServerAppIo APIs on one port). It starts
  Flower's SuperExec, which runs privmed's ``ServerApp`` in a ``flwr-serverapp`` process.
- each hospital: ``flower-supernode`` with ``--node-config`` naming its data, its site and
  its state folder (privacy ledger) and its policy (``client_app.node_config_site``); the
  SuperNode runs privmed's ``ClientApp`` in a ``flwr-clientapp`` process per message.
- the operator (on the server machine): ``flwr run APP_DIR privmed`` submits the run; the
  Flower App in APP_DIR is only a ``pyproject.toml`` whose components point at the
  installed privmed package and whose config holds the run configuration.

Every executable is taken from the folder of the running Python (the venv), whose ``bin``
is also put first on PATH, because the SuperLink finds ``flower-superexec`` through PATH.
Runtime dependency installation (``uv sync``, which needs the internet) is disabled.

Security non-guarantees, written where they apply: SuperNode authentication is not
enabled, so any party holding the CA certificate that can reach the port can join as a
node (the server refuses to start a round with more or fewer nodes than sites, and every
site must report a distinct expected name); the SuperNode's internal ClientAppIo API
listens without TLS on 127.0.0.1 only.
"""

from __future__ import annotations

import datetime
import ipaddress
import json
import math
import os
import socket
import ssl
import sys
from collections.abc import Sequence
from pathlib import Path

from privmed.crypto.certs import write_private
from privmed.errors import InputError, PeerError
from privmed.federated.checkpoint import atomic_write_bytes
from privmed.federated.config import FederatedConfig

__all__ = [
    "FEDERATION",
    "check_reachable",
    "flower_env",
    "flwr_run_command",
    "generate_certificates",
    "superlink_command",
    "supernode_command",
    "write_flower_app",
    "write_flwr_config",
]

FEDERATION = "privmed"
CERT_DAYS = 30


def _bin(name: str) -> str:
    path = Path(sys.executable).parent / name
    if not path.exists():
        raise InputError(f"{path}: Flower executable not found (is flwr installed in this environment?)")
    return str(path)


def flower_env(flwr_home: str | Path | None = None) -> dict[str, str]:
    """Environment for Flower processes: this venv's bin first on PATH and, if given,
    FLWR_HOME (where Flower unpacks app bundles and keeps its config) set to ``flwr_home``."""
    env = dict(os.environ)
    env["PATH"] = str(Path(sys.executable).parent) + os.pathsep + env.get("PATH", "")
    if flwr_home is not None:
        Path(flwr_home).mkdir(parents=True, exist_ok=True)
        env["FLWR_HOME"] = str(Path(flwr_home).resolve())
    return env


def generate_certificates(out_dir: str | Path, hosts: Sequence[str] = ("localhost", "127.0.0.1")) -> dict[str, Path]:
    """A fresh CA and a SuperLink server certificate for ``hosts`` (ECDSA P-256, 30 days).

    Writes ``ca.crt`` (give to every site and the operator), ``server.pem`` and
    ``server.key`` (server only; the key file is created with mode 0600). Keys come from
    the OS CSPRNG via ``cryptography``.
    """
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    if not hosts:
        raise InputError("certificates: expected at least one host name or IP address")
    out = Path(out_dir)
    now = datetime.datetime.now(datetime.timezone.utc)
    until = now + datetime.timedelta(days=CERT_DAYS)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "privmed federated run CA")])
    ca = (
        x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name)
        .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(now).not_valid_after(until)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                     content_commitment=False, key_encipherment=False,
                                     data_encipherment=False, key_agreement=False,
                                     encipher_only=False, decipher_only=False), critical=True)
        .sign(ca_key, hashes.SHA256())
    )  # fmt: skip
    names: list[x509.GeneralName] = []
    for host in hosts:
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            names.append(x509.DNSName(host))
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hosts[0])]))
        .issuer_name(ca_name).public_key(key.public_key())
        .serial_number(x509.random_serial_number()).not_valid_before(now).not_valid_after(until)
        .add_extension(x509.SubjectAlternativeName(names), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .sign(ca_key, hashes.SHA256())
    )  # fmt: skip
    pem = serialization.Encoding.PEM
    paths = {"ca": out / "ca.crt", "cert": out / "server.pem", "key": out / "server.key"}
    atomic_write_bytes(paths["ca"], ca.public_bytes(pem))
    atomic_write_bytes(paths["cert"], cert.public_bytes(pem))
    write_private(paths["key"], key.private_bytes(pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
    return paths


def generate_site_key(out_dir: str | Path, site: str) -> tuple[Path, Path]:
    """A hospital's SuperNode identity: an EC P-384 key pair in OpenSSH format.

    ``SITE.key`` (private, mode 0600) stays at the hospital and is given to
    ``privmed federate site --auth-key``; ``SITE.pub`` goes to the server operator, who
    registers it (``privmed federate register``). With SuperNode authentication on, the
    SuperLink accepts only registered keys; each request is signed with the private key
    (Flower's node authentication: timestamp signatures against impersonation and replay).
    """
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    if not site or any(c in site for c in "/\\ \t"):
        raise InputError(f"site name {site!r}: expected a name without slashes or spaces")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    key_path, pub_path = out / f"{site}.key", out / f"{site}.pub"
    if key_path.exists():
        raise InputError(f"{key_path}: already exists; keep it (or delete it to make a new identity)")
    private = ec.generate_private_key(ec.SECP384R1())
    key_bytes = private.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption()
    )
    fd = os.open(key_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(key_bytes)
    pub_path.write_bytes(
        private.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH) + b"\n"
    )
    return key_path, pub_path


def register_command(public_key: str | Path, name: str) -> list[str]:
    """``flwr supernode register`` of one site's public key, named after the site."""
    key = Path(public_key)
    if not key.is_file():
        raise InputError(f"{key}: public key not found (make it with privmed federate site-key)")
    return [_bin("flwr"), "supernode", "register", str(key.resolve()), FEDERATION, "--name", name]


def superlink_command(
    certs: str | Path, *, host: str, port: int, state_dir: str | Path | None = None, supernode_auth: bool = True
) -> list[str]:
    """``flower-superlink`` with TLS from ``certs`` (ca.crt, server.pem, server.key); with
    ``supernode_auth`` only SuperNodes whose public key was registered may connect."""
    c = Path(certs).resolve()
    for name in ("ca.crt", "server.pem", "server.key"):
        if not (c / name).is_file():
            raise InputError(f"{c / name}: missing (create with privmed federate certs)")
    cmd = [
        _bin("flower-superlink"),
        "--ssl-ca-certfile", str(c / "ca.crt"),
        "--ssl-certfile", str(c / "server.pem"),
        "--ssl-keyfile", str(c / "server.key"),
        "--host", host, "--port", str(port),
        "--disable-runtime-dependency-installation",
    ]  # fmt: skip
    if supernode_auth:
        cmd.append("--enable-supernode-auth")
    if state_dir is not None:
        Path(state_dir).mkdir(parents=True, exist_ok=True)
        cmd += ["--database", str(Path(state_dir).resolve() / "superlink.db")]
    return cmd


def _toml_value(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if not math.isfinite(value):
            raise InputError(f"TOML value: expected a finite number, got {value}")
        return repr(value)
    return json.dumps(str(value))  # a JSON string is a valid TOML basic string


def supernode_command(
    superlink: str,
    ca: str | Path,
    *,
    data_dir: str | Path,
    site: str,
    state_dir: str | Path,
    port: int,
    require_secagg: bool = True,
    require_dp: bool = False,
    max_epsilon: float | None = None,
    total_epsilon: float | None = None,
    total_delta: float | None = None,
    threads: int = 1,
    max_wait_s: int = 120,
    auth_key: str | Path | None = None,
) -> list[str]:
    """``flower-supernode`` for one hospital; ``--node-config`` carries the site's policy;
    ``auth_key`` is the site's private key (``generate_site_key``) for SuperNode authentication."""
    node = {
        "data-dir": str(Path(data_dir).resolve()),
        "site": site,
        "state-dir": str(Path(state_dir).resolve()),
        "require-secagg": require_secagg,
        "require-dp": require_dp,
        "threads": threads,
    }
    if max_epsilon is not None:
        node["max-epsilon"] = float(max_epsilon)
    if total_epsilon is not None:
        node["dp-total-epsilon"] = float(total_epsilon)
    if total_delta is not None:
        node["dp-total-delta"] = float(total_delta)
    cmd = [
        _bin("flower-supernode"),
        "--root-certificates", str(Path(ca).resolve()),
        "--superlink", superlink,
        "--node-config", " ".join(f"{k}={_toml_value(v)}" for k, v in node.items()),
        "--port", str(port),
        "--max-retries", "20",
        "--max-wait-time", str(max_wait_s),
    ]  # fmt: skip
    if auth_key is not None:
        key = Path(auth_key)
        if not key.is_file():
            raise InputError(f"{key}: private key not found (make it with privmed federate site-key)")
        cmd += ["--auth-supernode-private-key", str(key.resolve())]
    return cmd


def write_flower_app(app_dir: str | Path, config: FederatedConfig, run_dir: str | Path) -> Path:
    """The Flower App folder for ``flwr run``: a pyproject.toml whose run config is ``config``."""
    app = Path(app_dir)
    lines = [
        "[build-system]", 'requires = ["hatchling"]', 'build-backend = "hatchling.build"', "",
        "[project]", 'name = "privmed-federated"', 'version = "0.1.0"',
        'description = "privmed federated training; code comes from the installed privmed package"',
        'license = "Apache-2.0"', "dependencies = []", "",
        "[tool.flwr.app]", 'publisher = "privmed"', "",
        "[tool.flwr.app.components]",
        'serverapp = "privmed.federated.server_app:app"',
        'clientapp = "privmed.federated.client_app:app"', "",
        "[tool.flwr.app.config]",
        f"run-dir = {_toml_value(str(Path(run_dir).resolve()))}",
    ]  # fmt: skip
    lines += [f"{k} = {_toml_value(v)}" for k, v in config.to_flat().items()]
    atomic_write_bytes(app / "pyproject.toml", ("\n".join(lines) + "\n").encode("utf-8"))
    return app


def write_flwr_config(flwr_home: str | Path, superlink: str, ca: str | Path) -> Path:
    """FLWR_HOME/config.toml with one SuperLink connection named ``privmed`` (TLS)."""
    text = (
        f'[superlink]\ndefault = "{FEDERATION}"\n\n[superlink.{FEDERATION}]\n'
        f"address = {_toml_value(superlink)}\nroot-certificates = {_toml_value(str(Path(ca).resolve()))}\n"
    )
    path = Path(flwr_home) / "config.toml"
    atomic_write_bytes(path, text.encode("utf-8"))
    return path


def flwr_run_command(app_dir: str | Path) -> list[str]:
    return [_bin("flwr"), "run", str(Path(app_dir).resolve()), FEDERATION, "--stream"]


def check_reachable(address: str, ca: str | Path, timeout: float = 10.0, wait: float = 0.0) -> None:
    """TCP connect and TLS handshake (verifying against ``ca``) with the SuperLink, or PeerError.

    Connection failures are retried every second until ``wait`` seconds have passed (a site
    may start before the server); a failed TLS handshake is never retried.
    """
    import time

    host, sep, port_text = address.rpartition(":")
    if not sep or not port_text.isdigit():
        raise InputError(f"SuperLink address: expected HOST:PORT, got {address!r}")
    host = host.strip("[]")
    try:
        context = ssl.create_default_context(cafile=str(ca))
    except (OSError, ssl.SSLError) as exc:
        raise InputError(f"{ca}: cannot load CA certificate ({exc})") from None
    deadline = time.monotonic() + wait
    while True:
        try:
            with socket.create_connection((host, int(port_text)), timeout=timeout) as sock:
                with context.wrap_socket(sock, server_hostname=host):
                    return
        except ssl.SSLError as exc:
            raise PeerError(f"SuperLink at {address}: TLS handshake failed ({exc.reason or exc})") from None
        except OSError as exc:
            if time.monotonic() + 1.0 > deadline:
                reason = exc.strerror or type(exc).__name__
                raise PeerError(
                    f"SuperLink at {address}: unreachable ({reason}) after {max(wait, timeout):g} s"
                ) from None
            time.sleep(1.0)
