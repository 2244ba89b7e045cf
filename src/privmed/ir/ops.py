"""Helpers that give plan attributes their meaning, shared by every executor of a plan."""

from __future__ import annotations

from typing import Any

import numpy as np

from privmed.ir.plan import Node
from privmed.ring import layout
from privmed.ring.linalg import ConvSpec


def conv_spec(attrs: dict[str, Any]) -> ConvSpec:
    s = attrs["spec"]
    return ConvSpec(tuple(s["kernel"]), tuple(s["strides"]), tuple(s["pads"]), tuple(s["dilations"]), s["groups"], tuple(s["output_padding"]))


BATCH_AXIS = "z"  # einsum letter of the batch axis; plan equations use a-y only


def batched_equation(equation: str) -> str:
    """A per-sample einsum equation with the batch axis prepended to every operand."""
    ins, out = equation.split("->")
    x, y = ins.split(",")
    return f"{BATCH_AXIS}{x},{BATCH_AXIS}{y}->{BATCH_AXIS}{out}"


def interp_taps(attrs: dict[str, Any]) -> list[list[np.ndarray]]:
    """Per spatial axis, the source index list of each tap of an ``interp`` node."""
    return [[np.asarray(t, dtype=np.int64) for t in axis] for axis in attrs["taps"]]


def interp_weights(attrs: dict[str, Any]) -> list[np.ndarray]:
    """Per combination of one tap per axis, the product of the taps' weights over the output's
    spatial grid (float64; each executor encodes it for its domain)."""
    from itertools import product

    ws = attrs["weights"]
    grids = []
    for combo in product(*(range(len(axis)) for axis in ws)):
        g = np.ones(())
        for d, t in enumerate(combo):
            g = np.multiply.outer(g, np.asarray(ws[d][t], dtype=np.float64))
        grids.append(g)
    return grids


def postprocess(logits: np.ndarray, post: dict[str, Any]) -> np.ndarray:
    """The final op applied by the data owner in clear."""
    kind = post.get("kind", "none")
    if kind == "sigmoid":
        return 1.0 / (1.0 + np.exp(-logits))
    if kind == "softmax":
        z = logits - logits.max(axis=post.get("axis", -1), keepdims=True)
        e = np.exp(z)
        return e / e.sum(axis=post.get("axis", -1), keepdims=True)
    return logits


def avg_divisor(node: Node, x_shape: tuple[int, ...]) -> np.ndarray | float:
    a = node.attrs
    if a["count_include_pad"] or not any(a["pads"]):
        return float(np.prod(a["kernel"]))
    return layout.pool_counts(x_shape[2:], a["kernel"], a["strides"], a["pads"]).astype(np.float64)
