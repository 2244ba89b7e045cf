"""The lowering of the non-linear ONNX ops (part of ``privmed.compiler.lower.Lowerer``).

ReLU, LeakyReLU and PReLU become comparisons (fused with the truncation of their input);
Sigmoid, Tanh, Erf, SiLU (``Swish``, fused by ``onnx_front``) and GELU inside the network become
``approx`` nodes whose public piecewise-cubic table (``privmed.compiler.approx``) travels in the
plan; a Softmax inside is the secure ``softmax`` node (``privmed.ir.softmax``); a final Sigmoid
or Softmax is applied by the data owner in clear; a product of two secret tensors is one ``mul``
node and a MatMul / Einsum of two secret tensors one ``einsum`` node (a Beaver product each).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from privmed.compiler.approx import fit_table
from privmed.compiler.lower_base import LowererBase, Ref
from privmed.compiler.onnx_front import OnnxNode
from privmed.errors import ModelError
from privmed.ir.shapes import ShapeError, infer_shape

SOFTMAX_NEWTON_STEPS = 4  # relative error of 1/S: (1/3)^16 = 2.3e-8 (privmed.ir.softmax)


class NonlinearLowering(LowererBase):
    """The ``op_*`` methods of the non-linear ops."""

    def op_Relu(self, node: OnnxNode, ins: list[Any]) -> Ref:
        x = self.ref(node.inputs[0], node)
        return self.emit("relu", [x], x.shape, 1, node.name, shift_k=x.k - 1)

    def op_PRelu(self, node: OnnxNode, ins: list[Any]) -> Ref:
        """ReLU(x) + a * (x - ReLU(x)) with the model owner's private slopes a (one per channel,
        or one shared): the ReLU's comparison, then one private per-channel product."""
        x = self.ref(node.inputs[0], node)
        slope = self._per_channel(node, self.const(node.inputs[1], node), x)
        c = x.shape[0]
        out = self.emit("prelu", [x], x.shape, 2, node.name, shift_k=x.k - 1, w_shape=[c])
        self.float_weight[out.id] = np.broadcast_to(slope, (c,)).astype(np.float64).copy()
        return out

    def op_LeakyRelu(self, node: OnnxNode, ins: list[Any]) -> Ref:
        x = self.ref(node.inputs[0], node)
        alpha = float(node.attrs.get("alpha", 0.01))
        return self.emit("leaky_relu", [x], x.shape, 2, node.name, shift_k=x.k - 1, alpha=alpha)

    def _final(self, node: OnnxNode, kind: str) -> Ref:
        """The model's last op, applied exactly by the data owner in clear after the reveal."""
        x = self.ref(node.inputs[0], node)
        axis = int(node.attrs.get("axis", -1))
        self.post = {"kind": kind, "axis": axis}
        return x

    def _approx(self, node: OnnxNode, fn: str) -> Ref:
        """A smooth activation inside the network: the public piecewise cubic of
        ``privmed.compiler.approx`` (its table travels in the plan), on x at scale f."""
        x = self.at_k1(self.ref(node.inputs[0], node), node.name)
        if fn not in self._tables:
            self._tables[fn] = fit_table(fn)
        t = self._tables[fn]
        return self.emit("approx", [x], x.shape, 2, node.name, fn=fn, knots=t["knots"], centers=t["centers"], coeffs=t["coeffs"])

    def op_Sigmoid(self, node: OnnxNode, ins: list[Any]) -> Ref:
        if node.outputs[0] == self.g.output_name:
            return self._final(node, "sigmoid")  # the model's last op: exact, in clear
        return self._approx(node, "sigmoid")

    def op_Tanh(self, node: OnnxNode, ins: list[Any]) -> Ref:
        return self._approx(node, "tanh")

    def op_Erf(self, node: OnnxNode, ins: list[Any]) -> Ref:
        return self._approx(node, "erf")

    def op_Swish(self, node: OnnxNode, ins: list[Any]) -> Ref:
        """x * Sigmoid(x) (SiLU), fused by ``onnx_front`` (ONNX has no Swish op)."""
        return self._approx(node, "silu")

    def op_Gelu(self, node: OnnxNode, ins: list[Any]) -> Ref:
        """ONNX Gelu (opset 20; erf or tanh form), or torch's exported x * (Erf(x / sqrt 2) + 1) * 0.5
        fused by ``onnx_front``."""
        approximate = node.attrs.get("approximate", "none")
        if approximate not in ("none", "tanh"):
            raise ModelError(f"node {node.name}: Gelu approximate={approximate!r} is not supported (none, tanh)")
        return self._approx(node, "gelu" if approximate == "none" else "gelu_tanh")

    def op_Softmax(self, node: OnnxNode, ins: list[Any]) -> Ref:
        """The model's last op: in clear by the data owner. Inside (attention): the secure
        softmax of ``privmed.ir.softmax`` with the exponential's table in the plan."""
        if node.outputs[0] == self.g.output_name:
            return self._final(node, "softmax")
        x = self.at_k1(self.ref(node.inputs[0], node), node.name)
        axis = self.axis_of(x, int(node.attrs.get("axis", -1)), node)
        if "expneg" not in self._tables:
            self._tables["expneg"] = fit_table("expneg")
        t = self._tables["expneg"]
        return self.emit("softmax", [x], x.shape, 2, node.name, axis=axis, knots=t["knots"], centers=t["centers"], coeffs=t["coeffs"],
                         iters=SOFTMAX_NEWTON_STEPS)

    def _secret_product(self, node: OnnxNode, x: Ref, y: Ref) -> Ref:
        """x * y for two secret tensors (attention gates, squeeze-excitation): one Beaver
        product, the smaller operand broadcast over the larger."""
        if len(y.shape) > len(x.shape) or (len(y.shape) == len(x.shape) and int(np.prod(y.shape)) > int(np.prod(x.shape))):
            x, y = y, x
        if len(y.shape) < len(x.shape):
            y = self._reshape(node, y, [1] * (len(x.shape) - len(y.shape)) + y.shape)
        if any(b not in (1, a) for a, b in zip(x.shape, y.shape, strict=True)):
            raise ModelError(f"node {node.name}: Mul of secret tensors {x.shape} and {y.shape}: one must broadcast to the other")
        x, y = self.at_k1(x, node.name), self.at_k1(y, node.name)
        return self.emit("mul", [x, y], x.shape, 2, node.name)

    def _secret_matmul(self, node: OnnxNode, x: Ref, y: Ref) -> Ref:
        """MatMul of two secret tensors (..., m, k) @ (..., k, n) with equal leading dims, or a
        per-sample (k, n) y: one Beaver einsum."""
        rx, ry = len(x.shape), len(y.shape)
        if rx < 2 or ry < 2 or (ry != 2 and ry != rx) or (ry == rx and x.shape[:-2] != y.shape[:-2]):
            raise ModelError(f"node {node.name}: MatMul of secret tensors {x.shape} and {y.shape} (leading dims must match)")
        lead = "abcd"[: rx - 2]
        ylead = lead if ry == rx else ""
        return self._einsum(node, x, y, f"{lead}mk,{ylead}kn->{lead}mn")

    def op_Einsum(self, node: OnnxNode, ins: list[Any]) -> Ref:
        """Einsum of two secret tensors whose first axis is the batch (attention's Q K^T and P V)."""
        eq = str(node.attrs.get("equation", "")).replace(" ", "")
        x, y = (self.ref(i, node) for i in node.inputs) if len(node.inputs) == 2 else (None, None)
        parts = eq.replace("->", ",").split(",") if "->" in eq and "." not in eq else []
        if x is None or y is None or len(parts) != 3 or len({p[:1] for p in parts}) != 1 or any(p[:1] in p[1:] for p in parts):
            raise ModelError(f"node {node.name}: Einsum {eq!r} is supported for two secret operands sharing the batch axis first, no ellipsis")
        letters = sorted(set("".join(p[1:] for p in parts)))
        if len(letters) > 25:
            raise ModelError(f"node {node.name}: Einsum {eq!r} has too many axes")
        rename = {c: chr(ord("a") + i) for i, c in enumerate(letters)}
        xs, ys, out = ("".join(rename[c] for c in p[1:]) for p in parts)
        return self._einsum(node, x, y, f"{xs},{ys}->{out}")

    def _einsum(self, node: OnnxNode, x: Ref, y: Ref, equation: str) -> Ref:
        x, y = self.at_k1(x, node.name), self.at_k1(y, node.name)
        try:
            shape = infer_shape("einsum", [x.shape, y.shape], {"equation": equation})
        except ShapeError as exc:
            raise ModelError(f"node {node.name}: {exc}") from None
        return self.emit("einsum", [x, y], shape, 2, node.name, equation=equation)
