"""Where the PACS is and who we are to it: ``PacsConfig`` from flags or a TOML ``[pacs]`` table.

TOML (the session file of ``privmed party`` may hold it, or a file of its own)::

    [pacs]
    host = "pacs.hospital.local"   # DNS name or IP address
    port = 11112                   # DICOM port (DIMSE)
    aet = "ORTHANC"                # the PACS's AE title (called)
    calling_aet = "PRIVMED"        # ours; the PACS must know it for C-GET/C-STORE if it checks
    timeout = 30                   # seconds for connecting and for every DIMSE response
    # tls_ca = "ca.pem"            # DICOM TLS (PS3.15 B.9): CA that signed the PACS certificate
    # tls_cert = "me.pem"          # our client certificate and key, if the PACS wants one
    # tls_key = "me.key"
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from privmed.errors import ConfigError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

__all__ = ["PacsConfig", "parse_address", "load_pacs_config"]


@dataclass(frozen=True)
class PacsConfig:
    """A DIMSE peer: ``aet@host:port``, our ``calling_aet``, a deadline and optional TLS files."""

    host: str
    port: int
    aet: str = "ORTHANC"
    calling_aet: str = "PRIVMED"
    timeout_s: float = 30.0
    tls_ca: Path | None = None
    tls_cert: Path | None = None
    tls_key: Path | None = None

    def __post_init__(self) -> None:
        for name in ("aet", "calling_aet"):
            value = getattr(self, name)
            if not 0 < len(value) <= 16 or not value.isascii() or "\\" in value:
                raise ConfigError(f"PACS {name} {value!r}: expected 1-16 ASCII characters (a DICOM AE title)")
        if not 0 < self.port < 65536:
            raise ConfigError(f"PACS port {self.port}: expected 1-65535")
        if not self.timeout_s > 0:
            raise ConfigError(f"PACS timeout {self.timeout_s}: expected a positive number of seconds")

    @property
    def name(self) -> str:
        """How the PACS is named in every message: ``AET@host:port``."""
        return f"{self.aet}@{self.host}:{self.port}"


def parse_address(text: str) -> tuple[str, int]:
    """``host:port`` -> (host, port); ``[v6]:port`` accepted."""
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise ConfigError(f"--pacs {text!r}: expected HOST:PORT, e.g. 127.0.0.1:4242")
    return host.strip("[]"), int(port)


def load_pacs_config(path: Path) -> PacsConfig:
    """The ``[pacs]`` table of a TOML file (see the module docstring)."""
    try:
        data: dict[str, Any] = tomllib.loads(Path(path).read_text())
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read the PACS configuration ({exc.strerror})") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML ({exc})") from None
    table = data.get("pacs")
    if not isinstance(table, dict):
        raise ConfigError(f"{path}: no [pacs] table (host, port, aet, calling_aet, timeout)")
    unknown = sorted(set(table) - {"host", "port", "aet", "calling_aet", "timeout", "tls_ca", "tls_cert", "tls_key"})
    if unknown:
        raise ConfigError(f"{path}: [pacs] has unknown keys {', '.join(unknown)}")
    if "host" not in table or "port" not in table:
        raise ConfigError(f"{path}: [pacs] needs host and port")
    base = Path(path).parent

    def file(key: str) -> Path | None:
        return (base / str(table[key])) if key in table else None

    try:
        return PacsConfig(
            host=str(table["host"]), port=int(table["port"]), aet=str(table.get("aet", "ORTHANC")),
            calling_aet=str(table.get("calling_aet", "PRIVMED")), timeout_s=float(table.get("timeout", 30.0)),
            tls_ca=file("tls_ca"), tls_cert=file("tls_cert"), tls_key=file("tls_key"),
        )  # fmt: skip
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{path}: [pacs]: {exc}") from None
