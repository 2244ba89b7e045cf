"""The lowering of the token ops of vision transformers (part of
``privmed.compiler.lower.Lowerer``): Gather of one index on a secret tensor (the class token
``x[:, 0]``, and q, k, v out of einops' "b h (qkv l d) -> qkv b l h d"), and Concat of a secret
tensor with the model owner's constants (the class token), all public data movement plus, for
the constants, one private bias.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from privmed.compiler.lower_base import BatchMove, LowererBase, Ref
from privmed.compiler.onnx_front import OnnxNode
from privmed.errors import ModelError


class TokenLowering(LowererBase):
    """``op_Gather`` and the constant operands of ``op_Concat``."""

    def _take(self, node: OnnxNode, x: Ref, axis: int, index: int) -> Ref:
        """x[..., index, ...] along per-sample ``axis``: a slice, then a reshape without it."""
        n = x.shape[axis]
        if not -n <= index < n:
            raise ModelError(f"node {node.name}: Gather index {index} of an axis of size {n}")
        index %= n
        sl = [[0, s, 1] for s in x.shape]
        sl[axis] = [index, index + 1, 1]
        one = self.emit("slice", [x], [1 if d == axis else s for d, s in enumerate(x.shape)], x.k, node.name, slices=sl)
        return self._reshape(node, one, [s for d, s in enumerate(x.shape) if d != axis])

    def op_Gather(self, node: OnnxNode, ins: list[Any]) -> Ref:
        data, idx = ins[0], self.const(node.inputs[1], node)
        if np.ndim(idx) != 0:
            raise ModelError(f"node {node.name}: Gather on a secret tensor takes one constant index, got shape {np.shape(idx)}")
        axis, index = int(node.attrs.get("axis", 0)), int(idx)
        if isinstance(data, BatchMove):
            if axis != 0:
                raise ModelError(f"node {node.name}: Gather axis {axis} of a Transpose that moved the batch axis (only axis 0)")
            moved = data.perm[0]  # ONNX axis (>= 1) that the transpose brought to the front
            rest = [q if q < moved else q - 1 for q in data.perm[1:]]
            if rest[0] != 0:
                raise ModelError(f"node {node.name}: after Gather the batch axis is not first (perm {data.perm})")
            merged = data.ref.merged  # then ONNX axes are the per-sample axes (lower_base.Ref)
            x = self._take(node, data.ref, moved if merged else moved - 1, index)
            p = rest if merged else [q - 1 for q in rest[1:]]
            if p == sorted(p):
                return x
            return self.emit("transpose", [x], [x.shape[i] for i in p], x.k, node.name, perm=p)
        x = self.ref(node.inputs[0], node)
        return self._take(node, x, self.axis_of(x, axis, node), index)

    def _concat_with_constants(self, node: OnnxNode, parts: list[Any]) -> Ref:
        """Concat(c_1.., x.., c_k): the constants (the model owner's, e.g. a class token) before
        and after the secret parts become zero padding plus a private bias there."""
        secret = [i for i, v in enumerate(parts) if isinstance(v, Ref)]
        if not secret or secret != list(range(secret[0], secret[-1] + 1)):
            raise ModelError(f"node {node.name}: Concat with constants only before and after the secret tensors")
        refs = [self.at_k1(parts[i], node.name) for i in secret]
        rank = len(refs[0].shape)
        axis = self._axis(int(node.attrs["axis"]), rank + 1, node)
        consts = [np.zeros((1,)) if isinstance(v, Ref) else np.asarray(v, dtype=np.float64) for v in parts]
        if any(c.shape[0] != 1 or list(c.shape[1:]) != [*refs[0].shape[:axis], c.shape[axis + 1], *refs[0].shape[axis + 1 :]]
               for i, c in enumerate(consts) if i not in secret):  # fmt: skip
            raise ModelError(f"node {node.name}: Concat constants must match the secret tensor's other dims (batch 1)")
        x = refs[0] if len(refs) == 1 else self.emit("concat", refs, [*refs[0].shape[:axis], sum(r.shape[axis] for r in refs),
                                                                       *refs[0].shape[axis + 1 :]], 1, node.name, axis=axis)  # fmt: skip
        before = sum(c.shape[axis + 1] for i, c in enumerate(consts) if i < secret[0])
        after = sum(c.shape[axis + 1] for i, c in enumerate(consts) if i > secret[-1])
        pads = [0] * (2 * rank)
        pads[axis], pads[rank + axis] = before, after
        shape = list(x.shape)
        shape[axis] += before + after
        padded = self.emit("pad", [x], shape, x.k, node.name, pads=pads, mode="constant", value=0.0)
        full = np.zeros(shape)
        lead = [slice(None)] * axis
        full[(*lead, slice(0, before))] = np.concatenate([consts[i][0] for i in range(secret[0])], axis=axis) if before else 0.0
        if after:
            full[(*lead, slice(shape[axis] - after, None))] = np.concatenate([consts[i][0] for i in range(secret[-1] + 1, len(parts))], axis=axis)
        out = self.emit("bias", [padded], shape, padded.k, node.name)
        self.float_bias[out.id] = full
        return out
