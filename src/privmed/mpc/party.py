"""The party context passed explicitly to every protocol (no global state)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from privmed.net.channel import Channel

if TYPE_CHECKING:
    from privmed.mpc.correlation.source import CorrelationSource

DATA_OWNER, MODEL_OWNER = 0, 1
ROLE_NAMES = {DATA_OWNER: "data-owner", MODEL_OWNER: "model-owner"}


@dataclass
class Party:
    """One computing party's view of a session."""

    index: int
    peer: Channel
    source: CorrelationSource
    rounds: int = 0
    round_log: dict[str, int] = field(default_factory=dict)
    ring_bits: int = 64  # the shares' ring Z_2^l (the plan's ``ring_bits``)

    @property
    def is_data_owner(self) -> bool:
        return self.index == DATA_OWNER

    def exchange(self, tag: str, mine: np.ndarray) -> np.ndarray:
        """Send ``mine`` and receive the peer's array of the same shape/dtype (one round)."""
        self.peer.send(tag, mine)
        theirs = self.peer.recv(tag, mine.dtype, mine.shape)
        self.rounds += 1
        return theirs

    def exchange_ring(self, tag: str, mine: np.ndarray, bits: int | None = None) -> np.ndarray:
        """Send ``mine`` (elements of Z_2^bits, by default the session's ring) and receive the
        peer's of the same shape, each packed at ceil(bits / 8) bytes (one round)."""
        bits = self.ring_bits if bits is None else bits
        self.peer.send_ring(tag, mine, bits)
        theirs = self.peer.recv_ring(tag, mine.shape, bits)
        self.rounds += 1
        return theirs

    def send_ring(self, tag: str, x: np.ndarray) -> None:
        self.peer.send_ring(tag, x, self.ring_bits)

    def recv_ring(self, tag: str, shape: tuple[int, ...]) -> np.ndarray:
        return self.peer.recv_ring(tag, shape, self.ring_bits)

    def exchange_bits(self, tag: str, bits: np.ndarray) -> np.ndarray:
        """Exchange arrays of 0/1 bits packed 8 per byte (one round)."""
        packed = np.packbits(bits.reshape(-1))
        theirs = self.exchange(tag, packed)
        return np.unpackbits(theirs, count=bits.size).reshape(bits.shape)
