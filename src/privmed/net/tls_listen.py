"""The listening side of TCP + mutual TLS 1.3: bind, accept, handshake, admit or refuse.

``listening_socket`` binds (IPv4, IPv6, or a host name that must not resolve to loopback);
``Listener`` accepts the peers of one session (``privmed party``), the services of
``runtime.service`` use the same pieces for many. Every connection's TLS handshake runs in a
thread of its own within ``HANDSHAKE_S``, so a silent connection (a port scanner, a health
check) delays nobody; at most ``MAX_HANDSHAKES`` are in progress at once. A peer refused after
its handshake (another role, not on an allow-list) receives an ``abort`` frame saying why.
"""

from __future__ import annotations

import errno
import ipaddress
import socket
import ssl
import threading
import time
from collections import deque
from typing import Any

from privmed.crypto.certs import Identity
from privmed.errors import ConfigError, PeerError
from privmed.net.frame import MAX_ABORT_BYTES, pack_header
from privmed.net.tls import peer_role, tls_context

HANDSHAKE_S = 10.0  # a TLS handshake takes milliseconds; a silent connection is dropped after this
MAX_HANDSHAKES = 32  # connections in their handshake at once; beyond, new ones are closed at once
ACCEPT_POLL_S = 0.02  # how often a waiting accept looks for a finished handshake


def server_context(identity: Identity) -> ssl.SSLContext:
    """A listener's context: TLS 1.3 only, a client certificate from the CA required."""
    return tls_context(identity, server=True)


def server_handshake(ctx: ssl.SSLContext, raw: socket.socket, timeout_s: float) -> ssl.SSLSocket:
    """Run the server side of the handshake on an accepted socket within ``timeout_s`` (raises
    ``ssl.SSLError`` / ``OSError``; the caller closes ``raw``). One silent peer delays only
    the thread that runs this for it."""
    raw.settimeout(timeout_s)
    return ctx.wrap_socket(raw, server_side=True)


def peer_certificate(sock: ssl.SSLSocket) -> tuple[str, str, bytes]:
    """(role = common name, organisation or "", DER bytes) of a connected peer's certificate."""
    cert: Any = sock.getpeercert() or {}
    org = ""
    for field in cert.get("subject", ()):
        for key, value in field:
            if key == "organizationName":
                org = str(value)
    return peer_role(sock), org, sock.getpeercert(binary_form=True) or b""


def refuse(tls: ssl.SSLSocket, reason: str, linger_s: float = 2.0) -> None:
    """Send ``abort`` with ``reason`` to a peer that completed the handshake, then read (and
    drop) what it sends until it closes, for at most ``linger_s``: closing with its first
    message unread would reset the connection and could destroy the abort before it is read."""
    import numpy as np

    payload = np.frombuffer(reason.encode("utf-8")[:MAX_ABORT_BYTES], dtype=np.uint8)
    deadline = time.monotonic() + linger_s
    try:
        tls.settimeout(linger_s)
        tls.sendall(pack_header(bytes(16), 0, "abort", payload) + payload.tobytes())
        while time.monotonic() < deadline and tls.recv(4096):
            pass
    except (OSError, ssl.SSLError):
        pass
    finally:
        tls.close()


def _is_loopback_literal(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def listening_socket(name: str, host: str, port: int, backlog: int) -> socket.socket:
    """A TCP socket bound to host:port (IPv4 or IPv6 literal, or a host name) and listening.

    A host *name* that resolves to a loopback address (Debian maps the machine's own name to
    127.0.1.1) is refused: peers on other hosts could never connect. A loopback literal
    (127.0.0.1, ::1, localhost) is taken as meant."""
    try:
        family, _, _, _, sockaddr = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    except socket.gaierror as exc:
        raise ConfigError(f"{name}: cannot resolve host {host!r}: {exc.strerror}") from exc
    if not _is_loopback_literal(host) and ipaddress.ip_address(sockaddr[0]).is_loopback:
        raise ConfigError(f"{name}: host {host!r} resolves to {sockaddr[0]} (loopback) on this machine, so peers on other "
                          f"hosts could not connect; give the address of the interface they reach")
    sock = socket.socket(family, socket.SOCK_STREAM)
    # a port whose previous session is in TIME_WAIT can be reused; a live listener still
    # makes bind fail (EADDRINUSE), which is reported below
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(sockaddr)
    except OSError as exc:
        sock.close()
        if exc.errno == errno.EADDRINUSE:
            raise ConfigError(f"{name}: port {port} on {host} is already in use") from exc
        raise ConfigError(f"{name}: cannot listen on {host}:{port}: {exc.strerror}") from exc
    sock.listen(backlog)
    return sock


class Listener:
    """A bound, listening TCP socket that accepts mutually authenticated TLS peers."""

    def __init__(self, identity: Identity, host: str, port: int) -> None:
        self.identity = identity
        self._ctx = tls_context(identity, server=True)
        self._sock = listening_socket(identity.name, host, port, 8)
        self.host, self.port = self._sock.getsockname()[:2]
        self._last_refusal = ""
        self._lock = threading.Lock()
        self._ready: deque[tuple[str, str, ssl.SSLSocket]] = deque()  # (address, role, socket) handshaken
        self._handshaking = 0
        self._closed = False

    def accept(self, expected: set[str], timeout_s: float) -> tuple[str, ssl.SSLSocket]:
        """Accept one peer whose certificate names one of ``expected``; others are dropped.

        Each connection's TLS handshake runs in a thread of its own (at most
        ``MAX_HANDSHAKES`` at once, each within ``HANDSHAKE_S``), so a silent connection (a
        port scanner, a health check) does not hold up the peer that connects next."""
        deadline = time.monotonic() + timeout_s
        while True:
            with self._lock:
                while self._ready:
                    addr, name, tls = self._ready.popleft()
                    if name in expected:
                        return name, tls
                    self._last_refusal = f"{addr}: its certificate names {name!r}, expected {' or '.join(sorted(expected))}"
                    threading.Thread(target=refuse, daemon=True, args=(
                        tls, f"{self.identity.name} refused a certificate issued to {name!r}; expected {' or '.join(sorted(expected))}")).start()
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                refused = f" (refused: {self._last_refusal})" if self._last_refusal else ""
                raise PeerError(f"{' / '.join(sorted(expected))} did not connect to {self.identity.name} at {self.host}:{self.port} within {timeout_s:.0f}s{refused}")
            self._sock.settimeout(min(remaining, ACCEPT_POLL_S))
            try:
                raw, addr = self._sock.accept()
            except TimeoutError:
                continue
            with self._lock:
                full = self._handshaking >= MAX_HANDSHAKES
                if not full:
                    self._handshaking += 1
            if full:
                raw.close()
                continue
            threading.Thread(target=self._handshake, args=(raw, f"{addr[0]}:{addr[1]}", min(HANDSHAKE_S, max(1.0, remaining))),
                             daemon=True).start()

    def _handshake(self, raw: socket.socket, addr: str, timeout_s: float) -> None:
        try:
            tls = server_handshake(self._ctx, raw, timeout_s)
        except (ssl.SSLError, OSError) as exc:
            raw.close()  # e.g. certificate not signed by the session CA, or silent: refused
            self._last_refusal = f"{addr}: {getattr(exc, 'reason', None) or exc}"
            return
        finally:
            with self._lock:
                self._handshaking -= 1
        with self._lock:
            if self._closed:
                tls.close()
                return
            self._ready.append((addr, peer_role(tls), tls))

    def close(self) -> None:
        with self._lock:
            self._closed = True
            ready, self._ready = list(self._ready), deque()
        for _addr, _name, tls in ready:  # connected after the session had its peers
            tls.close()
        self._sock.close()
