"""Products of two secret tensors, with broadcasting, squares, and einsums (matrix products of
two secret tensors): ``privmed.mpc.beaver`` with B = elementwise product or the einsum over
Z_2^l (the plan's ring)."""

from __future__ import annotations

import numpy as np

from privmed.mpc.beaver import Triple, beaver
from privmed.mpc.correlation.requests import Request
from privmed.mpc.party import Party


def multiply(p: Party, req: Request, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Shares of x * y (y broadcast to x's shape); the scale is the sum of both scales.

    One round; |x| + |y| ring elements each way; dealer to model owner: |x| elements.
    """
    corr = p.source.product(req)
    return beaver(p, req.label, x, y, Triple(corr.a, corr.b, corr.c), np.multiply)


def square(p: Party, req: Request, x: np.ndarray) -> np.ndarray:
    """Shares of x * x with a dealer pair (a, a^2): one round, |x| elements each way; dealer:
    |x| elements."""
    corr = p.source.product(req)
    return beaver(p, req.label, x, None, Triple(corr.a, corr.a, corr.c), np.multiply)


def einsum(p: Party, req: Request, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Shares of einsum(x, y) for two secret tensors (attention's Q K^T and P V): ``beaver``
    with B the einsum, bilinear over Z_2^l (SecureML, Mohassel-Zhang, S&P 2017, sec. 4.1, for
    matrix products; CrypTen's generic ``beaver_protocol``).

    One round; |x| + |y| ring elements each way; dealer to model owner: |einsum(x, y)|
    elements. Security: as ``beaver`` (d = x - a and e = y - b are uniform).
    """
    spec = req.product
    assert spec is not None and spec.equation
    corr = p.source.product(req)
    return beaver(p, req.label, x, y, Triple(corr.a, corr.b, corr.c), spec.bilinear)
