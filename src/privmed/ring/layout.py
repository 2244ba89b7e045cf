"""Public data movement on arrays of any dtype: pad, window extraction, pooling sums,
concatenation, nearest-neighbour, linear and cubic resize.

These maps are linear and public, so each party applies them to its own share and the shares
still add up to the map applied to the secret. The same functions serve the float executor
(calibration), the fixed-point reference and the secure runtime, so the three agree by
construction.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def pad(x: np.ndarray, pads: Sequence[int], mode: str = "constant", value: object = 0) -> np.ndarray:
    """ONNX Pad on the trailing len(pads)//2 axes (pads = begin..., end...)."""
    n = len(pads) // 2
    width = [(0, 0)] * (x.ndim - n) + [(int(pads[d]), int(pads[n + d])) for d in range(n)]
    if not any(p for pair in width for p in pair):
        return x
    np_mode = {"constant": "constant", "reflect": "reflect", "edge": "edge"}[mode]
    if np_mode == "constant":
        return np.pad(x, width, mode="constant", constant_values=np.asarray(value, dtype=x.dtype))
    return np.pad(x, width, mode=np_mode)  # type: ignore[call-overload]


def windows(
    x: np.ndarray,
    kernel: Sequence[int],
    strides: Sequence[int],
    pads: Sequence[int],
    dilations: Sequence[int] | None = None,
    pad_mode: str = "constant",
) -> np.ndarray:
    """Pooling windows of x (N, C, *S) as (N, C, *O, prod(kernel))."""
    n = len(kernel)
    dil = tuple(dilations or (1,) * n)
    xp = pad(x, pads, mode=pad_mode)
    extent = tuple(dil[d] * (kernel[d] - 1) + 1 for d in range(n))
    win = np.lib.stride_tricks.sliding_window_view(xp, extent, axis=tuple(range(2, 2 + n)))
    sl = (slice(None), slice(None))
    sl += tuple(slice(None, None, strides[d]) for d in range(n))
    sl += tuple(slice(None, None, dil[d]) for d in range(n))
    win = win[sl]
    return win.reshape(win.shape[: 2 + n] + (-1,))


def pool_sum(x: np.ndarray, kernel: Sequence[int], strides: Sequence[int], pads: Sequence[int]) -> np.ndarray:
    """Sum over each pooling window (zero padding)."""
    return windows(x, kernel, strides, pads).sum(axis=-1, dtype=x.dtype)


def pool_counts(spatial: Sequence[int], kernel: Sequence[int], strides: Sequence[int], pads: Sequence[int]) -> np.ndarray:
    """Number of non-padding elements in each window (for count_include_pad=0)."""
    ones = np.ones((1, 1) + tuple(spatial), dtype=np.int64)
    return pool_sum(ones, kernel, strides, pads)[0, 0]


def resize_nearest_index(in_size: int, out_size: int, mode: str = "asymmetric", rounding: str = "floor",
                         scale: float | None = None) -> np.ndarray:  # fmt: skip
    """Source index per output index for ONNX Resize(mode=nearest) on one axis (``scale``:
    the model's scale factor when it gave one, else out_size / in_size)."""
    src = _source_coordinate(in_size, out_size, mode, out_size / in_size if scale is None else scale)
    if rounding == "round_prefer_ceil":
        idx = np.floor(src + 0.5)
    elif rounding == "round_prefer_floor":
        idx = np.ceil(src - 0.5)
    elif rounding == "ceil":
        idx = np.ceil(src)
    else:
        idx = np.floor(src)
    return np.clip(idx.astype(np.int64), 0, in_size - 1)


def resize_nearest(x: np.ndarray, indices: Sequence[np.ndarray]) -> np.ndarray:
    """Gather along the trailing axes with per-axis source indices."""
    n = len(indices)
    for d, idx in enumerate(indices):
        x = np.take(x, idx, axis=x.ndim - n + d)
    return x


def _source_coordinate(in_size: int, out_size: int, mode: str, scale: float) -> np.ndarray:
    """ONNX Resize's coordinate_transformation_mode: the input coordinate of each output."""
    o = np.arange(out_size, dtype=np.float64)
    if mode == "half_pixel":
        src = (o + 0.5) / scale - 0.5
    elif mode == "pytorch_half_pixel":
        src = (o + 0.5) / scale - 0.5 if out_size > 1 else np.zeros(1)
    elif mode == "align_corners":
        src = o * (in_size - 1) / max(out_size - 1, 1)
    elif mode == "asymmetric":
        src = o / scale
    elif mode == "tf_half_pixel_for_nn":
        src = (o + 0.5) / scale
    elif mode == "half_pixel_symmetric":  # opset 19
        adjustment = out_size / (scale * in_size)
        src = in_size / 2 * (1 - adjustment) + (o + 0.5) / scale - 0.5
    else:
        raise ValueError(f"coordinate_transformation_mode {mode!r} is not supported")
    return src


def resize_linear_taps(in_size: int, out_size: int, mode: str, scale: float) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Source indices and weights of ONNX Resize(mode=linear) along one axis: output o reads
    (1 - w) x[i0] + w x[i1] with the source coordinate clamped to [0, in_size - 1] (what
    onnxruntime and PyTorch's ``align_corners=False`` do at the borders). One tap when every
    weight w is 0 (an axis that is not resized)."""
    src = np.clip(_source_coordinate(in_size, out_size, mode, scale), 0.0, in_size - 1)
    lo = np.floor(src).astype(np.int64)
    hi = np.minimum(lo + 1, in_size - 1)
    w = src - lo
    if not w.any():
        return [lo], [np.ones(out_size)]
    return [lo, hi], [1.0 - w, w]


def resize_cubic_taps(in_size: int, out_size: int, mode: str, scale: float, a: float = -0.75,
                      exclude_outside: bool = False) -> tuple[list[np.ndarray], list[np.ndarray]]:  # fmt: skip
    """Source indices and weights of ONNX Resize(mode=cubic) along one axis: the four
    neighbours floor(x) - 1 .. floor(x) + 2 with Keys' cubic coefficients (parameter ``a``),
    outside indices replaced by the edge (the ONNX reference pads with edge values) or, with
    ``exclude_outside``, given weight 0 and the rest renormalised."""
    src = _source_coordinate(in_size, out_size, mode, scale)
    base = np.floor(src)
    s = src - base
    t = s + 1.0
    w0 = ((a * t - 5 * a) * t + 8 * a) * t - 4 * a
    w1 = ((a + 2) * s - (a + 3)) * s * s + 1
    u = 1.0 - s
    w2 = ((a + 2) * u - (a + 3)) * u * u + 1
    weights = [w0, w1, w2, 1.0 - w0 - w1 - w2]
    taps = [base.astype(np.int64) + k for k in (-1, 0, 1, 2)]
    if exclude_outside:
        weights = [np.where((i >= 0) & (i < in_size), w, 0.0) for i, w in zip(taps, weights, strict=True)]
        total = sum(weights)
        weights = [w / total for w in weights]
    return [np.clip(i, 0, in_size - 1) for i in taps], weights


def interpolate(x: np.ndarray, taps: Sequence[Sequence[np.ndarray]], weights: Sequence[np.ndarray]) -> np.ndarray:
    """sum over one tap per trailing axis of (the product of the taps' weights) x[taps]: a
    separable interpolation as one public linear map. ``weights`` holds, per combination of
    taps (in ``itertools.product`` order), the weight grid over the output's spatial shape, of
    x's dtype (ring-encoded on the ring: the product of the per-axis weights is then rounded
    once, not once per axis)."""
    from itertools import product

    out = None
    for k, combo in enumerate(product(*(range(len(t)) for t in taps))):
        term = resize_nearest(x, [taps[d][t] for d, t in enumerate(combo)]) * weights[k]
        out = term if out is None else out + term
    assert out is not None
    return out
