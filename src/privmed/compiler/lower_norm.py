"""The lowering of the normalisations (part of ``privmed.compiler.lower.Lowerer``): instance,
layer and group normalisation all become one ``instnorm`` node (``privmed.ir.norm``: mean,
variance, Newton's inverse square root, on shares in ``privmed.mpc.norm``) over a public
reshape of the tensor to (groups, elements per group), then the model owner's private
per-element or per-channel affine as a ``channel_scale`` linear layer.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from privmed.compiler.lower_base import LowererBase, Ref
from privmed.compiler.onnx_front import OnnxNode
from privmed.errors import ModelError


class NormLowering(LowererBase):
    """The ``op_*`` methods of InstanceNormalization, LayerNormalization, GroupNormalization."""

    def op_InstanceNormalization(self, node: OnnxNode, ins: list[Any]) -> Ref:
        x = self.at_k1(self.ref(node.inputs[0], node), node.name)
        gamma = self.const(node.inputs[1], node).astype(np.float64).reshape(-1)
        beta = self.const(node.inputs[2], node).astype(np.float64).reshape(-1)
        c = x.shape[0]
        # affine-free instance norms (GroupNorm's inner op) skip the private gamma step
        affine = not (np.all(gamma == 1.0) and np.all(beta == 0.0))
        out = self.emit("instnorm", [x], x.shape, 2, node.name, eps=float(node.attrs.get("epsilon", 1e-5)), affine=bool(affine),
                        kind="channel_scale", w_shape=[c])
        if affine:
            self.float_weight[out.id] = np.broadcast_to(gamma, (c,)).copy()
            self.float_bias[out.id] = np.broadcast_to(beta, (c,)).reshape(c, 1).copy()
        return out

    def _grouped_norm(self, node: OnnxNode, x: Ref, groups: int, gamma: np.ndarray | None, beta: np.ndarray | None,
                      affine_axis_first: bool) -> Ref:  # fmt: skip
        """Normalise each of ``groups`` equal slices of x (per sample, in C order), then the
        private affine: per channel (axis 0) when ``affine_axis_first``, else per element of
        the trailing normalised block (gamma.size of them)."""
        x = self.at_k1(x, node.name)
        shape, total = list(x.shape), int(np.prod(x.shape))
        flat = self._reshape(node, x, [groups, total // groups])
        normed = self.emit("instnorm", [flat], flat.shape, 2, node.name, eps=float(node.attrs.get("epsilon", 1e-5)), affine=False,
                           kind="channel_scale", w_shape=[groups])
        if gamma is None or (np.all(gamma == 1.0) and (beta is None or np.all(beta == 0.0))):
            return self._reshape(node, normed, shape)
        if affine_axis_first:
            c = shape[0]
            return self._channel_affine(node, self._reshape(node, normed, shape), np.broadcast_to(gamma, (c,)), beta)
        m = gamma.size  # the normalised block is the fastest-varying m elements: affine over them
        cols = self._reshape(node, normed, [total // m, m])
        t = self.emit("transpose", [cols], [m, total // m], cols.k, node.name, perm=[1, 0])
        scaled = self._channel_affine(node, t, gamma.reshape(-1), None if beta is None else np.broadcast_to(beta, gamma.shape).reshape(-1))
        back = self.emit("transpose", [scaled], [total // m, m], scaled.k, node.name, perm=[1, 0])
        return self._reshape(node, back, shape)

    def op_LayerNormalization(self, node: OnnxNode, ins: list[Any]) -> Ref:
        """Per sample, normalise over the axes from ``axis`` on (ViT's token features)."""
        x = self.ref(node.inputs[0], node)
        axis = int(node.attrs.get("axis", -1))
        axis = axis + len(x.shape) + 1 if axis < 0 else axis
        if not 1 <= axis <= len(x.shape):
            raise ModelError(f"node {node.name}: LayerNormalization over axis {axis} includes the batch axis")
        groups = int(np.prod(x.shape[: axis - 1]))
        gamma = np.broadcast_to(self.const(node.inputs[1], node).astype(np.float64), x.shape[axis - 1 :]).reshape(-1)
        beta = self.const(node.inputs[2], node).astype(np.float64) if len(node.inputs) > 2 and node.inputs[2] else None
        beta = None if beta is None else np.broadcast_to(beta, x.shape[axis - 1 :]).reshape(-1)
        if len(node.outputs) > 1 and any(node.outputs[1:]):
            raise ModelError(f"node {node.name}: LayerNormalization's mean / inverse std outputs are not supported")
        return self._grouped_norm(node, x, groups, gamma, beta, affine_axis_first=False)

    def op_GroupNormalization(self, node: OnnxNode, ins: list[Any]) -> Ref:
        """ONNX GroupNormalization: scale and bias per group (opset 18) or per channel (21)."""
        x = self.ref(node.inputs[0], node)
        g, c = int(node.attrs["num_groups"]), x.shape[0]
        if g < 1 or c % g:
            raise ModelError(f"node {node.name}: {c} channels in {g} groups")
        gamma = self.const(node.inputs[1], node).astype(np.float64).reshape(-1)
        beta = self.const(node.inputs[2], node).astype(np.float64).reshape(-1)
        if gamma.size == g and g != c:  # opset 18: one scale per group
            gamma, beta = np.repeat(gamma, c // g), np.repeat(beta, c // g)
        return self._grouped_norm(node, x, g, gamma, beta.reshape((c,) + (1,) * (len(x.shape) - 1)), affine_axis_first=True)
