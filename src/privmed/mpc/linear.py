"""Linear layers with the model owner's private weights."""

from __future__ import annotations

import numpy as np

from privmed.mpc.beaver import Triple, beaver
from privmed.mpc.correlation.requests import Request, require_shape
from privmed.mpc.party import Party
from privmed.ring.linalg import linear

U64 = np.uint64


def private_linear(
    p: Party,
    req: Request,
    x: np.ndarray,
    weight: np.ndarray | None = None,
    weight_bits: int | None = None,
    bias: np.ndarray | None = None,
    masked_weights: dict[str, np.ndarray] | None = None,
) -> np.ndarray:
    """Shares of L(W, x) + b, where W and b are known to the model owner only.

    ``privmed.mpc.beaver.beaver`` with B(x, W) = L(W, x) and W private to the model owner
    (Beaver 1991; the matrix form of SecureML, Mohassel-Zhang 2017, sec. 4.1):

    1. The dealer gives the data owner a uniform mask A (shape of x) and the model owner a
       uniform mask B (shape of W), and shares C0 + C1 = L(B, A).
    2. Data owner sends E = x0 - A; model owner sends F = W - B (the masked weights).
    3. Data owner: y0 = L(F, A) + C0.  Model owner: y1 = L(W, E + x1) + C1 + b.
       Then y0 + y1 = L(W - B, A) + L(B, A) + L(W, x - A) + b = L(W, x) + b.

    Rounds: 1 (both messages travel at once). Ring elements (of Z_2^l, ``Party.ring_bits``,
    packed at ceil(l / 8) bytes) sent: |x| by the data owner,
    |W| by the model owner once per session (``masked_weights`` caches F on the data owner for
    later batches; B is fixed per session, A and C are fresh per batch), |out| by the dealer to
    the model owner (everything else is seed-expanded).
    Security (semi-honest, dealer not colluding): E is x0 masked by uniform A, F is W masked by
    uniform B, and C1 is masked by the seed-expanded C0 that the model owner cannot derive:
    each message is uniform on its own, so the view is simulatable.
    The scale of y is the sum of the scales of W (f) and x.
    """
    spec = req.linear
    assert spec is not None
    require_shape(req.label, "input", x, spec.x_shape)
    corr = p.source.linear(req)

    def masked(a: np.ndarray, w: np.ndarray) -> np.ndarray:
        return linear(spec.kind, spec.conv, w, a, ring_bits=p.ring_bits)

    def real(d: np.ndarray, w: np.ndarray) -> np.ndarray:
        return linear(spec.kind, spec.conv, w, d, w_bits=weight_bits, ring_bits=p.ring_bits)

    if p.is_data_owner:
        triple = Triple(corr.mask, None, corr.product)
    else:
        triple = Triple(None, corr.mask, corr.product)
    y = beaver(p, req.label, x, weight, triple, masked, y_private=True, y_bilinear=real,
               e_cache=masked_weights, e_tag=f"w{req.node_index}/F", e_shape=spec.w_shape)  # fmt: skip
    if bias is not None and not p.is_data_owner:
        y = y + bias
    return y
