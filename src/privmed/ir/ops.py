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
