"""Execute a plan node by node with a pluggable backend.

The same walk serves the float executor (calibration), the fixed-point reference (the test
oracle) and the secure runtime (one party's view on shares). Public data movement (reshape,
transpose, concat, nearest resize, pad layout, add) is done here once; anything that depends on the
number domain or needs a protocol is a backend method.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol

import numpy as np

from privmed.ir.plan import Node, Plan
from privmed.ring import layout


class Backend(Protocol):
    def input(self, node: Node, batch: int) -> np.ndarray: ...
    def linear(self, node: Node, x: np.ndarray) -> np.ndarray: ...
    def bias(self, node: Node, x: np.ndarray) -> np.ndarray: ...
    def relu(self, node: Node, x: np.ndarray) -> np.ndarray: ...
    def leaky_relu(self, node: Node, x: np.ndarray) -> np.ndarray: ...
    def prelu(self, node: Node, x: np.ndarray) -> np.ndarray: ...
    def trunc(self, node: Node, x: np.ndarray) -> np.ndarray: ...
    def upscale(self, node: Node, x: np.ndarray) -> np.ndarray: ...
    def maxpool(self, node: Node, x: np.ndarray) -> np.ndarray: ...
    def avgpool(self, node: Node, x: np.ndarray) -> np.ndarray: ...
    def interp(self, node: Node, x: np.ndarray) -> np.ndarray: ...
    def instnorm(self, node: Node, x: np.ndarray) -> np.ndarray: ...
    def approx(self, node: Node, x: np.ndarray) -> np.ndarray: ...
    def softmax(self, node: Node, x: np.ndarray) -> np.ndarray: ...
    def mul(self, node: Node, x: np.ndarray, y: np.ndarray) -> np.ndarray: ...
    def einsum(self, node: Node, x: np.ndarray, y: np.ndarray) -> np.ndarray: ...
    def pad_value(self, node: Node, dtype: np.dtype) -> Any: ...
    def output(self, node: Node, x: np.ndarray) -> Any: ...


def run_plan(
    plan: Plan,
    backend: Backend,
    batch: int,
    on_node: Callable[[Node, str], None] | None = None,
    keep: bool = False,
) -> tuple[Any, dict[str, np.ndarray]]:
    """Run every node; returns (output of the output node, values kept when ``keep``)."""
    values: dict[str, np.ndarray] = {}
    last_use = {}
    for i, n in enumerate(plan.nodes):
        for src in n.inputs:
            last_use[src] = i
    result: Any = None
    for i, node in enumerate(plan.nodes):
        if on_node:
            on_node(node, "start")
        xs = [values[s] for s in node.inputs]
        out = _step(node, xs, backend, batch)
        if node.op == "output":
            result = out
        else:
            values[node.id] = out
        if not keep:
            for s in node.inputs:
                if last_use.get(s) == i:
                    values.pop(s, None)
        if on_node:
            on_node(node, "end")
    return result, values


def _step(node: Node, xs: list[np.ndarray], be: Backend, batch: int) -> Any:
    op, a = node.op, node.attrs
    if op == "input":
        return be.input(node, batch)
    x = xs[0]
    if op in ("linear", "bias", "relu", "leaky_relu", "prelu", "trunc", "upscale", "maxpool", "avgpool", "instnorm", "approx", "softmax", "interp", "output"):
        return getattr(be, op)(node, x)
    if op == "add":
        y = xs[1]
        return x + y if a.get("signs", [1, 1])[1] > 0 else x - y
    if op in ("mul", "einsum"):
        return getattr(be, op)(node, x, xs[1])
    if op == "concat":
        return np.concatenate(xs, axis=a["axis"] + 1)
    if op == "reshape":
        return x.reshape((x.shape[0], *node.shape))
    if op == "transpose":
        return np.ascontiguousarray(x.transpose([0] + [p + 1 for p in a["perm"]]))
    if op == "slice":
        return np.ascontiguousarray(x[(slice(None),) + tuple(slice(*s) for s in a["slices"])])
    if op == "pad":
        return layout.pad(x, a["pads"], mode=a["mode"], value=be.pad_value(node, x.dtype))
    if op == "resize":
        return np.ascontiguousarray(layout.resize_nearest(x, [np.asarray(i) for i in a["indices"]]))
    raise ValueError(f"unknown plan op {op!r} in node {node.id}")
