"""TCP + mutual TLS 1.3 transport.

Both ends present a certificate signed by the session CA (``privmed.crypto.certs``); each side
checks that the peer's certificate names the role it expects (``data-owner``, ``model-owner``,
``dealer``). A certificate from another CA fails the handshake: the connection is refused.

Each ``TlsChannel`` owns one I/O thread that does every SSL call (OpenSSL objects are not used
from two threads) with a non-blocking socket: it writes queued frames and reads into a bounded
buffer, so two parties can send large messages to each other at once without deadlock, and a
party that reads slowly pushes back on its sender through TCP.

The listening side (binding, handshakes in threads, refusals) is ``net.tls_listen``.
"""

from __future__ import annotations

import select
import socket
import ssl
import threading
import time
from collections import deque
from typing import Any

from privmed.crypto.certs import Identity
from privmed.errors import ConfigError, PeerError, PrivmedError, ProtocolError
from privmed.net.channel import DEFAULT_TIMEOUT_S, Channel, FailureGroup
from privmed.net.frame import HEADER_BYTES, MAX_PAYLOAD, unpack_header

READ_CHUNK = 1 << 20  # bytes handed to one SSL write
MAX_BUFFERED = 256 << 20  # stop reading complete frames beyond this (TCP backpressure)
MAX_QUEUED = 256 << 20  # a sender blocks (bounded by its deadline) beyond this many unsent bytes


def tls_context(identity: Identity, server: bool) -> ssl.SSLContext:
    """TLS 1.3 only, this party's certificate and key, peers verified against the CA."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER if server else ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    try:
        ctx.load_cert_chain(str(identity.cert), str(identity.key))
        ctx.load_verify_locations(str(identity.ca))
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(f"cannot load TLS files for {identity.name} ({identity.cert}, {identity.key}, {identity.ca}): {exc}") from exc
    ctx.verify_mode = ssl.CERT_REQUIRED
    if not server:
        ctx.check_hostname = True
    return ctx


def peer_role(sock: ssl.SSLSocket) -> str:
    """The role a connected peer's certificate names (its common name), or \"?\"."""
    cert: Any = sock.getpeercert() or {}
    for field in cert.get("subject", ()):
        for key, value in field:
            if key == "commonName":
                return str(value)
    return "?"


def connect(identity: Identity, peer: str, host: str, port: int, timeout_s: float) -> ssl.SSLSocket:
    """Connect to ``peer`` at host:port, retrying (bounded by ``timeout_s``) while it is not up."""
    ctx = tls_context(identity, server=False)
    deadline = time.monotonic() + timeout_s
    delay = 0.05
    last = "no attempt"
    while time.monotonic() < deadline:
        try:
            raw = socket.create_connection((host, port), timeout=max(0.5, min(10.0, deadline - time.monotonic())))
        except OSError as exc:
            last = exc.strerror or str(exc)
            time.sleep(min(delay, max(0.0, deadline - time.monotonic())))
            delay = min(delay * 2, 1.0)
            continue
        try:
            return ctx.wrap_socket(raw, server_hostname=peer)
        except ssl.SSLCertVerificationError as exc:
            raw.close()
            raise PeerError(f"{peer} at {host}:{port} presented a certificate not valid for the session CA/role: {exc.verify_message}") from exc
        except (TimeoutError, ConnectionError, ssl.SSLEOFError) as exc:
            # the listener was busy or dropped us before answering: retry within the budget
            raw.close()
            last = f"TLS handshake did not complete: {exc}"
            time.sleep(min(delay, max(0.0, deadline - time.monotonic())))
            delay = min(delay * 2, 1.0)
        except (ssl.SSLError, OSError) as exc:
            raw.close()
            raise PeerError(f"TLS handshake with {peer} at {host}:{port} failed (is our certificate from the session CA?): {exc}") from exc
    raise PeerError(f"{peer} is not reachable at {host}:{port} after {timeout_s:.0f}s ({last})")


class TlsChannel(Channel):
    """A ``Channel`` over one TLS socket, driven by a private I/O thread."""

    def __init__(
        self,
        me: str,
        peer: str,
        session: bytes,
        sock: ssl.SSLSocket,
        timeout_s: float = DEFAULT_TIMEOUT_S,
        group: FailureGroup | None = None,
    ) -> None:
        super().__init__(me, peer, session, timeout_s)
        self.group = group or FailureGroup()
        # the largest frame this end accepts; a service lowers it so that one peer cannot make
        # the process allocate what every other session needs (checked before allocating)
        self.max_frame = MAX_PAYLOAD
        self._sock = sock
        # small protocol messages must not wait for Nagle + delayed ACK (~40 ms per round)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.setblocking(False)
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._lock = threading.Condition()
        self._out: deque[memoryview] = deque()
        self._queued = 0
        self._frames: deque[tuple[bytes, bytearray]] = deque()  # complete (header, payload)
        self._buffered = 0
        self._hdr = bytearray(HEADER_BYTES)
        self._hdr_got = 0
        self._payload: bytearray | None = None
        self._payload_got = 0
        self._pending: bytearray | None = None
        self._eof = False
        self._read_error: BaseException | None = None
        self._error: BaseException | None = None
        self._closing = False
        self._idle = False  # the I/O thread is (about to be) blocked in select: wake it
        self._reader_full = False  # reading paused at MAX_BUFFERED: wake it when space frees
        self.group.register(self._lock)
        self._thread = threading.Thread(target=self._io_loop, name=f"tls-{me}->{peer}", daemon=True)
        self._thread.start()

    def alive(self) -> bool:
        """The peer has neither closed, failed nor aborted (as far as read so far)."""
        with self._lock:
            return not (self._eof or self._error is not None or self.group.reason)

    def move_to_group(self, group: FailureGroup) -> None:
        """Make this channel part of ``group`` (a dealer service pairs two connections that
        arrived separately into one session: an abort on either then wakes both)."""
        self.group = group
        group.register(self._lock)

    # -- I/O thread --------------------------------------------------------------
    def _io_loop(self) -> None:
        view = memoryview(bytearray(0))
        try:
            while True:
                with self._lock:
                    want_write = bool(self._out)
                    buffered = self._buffered
                    closing = self._closing
                    want_read = not self._eof and buffered < MAX_BUFFERED
                    self._reader_full = not want_read
                    self._idle = True
                if closing and not want_write:
                    return
                rlist = [self._wake_r] + ([self._sock] if want_read else [])
                wlist = [self._sock] if want_write else []
                if not (want_read and self._sock.pending()):
                    select.select(rlist, wlist, [], 1.0)
                with self._lock:
                    self._idle = False
                try:
                    while self._wake_r.recv(4096):
                        pass
                except (BlockingIOError, InterruptedError):
                    pass
                if want_read:
                    self._read_some(view)
                if want_write:
                    self._write_some()
        except BaseException as exc:  # noqa: BLE001 - reported to the waiting caller
            if not self.finished:
                self.group.note_lost(self.peer)
            with self._lock:
                self._error = exc
                self._lock.notify_all()

    def _read_some(self, view: memoryview) -> None:
        """Read whatever is available straight into the current frame's buffers."""
        for _ in range(256):
            if self._payload is None:
                target = memoryview(self._hdr)[self._hdr_got :]
            else:
                target = memoryview(self._payload)[self._payload_got :]
            try:
                n = self._sock.recv_into(target) if len(target) else 0
            except (ssl.SSLWantReadError, ssl.SSLWantWriteError, BlockingIOError):
                return
            except (ssl.SSLError, OSError) as exc:
                self._read_error = exc
                n = -1
            if n <= 0 and len(target):
                if not self.finished:
                    self.group.note_lost(self.peer)
                with self._lock:
                    self._eof = True
                    self._lock.notify_all()
                return
            if self._payload is None:
                self._hdr_got += n
                if self._hdr_got < HEADER_BYTES:
                    continue
                try:
                    hdr = unpack_header(bytes(self._hdr))  # validated before allocating
                except ProtocolError as exc:
                    raise ProtocolError(f"{self.peer} sent a bad frame header: {exc} (during {self.step})") from None
                if hdr.length > self.max_frame:
                    raise ProtocolError(f"{self.peer} sent a frame of {hdr.length} bytes (tag {hdr.tag!r}); "
                                        f"at most {self.max_frame} are accepted here (during {self.step})")
                self._payload, self._payload_got = bytearray(hdr.length), 0
            else:
                self._payload_got += n
            if self._payload_got == len(self._payload):
                if bytes(self._hdr[32:64]).rstrip(b"\0") == b"abort":  # tell the party's other waits
                    reason = bytes(self._payload).decode("utf-8", "replace")
                    self.group.fail(f"{self.peer} aborted the session: {reason}")
                with self._lock:
                    self._frames.append((bytes(self._hdr), self._payload))
                    self._buffered += len(self._payload) + HEADER_BYTES
                    self._lock.notify_all()
                self._payload, self._hdr_got = None, 0
                if self._buffered > MAX_BUFFERED:
                    return

    def _write_some(self) -> None:
        while True:
            with self._lock:
                if not self._out:
                    self._lock.notify_all()
                    return
                head = self._out[0]
            try:
                sent = self._sock.send(head[:READ_CHUNK])
            except (ssl.SSLWantWriteError, ssl.SSLWantReadError, BlockingIOError):
                return
            with self._lock:
                self._queued -= sent
                if sent >= len(head):
                    self._out.popleft()
                else:
                    self._out[0] = head[sent:]
                self._lock.notify_all()

    # -- Channel hooks -------------------------------------------------------------
    def _put(self, header: bytes, payload: memoryview) -> None:
        deadline = time.monotonic() + self.timeout_s
        with self._lock:
            while self._queued > MAX_QUEUED:
                if self.group.reason:  # a peer's abort explains the failure better than EOF
                    raise PeerError(self.group.reason)
                if self._error is not None or self._eof:
                    raise self._io_failure()
                if time.monotonic() > deadline:
                    raise PeerError(f"{self.peer} stopped reading for {self.timeout_s:.0f}s (during {self.step})")
                self._lock.wait(0.5)
            if self.group.reason:
                raise PeerError(self.group.reason)
            if self._error is not None or self._eof:
                raise self._io_failure()
            self._out.append(memoryview(header))
            self._queued += len(header) + len(payload)
            if len(payload):
                self._out.append(payload)
            wake = self._idle
        if wake:  # a wake-up costs a syscall and a GIL hand-over: only when needed
            self._wake()

    def _get_header(self, deadline: float) -> bytes:
        with self._lock:
            while not self._frames:
                if self.group.reason:  # this peer's own abort/EOF, or another peer's
                    raise PeerError(self.group.reason)
                if self._error is not None or self._eof:
                    raise self._io_failure()
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise self._timeout_error("a message")
                self._lock.wait(min(remaining, 1.0))
            header, self._pending = self._frames.popleft()
            self._buffered -= len(self._pending) + HEADER_BYTES
            wake = self._reader_full and self._buffered < MAX_BUFFERED
        if wake:  # reading had paused on a full buffer
            self._wake()
        return header

    def _io_failure(self) -> PrivmedError:
        """Why the I/O thread stopped: a header it refused, or the connection's end."""
        if isinstance(self._error, ProtocolError):
            return ProtocolError(str(self._error))
        return self._lost_error()

    def _lost_error(self) -> PeerError:
        exc = self._read_error
        text = str(exc).upper() if exc else ""
        if isinstance(exc, ssl.SSLError) and ("ALERT" in text or "CERTIFICATE" in text):
            # TLS 1.3: the server checks our certificate after the client's handshake returned,
            # so a refusal arrives as an alert on the first read
            reason = getattr(exc, "reason", None) or str(exc)
            return PeerError(
                f"{self.peer} refused the TLS connection ({reason}): is this party's certificate "
                f"signed by the session CA and issued for its role? (during {self.step})"
            )
        return PeerError(f"lost connection to {self.peer} (during {self.step}){self.group.earlier_losses(self.peer)}")

    def _wake(self) -> None:
        try:
            self._wake_w.send(b"x")
        except OSError:
            pass

    def _get_payload(self, nbytes: int, deadline: float) -> bytearray:
        payload, self._pending = self._pending, None
        assert payload is not None and len(payload) == nbytes
        return payload

    def flush(self, timeout_s: float = 30.0) -> None:
        """Wait until every queued frame has been handed to the kernel."""
        deadline = time.monotonic() + timeout_s
        with self._lock:
            while self._out and self._error is None:
                if time.monotonic() > deadline:
                    raise self._timeout_error("(flush)")
                self._lock.wait(0.5)

    def close(self, flush_s: float | None = None) -> None:
        self.finished = True
        try:
            self.flush(timeout_s=self.timeout_s if flush_s is None else flush_s)
        except PeerError:
            pass
        with self._lock:
            self._closing = True
        try:
            self._wake_w.send(b"x")
        except OSError:
            pass
        self._thread.join(timeout=1.0 if flush_s is not None else 5.0)
        for s in (self._sock, self._wake_r, self._wake_w):
            try:
                s.close()
            except OSError:
                pass
