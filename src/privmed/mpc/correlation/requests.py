"""One correlation request: its shapes, its message label and its PRG stream key.

Every request carries a ``StreamKey`` (batch, node index, purpose, step), and its material is
expanded from that key only. ``privmed.mpc.protocols`` numbers the requests of each node
0, 1, 2, ... in the order the node's protocols consume them, so the keys of a session are
distinct: one node index per node, one step per request of a node, one batch number per batch,
and session-wide material (the weight masks) under ``SESSION``. ``privmed.crypto.prg`` maps
distinct keys to disjoint AES counter ranges, so no two requests ever share a mask, whatever
the plan's node ids are (``tests/protocol/test_hostile_vendor.py`` checks distinctness over
whole sessions of several plans).
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import IntEnum

import numpy as np

from privmed.crypto.prg import SESSION, StreamKey
from privmed.errors import ProtocolError
from privmed.ring.linalg import ConvSpec

CHUNK = 4  # bits per comparison chunk




class Purpose(IntEnum):
    """``StreamKey.purpose``: what a stream's material is for."""

    LINEAR = 1  # data owner's input mask A and product share C0
    WEIGHT_MASK = 2  # model owner's weight mask B (fixed for the session)
    NONLINEAR = 3  # truncation / comparison material and its AND triples
    PRODUCT = 4  # Beaver triple of a secret product or square
    DEALER_BITS = 5  # the dealer's private random bits (c_hat)


@dataclass(frozen=True)
class LinearSpec:
    """L(W, x) with the model owner's private W: the map and every shape (batch included)."""

    kind: str  # "conv" | "conv_transpose" | "matmul" | "channel_scale" (privmed.ring.linalg.linear)
    conv: ConvSpec | None
    w_shape: tuple[int, ...]
    x_shape: tuple[int, ...]
    out_shape: tuple[int, ...]


@dataclass(frozen=True)
class NonlinearSpec:
    n: int
    shift: int
    bits: int = 0  # comparison width l (|x| < 2^l)
    drop: int = 0  # low bits ignored by the comparison
    relu: bool = False  # a comparison: tables, AND triples, c_hat
    select: bool = True  # with relu: also c_hat (r >> shift) and c_hat msb(r) for the ReLU select (not for a sign)

    @property
    def chunks(self) -> int:
        return (self.bits - self.drop) // CHUNK if self.relu else 0


@dataclass(frozen=True)
class ThresholdSpec:
    """Signs [x - t_j >= 0] of n elements against k public thresholds t_j, with one masked
    opening of x shared by the k comparisons (``privmed.mpc.compare.sign_thresholds``)."""

    n: int
    k: int
    bits: int  # comparison width l (|x - t_j| < 2^l)

    @property
    def chunks(self) -> int:
        return self.bits // CHUNK


@dataclass(frozen=True)
class ProductSpec:
    """A Beaver product of two secret tensors: x (x_shape) times y (y_shape, broadcast to
    x_shape), the square of x, or, with ``equation``, the einsum of x and y (a matrix product,
    attention's Q K^T; the equation names every axis, batch included)."""

    x_shape: tuple[int, ...]
    y_shape: tuple[int, ...] = ()
    square: bool = False
    equation: str = ""

    @property
    def out_shape(self) -> tuple[int, ...]:
        if not self.equation:
            return self.x_shape
        ins, out = self.equation.split("->")
        sizes = dict(zip(ins.split(",")[0], self.x_shape, strict=True)) | dict(zip(ins.split(",")[1], self.y_shape, strict=True))
        return tuple(sizes[c] for c in out)

    def bilinear(self, x: np.ndarray, y: np.ndarray) -> np.ndarray:
        """B(x, y) over Z_2^64 (numpy's integer einsum wraps modulo 2^64, like every ring op)."""
        return np.einsum(self.equation, x, y) if self.equation else x * y


@dataclass(frozen=True)
class Request:
    """One correlation: ``label`` names its messages (frame tags, logs), ``key`` keys its
    randomness, ``node_index`` is the node's position in the plan; exactly one spec is set."""

    label: str
    key: StreamKey
    node_index: int
    linear: LinearSpec | None = None
    nonlinear: NonlinearSpec | None = None
    product: ProductSpec | None = None
    thresholds: ThresholdSpec | None = None
    ring: int = 64  # the shares' ring Z_2^ring (the plan's ``ring_bits``)

    @property
    def weight_mask_key(self) -> StreamKey:
        """The session-wide key of the weight mask B of this node (one private weight per node)."""
        return StreamKey(SESSION, self.node_index, Purpose.WEIGHT_MASK)


def require_shape(label: str, what: str, arr: np.ndarray, shape: tuple[int, ...]) -> None:
    """Abort unless ``arr`` has exactly ``shape``: a mask, table or triple is never broadcast
    over the value it protects (a broadcast mask would reuse one random value many times)."""
    if tuple(arr.shape) != tuple(shape):
        raise ProtocolError(f"protocol error at {label}: {what} has shape {tuple(arr.shape)}, "
                            f"the value it protects {tuple(shape)}; session aborted")  # fmt: skip


def merge_schedule(m: int) -> list[list[tuple[int, int, bool]]]:
    """Levels of the comparison tree: (lo, hi, need_eq) pairs over the current list.

    Element 0 of each level is only ever a low half, so its 'equal' bit is never needed.
    """
    levels, count = [], m
    while count > 1:
        levels.append([(2 * p, 2 * p + 1, p > 0) for p in range(count // 2)])
        count = count // 2 + count % 2
    return levels


def ands_per_level(m: int) -> list[int]:
    return [sum(1 + int(eq) for _, _, eq in lvl) for lvl in merge_schedule(m)]


def packed_len(n: int) -> int:
    """Bytes of n bits packed 8 per byte (numpy packbits order)."""
    return (n + 7) // 8
