"""The service file of a long-running model owner or dealer (``privmed serve``).

Example ``service.toml`` (paths are relative to the file)::

    [service]
    host = "10.0.0.2"          # address to listen on (an address of this host)
    port = 7100
    ca = "ca.pem"              # the CA that signed every party's certificate
    cert = "model-owner.pem"   # this service's own certificate: its role must be the service's
    key = "model-owner.key"
    max_sessions = 4           # sessions at once; beyond that a client is refused as busy
    max_sessions_per_peer = 2  # optional: at most this many for one certificate (default max_sessions)
    timeout_s = 60             # deadline of every receive during a session
    connect_timeout_s = 30     # handshake, request and pairing deadline
    audit_log = "audit.jsonl"  # one JSON line per session (rotation: left to the system)
    allow = ["sha256:9f1c...", "O=St Mary Hospital"]  # who may open sessions, or ["*"]
    metrics = "127.0.0.1:9100" # optional: Prometheus text format at http://.../metrics
    max_frame_mb = 1024        # optional: the largest message a peer may send (checked before
                               # allocating; sessions share the process's memory)

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

from privmed.crypto.certs import Identity
from privmed.crypto.csr import certificate_role, check_own_role
from privmed.errors import ConfigError
from privmed.runtime.config import Schema, check_table
from privmed.runtime.service_metrics import parse_address

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

SERVICE_ROLES = ("model-owner", "dealer")
_FINGERPRINT = re.compile(r"^sha256:[0-9a-f]{64}$")
# key -> (type, required); the checks below give each its range
_SERVICE_KEYS: Schema = {
    "host": (str, True), "port": (int, True), "ca": (str, True), "cert": (str, True), "key": (str, True),
    "max_sessions": (int, False), "timeout_s": ((int, float), False), "connect_timeout_s": ((int, float), False),
    "audit_log": (str, False), "allow": (list, True), "metrics": (str, False), "max_frame_mb": (int, False),
    "max_sessions_per_peer": (int, False),
}
_DEALER_KEYS: Schema = {"host": (str, True), "port": (int, True)}


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
    metrics: tuple[str, int] | None = None  # Prometheus endpoint (host, port), plain HTTP
    max_frame_bytes: int = 1 << 30  # the largest message a peer may send
    max_sessions_per_peer: int = 256  # slots one certificate may hold at once


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
    sec = check_table(raw, "service", _SERVICE_KEYS, str(path))
    base = path.parent

    def rel(p: str) -> Path:
        return Path(p) if Path(p).is_absolute() else base / p

    max_frame_mb = int(sec.get("max_frame_mb", 1024))
    if not 1 <= max_frame_mb <= 65536:
        raise ConfigError(f"{path} [service]: 'max_frame_mb' must be 1..65536, got {max_frame_mb}")
    max_sessions = int(sec.get("max_sessions", 4))
    if not 1 <= max_sessions <= 256:
        raise ConfigError(f"{path} [service]: 'max_sessions' must be 1..256, got {max_sessions}")
    per_peer = int(sec.get("max_sessions_per_peer", max_sessions))
    if not 1 <= per_peer <= max_sessions:
        raise ConfigError(f"{path} [service]: 'max_sessions_per_peer' must be 1..max_sessions ({max_sessions}), got {per_peer}")
    allow = tuple(check_allow_entry(e, str(path)) for e in sec["allow"])
    if not allow:
        raise ConfigError(f"{path} [service]: 'allow' is empty: nobody could open a session (use [\"*\"] for any certified peer)")
    identity = Identity(role, rel(sec["cert"]), rel(sec["key"]), rel(sec["ca"]))
    certificate_role(identity.cert)  # readable (the service's own file: refuse early)
    check_own_role(identity.cert, role, f"{role} service")
    dealer = None
    if role == "model-owner":
        d = check_table(raw, "dealer", _DEALER_KEYS, str(path))
        dealer = (str(d["host"]), int(d["port"]))
    return ServiceConfig(
        path, role, identity, str(sec["host"]), int(sec["port"]), max_sessions,
        float(sec.get("timeout_s", 60.0)), float(sec.get("connect_timeout_s", 30.0)),
        rel(sec["audit_log"]) if "audit_log" in sec else None, allow, dealer,
        parse_address(sec["metrics"], str(path)) if "metrics" in sec else None, max_frame_mb << 20, per_peer,
    )  # fmt: skip
