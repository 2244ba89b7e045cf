"""Linear layers with the model owner's private weights."""

from __future__ import annotations

import numpy as np

from privmed.ir.ops import conv_spec
from privmed.ir.plan import Node
from privmed.mpc.correlated import Request, require_shape
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

    Beaver-style masking with a dealer (Beaver 1991; the matrix form used by SecureML,
    Mohassel-Zhang 2017, sec. 4.1, with one operand held in clear by one party):

    1. The dealer gives the data owner a uniform mask A (shape of x) and the model owner a
       uniform mask B (shape of W), and shares C0 + C1 = L(B, A).
    2. Data owner sends E = x0 - A; model owner sends F = W - B (the masked weights).
    3. Data owner: y0 = L(F, A) + C0.  Model owner: y1 = L(W, E + x1) + C1 + b.
       Then y0 + y1 = L(W - B, A) + L(B, A) + L(W, x - A) + b = L(W, x) + b.

    Rounds: 1 (both messages travel at once). Ring elements sent: |x| by the data owner,
    |W| by the model owner once per session (``masked_weights`` caches F on the data owner for
    later batches; B is fixed per session, A and C are fresh per batch), |out| by the dealer to
    the model owner (everything else is seed-expanded).
    Security (semi-honest, dealer not colluding): E is x0 masked by uniform A, F is W masked by
    uniform B, and C1 is masked by the seed-expanded C0 that the model owner cannot derive:
    each message is uniform on its own, so the view is simulatable.
    The scale of y is the sum of the scales of W (f) and x.
    """
    node: Node = req.node
    spec = conv_spec(node.attrs) if "spec" in node.attrs else None
    kind = node.attrs["kind"]
    corr = p.source.linear(req)
    cache = {} if masked_weights is None else masked_weights
    first = node.id not in cache
    w_tag = f"w{req.node_index}/F"
    require_shape(req.label, "input", x, req.x_shape)
    if p.is_data_owner:
        require_shape(req.label, "input mask A", corr.mask, x.shape)
        p.peer.send(f"{req.label}/E", x - corr.mask)
        if first:
            cache[node.id] = p.peer.recv(w_tag, U64, tuple(node.attrs["w_shape"]))
        p.rounds += 1
        y0 = linear(kind, spec, cache[node.id], corr.mask)
        require_shape(req.label, "product share C0", corr.product, y0.shape)
        return y0 + corr.product
    assert weight is not None
    if first:
        require_shape(req.label, "weight mask B", corr.mask, weight.shape)
        p.peer.send(w_tag, weight - corr.mask)
        cache[node.id] = np.zeros(0, U64)  # only remember that F was sent
    masked_input = p.peer.recv(f"{req.label}/E", U64, x.shape)
    p.rounds += 1
    y = linear(kind, spec, weight, masked_input + x, w_bits=weight_bits)
    require_shape(req.label, "product share C1", corr.product, y.shape)
    y = y + corr.product
    if bias is not None:
        y = y + bias
    return y
