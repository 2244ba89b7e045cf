"""Additive sharing over Z_2^64 and XOR sharing of bits (two parties).

A secret x in Z_2^64 is held as x0 (data owner) and x1 (model owner) with x0 + x1 = x mod 2^64;
one share is uniform and alone reveals nothing (perfectly hiding).
"""

from __future__ import annotations

import numpy as np

from privmed.crypto.prg import Stream


def share(x: np.ndarray, stream: Stream) -> tuple[np.ndarray, np.ndarray]:
    """Split x into (x0, x1) with x0 uniform from ``stream``."""
    x0 = stream.uint64(x.shape)
    return x0, x - x0


def reconstruct(x0: np.ndarray, x1: np.ndarray) -> np.ndarray:
    return x0 + x1
