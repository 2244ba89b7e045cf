"""The session file: who listens where, which certificates, how long to wait.

Example ``session.toml`` (paths are relative to the file)::

    [session]
    ca = "certs/ca.pem"
    timeout_s = 60            # deadline of every receive during the session
    connect_timeout_s = 30    # how long to retry a peer that is not up yet

    [data-owner]
    cert = "certs/data-owner.pem"
    key = "certs/data-owner.key"

    [model-owner]
    host = "10.0.0.2"
    port = 7100
    cert = "certs/model-owner.pem"
    key = "certs/model-owner.key"

    [dealer]
    host = "10.0.0.3"
    port = 7101
    cert = "certs/dealer.pem"
    key = "certs/dealer.key"

The model owner and the dealer listen; the data owner connects to both and the model owner
connects to the dealer. ``port = 0`` with ``port_file = "..."`` lets the OS choose the port and
publishes it in that file (used by ``privmed infer`` on one machine).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from privmed.crypto.certs import ROLES, Identity
from privmed.errors import ConfigError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib


@dataclass(frozen=True)
class Endpoint:
    host: str
    port: int
    port_file: Path | None


@dataclass(frozen=True)
class SessionConfig:
    path: Path
    identities: dict[str, Identity]
    endpoints: dict[str, Endpoint]  # model-owner, dealer
    timeout_s: float
    connect_timeout_s: float


def _path(base: Path, section: dict[str, Any], key: str, where: str) -> Path:
    if key not in section:
        raise ConfigError(f"{where}: missing '{key}'")
    p = Path(section[key])
    return p if p.is_absolute() else base / p


def load_config(path: Path) -> SessionConfig:
    path = Path(path)
    try:
        raw = tomllib.loads(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"{path}: session file not found") from None
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError(f"{path}: not a valid TOML session file: {exc}") from exc
    base = path.parent
    sess = raw.get("session", {})
    ca = _path(base, sess, "ca", f"{path} [session]")
    identities, endpoints = {}, {}
    for role in ROLES:
        sec = raw.get(role)
        if sec is None:
            raise ConfigError(f"{path}: missing section [{role}]")
        where = f"{path} [{role}]"
        identities[role] = Identity(role, _path(base, sec, "cert", where), _path(base, sec, "key", where), ca)
        if role != "data-owner":
            if "host" not in sec or "port" not in sec:
                raise ConfigError(f"{where}: needs host and port")
            pf = sec.get("port_file")
            endpoints[role] = Endpoint(str(sec["host"]), int(sec["port"]), (base / pf) if pf else None)
    return SessionConfig(path, identities, endpoints, float(sess.get("timeout_s", 60.0)), float(sess.get("connect_timeout_s", 30.0)))


def write_config(path: Path, identities: dict[str, Identity], endpoints: dict[str, Endpoint], timeout_s: float, connect_timeout_s: float) -> None:
    """Write a session file (used for local runs and by ``privmed certs``)."""
    lines = ["[session]", f'ca = "{identities["dealer"].ca}"', f"timeout_s = {timeout_s}", f"connect_timeout_s = {connect_timeout_s}", ""]
    for role in ROLES:
        ident = identities[role]
        lines += [f"[{role}]", f'cert = "{ident.cert}"', f'key = "{ident.key}"']
        if role in endpoints:
            ep = endpoints[role]
            lines += [f'host = "{ep.host}"', f"port = {ep.port}"]
            if ep.port_file:
                lines.append(f'port_file = "{ep.port_file}"')
        lines.append("")
    path.write_text("\n".join(lines))
