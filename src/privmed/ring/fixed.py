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
    """Whole bytes per element of Z_2^bits (the part of ``pack`` below bit 8 floor(bits/8) is
    ``bits // 8`` bytes; the remaining bits are bit-packed across elements)."""
    return -(-bits // 8)


def wire_len(count: int, bits: int) -> int:
    """Bytes of ``count`` elements of Z_2^bits packed by ``pack``: ceil(count bits / 8) up to
    the byte rounding of the low and high parts."""
    q, r = divmod(bits, 8)
    return q * count + (count * r + 7) // 8


_WORDS: dict[int, np.dtype] = {1: np.dtype("u1"), 2: np.dtype("<u2"), 4: np.dtype("<u4")}
_THREE = np.dtype([("lo", "<u2"), ("hi", "u1")])
_SPLIT = {5: np.dtype([("lo", "<u4"), ("hi", "u1")]), 6: np.dtype([("lo", "<u4"), ("hi", "<u2")]),
          7: np.dtype([("lo", "<u4"), ("mid", "<u2"), ("hi", "u1")])}  # fmt: skip


def _pack_bytes(x: np.ndarray, nb: int) -> np.ndarray:
    """The low ``nb`` bytes of each uint64 of flat x, little-endian: uint8 (n * nb,)."""
    if nb == 8:
        return np.ascontiguousarray(x, dtype="<u8").view(np.uint8)
    if nb in _WORDS:
        return x.astype(_WORDS[nb]).view(np.uint8)  # the cast keeps the low bytes
    if nb == 3:
        out3 = np.empty(x.shape, dtype=_THREE)
        out3["lo"], out3["hi"] = x, x >> U64(16)
        return out3.view(np.uint8)
    split = _SPLIT.get(nb)
    if split is None:
        return np.ascontiguousarray(np.ascontiguousarray(x, dtype="<u8").view(np.uint8).reshape(-1, 8)[:, :nb]).reshape(-1)
    out = np.empty(x.shape, dtype=split)  # field casts truncate: lo = x mod 2^32, ...
    out["lo"] = x
    if nb == 7:
        out["mid"] = x >> U64(32)
    out["hi"] = x >> U64(48 if nb == 7 else 32)
    return out.view(np.uint8)


def _unpack_bytes(buf: np.ndarray, nb: int) -> np.ndarray:
    """Inverse of ``_pack_bytes``: uint64 (n,)."""
    if nb == 8:
        return np.ascontiguousarray(buf).view("<u8").astype(U64, copy=False)
    if nb in _WORDS:
        return np.ascontiguousarray(buf).view(_WORDS[nb]).astype(U64)
    if nb == 3:
        f3 = np.ascontiguousarray(buf).view(_THREE)
        return (f3["hi"].astype(U64) << U64(16)) | f3["lo"]
    split = _SPLIT.get(nb)
    if split is None:
        out8 = np.zeros((buf.size // max(nb, 1), 8), dtype=np.uint8)
        out8[:, :nb] = buf.reshape(-1, nb)
        return out8.view("<u8").reshape(-1).astype(U64, copy=False)
    fields = np.ascontiguousarray(buf).view(split)
    out = fields["hi"].astype(U64)
    if nb == 7:
        out <<= U64(16)
        out |= fields["mid"]
    out <<= U64(32)
    out |= fields["lo"]
    return out


def pack(x: np.ndarray, bits: int) -> np.ndarray:
    """x mod 2^bits for the wire: uint8 (``wire_len(x.size, bits)``,), the low 8 floor(bits/8)
    bits of each element as whole little-endian bytes, then the remaining bits % 8 high bits of
    all elements packed together (two nibbles per byte for 4; ``np.packbits`` otherwise). The
    bits above ``bits`` are dropped, so a packed share carries nothing but its value mod 2^bits."""
    q, r = divmod(bits, 8)
    flat = np.asarray(x, dtype=U64).reshape(-1)
    low = _pack_bytes(flat, q) if q else np.zeros(0, np.uint8)
    if not r:
        return low
    if r == 4:  # byte q of each element, read in place (no 64-bit shifts), two nibbles per byte
        byte_q = np.ascontiguousarray(flat, dtype="<u8").view(np.uint8).reshape(-1, 8)[:, q]
        tail = byte_q[0::2] & np.uint8(15)
        tail[: byte_q.size // 2] |= byte_q[1::2] << np.uint8(4)
        return np.concatenate([low, tail])
    high = ((flat >> U64(8 * q)) & U64((1 << r) - 1)).astype(np.uint8)
    tail = np.packbits(np.unpackbits(high[:, None], axis=1, count=8, bitorder="little")[:, :r].reshape(-1), bitorder="little")
    return np.concatenate([low, tail])


def unpack(buf: np.ndarray, bits: int, count: int) -> np.ndarray:
    """Inverse of ``pack``: ``count`` uint64 values below 2^bits from uint8 (wire_len,)."""
    q, r = divmod(bits, 8)
    buf = np.asarray(buf, dtype=np.uint8).reshape(-1)
    out = _unpack_bytes(buf[: q * count], q) if q else np.zeros(count, dtype=U64)
    if not r:
        return out
    tail = buf[q * count :]
    if r == 4:  # the nibbles written straight into byte q of each little-endian element (zero there)
        by = out.view(np.uint8).reshape(-1, 8)
        np.bitwise_and(tail[: (count + 1) // 2], np.uint8(15), out=by[0::2, q])
        np.right_shift(tail[: count // 2], np.uint8(4), out=by[1::2, q])
        return out
    b = np.unpackbits(tail, count=count * r, bitorder="little").reshape(count, r)
    high = np.packbits(b, axis=1, bitorder="little").reshape(-1)
    return out | (high.astype(U64) << U64(8 * q))
