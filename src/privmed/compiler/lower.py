"""Lower ONNX nodes to IR nodes.

Scales are tracked as multiples ``k`` of the (not yet chosen) fractional bits f: the input is
at k=1, a linear layer multiplies by weights at k=1 so its output is at k+1. Consumers that
need k=1 (linear layers, pooling, concat of mixed scales) get a truncation; a ReLU at k=2
becomes one fused truncate-and-ReLU (ReLU commutes with the floor shift). ``calibrate``
turns multiples into bits once f is chosen.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from privmed.compiler.lower_base import BatchMove, Ref, Value
from privmed.compiler.lower_nonlinear import NonlinearLowering
from privmed.compiler.lower_norm import NormLowering
from privmed.compiler.lower_tokens import TokenLowering
from privmed.compiler.onnx_front import CONST_OPS, OnnxGraph, OnnxNode
from privmed.errors import ModelError
from privmed.ring.layout import resize_cubic_taps, resize_linear_taps, resize_nearest_index
from privmed.ring.linalg import ConvSpec


def _conv_spec(attrs: dict[str, Any], kernel: tuple[int, ...], spatial: list[int], transpose: bool = False) -> ConvSpec:
    n = len(kernel)
    strides = tuple(attrs.get("strides", [1] * n))
    dil = tuple(attrs.get("dilations", [1] * n))
    pads = list(attrs.get("pads", [0] * 2 * n))
    auto = attrs.get("auto_pad", "NOTSET")
    if auto in ("SAME_UPPER", "SAME_LOWER") and not transpose:
        pads = [0] * 2 * n
        for d in range(n):
            out = -(-spatial[d] // strides[d])
            total = max(0, (out - 1) * strides[d] + dil[d] * (kernel[d] - 1) + 1 - spatial[d])
            lo = total // 2 if auto == "SAME_UPPER" else total - total // 2
            pads[d], pads[n + d] = lo, total - lo
    elif auto == "VALID":
        pads = [0] * 2 * n
    elif auto not in ("NOTSET", ""):
        raise ModelError(f"auto_pad={auto} is not supported")
    return ConvSpec(tuple(int(k) for k in kernel), strides, tuple(pads), dil, int(attrs.get("group", 1)), tuple(attrs.get("output_padding", [])))


def _spec_attrs(spec: ConvSpec) -> dict[str, Any]:
    return {
        "kernel": list(spec.kernel), "strides": list(spec.strides), "pads": list(spec.pads),
        "dilations": list(spec.dilations), "groups": spec.groups, "output_padding": list(spec.output_padding),
    }


def _pool_out(spatial: list[int], kernel: list[int], strides: list[int], pads: list[int], dil: list[int], ceil_mode: int) -> tuple[list[int], list[int]]:
    """Output size and (possibly extended) pads for pooling with ceil_mode."""
    n = len(kernel)
    pads = list(pads)
    out = []
    for d in range(n):
        span = spatial[d] + pads[d] + pads[n + d] - dil[d] * (kernel[d] - 1) - 1
        o = (-(-span // strides[d]) if ceil_mode else span // strides[d]) + 1
        if ceil_mode and (o - 1) * strides[d] >= spatial[d] + pads[d]:
            o -= 1  # last window must start inside the input or left padding
        need = (o - 1) * strides[d] + dil[d] * (kernel[d] - 1) + 1 - (spatial[d] + pads[d] + pads[n + d])
        pads[n + d] += max(0, need)
        out.append(o)
    return out, pads


class Lowerer(NonlinearLowering, NormLowering, TokenLowering):
    """Walks the ONNX graph once, emitting IR nodes and collecting private float weights."""

    # -- main ------------------------------------------------------------------------
    def run(self) -> None:
        self.env[self.g.input_name] = self.emit("input", [], self.g.input_shape, 1, self.g.input_name)
        for node in self.g.nodes:
            ins = [self.env.get(i) if i else None for i in node.inputs]
            missing = [i for i, v in zip(node.inputs, ins, strict=True) if i and v is None]
            if missing:
                raise ModelError(f"node {node.name} ({node.op}): inputs {missing} are not produced by the graph")
            if all(isinstance(v, np.ndarray) or v is None for v in ins) and node.op not in ("Shape",):
                self._fold_const(node, ins)
                continue
            method = getattr(self, f"op_{node.op}", None)
            if method is None:
                raise ModelError(f"node {node.name}: {node.op} on a secret tensor is not supported")
            if node.op not in WINDOW_OPS and any(isinstance(v, Ref | BatchMove) and (v if isinstance(v, Ref) else v.ref).merged for v in ins):
                raise ModelError(f"node {node.name}: {node.op} on windows merged into the batch axis (Swin) is not supported")
            out = method(node, ins)
            self.env[node.outputs[0]] = out
        final = self.env.get(self.g.output_name)
        if not isinstance(final, Ref) or final.merged:
            raise ModelError("the model output does not depend on its input, or keeps windows merged into the batch axis")
        self.emit("output", [final], final.shape, final.k, self.g.output_name, post=self.post)

    # -- constant folding (shapes are static) ----------------------------------------
    def _fold_const(self, node: OnnxNode, ins: list[Any]) -> None:
        from privmed.compiler.constfold import evaluate

        try:
            outs = evaluate(node.op, ins, node.attrs)
        except Exception as exc:  # noqa: BLE001
            raise ModelError(f"node {node.name} ({node.op}): cannot fold constant: {exc}") from exc
        for name, val in zip(node.outputs, outs, strict=False):
            self.env[name] = np.asarray(val)

    def op_Shape(self, node: OnnxNode, ins: list[Any]) -> np.ndarray:
        v = ins[0].ref if isinstance(ins[0], BatchMove) else ins[0]
        full = v.onnx_shape if isinstance(v, Ref) else list(np.shape(v))
        start, end = node.attrs.get("start", 0), node.attrs.get("end", None)
        return np.array(full[start:end], dtype=np.int64)

    # -- linear layers -----------------------------------------------------------------
    def op_Conv(self, node: OnnxNode, ins: list[Any]) -> Ref:
        x = self.ref(node.inputs[0], node)
        w = self.const(node.inputs[1], node)
        b = self.const(node.inputs[2], node) if len(node.inputs) > 2 and node.inputs[2] else None
        spec = _conv_spec(node.attrs, tuple(w.shape[2:]), x.shape[1:])
        shape = [w.shape[0], *spec.out_shape(x.shape[1:])]
        bias = None if b is None else b.reshape((-1,) + (1,) * (len(shape) - 1))
        return self._linear(node, x, "conv", w, bias, shape, spec=_spec_attrs(spec))

    def op_ConvTranspose(self, node: OnnxNode, ins: list[Any]) -> Ref:
        x = self.ref(node.inputs[0], node)
        w = self.const(node.inputs[1], node)
        b = self.const(node.inputs[2], node) if len(node.inputs) > 2 and node.inputs[2] else None
        if "output_shape" in node.attrs:
            raise ModelError(f"node {node.name}: ConvTranspose with output_shape is not supported; give pads")
        spec = _conv_spec(node.attrs, tuple(w.shape[2:]), x.shape[1:], transpose=True)
        shape = [w.shape[1] * spec.groups, *spec.transpose_out_shape(x.shape[1:])]
        bias = None if b is None else b.reshape((-1,) + (1,) * (len(shape) - 1))
        return self._linear(node, x, "conv_transpose", w, bias, shape, spec=_spec_attrs(spec))

    def op_Gemm(self, node: OnnxNode, ins: list[Any]) -> Ref:
        x = self.ref(node.inputs[0], node)
        if node.attrs.get("transA", 0) or len(x.shape) != 1:
            raise ModelError(f"node {node.name}: Gemm needs a 2-D data input without transA")
        w = self.const(node.inputs[1], node).astype(np.float64)
        w = (w.T if node.attrs.get("transB", 0) else w) * float(node.attrs.get("alpha", 1.0))
        b = None
        if len(node.inputs) > 2 and node.inputs[2]:
            b = np.broadcast_to(self.const(node.inputs[2], node).astype(np.float64) * float(node.attrs.get("beta", 1.0)), (w.shape[1],)).copy()
        return self._linear(node, x, "matmul", w, b, [w.shape[1]])

    def op_MatMul(self, node: OnnxNode, ins: list[Any]) -> Ref:
        if all(isinstance(v, Ref) for v in ins):
            return self._secret_matmul(node, ins[0], ins[1])
        x = self.ref(node.inputs[0], node)
        w = self.const(node.inputs[1], node)
        if w.ndim != 2:
            raise ModelError(f"node {node.name}: MatMul needs a 2-D constant right operand")
        return self._linear(node, x, "matmul", w, None, x.shape[:-1] + [w.shape[1]])

    def op_BatchNormalization(self, node: OnnxNode, ins: list[Any]) -> Ref:
        x = self.ref(node.inputs[0], node)
        gamma, beta, mean, var = (self.const(i, node).astype(np.float64) for i in node.inputs[1:5])
        a = gamma / np.sqrt(var + float(node.attrs.get("epsilon", 1e-5)))
        return self._channel_affine(node, x, a, beta - mean * a)

    def op_Mul(self, node: OnnxNode, ins: list[Any]) -> Ref:
        x, c = (ins[0], ins[1]) if isinstance(ins[0], Ref) else (ins[1], ins[0])
        if isinstance(c, Ref):
            return self._secret_product(node, x, c)
        return self._channel_affine(node, x, self._per_channel(node, c, x), None)

    def op_Div(self, node: OnnxNode, ins: list[Any]) -> Ref:
        x = self.ref(node.inputs[0], node)
        c = self.const(node.inputs[1], node)
        return self._channel_affine(node, x, 1.0 / self._per_channel(node, c, x), None)

    def _add(self, node: OnnxNode, ins: list[Any], sign: int) -> Ref:
        a, b = ins
        if isinstance(a, Ref) and isinstance(b, Ref):
            k = max(a.k, b.k)
            a = a if a.k == k else self.emit("upscale", [a], a.shape, k, node.name, shift_k=k - a.k)
            b = b if b.k == k else self.emit("upscale", [b], b.shape, k, node.name, shift_k=k - b.k)
            shape = list(np.broadcast_shapes(tuple(a.shape), tuple(b.shape)))
            if shape != a.shape or shape != b.shape:
                raise ModelError(f"node {node.name}: broadcasting Add of two secret tensors is not supported")
            return self.emit("add", [a, b], shape, k, node.name, signs=[1, sign])
        x, c = (a, b) if isinstance(a, Ref) else (b, a)
        c = np.asarray(c, dtype=np.float64) * (sign if isinstance(a, Ref) else 1)
        if not isinstance(a, Ref) and sign < 0:
            raise ModelError(f"node {node.name}: constant minus secret is not supported")
        c = c.reshape(c.shape[1:]) if c.ndim == len(x.shape) + 1 else c
        np.broadcast_shapes(c.shape, tuple(x.shape))
        out = self.emit("bias", [x], x.shape, x.k, node.name)
        self.float_bias[out.id] = c
        return out

    def op_Add(self, node: OnnxNode, ins: list[Any]) -> Ref:
        return self._add(node, ins, 1)

    def op_Sub(self, node: OnnxNode, ins: list[Any]) -> Ref:
        return self._add(node, ins, -1)

    def op_MaxPool(self, node: OnnxNode, ins: list[Any]) -> Ref:
        x = self.at_k1(self.ref(node.inputs[0], node), node.name)
        kernel = list(node.attrs["kernel_shape"])
        n = len(kernel)
        strides = list(node.attrs.get("strides", [1] * n))
        dil = list(node.attrs.get("dilations", [1] * n))
        spec = _conv_spec({**node.attrs, "strides": strides}, tuple(kernel), x.shape[1:])
        out, pads = _pool_out(x.shape[1:], kernel, strides, list(spec.pads), dil, int(node.attrs.get("ceil_mode", 0)))
        return self.emit("maxpool", [x], [x.shape[0], *out], 1, node.name, kernel=kernel, strides=strides, pads=pads, dilations=dil)

    def op_AveragePool(self, node: OnnxNode, ins: list[Any]) -> Ref:
        x = self.at_k1(self.ref(node.inputs[0], node), node.name)
        kernel = list(node.attrs["kernel_shape"])
        n = len(kernel)
        strides = list(node.attrs.get("strides", [1] * n))
        spec = _conv_spec({**node.attrs, "strides": strides}, tuple(kernel), x.shape[1:])
        out, pads = _pool_out(x.shape[1:], kernel, strides, list(spec.pads), [1] * n, int(node.attrs.get("ceil_mode", 0)))
        include = bool(node.attrs.get("count_include_pad", 0)) and not node.attrs.get("ceil_mode", 0)
        return self.emit("avgpool", [x], [x.shape[0], *out], 2, node.name, kernel=kernel, strides=strides, pads=pads, count_include_pad=include)

    def op_GlobalAveragePool(self, node: OnnxNode, ins: list[Any]) -> Ref:
        x = self.at_k1(self.ref(node.inputs[0], node), node.name)
        sp = x.shape[1:]
        return self.emit("avgpool", [x], [x.shape[0]] + [1] * len(sp), 2, node.name, kernel=sp, strides=[1] * len(sp), pads=[0] * 2 * len(sp), count_include_pad=True)

    # -- data movement ---------------------------------------------------------------------
    def op_Concat(self, node: OnnxNode, ins: list[Any]) -> Ref:
        refs = [v for v in ins if v is not None]
        if not all(isinstance(r, Ref) for r in refs):
            return self._concat_with_constants(node, refs)
        if len({r.k for r in refs}) > 1:
            refs = [self.at_k1(r, node.name) for r in refs]
        axis = self._axis(int(node.attrs["axis"]), len(refs[0].shape) + 1, node)
        shape = list(refs[0].shape)
        shape[axis] = sum(r.shape[axis] for r in refs)
        return self.emit("concat", refs, shape, refs[0].k, node.name, axis=axis)

    def op_Flatten(self, node: OnnxNode, ins: list[Any]) -> Ref:
        x = self.ref(node.inputs[0], node)
        axis = int(node.attrs.get("axis", 1))
        axis = axis + len(x.shape) + 1 if axis < 0 else axis
        if axis != 1:
            raise ModelError(f"node {node.name}: Flatten axis {axis} mixes the batch axis; only axis=1 is supported")
        return self._reshape(node, x, [int(np.prod(x.shape))])

    def op_Reshape(self, node: OnnxNode, ins: list[Any]) -> Ref:
        """Per sample, in C order. A target whose first dim is not the batch (1 at export) folds
        windows into the batch axis (Swin's window partition): per sample that is a leading
        axis, and the result is ``merged`` (see ``Ref``) until a reshape unfolds it."""
        x = self.ref(node.inputs[0], node)
        target = [int(t) for t in self.const(node.inputs[1], node)]
        full_in = x.onnx_shape
        target = [full_in[i] if t == 0 and not node.attrs.get("allowzero", 0) else t for i, t in enumerate(target)]
        if -1 in target:
            known = int(np.prod([t for t in target if t != -1]))
            target[target.index(-1)] = int(np.prod(full_in)) // max(known, 1)
        if not target:
            raise ModelError(f"node {node.name}: Reshape to a scalar")
        if target[0] == 1:
            return self._reshape(node, x, target[1:], merged=False)
        if int(np.prod(target)) != int(np.prod(x.shape)) or len(target) < 2:
            raise ModelError(f"node {node.name}: Reshape to {target} changes the batch axis")
        return self._reshape(node, x, target, merged=True)

    def op_Cast(self, node: OnnxNode, ins: list[Any]) -> Ref:
        """A cast to a float type is the identity on a fixed-point tensor."""
        x = self.ref(node.inputs[0], node)
        if int(node.attrs.get("to", 0)) not in FLOAT_TYPES:
            raise ModelError(f"node {node.name}: Cast of a secret tensor to ONNX type {node.attrs.get('to')} (only to a float type)")
        return x

    def _axes(self, node: OnnxNode) -> list[int]:
        if len(node.inputs) > 1 and node.inputs[1]:
            return [int(a) for a in self.const(node.inputs[1], node)]
        return [int(a) for a in node.attrs.get("axes", [])]

    def op_Squeeze(self, node: OnnxNode, ins: list[Any]) -> Ref:
        x = self.ref(node.inputs[0], node)
        full = [1] + x.shape
        axes = [a + len(full) if a < 0 else a for a in self._axes(node)] or [i for i, s in enumerate(full) if s == 1 and i > 0]
        if 0 in axes:
            raise ModelError(f"node {node.name}: Squeeze of the batch axis is not supported")
        return self._reshape(node, x, [s for i, s in enumerate(full) if i not in axes][1:])

    def op_Unsqueeze(self, node: OnnxNode, ins: list[Any]) -> Ref:
        x = self.ref(node.inputs[0], node)
        full = [1] + x.shape
        rank = len(full) + len(self._axes(node))
        for a in sorted(a + rank if a < 0 else a for a in self._axes(node)):
            if a == 0:
                raise ModelError(f"node {node.name}: Unsqueeze before the batch axis is not supported")
            full.insert(a, 1)
        return self._reshape(node, x, full[1:])

    def op_Transpose(self, node: OnnxNode, ins: list[Any]) -> Ref | BatchMove:
        x = self.ref(node.inputs[0], node)
        perm = list(node.attrs.get("perm", list(range(len(x.onnx_shape) - 1, -1, -1))))
        if perm[0] != 0:
            return BatchMove(x, perm, node.name)  # resolved by the Gathers that use it (lower_tokens)
        p = perm if x.merged else [q - 1 for q in perm[1:]]
        return self.emit("transpose", [x], [x.shape[i] for i in p], x.k, node.name, perm=p)

    def op_Pad(self, node: OnnxNode, ins: list[Any]) -> Ref:
        x = self.ref(node.inputs[0], node)
        pads = [int(p) for p in self.const(node.inputs[1], node)]
        value = float(self.const(node.inputs[2], node)) if len(node.inputs) > 2 and node.inputs[2] else 0.0
        if len(node.inputs) > 3 and node.inputs[3]:
            raise ModelError(f"node {node.name}: Pad with axes input is not supported")
        r = len(x.shape) + 1
        if pads[0] or pads[r] or any(p < 0 for p in pads):
            raise ModelError(f"node {node.name}: Pad of the batch axis or negative pads are not supported")
        per = pads[1:r] + pads[r + 1 :]
        shape = [s + per[i] + per[len(x.shape) + i] for i, s in enumerate(x.shape)]
        return self.emit("pad", [x], shape, x.k, node.name, pads=per, mode=node.attrs.get("mode", "constant"), value=value)

    def op_Resize(self, node: OnnxNode, ins: list[Any]) -> Ref:
        """Nearest: a public gather. Linear (bilinear / trilinear) and cubic: a public linear map
        with the interpolation weights at scale f (local; the next op truncates)."""
        x = self.ref(node.inputs[0], node)
        mode = node.attrs.get("mode", "nearest")
        if mode not in ("nearest", "linear", "cubic"):
            raise ModelError(f"node {node.name}: Resize mode {mode!r} is not supported (nearest, linear, cubic)")
        if node.attrs.get("antialias", 0) or len(node.attrs.get("axes", [])):
            raise ModelError(f"node {node.name}: Resize with antialias or axes is not supported")
        full = [1] + x.shape
        sizes = self.const(node.inputs[3], node) if len(node.inputs) > 3 and node.inputs[3] else None
        if sizes is not None and np.size(sizes):
            out = [int(s) for s in sizes]
            scales = [o / i for o, i in zip(out, full, strict=True)]
        else:
            scales = [float(s) for s in self.const(node.inputs[2], node)]
            out = [int(np.floor(full[i] * scales[i])) for i in range(len(full))]
        if out[:2] != full[:2]:
            raise ModelError(f"node {node.name}: Resize of batch or channel axes is not supported")
        ctm = node.attrs.get("coordinate_transformation_mode", "half_pixel")
        if mode in ("linear", "cubic"):
            a, exclude = float(node.attrs.get("cubic_coeff_a", -0.75)), bool(node.attrs.get("exclude_outside", 0))
            try:
                per_axis = [resize_linear_taps(full[d], out[d], ctm, scales[d]) if mode == "linear"
                            else resize_cubic_taps(full[d], out[d], ctm, scales[d], a, exclude) for d in range(2, len(full))]  # fmt: skip
            except ValueError as exc:
                raise ModelError(f"node {node.name}: {exc}") from None
            x = self.at_k1(x, node.name)
            taps = [[t.tolist() for t in idx] for idx, _ in per_axis]
            weights = [[w.tolist() for w in ws] for _, ws in per_axis]
            return self.emit("interp", [x], out[1:], x.k + 1, node.name, taps=taps, weights=weights)
        nm = node.attrs.get("nearest_mode", "round_prefer_floor")
        try:
            idx = [resize_nearest_index(full[d], out[d], ctm, nm, scales[d]).tolist() for d in range(2, len(full))]
        except ValueError as exc:
            raise ModelError(f"node {node.name}: {exc}") from None
        return self.emit("resize", [x], out[1:], x.k, node.name, indices=idx)

    def op_Slice(self, node: OnnxNode, ins: list[Any]) -> Ref:
        x = self.ref(node.inputs[0], node)
        starts, ends = (self.const(i, node).astype(np.int64) for i in node.inputs[1:3])
        full = [1] + x.shape
        axes = self.const(node.inputs[3], node) if len(node.inputs) > 3 and node.inputs[3] else np.arange(len(starts))
        steps = self.const(node.inputs[4], node) if len(node.inputs) > 4 and node.inputs[4] else np.ones(len(starts), np.int64)
        sl: list[list[int]] = [[0, s, 1] for s in x.shape]
        for st, en, ax, sp in zip(starts, ends, axes, steps, strict=True):
            a = self._axis(int(ax), len(full), node)
            start, stop, step = slice(int(st), int(en), int(sp)).indices(x.shape[a])
            sl[a] = [start, stop, step]
        shape = [len(range(*s)) for s in sl]
        return self.emit("slice", [x], shape, x.k, node.name, slices=sl)

    def op_Identity(self, node: OnnxNode, ins: list[Any]) -> Value:
        return ins[0]

    def op_Dropout(self, node: OnnxNode, ins: list[Any]) -> Value:
        return ins[0]



# The supported-op list is the lowering itself: an op is supported on a secret tensor iff the
# Lowerer has a method for it.
# Ops whose lowering handles tensors with windows merged into the batch axis (``Ref.merged``).
WINDOW_OPS = frozenset({"MatMul", "Add", "Sub", "Mul", "Div", "Reshape", "Transpose", "Gather", "Softmax", "Cast", "Identity",
                        "Dropout", "Shape"})
FLOAT_TYPES = {1, 10, 11, 16}  # FLOAT, FLOAT16, DOUBLE, BFLOAT16

SECRET_OPS = frozenset(name[3:] for name in dir(Lowerer) if name.startswith("op_"))


def check_supported(graph: OnnxGraph, path: Path) -> Lowerer:
    """Refuse, in one line listing all of them, the ops that neither the lowering nor constant
    folding knows; then lower the graph (no calibration, cheap) so that ops refused in context
    (a cubic Resize, a Transpose that moves the batch axis) are reported before any party
    starts. Returns the lowering, which the compiler goes on with."""
    bad = sorted({f"{n.op} ({n.name})" for n in graph.nodes if n.op not in SECRET_OPS | CONST_OPS})
    if bad:
        ops = sorted({n.op for n in graph.nodes if n.op not in SECRET_OPS | CONST_OPS})
        raise ModelError(f"{path}: unsupported ONNX ops {', '.join(ops)} in nodes: {'; '.join(bad[:20])}" + (" ..." if len(bad) > 20 else ""))
    low = Lowerer(graph)
    try:
        low.run()
    except ModelError as exc:
        raise ModelError(f"{path}: {exc}") from None
    return low
