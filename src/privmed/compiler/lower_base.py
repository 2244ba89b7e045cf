"""The state and helpers of the ONNX -> IR lowering (``privmed.compiler.lower.Lowerer``).

Scales are tracked as multiples ``k`` of the (not yet chosen) fractional bits f; see
``privmed.compiler.lower``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from privmed.compiler.onnx_front import OnnxGraph, OnnxNode, consumers
from privmed.errors import ModelError
from privmed.ir.check import MAX_TEXT
from privmed.ir.plan import Node
from privmed.ir.shapes import infer_shape


@dataclass
class Ref:
    id: str
    shape: list[int]  # per sample
    k: int
    # Swin's window partition reshapes (b, H, W, C) to (b * windows, ...): the ONNX graph then
    # sees the windows inside its batch axis. Per sample that is an ordinary leading axis of
    # ``shape``; ``merged`` says that the ONNX axes of this tensor are the per-sample axes
    # (ONNX axis 0 is ``shape[0]``) instead of the batch followed by them.
    merged: bool = False

    @property
    def onnx_shape(self) -> list[int]:
        """The tensor's shape as the ONNX graph (exported with batch 1) sees it."""
        return list(self.shape) if self.merged else [1, *self.shape]


@dataclass
class BatchMove:
    """A Transpose that moves the batch axis (``perm[0] != 0``), kept pending: its only allowed
    uses are Gathers of one index of the new first axis (einops' "b h (qkv l d) -> qkv b l h d"
    then [0], [1], [2]), which bring the batch axis back to the front."""

    ref: Ref
    perm: list[int]  # over the full axes, batch included
    name: str


Value = np.ndarray | Ref | BatchMove


class LowererBase:
    """The emitted nodes, the private float weights, and the helpers every op lowering uses."""

    def __init__(self, graph: OnnxGraph) -> None:
        self.g = graph
        self.nodes: list[Node] = []
        self.float_weight: dict[str, np.ndarray] = {}
        self.float_bias: dict[str, np.ndarray] = {}
        self.env: dict[str, Value] = {k: v for k, v in graph.consts.items()}
        self.cons = consumers(graph)
        self.post: dict[str, Any] = {"kind": "none"}
        self._n = 0
        self._tables: dict[str, dict[str, Any]] = {}  # fitted once per function and model

    def emit(self, op: str, inputs: list[Ref], shape: list[int], k: int, name: str, *, merged: bool | None = None, **attrs: Any) -> Ref:
        self._n += 1
        nid = f"n{self._n}_{op}"
        attrs["onnx"] = "".join(ch if ch.isprintable() else "?" for ch in name)[:MAX_TEXT]
        shape = [int(s) for s in shape]
        if op != "input":
            # the receivers recompute every shape with the same rule (privmed.ir.check)
            inferred = infer_shape(op, [r.shape for r in inputs], attrs)
            if inferred != shape:
                raise ModelError(f"node {name} ({op}): lowered shape {shape} but the IR shape rule gives {inferred}")
        self.nodes.append(Node(nid, op, [r.id for r in inputs], shape, k, attrs))
        return Ref(nid, shape, k, inputs[0].merged if merged is None and inputs else bool(merged))

    def at_k1(self, ref: Ref, name: str) -> Ref:
        if ref.k == 1:
            return ref
        return self.emit("trunc", [ref], ref.shape, 1, name, shift_k=ref.k - 1)

    def const(self, name: str, node: OnnxNode) -> np.ndarray:
        v = self.env.get(name)
        if not isinstance(v, np.ndarray):
            raise ModelError(f"node {node.name} ({node.op}): input {name!r} must be a constant (model weights), got a secret tensor")
        return v

    def ref(self, name: str, node: OnnxNode) -> Ref:
        v = self.env.get(name)
        if isinstance(v, BatchMove):
            raise ModelError(f"node {v.name}: a Transpose that moves the batch axis is supported only when every use selects one "
                             f"index of its first axis (Gather), not by {node.name} ({node.op})")
        if not isinstance(v, Ref):
            raise ModelError(f"node {node.name} ({node.op}): input {name!r} must be the data tensor")
        return v

    def axis_of(self, x: Ref, axis: int, node: OnnxNode) -> int:
        """The per-sample axis of ONNX ``axis`` of x (see ``Ref.merged``)."""
        if not x.merged:
            return self._axis(axis, len(x.shape) + 1, node)
        axis = axis + len(x.shape) if axis < 0 else axis
        if axis == 0:
            raise ModelError(f"node {node.name} ({node.op}) acts on the windows merged into the batch axis, which is not supported")
        return axis

    def _axis(self, axis: int, rank: int, node: OnnxNode) -> int:
        axis = axis + rank if axis < 0 else axis
        if axis == 0:
            raise ModelError(f"node {node.name} ({node.op}) acts on the batch axis, which is not supported")
        return axis - 1

    def _linear(self, node: OnnxNode, x: Ref, kind: str, w: np.ndarray, b: np.ndarray | None, shape: list[int], **attrs: Any) -> Ref:
        x = self.at_k1(x, node.name)
        out = self.emit("linear", [x], shape, x.k + 1, node.name, kind=kind, w_shape=list(w.shape), **attrs)
        self.float_weight[out.id] = w.astype(np.float64)
        if b is not None:
            self.float_bias[out.id] = b.astype(np.float64)
        return out

    def _channel_affine(self, node: OnnxNode, x: Ref, a: np.ndarray, b: np.ndarray | None) -> Ref:
        c = x.shape[0]
        a = np.broadcast_to(np.asarray(a, dtype=np.float64).reshape(-1), (c,)).copy()
        bias = None if b is None else np.broadcast_to(np.asarray(b, np.float64).reshape(-1), (c,)).reshape((c,) + (1,) * (len(x.shape) - 1)).copy()
        return self._linear(node, x, "channel_scale", a, bias, x.shape)

    def _per_channel(self, node: OnnxNode, c: np.ndarray, x: Ref) -> np.ndarray:
        c = np.asarray(c, dtype=np.float64)
        if x.merged and c.size != 1:
            raise ModelError(f"node {node.name} ({node.op}): only scalar constants on windows merged into the batch axis")
        if c.size == 1:
            return c.reshape(1)
        squeezed = c.reshape(c.shape[1:]) if c.ndim == len(x.shape) + 1 else c
        if squeezed.ndim == len(x.shape) and squeezed.shape[0] == x.shape[0] and all(s == 1 for s in squeezed.shape[1:]):
            return squeezed.reshape(-1)
        raise ModelError(f"node {node.name} ({node.op}): only scalar or per-channel constants are supported, got shape {c.shape}")

    def _reshape(self, node: OnnxNode, x: Ref, shape: list[int], merged: bool | None = None) -> Ref:
        if int(np.prod(shape)) != int(np.prod(x.shape)):
            raise ModelError(f"node {node.name}: cannot reshape {x.shape} to {shape}")
        return self.emit("reshape", [x], shape, x.k, node.name, merged=merged, to=[int(d) for d in shape])
