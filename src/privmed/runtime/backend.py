"""One party's execution of the plan ops on additive shares."""

from __future__ import annotations

from typing import Any

import numpy as np

from privmed.ir.ops import avg_divisor
from privmed.ir.plan import Node, Plan, PrivateWeights
from privmed.mpc import linear as lin
from privmed.mpc import nonlinear as nl
from privmed.mpc.correlated import Request, maxpool_levels, requests
from privmed.mpc.norm import secure_instance_norm
from privmed.mpc.party import Party
from privmed.ring import layout
from privmed.ring.fixed import U64, encode


class SecureBackend:
    """Implements ``privmed.ir.walk.Backend`` for party 0 or 1."""

    def __init__(
        self,
        party: Party,
        plan: Plan,
        batch: int,
        weights: PrivateWeights | None = None,
        x: np.ndarray | None = None,
        index: int = 0,
        masked_weights: dict[str, np.ndarray] | None = None,
    ) -> None:
        self.p = party
        self.masked_weights = {} if masked_weights is None else masked_weights
        self.plan = plan
        self.w = weights
        self.x = x
        self.f = plan.frac_bits
        self.scales = {n.id: n.scale for n in plan.nodes}
        self._pre = f"b{index}:"
        self._index = {n.id: k for k, n in enumerate(plan.nodes)}
        self._reqs: dict[str, Request] = {r.label: r for r in requests(plan, batch, index)}

    def _label(self, node: Node) -> str:
        return f"{self._pre}{self._index[node.id]}"

    def input(self, node: Node, batch: int) -> np.ndarray:
        if self.p.is_data_owner:
            assert self.x is not None
            return encode(self.x, self.f)
        return np.zeros((batch, *node.shape), dtype=U64)

    def linear(self, node: Node, x: np.ndarray) -> np.ndarray:
        req = self._reqs[self._label(node)]
        if self.p.is_data_owner:
            return lin.private_linear(self.p, req, x, masked_weights=self.masked_weights)
        assert self.w is not None
        return lin.private_linear(
            self.p, req, x, self.w.weight[node.id], self.w.weight_bits.get(node.id), self.w.bias.get(node.id), self.masked_weights
        )

    def bias(self, node: Node, x: np.ndarray) -> np.ndarray:
        if self.p.is_data_owner:
            return x
        assert self.w is not None
        return x + self.w.bias[node.id]

    def relu(self, node: Node, x: np.ndarray) -> np.ndarray:
        return nl.relu(self.p, self._reqs[self._label(node)], x)[0]

    def leaky_relu(self, node: Node, x: np.ndarray) -> np.ndarray:
        r, t = nl.relu(self.p, self._reqs[self._label(node)], x)
        alpha = encode(np.array(node.attrs["alpha"]), self.f)
        return r * U64(1 << self.f) + (t - r) * alpha

    def trunc(self, node: Node, x: np.ndarray) -> np.ndarray:
        return nl.truncate(self.p, self._reqs[self._label(node)], x)

    def upscale(self, node: Node, x: np.ndarray) -> np.ndarray:
        return x << U64(node.attrs["shift"])

    def maxpool(self, node: Node, x: np.ndarray) -> np.ndarray:
        """Pairwise tree: max(a, b) = b + ReLU(a - b), one ReLU layer per level.

        Windows use edge padding: for pad < kernel the replicated border value lies in the
        same window, so the max is unchanged (and padding shares is a public linear map).
        """
        a = node.attrs
        win = layout.windows(x, a["kernel"], a["strides"], a["pads"], a["dilations"], pad_mode="edge")
        lead = win.shape[:-1]
        win = win.reshape(-1, win.shape[-1])
        for lvl, _size in enumerate(maxpool_levels(node, x.shape[0])):
            k = win.shape[1]
            half = k // 2
            lo, hi = win[:, 0 : 2 * half : 2], win[:, 1 : 2 * half : 2]
            diff = np.ascontiguousarray(lo - hi)
            rel, _ = nl.relu(self.p, self._reqs[f"{self._label(node)}/{lvl}"], diff)
            merged = hi + rel
            win = np.concatenate([merged, win[:, 2 * half :]], axis=1) if k % 2 else merged
        return win.reshape(lead)

    def avgpool(self, node: Node, x: np.ndarray) -> np.ndarray:
        a = node.attrs
        s = layout.pool_sum(x, a["kernel"], a["strides"], a["pads"])
        return s * encode(1.0 / np.asarray(avg_divisor(node, x.shape)), self.f)

    def instnorm(self, node: Node, x: np.ndarray) -> np.ndarray:
        return secure_instance_norm(self.p, node, x, self._reqs, self._label(node), self.w, self.masked_weights, self.f)

    def pad_value(self, node: Node, dtype: np.dtype) -> Any:
        if self.p.is_data_owner:
            return encode(np.array(node.attrs["value"]), self.scales[node.id])
        return U64(0)

    def output(self, node: Node, x: np.ndarray) -> np.ndarray | None:
        return nl.reveal_to_data_owner(self.p, self._label(node), x)
