"""The service file of a long-running model owner or dealer (``privmed serve``).

Example ``service.toml`` (paths are relative to the file)::

    [service]
    host = "10.0.0.2"          # address to listen on (an address of this host)
    port = 7100
    ca = "ca.pem"              # the CA that signed every party's certificate
    cert = "model-owner.pem"   # this service's own certificate: its role must be the service's
    key = "model-owner.key"
    max_sessions = 4           # sessions at once; beyond that a client is refused as busy
    timeout_s = 60             # deadline of every receive during a session
    connect_timeout_s = 30     # handshake, request and pairing deadline
    audit_log = "audit.jsonl"  # one JSON line per session (rotation: left to the system)
    allow = ["sha256:9f1c...", "O=St Mary Hospital"]  # who may open sessions, or ["*"]

    [dealer]                   # the model owner only: where the dealer service listens
    host = "10.0.0.3"
    port = 7101

``allow`` names the peers that may open a session: at the model owner the data owners
(hospitals), at the dealer the model owners (vendors); data owners reach the dealer only with
a session id a model owner registered for their certificate. An entry is a certificate's
SHA-256 fingerprint (``privmed certs fingerprint``) or a subject organisation ``O=...``;
``"*"`` admits any certificate of the role signed by the CA. Unknown keys and wrong types are
refused, one line per file naming the key.
"""

from __future__ import annotations

import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from privmed.crypto.certs import Identity
from privmed.crypto.csr import certificate_role
from privmed.errors import ConfigError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

SERVICE_ROLES = ("model-owner", "dealer")
_FINGERPRINT = re.compile(r"^sha256:[0-9a-f]{64}$")
# key -> (type, required); the checks below give each its range
_SERVICE_KEYS: dict[str, tuple[type | tuple[type, ...], bool]] = {
    "host": (str, True), "port": (int, True), "ca": (str, True), "cert": (str, True), "key": (str, True),
    "max_sessions": (int, False), "timeout_s": ((int, float), False), "connect_timeout_s": ((int, float), False),
    "audit_log": (str, False), "allow": (list, True),
}
_DEALER_KEYS: dict[str, tuple[type | tuple[type, ...], bool]] = {"host": (str, True), "port": (int, True)}


@dataclass(frozen=True)
class ServiceConfig:
    path: Path
    role: str
    identity: Identity
    host: str
    port: int
    max_sessions: int
    timeout_s: float
    connect_timeout_s: float
    audit_log: Path | None
    allow: tuple[str, ...]
    dealer: tuple[str, int] | None  # the model owner's dealer address


def _table(raw: dict[str, Any], name: str, schema: dict[str, tuple[type | tuple[type, ...], bool]], where: str) -> dict[str, Any]:
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
    if "port" in sec and not 0 <= sec["port"] <= 65535:
        raise ConfigError(f"{where} [{name}]: 'port' must be 0..65535, got {sec['port']}")
    return sec


def _positive(sec: dict[str, Any], key: str, default: float, where: str) -> float:
    value = float(sec.get(key, default))
    if not value > 0:
        raise ConfigError(f"{where} [service]: '{key}' must be positive, got {value}")
    return value


def check_allow_entry(entry: object, where: str) -> str:
    if entry == "*" or (isinstance(entry, str) and (_FINGERPRINT.match(entry) or (entry.startswith("O=") and 2 < len(entry) <= 66))):
        return str(entry)
    raise ConfigError(f"{where} [service]: allow entry {entry!r} is not '*', 'sha256:<64 hex digits>' or 'O=<organisation>'")


def load_service_config(path: Path, role: str) -> ServiceConfig:
    """Read and check ``path`` for a ``role`` service; its own certificate must be for ``role``."""
    path = Path(path)
    try:
        raw = tomllib.loads(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"{path}: service file not found") from None
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError(f"{path}: not a valid TOML service file: {exc}") from exc
    tables = {"service", "dealer"} if role == "model-owner" else {"service"}
    extra = sorted(set(raw) - tables)
    if extra:
        raise ConfigError(f"{path}: unknown table [{extra[0]}] for a {role} service (expected {', '.join(sorted(tables))})")
    sec = _table(raw, "service", _SERVICE_KEYS, str(path))
    base = path.parent

    def rel(p: str) -> Path:
        return Path(p) if Path(p).is_absolute() else base / p

    max_sessions = int(sec.get("max_sessions", 4))
    if not 1 <= max_sessions <= 256:
        raise ConfigError(f"{path} [service]: 'max_sessions' must be 1..256, got {max_sessions}")
    allow = tuple(check_allow_entry(e, str(path)) for e in sec["allow"])
    if not allow:
        raise ConfigError(f"{path} [service]: 'allow' is empty: nobody could open a session (use [\"*\"] for any certified peer)")
    identity = Identity(role, rel(sec["cert"]), rel(sec["key"]), rel(sec["ca"]))
    own_role, org = certificate_role(identity.cert)
    if own_role != role:
        raise ConfigError(f"{identity.cert}: a certificate for {own_role!r}{f' ({org})' if org else ''}, not for {role}; "
                          f"a {role} service needs a {role} certificate")
    dealer = None
    if role == "model-owner":
        d = _table(raw, "dealer", _DEALER_KEYS, str(path))
        dealer = (str(d["host"]), int(d["port"]))
    return ServiceConfig(
        path, role, identity, str(sec["host"]), int(sec["port"]), max_sessions,
        _positive(sec, "timeout_s", 60.0, str(path)), _positive(sec, "connect_timeout_s", 30.0, str(path)),
        rel(sec["audit_log"]) if "audit_log" in sec else None, allow, dealer,
    )  # fmt: skip
