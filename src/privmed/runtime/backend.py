"""One party's execution of the plan ops on additive shares, or the dealer's recording walk.

``SecureBackend`` implements ``privmed.ir.walk.Backend``. Its public ops (upscale, average
pooling, the combination of LeakyReLU) are ``privmed.reference.executors.RingOps``, shared
with the fixed-point reference; everything secret goes through a ``privmed.mpc.protocols``
set: ``Online`` for the data owner and the model owner, ``Schedule`` for the dealer, which
thereby serves every correlation in the order the parties consume it.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from privmed.ir.ops import batched_equation, conv_spec
from privmed.ir.plan import Node, Plan, PrivateWeights
from privmed.mpc.approx import secure_approx, secure_softmax
from privmed.mpc.norm import secure_instance_norm
from privmed.mpc.protocols import Protocols
from privmed.reference.executors import RingOps, leaky_combine, prelu_combine
from privmed.ring import layout
from privmed.ring.fixed import U64, encode


class SecureBackend(RingOps):
    """The plan's ops on this party's shares; ``weights`` for the model owner, ``x`` (float
    input) for the data owner, neither for the dealer's recording walk."""

    def __init__(self, plan: Plan, protocols: Protocols, weights: PrivateWeights | None = None, x: np.ndarray | None = None) -> None:
        super().__init__(plan.frac_bits)
        self.pr = protocols
        self.w = weights
        self.x = x
        self.data_owner = x is not None
        self.scales = {n.id: n.scale for n in plan.nodes}
        self._index = {n.id: k for k, n in enumerate(plan.nodes)}

    def _at(self, node: Node) -> Protocols:
        self.pr.at_node(self._index[node.id])
        return self.pr

    def input(self, node: Node, batch: int) -> np.ndarray:
        if self.x is not None:
            return encode(self.x, self.f)
        return np.zeros((batch, *node.shape), dtype=U64)

    def linear(self, node: Node, x: np.ndarray) -> np.ndarray:
        a = node.attrs
        conv = conv_spec(a) if "spec" in a else None
        out_shape = (x.shape[0], *node.shape)
        if self.w is None:
            return self._at(node).linear(x, a["kind"], conv, tuple(a["w_shape"]), out_shape)
        return self._at(node).linear(x, a["kind"], conv, tuple(a["w_shape"]), out_shape,
                                     self.w.weight[node.id], self.w.weight_bits.get(node.id), self.w.bias.get(node.id))  # fmt: skip

    def bias(self, node: Node, x: np.ndarray) -> np.ndarray:
        if self.w is None:
            return x
        return x + self.w.bias[node.id]

    def relu(self, node: Node, x: np.ndarray) -> np.ndarray:
        a = node.attrs
        return self._at(node).relu(x, a["shift"], a["bits"], a["drop"])[0].reshape(x.shape)

    def leaky_relu(self, node: Node, x: np.ndarray) -> np.ndarray:
        a = node.attrs
        r, t = self._at(node).relu(x, a["shift"], a["bits"], a["drop"])
        return leaky_combine(r.reshape(x.shape), t.reshape(x.shape), a["alpha"], self.f)

    def prelu(self, node: Node, x: np.ndarray) -> np.ndarray:
        """ReLU's comparison, then the private slopes times the negative part t - ReLU(t):
        one ``private_linear`` (per-channel, Beaver with the model owner's weights)."""
        a = node.attrs
        pr = self._at(node)
        r, t = pr.relu(x, a["shift"], a["bits"], a["drop"])
        r, t = r.reshape(x.shape), t.reshape(x.shape)
        weight = None if self.w is None else self.w.weight[node.id]
        bits = None if self.w is None else self.w.weight_bits.get(node.id)
        neg = pr.linear(np.ascontiguousarray(t - r), "channel_scale", None, tuple(a["w_shape"]), tuple(x.shape), weight, bits)
        return prelu_combine(r, neg, self.f)

    def trunc(self, node: Node, x: np.ndarray) -> np.ndarray:
        return self._at(node).truncate(x, node.attrs["shift"]).reshape(x.shape)

    def maxpool(self, node: Node, x: np.ndarray) -> np.ndarray:
        """Pairwise tree: max(a, b) = b + ReLU(a - b), one ReLU layer per level.

        Windows use edge padding: for pad < kernel the replicated border value lies in the
        same window, so the max is unchanged (and padding shares is a public linear map).
        Overlapping windows (a 3x3 pool of stride 2) are reduced one axis at a time, which
        needs fewer comparisons (ResNet's and DenseNet's stem: 6 per output instead of 8) in
        as many levels; ``separable_plan`` says when. Max is separable and edge padding
        commutes with it, so the result is the same.
        With ``drop`` = d > 0 (a max-pool moved before its ReLU, at scale 2f, d = f) the
        comparisons read bits >= d only: a pair closer than 2^(d+1) may yield the smaller one,
        so the result is within levels * 2^(d+1) of the max (2 ulp of f per level).
        """
        a = node.attrs
        pr = self._at(node)
        n = len(a["kernel"])
        steps = separable_plan(list(x.shape[2:]), list(node.shape[1:]), a) or [list(range(n))]
        for axes in steps:
            one = [d in axes for d in range(n)]
            win = layout.windows(
                x, [k if o else 1 for k, o in zip(a["kernel"], one, strict=True)], [s if o else 1 for s, o in zip(a["strides"], one, strict=True)],
                [p if one[i % n] else 0 for i, p in enumerate(a["pads"])], [d if o else 1 for d, o in zip(a["dilations"], one, strict=True)],
                pad_mode="edge",
            )  # fmt: skip
            x = _max_tree(pr, win, a["bits"], a["drop"])
        return x

    def instnorm(self, node: Node, x: np.ndarray) -> np.ndarray:
        gamma = beta = None
        if self.w is not None and node.attrs["affine"]:
            gamma, beta = self.w.weight[node.id], self.w.bias.get(node.id)
        return secure_instance_norm(self._at(node), x, node.attrs, self.f, gamma, beta)

    def approx(self, node: Node, x: np.ndarray) -> np.ndarray:
        """A smooth activation as a public piecewise cubic (``privmed.mpc.approx``)."""
        return secure_approx(self._at(node), x, node.attrs, self.f)

    def softmax(self, node: Node, x: np.ndarray) -> np.ndarray:
        """Softmax inside the network (``privmed.mpc.approx.secure_softmax``)."""
        return secure_softmax(self._at(node), x, node.attrs, self.f)

    def mul(self, node: Node, x: np.ndarray, y: np.ndarray) -> np.ndarray:
        """Product of two secret tensors, y broadcast over x: one Beaver product."""
        return self._at(node).multiply(np.ascontiguousarray(x), np.ascontiguousarray(y))

    def einsum(self, node: Node, x: np.ndarray, y: np.ndarray) -> np.ndarray:
        """Matrix products of two secret tensors (attention): one Beaver einsum."""
        return self._at(node).einsum(batched_equation(node.attrs["equation"]), x, y)

    def pad_value(self, node: Node, dtype: np.dtype) -> Any:
        if self.data_owner:
            return encode(np.array(node.attrs["value"]), self.scales[node.id])
        return U64(0)

    def output(self, node: Node, x: np.ndarray) -> np.ndarray | None:
        return self._at(node).reveal(x)


def _max_tree(pr: Protocols, win: np.ndarray, bits: int, drop: int) -> np.ndarray:
    """The max over the last axis of ``win`` by a pairwise tree of ReLUs."""
    lead = win.shape[:-1]
    win = win.reshape(-1, win.shape[-1])
    while win.shape[1] > 1:
        k = win.shape[1]
        half = k // 2
        lo, hi = win[:, 0 : 2 * half : 2], win[:, 1 : 2 * half : 2]
        diff = np.ascontiguousarray(lo - hi)
        rel, _ = pr.relu(diff, 0, bits, drop)
        merged = hi + rel.reshape(diff.shape)
        win = np.concatenate([merged, win[:, 2 * half :]], axis=1) if k % 2 else merged
    return win.reshape(lead)


def separable_plan(spatial: list[int], out: list[int], attrs: dict[str, Any]) -> list[list[int]] | None:
    """[[axis], [axis], ...] to reduce a max-pool window one spatial axis at a time when that
    takes fewer comparisons than the whole window at once and no more tree levels; None
    otherwise. Comparisons per pass: the elements left after it times (kernel - 1)."""
    kernel, n = attrs["kernel"], len(attrs["kernel"])
    whole = math.prod(out) * (math.prod(kernel) - 1)
    levels = math.ceil(math.log2(max(1, math.prod(kernel))))
    shape, apart, apart_levels = list(spatial), 0, 0
    for d in range(n):
        shape[d] = out[d]
        apart += math.prod(shape) * (kernel[d] - 1)
        apart_levels += math.ceil(math.log2(max(1, kernel[d])))
    if apart < whole and apart_levels <= levels:
        pads = attrs["pads"]
        return [[d] for d in range(n) if kernel[d] > 1 or attrs["strides"][d] > 1 or pads[d] or pads[n + d]]
    return None
