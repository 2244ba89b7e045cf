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

import numpy as np

from privmed.crypto.prg import Stream
from privmed.errors import ProtocolError
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


def product_online(ot: OTSession, tag: str, is_data_owner: bool, x: np.ndarray, y: np.ndarray | None, mat: ProductMaterial) -> np.ndarray:
    """Shares of x * y (y broadcast over x), or of x * x when y is None (Beaver 1991).

    1. Each party sends d_i = x_i - a_i and e_i = y_i - b_i (one round; |x| + |y| elements).
    2. d = x - a and e = y - b are public; z_i = c_i + d b_i + a_i e, and the data owner adds
       d e (square: z_i = c_i + 2 d a_i, data owner + d^2). Then z0 + z1 = (d + a)(e + b) = x y.
    Security: d, e are masked by a, b, uniform and used once; nothing else is sent.
    """
    mask = ring_mask(mat.bits)
    if x.shape != mat.a.shape or (y is None) != (mat.b is None) or (y is not None and mat.b is not None and y.shape != mat.b.shape):
        raise ProtocolError(f"{tag}: the product's material does not have the shape of its operands")
    mine = ((x - mat.a) & mask).reshape(-1)
    if y is not None and mat.b is not None:
        mine = np.concatenate([mine, ((y - mat.b) & mask).reshape(-1)])
    ot.ch.send(f"{tag}/de", mine)
    theirs = ot.ch.recv(f"{tag}/de", U64, mine.shape)
    if np.any(theirs > mask):
        raise ProtocolError(f"{tag}/de: expected elements of Z_2^{mat.bits} from the peer")
    opened = (mine + theirs) & mask
    d = opened[: x.size].reshape(x.shape)
    if y is None or mat.b is None:
        z = mat.c + U64(2) * d * mat.a
        return (z + d * d if is_data_owner else z) & mask
    if mat.equation:  # z = c + einsum(d, b) + einsum(a, e) (+ einsum(d, e)): bilinear
        e = opened[x.size :].reshape(y.shape)
        z = mat.c + np.einsum(mat.equation, d, mat.b) + np.einsum(mat.equation, mat.a, e)
        return (z + np.einsum(mat.equation, d, e) if is_data_owner else z) & mask
    e = np.broadcast_to(opened[x.size :].reshape(y.shape), x.shape)
    z = mat.c + d * np.broadcast_to(mat.b, x.shape) + mat.a * e
    return (z + d * e if is_data_owner else z) & mask
