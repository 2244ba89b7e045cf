"""Long-running services: accept sessions from many peers, each in its own thread.

``Service`` owns the listening socket and what every role's service shares:

- each accepted TCP connection gets its own thread, which runs the TLS handshake within
  ``min(connect_timeout_s, HANDSHAKE_S)``: a silent connection (a port scanner, a health check)
  delays nobody else; at most ``max_connections`` connection threads exist at once, further
  connections are closed at once;
- the peer's certificate is admitted by role (its common name; TLS already checked the CA)
  and by the allow-list (fingerprint or organisation), otherwise it receives an ``abort`` that
  says why;
- at most ``max_sessions`` sessions hold a slot (``reserve``); beyond that the peer receives a
  ``busy`` reply at once;
- ``serve(stop)`` returns after ``stop`` is set and every running session ended: new requests
  meanwhile get a ``shutting-down`` reply (graceful shutdown on SIGTERM);
- one JSON line per session in the audit log (``AuditLog``).

Isolation: a session is a thread with its own channels, ``FailureGroup``, deadlines and PRG
seeds; an exception, a hang (the receive deadline) or a bad frame ends that session's thread
only. Sessions share the process (its memory and the compiled models, read-only), so the CPU
time and peak memory in a session's stats are the process's, not the session's.
The role-specific handlers are in ``runtime.service_roles``.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import socket
import ssl
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from privmed.crypto.csr import fingerprint_der
from privmed.errors import ConfigError
from privmed.net.tls_listen import (
    HANDSHAKE_S,
    listening_socket,
    peer_certificate,
    refuse,
    server_context,
    server_handshake,
)
from privmed.runtime.service_config import ServiceConfig

log = logging.getLogger(__name__)
ACCEPT_POLL_S = 0.2  # how often the accept loop looks at the stop flag


@dataclass(frozen=True)
class PeerId:
    """Who is on the other end, from its certificate (checked by TLS against the CA)."""

    role: str
    org: str
    fingerprint: str  # sha256:<hex> of the DER certificate
    address: str

    def audit(self) -> dict[str, str]:
        return {"role": self.role, "org": self.org, "fingerprint": self.fingerprint, "address": self.address}

    def label(self) -> str:
        return f"{self.role} {self.org!r} ({self.fingerprint[:19]}) from {self.address}"


def allowed(peer: PeerId, allow: tuple[str, ...]) -> bool:
    return any(e == "*" or e == peer.fingerprint or (e.startswith("O=") and e[2:] == peer.org) for e in allow)


class AuditLog:
    """Append one JSON object per line; the file is opened per line, so a rotation by the
    system (logrotate without copytruncate) takes effect at the next session."""

    def __init__(self, path: Path | None, on_record: Callable[[dict[str, Any]], None] | None = None) -> None:
        self.path = path
        self.on_record = on_record
        self._lock = threading.Lock()
        if path is not None:
            try:
                path.parent.mkdir(parents=True, exist_ok=True)
                with path.open("a"):
                    pass
            except OSError as exc:
                raise ConfigError(f"{path}: cannot write the audit log: {exc.strerror}") from exc

    def write(self, record: dict[str, Any]) -> None:
        line = json.dumps(record, sort_keys=True)
        with self._lock:
            if self.on_record:  # first: once the line is in the file, the metrics count it too
                self.on_record(record)
            if self.path is not None:
                try:
                    with self.path.open("a") as fh:
                        fh.write(line + "\n")
                except OSError as exc:  # the session itself is over; say so, keep serving
                    log.error("cannot append to the audit log %s: %s", self.path, exc)


def now_iso() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="milliseconds")


Handler = Callable[["Service", PeerId, ssl.SSLSocket], None]


class Service:
    """The listening side of a ``model-owner`` or ``dealer`` service (see the module docstring).

    ``admit(peer)`` returns None or (code, reason) for a peer that completed the handshake;
    ``handler`` then owns the TLS socket (and closes it)."""

    def __init__(self, cfg: ServiceConfig, admit: Callable[[PeerId], tuple[str, str] | None], handler: Handler,
                 audit: AuditLog) -> None:
        self.cfg = cfg
        self.audit = audit
        self._admit = admit
        self._handler = handler
        self._ctx = server_context(cfg.identity)
        self._lock = threading.Lock()
        self.active = 0  # sessions holding a slot
        self._per_peer: dict[str, int] = {}  # certificate fingerprint -> slots it holds
        self._connections = 0
        self.max_connections = 3 * cfg.max_sessions + 32
        self.draining = False
        self._sock = listening_socket(f"{cfg.role} service", cfg.host, cfg.port, 64)
        self.port = int(self._sock.getsockname()[1])

    # -- slots -----------------------------------------------------------------------
    def reserve(self, peer: PeerId) -> tuple[str, str] | None:
        """Take a session slot for ``peer``, or (code, reason) why not (atomic with the drain
        check). No certificate holds more than ``max_sessions_per_peer`` slots, so one hospital
        submitting in parallel cannot starve the others."""
        with self._lock:
            if self.draining:
                return "shutting-down", f"{self.cfg.role} service is shutting down; try again later"
            if self.active >= self.cfg.max_sessions:
                return "busy", f"{self.cfg.role} service is busy ({self.active} of {self.cfg.max_sessions} sessions running); try again later"
            mine = self._per_peer.get(peer.fingerprint, 0)
            if mine >= self.cfg.max_sessions_per_peer:
                return "busy", (f"{self.cfg.role} service is busy for this certificate ({mine} of at most "
                                f"{self.cfg.max_sessions_per_peer} sessions per peer running); try again later")
            self.active += 1
            self._per_peer[peer.fingerprint] = mine + 1
            return None

    def release(self, peer: PeerId) -> None:
        with self._lock:
            self.active -= 1
            left = self._per_peer.pop(peer.fingerprint) - 1
            if left:
                self._per_peer[peer.fingerprint] = left

    # -- accept loop -----------------------------------------------------------------
    def serve(self, stop: threading.Event) -> None:
        """Accept connections until ``stop`` is set, then refuse new sessions and return once
        the running ones have ended (their own deadlines bound how long that takes)."""
        self._sock.settimeout(ACCEPT_POLL_S)
        try:
            while True:
                with self._lock:
                    if stop.is_set():
                        self.draining = True
                    if self.draining and self.active == 0:
                        return
                try:
                    raw, addr = self._sock.accept()
                except (TimeoutError, InterruptedError):
                    continue
                except OSError as exc:  # e.g. EMFILE: keep serving the sessions that run
                    log.warning("accept failed: %s", exc)
                    time.sleep(ACCEPT_POLL_S)
                    continue
                with self._lock:
                    full = self._connections >= self.max_connections
                    if not full:
                        self._connections += 1
                if full:
                    raw.close()
                    continue
                threading.Thread(target=self._connection, args=(raw, f"{addr[0]}:{addr[1]}"), daemon=True,
                                 name=f"{self.cfg.role}-conn-{addr[1]}").start()
        finally:
            self._sock.close()

    def _connection(self, raw: socket.socket, address: str) -> None:
        try:
            try:
                tls = server_handshake(self._ctx, raw, min(self.cfg.connect_timeout_s, HANDSHAKE_S))
            except (ssl.SSLError, OSError) as exc:
                raw.close()
                log.info("%s: TLS handshake failed: %s", address, getattr(exc, "reason", None) or exc)
                return
            role, org, der = peer_certificate(tls)
            peer = PeerId(role, org, fingerprint_der(der), address)
            refusal = self._admit(peer)
            if refusal is not None:
                code, reason = refusal
                self.audit.write({"time": now_iso(), "service": self.cfg.role, "peer": peer.audit(),
                                  "outcome": "refused", "code": code, "error": reason})
                refuse(tls, reason)
                return
            self._handler(self, peer, tls)
        except Exception:  # noqa: BLE001 - a bug in one connection must not end the service
            log.exception("connection from %s failed", address)
        finally:
            with self._lock:
                self._connections -= 1
