"""Products of two secret tensors in the two-party mode: Beaver triples made offline by Gilboa's
OT multiplication (``arith.multiply``), consumed online by the usual one-round opening;
elementwise (with broadcasting), squares, and einsums of two secret tensors (attention).

Broadcasting as the executor's ``multiply`` (y broadcast over x by numpy's rules): the triple's
b has y's exact shape and c = a * broadcast(b), so the opened e = y - b is y-shaped and every
mask has exactly the shape of what it hides. Squares use a pair (a, a^2) and open only x - a.
Ring: Z_2^64 (the products' range is the dealer mode's contract, |.| < 2^62, checked by the
compiler); ``bits`` is kept as a parameter for tests.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from privmed.crypto.prg import Stream
from privmed.errors import ProtocolError
from privmed.mpc.beaver import Ring, Triple, beaver
from privmed.mpc.twoparty.arith import multiply
from privmed.mpc.twoparty.compare import ring_mask
from privmed.mpc.twoparty.ot import OTSession

U64 = np.uint64


@dataclass
class ProductMaterial:
    """One party's shares of a (x's shape), b (y's shape; None for a square) and c = a b
    (with ``equation``: c = einsum(equation, a, b))."""

    a: np.ndarray
    b: np.ndarray | None
    c: np.ndarray
    bits: int
    equation: str = ""


def _expanded(equation: str, x_shape: tuple[int, ...], y_shape: tuple[int, ...]) -> tuple[str, str, str, str, tuple[int, ...]]:
    """(x labels, y labels, out labels, all labels in first-seen order, the full shape)."""
    ins, out = equation.split("->")
    xl, yl = ins.split(",")
    labels = "".join(dict.fromkeys(xl + yl))
    sizes = dict(zip(xl, x_shape, strict=True)) | dict(zip(yl, y_shape, strict=True))
    return xl, yl, out, labels, tuple(sizes[c] for c in labels)


def _broadcast(v: np.ndarray, own: str, labels: str, full: tuple[int, ...]) -> np.ndarray:
    """v (axes ``own``) laid out over every label of ``labels`` (missing ones broadcast)."""
    order = "".join(c for c in labels if c in own)
    moved = np.einsum(f"{own}->{order}", v)
    shape = tuple(full[i] if c in own else 1 for i, c in enumerate(labels))
    return np.ascontiguousarray(np.broadcast_to(moved.reshape(shape), full))


def einsum_offline(ot: OTSession, tag: str, is_data_owner: bool, equation: str, x_shape: tuple[int, ...], y_shape: tuple[int, ...],
                   bits: int, stream: Stream) -> ProductMaterial:  # fmt: skip
    """A matrix Beaver triple (a, b, einsum(a, b)) by expansion: a and b are laid out over every
    axis of the equation, multiplied elementwise by ``arith.multiply`` (Gilboa), and the product
    is summed over the contracted axes (local, linear). Correct for any einsum of two operands
    that names every axis; the cost grows with the full expansion: 24 l bytes per element of
    prod(all axis sizes) (Q K^T with T tokens and width d: T^2 d elements), so it suits the
    small attention blocks of imaging models, not long sequences. Rounds 2.
    Security: ``arith.multiply`` on uniform a, b (repeating a choice bit across the expansion
    is fine: every COT is independent).
    """
    mask = ring_mask(bits)
    a = stream.uint64(x_shape) & mask
    b = stream.uint64(y_shape) & mask
    xl, yl, out, labels, full = _expanded(equation, x_shape, y_shape)
    prod = multiply(ot, tag, is_data_owner, _broadcast(a, xl, labels, full), _broadcast(b, yl, labels, full), bits)
    return ProductMaterial(a, b, np.einsum(f"{labels}->{out}", prod) & mask, bits, equation)


def product_offline(ot: OTSession, tag: str, is_data_owner: bool, x_shape: tuple[int, ...], y_shape: tuple[int, ...] | None,
                    bits: int, stream: Stream) -> ProductMaterial:  # fmt: skip
    """A Beaver triple (a, b, a * broadcast(b)), or a square pair (a, a^2) when ``y_shape`` is
    None, over Z_2^bits: a, b from this party's PRG, the product by ``arith.multiply``
    (Gilboa: l COTs per element per cross term). Rounds 2; bytes per element of x and party:
    24 l (1,536 at l = 64). Security: ``arith.multiply``; a, b are uniform and input-independent.
    """
    mask = ring_mask(bits)
    a = stream.uint64(x_shape) & mask
    if y_shape is None:
        return ProductMaterial(a, None, multiply(ot, tag, is_data_owner, a, a, bits), bits)
    b = stream.uint64(y_shape) & mask
    wide = np.ascontiguousarray(np.broadcast_to(b, x_shape))
    return ProductMaterial(a, b, multiply(ot, tag, is_data_owner, a, wide, bits), bits)


@dataclass
class _RingPeer:
    """What ``privmed.mpc.beaver.beaver`` needs of a party, over Z_2^bits: the exchange checks
    that every element the peer sends lies in the ring."""

    ch: Any
    is_data_owner: bool
    bits: int
    rounds: int = 0

    def exchange(self, tag: str, mine: np.ndarray) -> np.ndarray:
        self.ch.send(tag, mine)
        theirs = self.ch.recv(tag, U64, mine.shape)
        if np.any(theirs > ring_mask(self.bits)):
            raise ProtocolError(f"{tag}: expected elements of Z_2^{self.bits} from the peer")
        self.rounds += 1
        return theirs

    exchange_ring = exchange  # beaver's arithmetic opening: whole uint64 words, checked above


def product_online(ot: OTSession, tag: str, is_data_owner: bool, x: np.ndarray, y: np.ndarray | None, mat: ProductMaterial) -> np.ndarray:
    """Shares of x * y (y broadcast over x), of x * x when y is None, or of the einsum of x and
    y: ``privmed.mpc.beaver.beaver`` over Z_2^bits with the OT-made triple (Beaver 1991).

    One round; |x| + |y| ring elements each way (|x| for a square). Security: d and e are
    masked by a and b, uniform in Z_2^bits and used once; nothing else is sent.
    """
    mask = ring_mask(mat.bits)
    if x.shape != mat.a.shape or (y is None) != (mat.b is None) or (y is not None and mat.b is not None and y.shape != mat.b.shape):
        raise ProtocolError(f"{tag}: the product's material does not have the shape of its operands")
    ring = Ring(lambda u, v: (u + v) & mask, lambda u, v: (u - v) & mask)
    if mat.equation:
        equation = mat.equation

        def bilinear(u: np.ndarray, v: np.ndarray) -> np.ndarray:
            return np.einsum(equation, u, v) & mask
    else:

        def bilinear(u: np.ndarray, v: np.ndarray) -> np.ndarray:
            return (u * v) & mask

    peer = _RingPeer(ot.ch, is_data_owner, mat.bits)
    b = mat.a if y is None else mat.b
    return beaver(peer, tag, x & mask, None if y is None else y & mask, Triple(mat.a, b, mat.c), bilinear, ring)  # type: ignore[arg-type]
