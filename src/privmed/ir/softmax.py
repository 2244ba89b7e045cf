"""Softmax inside the network (attention): the one fixed-point algorithm that the reference
runs on values and the secure runtime on shares (``privmed.mpc.approx`` supplies the ops).

For x at scale f along an axis of length L (softmax(x)_i = exp(x_i - max) / sum_j exp(x_j - max)):

1. m = max_j x_j by a pairwise tree, max(a, b) = b + ReLU(a - b): ceil(log2 L) ReLU layers.
2. z = x - m <= 0 and e = exp(z) as the public piecewise cubic of exp(min(z, 0))
   (``privmed.ir.approx``, fitted within 1e-4; e = 1 exactly at the maximum), truncated to f.
3. S = sum_j e_j, in [1, L (1 + 1e-4)] (local).
4. 1/S by Newton's y <- y (2 - S y) from y0 = (2/3) 2^-k for S in [2^k, 2^(k+1)), k from the
   sign bits [S >= 2^k], k = 1..ceil(log2 L) (a public linear map of the bits): S y0 is in
   [2/3, 4/3], so the relative error 1/3 squares at each step: 1.1e-1, 1.2e-2, 1.5e-4, 2.3e-8
   after ``iters`` = 4 steps, then fixed-point rounding (a few units of 2^-f).
5. out = e * y (y broadcast along the axis), at scale 2f (the next op truncates).

Error: |out - softmax| <= (delta_e + p_i L delta_e) / S + p_i (relative error of y), with
delta_e <= 1.3e-4 the exponential's bound (fit + fixed point + one truncation), i.e. at most
1.3e-4 (1 + L p_i) plus a few ulps.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from privmed.ir.approx import ApproxOps, piecewise
from privmed.ring.fixed import U64, encode


def row_max(ops: ApproxOps, x: np.ndarray) -> np.ndarray:
    """Step 1 along the last axis (keeps it, length 1)."""
    m = x
    while m.shape[-1] > 1:
        k, half = m.shape[-1], m.shape[-1] // 2
        lo, hi = m[..., 0 : 2 * half : 2], m[..., 1 : 2 * half : 2]
        merged = hi + ops.relu(np.ascontiguousarray(lo - hi))
        m = np.concatenate([merged, m[..., 2 * half :]], axis=-1) if k % 2 else merged
    return m


def reciprocal_guess(ops: ApproxOps, s: np.ndarray, length: int, f: int) -> np.ndarray:
    """Step 4's y0 for S in [1, length] (s at scale f, any shape): (2/3) 2^-k on [2^k, 2^(k+1))."""
    ks = np.arange(1, max(1, math.ceil(math.log2(length))) + 1, dtype=np.float64)
    bits = ops.sign_thresholds(np.ascontiguousarray(s), encode(2.0**ks, f))  # (K, *s.shape)
    steps = encode((2.0 / 3.0) * (2.0**-ks - 2.0 ** -(ks - 1)), f).reshape(-1, *([1] * s.ndim))
    return ops.const(np.broadcast_to(encode(np.array(2.0 / 3.0), f), s.shape).copy()) + (bits * steps).sum(axis=0, dtype=U64)


def softmax(ops: ApproxOps, x: np.ndarray, attrs: dict[str, Any], f: int) -> np.ndarray:
    """Steps 1-5 along ``attrs["axis"]`` (per sample, so + 1 here); result at scale 2f."""
    axis = attrs["axis"] + 1
    xl = np.ascontiguousarray(np.moveaxis(x, axis, -1))
    length = xl.shape[-1]
    z = xl - row_max(ops, xl)
    e = ops.trunc(piecewise(ops, z, attrs, f), f)
    s = e.sum(axis=-1, keepdims=True, dtype=U64)
    y = reciprocal_guess(ops, s, length, f)
    two = ops.const(np.broadcast_to(encode(np.array(2.0), f), s.shape).copy())
    for _ in range(attrs["iters"]):
        sy = ops.trunc(ops.mul(s, y), f)
        y = ops.trunc(ops.mul(y, two - sy), f)
    out = ops.mul(e, y)
    return np.ascontiguousarray(np.moveaxis(out, -1, axis))
