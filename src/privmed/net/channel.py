"""A ``Channel`` carries checked, framed numpy arrays to one peer.

``send`` never blocks on the peer (frames go to a sender thread or queue), so two parties can
exchange large messages at the same time without deadlock. ``recv`` states what it expects
and has a deadline; a silent, dead or misbehaving peer raises ``PeerError`` / ``ProtocolError``
naming the peer and the current step (``channel.step``, set by the runtime per layer).
"""

from __future__ import annotations

import math
import queue
import threading
import time
from dataclasses import dataclass, field

import numpy as np

from privmed.errors import PeerError
from privmed.net.frame import HEADER_BYTES, Header, check_header, pack_header, unpack_header
from privmed.ring.fixed import pack, unpack, wire_len

DEFAULT_TIMEOUT_S = 60.0


class FailureGroup:
    """Shared by one party's channels: the first ``abort`` any of them receives wakes every
    wait on every channel of that party, so a party blocked on one peer learns at once that
    another peer gave up, and reports that peer's reason (which names the peer at fault).

    A lost connection is reported by the channel it happens on only: a peer that closes after
    its last message is normal, and the peer that saw the loss mid-session sends ``abort``."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.reason: str | None = None
        self._conds: list[threading.Condition] = []
        self.lost_at: dict[str, float] = {}  # peer -> monotonic time its connection dropped

    def note_lost(self, peer: str) -> None:
        """Record (once) when a connection dropped before the protocol was done with it.

        It does not fail the group (see the class docstring); it lets a later error on another
        channel say which peer went first: when a peer dies, the party that saw it aborts and
        closes, and a third party may see that close before (or instead of) the abort frame.
        """
        with self._lock:
            self.lost_at.setdefault(peer, time.monotonic())

    def earlier_losses(self, peer: str) -> str:
        """``"; data-owner had disconnected 0.3 s before"`` for peers lost before ``peer``."""
        with self._lock:
            mine = self.lost_at.get(peer, time.monotonic())
            earlier = sorted((t, p) for p, t in self.lost_at.items() if p != peer and t <= mine)
        return "".join(f"; {p} had disconnected {mine - t:.1f} s before" for t, p in earlier)

    def register(self, cond: threading.Condition) -> None:
        with self._lock:
            self._conds.append(cond)

    def fail(self, reason: str) -> None:
        with self._lock:
            if self.reason is not None:
                return
            self.reason = reason
            conds = list(self._conds)
        for cond in conds:
            with cond:
                cond.notify_all()


@dataclass
class Counters:
    bytes_sent: int = 0
    bytes_recv: int = 0
    messages_sent: int = 0
    messages_recv: int = 0
    wait_s: float = 0.0
    by_step: dict[str, int] = field(default_factory=dict)


class Channel:
    """Base class: framing, checking and counting; subclasses move bytes."""

    def __init__(self, me: str, peer: str, session: bytes, timeout_s: float = DEFAULT_TIMEOUT_S) -> None:
        self.me = me
        self.peer = peer
        self.session = session
        self.timeout_s = timeout_s
        self.step = "session setup"
        self.counters = Counters()
        self._send_seq = 0
        self._recv_seq = 0
        self.finished = False  # no further message expected from the peer: EOF is normal

    # -- transport hooks -------------------------------------------------------------
    def _put(self, header: bytes, payload: memoryview) -> None:
        raise NotImplementedError

    def _get_header(self, deadline: float) -> bytes:
        raise NotImplementedError

    def _get_payload(self, nbytes: int, deadline: float) -> bytearray:
        raise NotImplementedError

    def close(self, flush_s: float | None = None) -> None:
        """Release the transport (idempotent); wait at most ``flush_s`` for unsent data."""

    def finish(self) -> None:
        """Mark that the protocol expects nothing more from the peer."""
        self.finished = True

    # -- public API ------------------------------------------------------------------
    def send(self, tag: str, arr: np.ndarray) -> None:
        arr = np.ascontiguousarray(arr)
        header = pack_header(self.session, self._send_seq, tag, arr)
        self._send_seq += 1
        self._put(header, arr.data.cast("B") if arr.nbytes else memoryview(b""))
        nbytes = HEADER_BYTES + arr.nbytes
        self.counters.bytes_sent += nbytes
        self.counters.messages_sent += 1
        self.counters.by_step[self.step] = self.counters.by_step.get(self.step, 0) + nbytes

    def recv(
        self,
        tag: str,
        dtype: np.dtype | type,
        shape: tuple[int, ...] | None,
        timeout_s: float | None = None,
        max_bytes: int | None = None,
    ) -> np.ndarray:
        """Receive the next message, which must be ``tag`` of ``dtype`` and ``shape`` (or, with
        shape None, at most ``max_bytes``); the header is checked before the payload is read."""
        timeout = self.timeout_s if timeout_s is None else timeout_s
        start = time.monotonic()
        deadline = start + timeout
        hdr: Header = unpack_header(self._get_header(deadline))
        check_header(
            hdr, peer=self.peer, session=self.session, seq=self._recv_seq, tag=tag, dtype=np.dtype(dtype), shape=shape,
            max_bytes=max_bytes,
        )
        payload = self._get_payload(hdr.length, deadline)
        self._recv_seq += 1
        self.counters.bytes_recv += HEADER_BYTES + hdr.length
        self.counters.messages_recv += 1
        self.counters.wait_s += time.monotonic() - start
        if hdr.tag == "abort" and tag != "abort":
            reason = bytes(payload).decode("utf-8", "replace")
            raise PeerError(f"{self.peer} aborted the session: {reason}")
        return np.frombuffer(payload, dtype=hdr.dtype).reshape(hdr.shape)

    def send_ring(self, tag: str, arr: np.ndarray, bits: int = 64) -> None:
        """Send ring elements of Z_2^bits: uint64 as is for 64 bits, else packed at bits / 8
        bytes each (``privmed.ring.fixed.pack``: only the value mod 2^bits is sent)."""
        self.send(tag, arr if bits == 64 else pack(arr, bits))

    def recv_ring(self, tag: str, shape: tuple[int, ...], bits: int = 64, timeout_s: float | None = None) -> np.ndarray:
        """Receive exactly ``shape`` ring elements of Z_2^bits sent by ``send_ring`` (uint64,
        each below 2^bits); the frame must have exactly the packed length."""
        if bits == 64:
            return self.recv(tag, np.uint64, shape, timeout_s)
        count = math.prod(shape)
        return unpack(self.recv(tag, np.uint8, (wire_len(count, bits),), timeout_s), bits, count).reshape(shape)

    def send_text(self, tag: str, text: str) -> None:
        self.send(tag, np.frombuffer(text.encode("utf-8"), dtype=np.uint8))

    def recv_text(self, tag: str, max_bytes: int, timeout_s: float | None = None) -> str:
        """A UTF-8 text message of at most ``max_bytes``."""
        return bytes(self.recv(tag, np.uint8, None, timeout_s, max_bytes=max_bytes)).decode("utf-8", "replace")

    def abort(self, reason: str) -> None:
        """Tell the peer this party is giving up (best effort)."""
        try:
            self.send_text("abort", reason[:2000])
        except Exception:  # noqa: BLE001 - the peer may already be gone
            pass

    def _timeout_error(self, what: str) -> PeerError:
        return PeerError(
            f"{self.peer} did not send {what} within {self.timeout_s:.0f}s (during {self.step})"
        )

    def _lost_error(self) -> PeerError:
        return PeerError(f"lost connection to {self.peer} (during {self.step})")


class InProcessChannel(Channel):
    """Thread-to-thread transport over queues (tests). Frames are real packed bytes."""

    def __init__(self, me: str, peer: str, session: bytes, outbox: queue.Queue, inbox: queue.Queue, timeout_s: float) -> None:
        super().__init__(me, peer, session, timeout_s)
        self._outbox = outbox
        self._inbox = inbox
        self._pending_payload: bytes | None = None
        self._closed = threading.Event()

    def _put(self, header: bytes, payload: memoryview) -> None:
        self._outbox.put((header, bytes(payload)))

    def _get_header(self, deadline: float) -> bytes:
        try:
            item = self._inbox.get(timeout=max(0.0, deadline - time.monotonic()))
        except queue.Empty:
            raise self._timeout_error("a message") from None
        if item is None:
            raise self._lost_error()
        header, payload = item
        self._pending_payload = payload
        return header

    def _get_payload(self, nbytes: int, deadline: float) -> bytearray:
        payload, self._pending_payload = self._pending_payload, None
        assert payload is not None and len(payload) == nbytes
        return bytearray(payload)

    def close(self, flush_s: float | None = None) -> None:
        if not self._closed.is_set():
            self._closed.set()
            self._outbox.put(None)


def in_process_pair(a: str, b: str, session: bytes, timeout_s: float = DEFAULT_TIMEOUT_S) -> tuple[Channel, Channel]:
    """Two connected in-process channels (a's end, b's end)."""
    q_ab: queue.Queue = queue.Queue()
    q_ba: queue.Queue = queue.Queue()
    return (
        InProcessChannel(a, b, session, q_ab, q_ba, timeout_s),
        InProcessChannel(b, a, session, q_ba, q_ab, timeout_s),
    )
