"""Shape inference: one function per plan op, the output shape from the input shapes and attrs.

The compiler emits every node's shape through ``infer_shape`` and every party that receives a
plan recomputes them with it (``privmed.ir.check``), so the shapes a hostile model owner
declares cannot differ from the shapes the data actually has: the masks, tables and triples
that the protocols draw per node are sized from these shapes.

Shapes are per sample (the batch dimension is not included) and computed with Python ints, so
a huge declared dimension cannot overflow. Each function assumes its attributes passed the
schema in ``privmed.ir.check`` (types and ranges) and raises ``ShapeError`` for any
inconsistency between the attributes and the input shapes.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from privmed.ring.linalg import ConvSpec

Shape = list[int]
MAX_TAP_COMBINATIONS = 64  # interp: 4 taps per axis in 3-D (tricubic)


class ShapeError(ValueError):
    """The attributes of a node do not fit its input shapes."""


def _same(in_shapes: Sequence[Shape], attrs: dict[str, Any]) -> Shape:
    return list(in_shapes[0])


def _spatial_rank(x: Shape, attrs: dict[str, Any], key: str = "kernel") -> int:
    n = len(attrs[key])
    if len(x) != n + 1:
        raise ShapeError(f"{len(x) - 1} spatial dims in the input but a {n}-d {key}")
    return n


def _window_out(x: Shape, kernel: Sequence[int], strides: Sequence[int], pads: Sequence[int], dil: Sequence[int]) -> Shape:
    n = len(kernel)
    for name, seq, want in (("strides", strides, n), ("pads", pads, 2 * n), ("dilations", dil, n)):
        if len(seq) != want:
            raise ShapeError(f"{name} has {len(seq)} entries, expected {want}")
    out = []
    for d in range(n):
        span = x[d + 1] + pads[d] + pads[n + d] - dil[d] * (kernel[d] - 1) - 1
        if span < 0:
            raise ShapeError(f"window {kernel[d]} (dilation {dil[d]}) does not fit dim {d} of size {x[d + 1]} + pads")
        out.append(span // strides[d] + 1)
    return [x[0], *out]


def conv_spec_of(spec: dict[str, Any]) -> ConvSpec:
    return ConvSpec(tuple(spec["kernel"]), tuple(spec["strides"]), tuple(spec["pads"]), tuple(spec["dilations"]),
                    spec["groups"], tuple(spec["output_padding"]))


def _linear(in_shapes: Sequence[Shape], attrs: dict[str, Any]) -> Shape:
    x, w, kind = in_shapes[0], list(attrs["w_shape"]), attrs["kind"]
    if kind == "matmul":
        if len(w) != 2 or x[-1] != w[0]:
            raise ShapeError(f"matmul of {x} with weights {w}")
        return [*x[:-1], w[1]]
    if kind == "channel_scale":
        if w != [x[0]]:
            raise ShapeError(f"per-channel weights {w} for {x[0]} channels")
        return list(x)
    spec = conv_spec_of(attrs["spec"])
    n = spec.ndim
    if len(x) != n + 1 or len(w) != n + 2 or tuple(w[2:]) != spec.kernel:
        raise ShapeError(f"{n}-d {kind} with weights {w} on input {x}")
    if len(spec.output_padding) not in (0, n):
        raise ShapeError(f"output_padding {list(spec.output_padding)} for a {n}-d {kind}")
    g = spec.groups
    if kind == "conv":
        if x[0] != w[1] * g or w[0] % g:
            raise ShapeError(f"conv weights {w} with {g} groups on {x[0]} input channels")
        out = _window_out(x, spec.kernel, spec.strides, spec.pads, spec.dilations)
        return [w[0], *out[1:]]
    if x[0] != w[0] or w[0] % g:
        raise ShapeError(f"conv_transpose weights {w} with {g} groups on {x[0]} input channels")
    if len(spec.strides) != n or len(spec.pads) != 2 * n or len(spec.dilations) != n:
        raise ShapeError(f"conv_transpose geometry does not match its {n}-d kernel")
    spatial = list(spec.transpose_out_shape(x[1:]))
    if min(spatial) < 1:
        raise ShapeError(f"conv_transpose output {spatial} is empty")
    return [w[1] * g, *spatial]


def _maxpool(in_shapes: Sequence[Shape], attrs: dict[str, Any]) -> Shape:
    x = in_shapes[0]
    _spatial_rank(x, attrs)
    return _window_out(x, attrs["kernel"], attrs["strides"], attrs["pads"], attrs["dilations"])


def _avgpool(in_shapes: Sequence[Shape], attrs: dict[str, Any]) -> Shape:
    x = in_shapes[0]
    n = _spatial_rank(x, attrs)
    return _window_out(x, attrs["kernel"], attrs["strides"], attrs["pads"], [1] * n)


def _instnorm(in_shapes: Sequence[Shape], attrs: dict[str, Any]) -> Shape:
    x = in_shapes[0]
    if len(x) < 2 or list(attrs["w_shape"]) != [x[0]]:
        raise ShapeError(f"instance norm over {x} with per-channel weights {attrs['w_shape']}")
    return list(x)


def _per_channel(in_shapes: Sequence[Shape], attrs: dict[str, Any]) -> Shape:
    x = in_shapes[0]
    if list(attrs["w_shape"]) != [x[0]]:
        raise ShapeError(f"per-channel weights {attrs['w_shape']} for {x[0]} channels")
    return list(x)


def _add(in_shapes: Sequence[Shape], attrs: dict[str, Any]) -> Shape:
    if len(in_shapes) != 2 or in_shapes[0] != in_shapes[1]:
        raise ShapeError(f"add of {in_shapes} (the two shapes must be equal: no broadcasting)")
    return list(in_shapes[0])


def _mul(in_shapes: Sequence[Shape], attrs: dict[str, Any]) -> Shape:
    x, y = in_shapes
    if len(x) != len(y) or any(b not in (1, a) for a, b in zip(x, y, strict=True)):
        raise ShapeError(f"secret product of {x} and {y} (the second must broadcast to the first)")
    return list(x)


def _softmax(in_shapes: Sequence[Shape], attrs: dict[str, Any]) -> Shape:
    if attrs["axis"] >= len(in_shapes[0]):
        raise ShapeError(f"softmax axis {attrs['axis']} of a rank-{len(in_shapes[0])} tensor")
    return list(in_shapes[0])


def _einsum(in_shapes: Sequence[Shape], attrs: dict[str, Any]) -> Shape:
    ins, out = attrs["equation"].split("->")
    sizes: dict[str, int] = {}
    for letters, shape in zip(ins.split(","), in_shapes, strict=True):
        if len(letters) != len(shape):
            raise ShapeError(f"einsum operand {letters!r} for a rank-{len(shape)} tensor")
        for c, n in zip(letters, shape, strict=True):
            if sizes.setdefault(c, n) != n:
                raise ShapeError(f"einsum axis {c!r} has sizes {sizes[c]} and {n}")
    return [sizes[c] for c in out]


def _concat(in_shapes: Sequence[Shape], attrs: dict[str, Any]) -> Shape:
    axis, first = attrs["axis"], in_shapes[0]
    if not 0 <= axis < len(first):
        raise ShapeError(f"concat axis {axis} of a rank-{len(first)} tensor")
    for s in in_shapes[1:]:
        if len(s) != len(first) or any(a != b for d, (a, b) in enumerate(zip(s, first, strict=True)) if d != axis):
            raise ShapeError(f"concat of {list(in_shapes)} along axis {axis}")
    out = list(first)
    out[axis] = sum(s[axis] for s in in_shapes)
    return out


def _reshape(in_shapes: Sequence[Shape], attrs: dict[str, Any]) -> Shape:
    target = list(attrs["to"])
    if _prod(target) != _prod(in_shapes[0]):
        raise ShapeError(f"reshape of {in_shapes[0]} to {target} changes the element count")
    return target


def _transpose(in_shapes: Sequence[Shape], attrs: dict[str, Any]) -> Shape:
    x, perm = in_shapes[0], list(attrs["perm"])
    if sorted(perm) != list(range(len(x))):
        raise ShapeError(f"perm {perm} is not a permutation of {len(x)} axes")
    return [x[p] for p in perm]


def _slice(in_shapes: Sequence[Shape], attrs: dict[str, Any]) -> Shape:
    x, slices = in_shapes[0], attrs["slices"]
    if len(slices) != len(x):
        raise ShapeError(f"{len(slices)} slices for a rank-{len(x)} tensor")
    out = []
    for (start, stop, step), size in zip(slices, x, strict=True):
        if step < 1 or not 0 <= start <= stop <= size:
            raise ShapeError(f"slice [{start}:{stop}:{step}] of a dim of size {size} (need 0 <= start <= stop <= size, step >= 1)")
        out.append(len(range(start, stop, step)))
    return out


def _pad(in_shapes: Sequence[Shape], attrs: dict[str, Any]) -> Shape:
    x, pads = in_shapes[0], attrs["pads"]
    r = len(x)
    if len(pads) != 2 * r:
        raise ShapeError(f"{len(pads)} pads for a rank-{r} tensor")
    if attrs["mode"] == "reflect" and any(pads[i] >= x[i] or pads[r + i] >= x[i] for i in range(r)):
        raise ShapeError(f"reflect pads {pads} as large as the tensor {x}")
    return [s + pads[i] + pads[r + i] for i, s in enumerate(x)]


def _resize(in_shapes: Sequence[Shape], attrs: dict[str, Any]) -> Shape:
    x, idx = in_shapes[0], attrs["indices"]
    if len(idx) != len(x) - 1:
        raise ShapeError(f"{len(idx)} index lists for {len(x) - 1} spatial dims")
    for d, ind in enumerate(idx):
        if not ind or min(ind) < 0 or max(ind) >= x[d + 1]:
            raise ShapeError(f"resize indices of spatial dim {d} outside [0, {x[d + 1]})")
    return [x[0], *(len(ind) for ind in idx)]


def _interp(in_shapes: Sequence[Shape], attrs: dict[str, Any]) -> Shape:
    x, taps, weights = in_shapes[0], attrs["taps"], attrs["weights"]
    if len(taps) != len(x) - 1 or len(weights) != len(taps):
        raise ShapeError(f"{len(taps)} tap lists and {len(weights)} weight lists for {len(x) - 1} spatial dims")
    if _prod([len(axis) for axis in taps]) > MAX_TAP_COMBINATIONS:  # each combination is one gather of the output
        raise ShapeError(f"{_prod([len(axis) for axis in taps])} tap combinations, more than {MAX_TAP_COMBINATIONS} (tricubic)")
    out = [x[0]]
    for d, (axis, w) in enumerate(zip(taps, weights, strict=True)):
        size = len(axis[0])
        if len(w) != len(axis) or any(len(t) != size for t in [*axis, *w]):
            raise ShapeError(f"spatial dim {d}: every tap and weight list must have the same length")
        if any(min(t) < 0 or max(t) >= x[d + 1] for t in axis):
            raise ShapeError(f"interpolation taps of spatial dim {d} outside [0, {x[d + 1]})")
        out.append(size)
    return out


def _prod(shape: Sequence[int]) -> int:
    out = 1
    for s in shape:
        out *= int(s)
    return out


INFER: dict[str, Callable[[Sequence[Shape], dict[str, Any]], Shape]] = {
    "linear": _linear, "bias": _same, "relu": _same, "leaky_relu": _same, "trunc": _same,
    "upscale": _same, "prelu": _per_channel, "maxpool": _maxpool, "avgpool": _avgpool, "instnorm": _instnorm,
    "add": _add, "mul": _mul, "einsum": _einsum, "approx": _same, "softmax": _softmax, "concat": _concat, "reshape": _reshape, "transpose": _transpose,
    "slice": _slice, "pad": _pad, "resize": _resize, "interp": _interp, "output": _same,
}


def infer_shape(op: str, in_shapes: Sequence[Shape], attrs: dict[str, Any]) -> Shape:
    """The per-sample output shape of one node (``input`` is given by the plan, not inferred)."""
    fn = INFER.get(op)
    if fn is None:
        raise ShapeError(f"no shape rule for op {op!r}")
    out = fn([list(s) for s in in_shapes], attrs)
    if not out or min(out) < 1:
        raise ShapeError(f"output shape {out} is empty")
    return out


def elements(shape: Sequence[int]) -> int:
    """Number of elements, as a Python int (no overflow)."""
    return _prod(shape)
