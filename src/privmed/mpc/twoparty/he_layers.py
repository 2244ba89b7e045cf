"""Every linear-layer kind as a 2-D convolution or a matmul, for the HE encodings (pure).

``he_encoding`` packs 2-D convolutions and matrix products. The other kinds of
``privmed.ring.linalg.linear`` reduce to them by public data movement that each party applies
to what it holds (zeros are valid shares, so padding and zero-upsampling a share are exact):

- conv 1-D: a 2-D conv with height 1.
- strided conv: space-to-depth (polyphase) on the padded input, x'[(c, p, q), u, v] =
  x[c, s u + p, s v + q], and on the (dilated) kernel alike, gives a stride-1 conv with s^2
  times the channels and the kernel ceil(k / s) wide, whose output is exactly the strided
  output (cropped): no s^2-fold waste of output coefficients.
- conv_transpose (1-D / 2-D): a stride-1 conv of the zero-upsampled input with the flipped,
  group-transposed kernel, the construction ``ring.linalg.conv_transpose`` uses (cropping for
  negative pads is done on the input).
- channel_scale: a depthwise 1x1 conv (groups = channels).

3-D kernels are not lowered yet (``NotImplementedError`` names the kind).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from privmed.ring.linalg import ConvSpec, pad_spatial

Map = Callable[[np.ndarray], np.ndarray]


@dataclass(frozen=True)
class Lowered:
    """A layer as "conv" (2-D) or "matmul": the maps the data owner applies to x and the model
    owner to W, the shapes after them, and the map from the lowered output to the layer's."""

    kind: str
    spec: ConvSpec | None
    x_shape: tuple[int, ...]
    w_shape: tuple[int, ...]
    x_map: Map
    w_map: Map
    y_map: Map


def _same(a: np.ndarray) -> np.ndarray:
    return a


def _as_2d(spec: ConvSpec) -> ConvSpec:
    """A 1-D spec as 2-D with a height-1 kernel."""
    if spec.ndim == 2:
        return spec
    op = (0,) + tuple(spec.output_padding) if spec.output_padding else ()
    return ConvSpec((1,) + spec.kernel, (1,) + spec.strides, (0, spec.pads[0], 0, spec.pads[1]), (1,) + spec.dilations, spec.groups, op)


def lower(kind: str, spec: ConvSpec | None, x_shape: tuple[int, ...], w_shape: tuple[int, ...]) -> Lowered:
    """The 2-D conv / matmul form of one layer (see the module docstring)."""
    if kind == "matmul":
        return Lowered(kind, None, x_shape, w_shape, _same, _same, _same)
    if kind == "channel_scale":
        if len(x_shape) not in (2, 3, 4):
            raise NotImplementedError(f"HE channel_scale on a {len(x_shape)}-d input is not implemented")
        c = x_shape[1]
        x4 = x_shape[:2] + (1,) * (4 - len(x_shape)) + x_shape[2:]
        dw = ConvSpec((1, 1), (1, 1), (0, 0, 0, 0), (1, 1), groups=c)
        return Lowered("conv", dw, x4, (c, 1, 1, 1), lambda a: a.reshape(x4), lambda w: w.reshape(c, 1, 1, 1), lambda y: y.reshape(x_shape))
    if spec is None or spec.ndim not in (1, 2) or kind not in ("conv", "conv_transpose"):
        raise NotImplementedError(f"HE linear layer for kind {kind!r} ({'no spec' if spec is None else f'{spec.ndim}-d'}) is not implemented")
    s2 = _as_2d(spec)
    x4 = x_shape if spec.ndim == 2 else x_shape[:2] + (1,) + x_shape[2:]
    w4 = w_shape if spec.ndim == 2 else w_shape[:2] + (1,) + w_shape[2:]

    def back(y: np.ndarray) -> np.ndarray:
        return y if spec.ndim == 2 else y.reshape(y.shape[:2] + y.shape[3:])

    if kind == "conv_transpose":
        return _transpose(s2, x4, w4, back)
    if s2.strides != (1, 1):
        return _space_to_depth(s2, x4, w4, back)
    return Lowered("conv", s2, x4, w4, lambda a: a.reshape(x4), lambda w: w.reshape(w4), back)


def _space_to_depth(spec: ConvSpec, x_shape: tuple[int, ...], w_shape: tuple[int, ...], back: Map) -> Lowered:
    n, c, h, w = x_shape
    m, cg = w_shape[:2]
    sh, sw = spec.strides
    kh, kw = (spec.dilations[d] * (spec.kernel[d] - 1) + 1 for d in range(2))
    hp, wp = h + spec.pads[0] + spec.pads[2], w + spec.pads[1] + spec.pads[3]
    ho, wo = (hp - kh) // sh + 1, (wp - kw) // sw + 1
    hs, ws, k2h, k2w = -(-hp // sh), -(-wp // sw), -(-kh // sh), -(-kw // sw)

    def x_map(a: np.ndarray) -> np.ndarray:
        full = np.zeros((n, c, hs * sh, ws * sw), dtype=a.dtype)
        full[:, :, :hp, :wp] = pad_spatial(a.reshape(x_shape), spec.pads)
        return np.ascontiguousarray(full.reshape(n, c, hs, sh, ws, sw).transpose(0, 1, 3, 5, 2, 4)).reshape(n, c * sh * sw, hs, ws)

    def w_map(wt: np.ndarray) -> np.ndarray:
        full = np.zeros((m, cg, k2h * sh, k2w * sw), dtype=wt.dtype)
        full[:, :, :kh:spec.dilations[0], :kw:spec.dilations[1]] = wt.reshape(w_shape)
        return np.ascontiguousarray(full.reshape(m, cg, k2h, sh, k2w, sw).transpose(0, 1, 3, 5, 2, 4)).reshape(m, cg * sh * sw, k2h, k2w)

    inner = ConvSpec((k2h, k2w), (1, 1), (0, 0, 0, 0), (1, 1), spec.groups)
    return Lowered("conv", inner, (n, c * sh * sw, hs, ws), (m, cg * sh * sw, k2h, k2w), x_map, w_map,
                   lambda y: back(np.ascontiguousarray(y[:, :, :ho, :wo])))


def _transpose(spec: ConvSpec, x_shape: tuple[int, ...], w_shape: tuple[int, ...], back: Map) -> Lowered:
    g = spec.groups
    n_batch, channels = x_shape[:2]
    cg, mg = channels // g, w_shape[1]
    up_shape = tuple((x_shape[2 + d] - 1) * spec.strides[d] + 1 for d in range(2))
    op = spec.output_padding or (0, 0)
    full = tuple(spec.dilations[d] * (spec.kernel[d] - 1) for d in range(2))
    begin = [full[d] - spec.pads[d] for d in range(2)]
    end = [full[d] - spec.pads[2 + d] + op[d] for d in range(2)]
    crop = tuple(slice(max(0, -begin[d]), up_shape[d] - max(0, -end[d])) for d in range(2))
    cropped = tuple(len(range(up_shape[d])[crop[d]]) for d in range(2))
    inner = ConvSpec(spec.kernel, (1, 1), tuple(max(0, b) for b in begin) + tuple(max(0, e) for e in end), spec.dilations, g)

    def x_map(a: np.ndarray) -> np.ndarray:
        up = np.zeros((n_batch, channels) + up_shape, dtype=a.dtype)
        up[:, :, :: spec.strides[0], :: spec.strides[1]] = a.reshape(x_shape)
        return np.ascontiguousarray(up[(slice(None), slice(None)) + crop])

    def w_map(w: np.ndarray) -> np.ndarray:
        grouped = w.reshape((g, cg, mg) + spec.kernel)
        flipped = np.swapaxes(grouped, 1, 2).reshape((g * mg, cg) + spec.kernel)[:, :, ::-1, ::-1]
        return np.ascontiguousarray(flipped)

    return Lowered("conv", inner, (n_batch, channels) + cropped, (g * mg, cg) + spec.kernel, x_map, w_map, back)
