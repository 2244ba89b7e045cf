"""Products of two secret tensors (Beaver 1991), with broadcasting, and squares."""

from __future__ import annotations

import numpy as np

from privmed.mpc.correlated import Request, require_shape
from privmed.mpc.party import Party


def multiply(p: Party, req: Request, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Shares of x * y (y broadcast to x's shape); the scale is the sum of both scales.

    Beaver's multiplication triple from the dealer: a (shape of x), b (shape of y),
    c = a * b. Steps: (1) open d = x - a and e = y - b (one round; |x| + |y| ring elements each
    way); (2) z_i = c_i + d b_i + e a_i, and party 0 adds d e. Then
    sum z_i = ab + (x - a) b + (y - b) a + (x - a)(y - b) = x y. Dealer to model owner: |x|
    elements. Secure because a and b are uniform and used once: d and e are uniform.
    """
    corr = p.source.product(req)
    assert corr.b is not None
    require_shape(req.label, "triple a", corr.a, x.shape)
    require_shape(req.label, "triple b", corr.b, y.shape)
    require_shape(req.label, "triple c", corr.c, x.shape)
    mine = np.concatenate([(x - corr.a).reshape(-1), (y - corr.b).reshape(-1)])
    opened = mine + p.exchange(f"{req.label}/de", mine)
    d = opened[: x.size].reshape(x.shape)
    e = opened[x.size :].reshape(y.shape)
    z = corr.c + d * corr.b + e * corr.a
    if p.is_data_owner:
        z = z + d * e
    return z


def square(p: Party, req: Request, x: np.ndarray) -> np.ndarray:
    """Shares of x * x with a dealer pair (a, a^2): open d = x - a (one round, |x| elements
    each way), then z_i = c_i + 2 d a_i, and party 0 adds d^2. Dealer: |x| elements."""
    corr = p.source.product(req)
    require_shape(req.label, "square pair a", corr.a, x.shape)
    require_shape(req.label, "square pair c", corr.c, x.shape)
    mine = (x - corr.a).reshape(-1)
    d = (mine + p.exchange(f"{req.label}/d", mine)).reshape(x.shape)
    z = corr.c + np.uint64(2) * d * corr.a
    if p.is_data_owner:
        z = z + d * d
    return z
