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

The file is checked against a schema (``check_table``): unknown tables or keys, missing keys,
wrong types, ports outside 0..65535 and non-positive timeouts are each refused in one line.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
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
    options: dict[str, Any] = field(default_factory=dict)  # a mode's own [session] keys (``session_schema``)


Schema = dict[str, tuple[type | tuple[type, ...], bool]]  # key -> (type, required)
_SESSION: Schema = {"ca": (str, True), "timeout_s": ((int, float), False), "connect_timeout_s": ((int, float), False)}
SESSION_SCHEMA = _SESSION  # what every [session] table may hold; a mode extends it (``load_config``)
_ROLE: Schema = {"cert": (str, True), "key": (str, True)}
_LISTENER: Schema = {**_ROLE, "host": (str, True), "port": (int, True), "port_file": (str, False)}


def check_table(raw: dict[str, Any], name: str, schema: Schema, where: str) -> dict[str, Any]:
    """Table ``[name]`` of a parsed TOML file, every key known and of its type (one line per
    problem: unknown key, missing key, wrong type, port out of range, non-positive timeout)."""
    sec = raw.get(name)
    if not isinstance(sec, dict):
        raise ConfigError(f"{where}: missing table [{name}]")
    unknown = sorted(set(sec) - set(schema))
    if unknown:
        raise ConfigError(f"{where} [{name}]: unknown key {unknown[0]!r} (expected {', '.join(schema)})")
    for key, (kind, required) in schema.items():
        if key not in sec:
            if required:
                raise ConfigError(f"{where} [{name}]: missing '{key}'")
            continue
        value = sec[key]
        if isinstance(value, bool) or not isinstance(value, kind):
            want = " or ".join(t.__name__ for t in (kind if isinstance(kind, tuple) else (kind,)))
            raise ConfigError(f"{where} [{name}]: '{key}' must be {want}, got {value!r}")
        if key == "port" and isinstance(value, int) and not 0 <= value <= 65535:
            raise ConfigError(f"{where} [{name}]: 'port' must be 0..65535, got {value}")
        if key.endswith("timeout_s") and isinstance(value, (int, float)) and not value > 0:
            raise ConfigError(f"{where} [{name}]: '{key}' must be positive, got {value}")
    return sec


def _path(base: Path, section: dict[str, Any], key: str, where: str) -> Path:
    if key not in section:
        raise ConfigError(f"{where}: missing '{key}'")
    p = Path(section[key])
    return p if p.is_absolute() else base / p


def load_config(path: Path, roles: tuple[str, ...] = ROLES, session_schema: Schema | None = None) -> SessionConfig:
    """The session file of ``roles`` (the three of the dealer mode, or data owner and model
    owner of the two-party mode); every table and key checked (``check_table``). A mode with
    keys of its own in ``[session]`` passes its ``session_schema`` (a superset of the common
    one); those keys come back in ``options``."""
    path = Path(path)
    try:
        raw = tomllib.loads(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"{path}: session file not found") from None
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError(f"{path}: not a valid TOML session file: {exc}") from exc
    base = path.parent
    if "dealer" in raw and "dealer" not in roles:
        raise ConfigError(f"{path}: a two-party session file has no [dealer] table (remove it, or run without --parties 2)")
    extra = sorted(set(raw) - {"session", *roles})
    if extra:
        raise ConfigError(f"{path}: unknown table [{extra[0]}] (expected session, {', '.join(roles)})")
    sess = check_table(raw, "session", session_schema or _SESSION, str(path))
    ca = _path(base, sess, "ca", f"{path} [session]")
    identities, endpoints = {}, {}
    for role in roles:
        sec = check_table(raw, role, _ROLE if role == "data-owner" else _LISTENER, str(path))
        where = f"{path} [{role}]"
        identities[role] = Identity(role, _path(base, sec, "cert", where), _path(base, sec, "key", where), ca)
        if role != "data-owner":
            pf = sec.get("port_file")
            endpoints[role] = Endpoint(str(sec["host"]), int(sec["port"]), (base / pf) if pf else None)
    options = {k: v for k, v in sess.items() if k not in _SESSION}
    return SessionConfig(path, identities, endpoints, float(sess.get("timeout_s", 60.0)), float(sess.get("connect_timeout_s", 30.0)), options)


def write_config(path: Path, identities: dict[str, Identity], endpoints: dict[str, Endpoint], timeout_s: float,
                 connect_timeout_s: float, roles: tuple[str, ...] = ROLES, options: dict[str, str] | None = None) -> None:
    """Write a session file of ``roles`` (used for local runs and by ``privmed certs``);
    ``options``: a mode's own ``[session]`` keys (string values)."""
    lines = ["[session]", f'ca = "{identities["data-owner"].ca}"', f"timeout_s = {timeout_s}", f"connect_timeout_s = {connect_timeout_s}"]
    lines += [f'{key} = "{value}"' for key, value in (options or {}).items()] + [""]
    for role in roles:
        ident = identities[role]
        lines += [f"[{role}]", f'cert = "{ident.cert}"', f'key = "{ident.key}"']
        if role in endpoints:
            ep = endpoints[role]
            lines += [f'host = "{ep.host}"', f"port = {ep.port}"]
            if ep.port_file:
                lines.append(f'port_file = "{ep.port_file}"')
        lines.append("")
    path.write_text("\n".join(lines))
