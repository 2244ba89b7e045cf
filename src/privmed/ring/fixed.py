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
