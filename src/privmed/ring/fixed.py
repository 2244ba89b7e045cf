"""Fixed-point encoding in Z_2^64.

A real number v is stored as round(v * 2^scale) mod 2^64 in a uint64 array; negative numbers
wrap (two's complement). ``scale`` is the number of fractional bits. Pure functions only.
"""

from __future__ import annotations

import numpy as np

RING_BITS = 64
U64 = np.uint64


def encode(values: np.ndarray, scale: int) -> np.ndarray:
    """Encode reals as fixed-point ring elements (round to nearest).

    Pre: |values| * 2^scale < 2^62. Post: uint64 array of the same shape.
    """
    scaled = np.rint(np.asarray(values, dtype=np.float64) * float(2**scale))
    return scaled.astype(np.int64).view(U64)


def decode(ring: np.ndarray, scale: int) -> np.ndarray:
    """Decode ring elements (two's complement) to float64 reals."""
    return np.asarray(ring, dtype=U64).view(np.int64).astype(np.float64) / float(2**scale)


def signed(ring: np.ndarray) -> np.ndarray:
    """View ring elements as signed int64 (two's complement)."""
    return np.asarray(ring, dtype=U64).view(np.int64)


def arith_shift(ring: np.ndarray, shift: int) -> np.ndarray:
    """floor(x / 2^shift) of the signed value, back in the ring (the exact truncation)."""
    return (signed(ring) >> np.int64(shift)).view(U64)


def public_const(value: int) -> np.uint64:
    """An integer constant (possibly negative) as a ring element."""
    return U64(value % (1 << RING_BITS))


# -- narrower rings Z_2^l (l <= 64) carried in uint64 arrays ------------------------------------
#
# Shares of Z_2^l live in uint64 arrays whose bits above l carry no meaning: Z_2^64 -> Z_2^l is a
# ring homomorphism, so every sum and product computed mod 2^64 is right mod 2^l. Only what looks
# at bits (comparisons, truncation, decoding) and what goes on the wire reduces first.


def ring_mask(bits: int) -> np.uint64:
    """2^bits - 1 as a uint64 (all ones for 64)."""
    return U64((1 << bits) - 1)


def reduce(x: np.ndarray, bits: int) -> np.ndarray:
    """x mod 2^bits (a new array; x itself when bits = 64)."""
    return x if bits == RING_BITS else np.bitwise_and(x, ring_mask(bits))


def sign_extend(x: np.ndarray, bits: int) -> np.ndarray:
    """The Z_2^bits value x as a Z_2^64 two's-complement value (what ``decode`` reads)."""
    if bits == RING_BITS:
        return x
    up = U64(RING_BITS - bits)
    return ((np.asarray(x, dtype=U64) << up).view(np.int64) >> np.int64(RING_BITS - bits)).view(U64)


def wire_bytes(bits: int) -> int:
    """Bytes per element of Z_2^bits on the wire."""
    return -(-bits // 8)


_SPLIT = {5: np.dtype([("lo", "<u4"), ("hi", "u1")]), 6: np.dtype([("lo", "<u4"), ("hi", "<u2")]),
          7: np.dtype([("lo", "<u4"), ("mid", "<u2"), ("hi", "u1")])}  # fmt: skip


def pack(x: np.ndarray, bits: int) -> np.ndarray:
    """x mod 2^bits as ``wire_bytes(bits)`` little-endian bytes per element: uint8
    (*x.shape, nbytes). The bits above ``bits`` are zeroed, so a packed share carries nothing
    but its value mod 2^bits."""
    nb = wire_bytes(bits)
    x = np.asarray(x, dtype=U64)
    split = _SPLIT.get(nb)
    if split is None:
        flat = np.ascontiguousarray(reduce(x, bits), dtype="<u8").reshape(-1)
        return np.ascontiguousarray(flat.view(np.uint8).reshape(-1, 8)[:, :nb]).reshape(x.shape + (nb,))
    out = np.empty(x.shape, dtype=split)  # field casts truncate: lo = x mod 2^32, ...
    out["lo"] = x
    if nb == 7:
        out["mid"] = x >> U64(32)
    top = 48 if nb == 7 else 32  # the first bit the "hi" field holds
    out["hi"] = x >> U64(top)
    if bits % 8:
        out["hi"] &= (1 << (bits - top)) - 1
    return out.view(np.uint8).reshape(x.shape + (nb,))


def unpack(buf: np.ndarray, bits: int) -> np.ndarray:
    """Inverse of ``pack``: uint8 (*shape, nbytes) -> uint64 (*shape), values below 2^(8 nbytes)."""
    nb = wire_bytes(bits)
    shape = buf.shape[:-1]
    split = _SPLIT.get(nb)
    if split is None:
        out8 = np.zeros(shape + (8,), dtype=np.uint8)
        out8[..., :nb] = buf
        return out8.view("<u8").reshape(shape).astype(U64, copy=False)
    fields = np.ascontiguousarray(buf).reshape(-1).view(split)
    out = fields["hi"].astype(U64)
    if nb == 7:
        out <<= U64(16)
        out |= fields["mid"]
    out <<= U64(32)
    out |= fields["lo"]
    return out.reshape(shape)
