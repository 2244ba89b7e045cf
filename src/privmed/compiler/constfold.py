"""Compile-time evaluation of ONNX ops whose inputs are all constants (shape arithmetic)."""

from __future__ import annotations

from typing import Any

import numpy as np
from onnx import helper


def _axes(ins: list[Any], attrs: dict[str, Any]) -> list[int] | None:
    if len(ins) > 1 and ins[1] is not None:
        return [int(a) for a in np.asarray(ins[1]).reshape(-1)]
    return attrs.get("axes")


def evaluate(op: str, ins: list[Any], attrs: dict[str, Any]) -> list[np.ndarray]:
    x: Any = ins[0] if ins else None
    if op == "Constant":
        for key in ("value", "value_float", "value_floats", "value_int", "value_ints"):
            if key in attrs:
                return [np.asarray(attrs[key])]
        raise ValueError("unsupported Constant attribute")
    if op in ("Identity", "Dropout"):
        return [x]
    if op == "Cast":
        return [np.asarray(x).astype(helper.tensor_dtype_to_np_dtype(attrs["to"]))]
    if op == "Gather":
        return [np.take(x, np.asarray(ins[1]).astype(np.int64), axis=attrs.get("axis", 0))]
    if op == "Unsqueeze":
        out = np.asarray(x)
        rank = out.ndim + len(_axes(ins, attrs) or [])
        for a in sorted(a + rank if a < 0 else a for a in _axes(ins, attrs) or []):
            out = np.expand_dims(out, a)
        return [out]
    if op == "Squeeze":
        sq_axes = _axes(ins, attrs)
        return [np.squeeze(x, axis=tuple(sq_axes) if sq_axes else None)]
    if op == "Concat":
        return [np.concatenate([np.atleast_1d(v) for v in ins if v is not None], axis=attrs["axis"])]
    if op == "Reshape":
        shape = [int(s) for s in ins[1]]
        shape = [x.shape[i] if s == 0 else s for i, s in enumerate(shape)]
        return [np.reshape(x, shape)]
    if op == "Slice":
        starts, ends = np.asarray(ins[1]), np.asarray(ins[2])
        slice_axes: Any = np.asarray(ins[3]) if len(ins) > 3 and ins[3] is not None else np.arange(len(starts))
        steps: Any = np.asarray(ins[4]) if len(ins) > 4 and ins[4] is not None else np.ones(len(starts), dtype=np.int64)
        sl = [slice(None)] * np.ndim(x)
        for s, e, a, st in zip(starts, ends, slice_axes, steps, strict=True):
            sl[int(a)] = slice(int(s), int(e), int(st))
        return [np.asarray(x)[tuple(sl)]]
    if op == "ConstantOfShape":
        value = attrs.get("value", np.zeros(1, dtype=np.float32))
        return [np.full([int(s) for s in x], np.asarray(value).reshape(-1)[0])]
    if op == "Range":
        return [np.arange(ins[0], ins[1], ins[2])]
    binary = {"Add": np.add, "Sub": np.subtract, "Mul": np.multiply, "Equal": np.equal}
    if op in binary:
        return [binary[op](ins[0], ins[1])]
    if op == "Div":
        num: Any = np.asarray(ins[0])
        den: Any = np.asarray(ins[1])
        return [num // den if np.issubdtype(num.dtype, np.integer) else num / den]
    if op == "Mod":  # fmod=0: the sign of the divisor (numpy's mod); fmod=1: C's fmod
        return [(np.fmod if attrs.get("fmod", 0) else np.mod)(ins[0], ins[1])]
    if op == "Not":
        return [np.logical_not(x)]
    if op == "ScatterND":  # Swin's shifted-window mask, built from shapes only
        if attrs.get("reduction", "none") != "none":
            raise ValueError(f"ScatterND reduction {attrs['reduction']!r}")
        out, idx, upd = np.array(x, copy=True), np.asarray(ins[1]).astype(np.int64), np.asarray(ins[2])
        for i in np.ndindex(*idx.shape[:-1]):
            out[tuple(idx[i])] = upd[i]
        return [out]
    if op == "Where":
        return [np.where(ins[0], ins[1], ins[2])]
    if op == "Expand":
        return [np.broadcast_to(x, np.broadcast_shapes(np.shape(x), tuple(int(s) for s in ins[1]))).copy()]
    if op == "ReduceProd":
        return [np.prod(x, keepdims=bool(attrs.get("keepdims", 1)))]
    if op in ("Floor", "Sqrt", "Neg"):
        return [{"Floor": np.floor, "Sqrt": np.sqrt, "Neg": np.negative}[op](x)]
    if op == "Transpose":
        return [np.transpose(x, attrs.get("perm"))]
    raise ValueError(f"{op} cannot be folded")
