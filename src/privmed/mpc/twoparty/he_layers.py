"""Every linear-layer kind as a 2-D / 3-D convolution or a matmul, for the HE encodings (pure).

``he_encoding`` packs 2-D and 3-D convolutions (stride 1 is all it needs) and matrix
products. The other kinds of ``privmed.ring.linalg.linear`` reduce to them by public data
movement that each party applies to what it holds (zeros are valid shares, so padding and
zero-upsampling a share are exact):

- conv 1-D: a 2-D conv with height 1.
- strided conv (2-D / 3-D): space-to-depth (polyphase) on the padded input,
  x'[(c, p_1..p_n), u_1..u_n] = x[c, s_1 u_1 + p_1, ..., s_n u_n + p_n], and on the
  (dilated) kernel alike, gives a stride-1 conv with prod(s) times the channels and the kernel
  ceil(k / s) wide, whose output is exactly the strided output (cropped): no prod(s)-fold
  waste of output coefficients.
- conv_transpose (1-D / 2-D / 3-D): a stride-1 conv of the zero-upsampled input with the
  flipped, group-transposed kernel, the construction ``ring.linalg.conv_transpose`` uses
  (cropping for negative pads is done on the input). Strided 3-D ones may instead go
  polyphase (sub-pixel): one stride-1 conv of x itself with prod(s) times the output
  channels (one per output phase), then depth-to-space, so the input is not prod(s) times
  larger (8x in 3-D at stride 2); the cheaper in bytes of the two is taken (small layers
  keep the upsampled form: fewer replies). 2-D keeps the upsampled form (its figures in
  docs/twoparty.md were measured so).
- channel_scale: a depthwise 1x1 conv (groups = channels); a 3-D input as (D H, W).

Kernels of 4 or more spatial dimensions are refused (``NotImplementedError`` names the kind).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from privmed.mpc.twoparty.he_encoding import geometry
from privmed.ring.linalg import ConvSpec, pad_spatial

Map = Callable[[np.ndarray], np.ndarray]


@dataclass(frozen=True)
class Lowered:
    """A layer as "conv" (stride-1 2-D or 3-D) or "matmul": the maps the data owner applies
    to x and the model owner to W, the shapes after them, and the map from the lowered output
    to the layer's."""

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
    """A 1-D spec as 2-D with a height-1 kernel (2-D and 3-D specs unchanged)."""
    if spec.ndim != 1:
        return spec
    op = (0,) + tuple(spec.output_padding) if spec.output_padding else ()
    return ConvSpec((1,) + spec.kernel, (1,) + spec.strides, (0, spec.pads[0], 0, spec.pads[1]), (1,) + spec.dilations, spec.groups, op)


def lower(kind: str, spec: ConvSpec | None, x_shape: tuple[int, ...], w_shape: tuple[int, ...], n: int = 8192) -> Lowered:
    """The stride-1 conv / matmul form of one layer (see the module docstring); n, the
    polynomial degree, only serves to choose between two lowerings by their bytes."""
    if kind == "matmul":
        return Lowered(kind, None, x_shape, w_shape, _same, _same, _same)
    if kind == "channel_scale":
        if len(x_shape) not in (2, 3, 4, 5):
            raise NotImplementedError(f"HE channel_scale on a {len(x_shape)}-d input is not implemented")
        c = x_shape[1]
        x4: tuple[int, ...]
        if len(x_shape) == 5:
            x4 = x_shape[:2] + (x_shape[2] * x_shape[3], x_shape[4])
        else:
            x4 = x_shape[:2] + (1,) * (4 - len(x_shape)) + x_shape[2:]
        dw = ConvSpec((1, 1), (1, 1), (0, 0, 0, 0), (1, 1), groups=c)
        return Lowered("conv", dw, x4, (c, 1, 1, 1), lambda a: a.reshape(x4), lambda w: w.reshape(c, 1, 1, 1), lambda y: y.reshape(x_shape))
    if spec is None or spec.ndim not in (1, 2, 3) or kind not in ("conv", "conv_transpose"):
        raise NotImplementedError(f"HE linear layer for kind {kind!r} ({'no spec' if spec is None else f'{spec.ndim}-d'}) is not implemented")
    s2 = _as_2d(spec)
    x4 = x_shape if spec.ndim != 1 else x_shape[:2] + (1,) + x_shape[2:]
    w4 = w_shape if spec.ndim != 1 else w_shape[:2] + (1,) + w_shape[2:]

    def back(y: np.ndarray) -> np.ndarray:
        return y if spec.ndim != 1 else y.reshape(y.shape[:2] + y.shape[3:])

    if kind == "conv_transpose":
        upsampled = _transpose(s2, x4, w4, back)
        if spec.ndim != 3 or all(v == 1 for v in spec.strides):  # 2-D: as measured in docs/twoparty.md
            return upsampled
        phases = _transpose_polyphase(s2, x4, w4, back)
        return min((phases, upsampled), key=lambda low: _wire_bytes(low, n))
    if any(s != 1 for s in s2.strides):
        return _space_to_depth(s2, x4, w4, back)
    return Lowered("conv", s2, x4, w4, lambda a: a.reshape(x4), lambda w: w.reshape(w4), back)


def _polyphase(a: np.ndarray, lead: tuple[int, int], outer: tuple[int, ...], s: tuple[int, ...]) -> np.ndarray:
    """(A, B, outer_d s_d ...) -> (A, B prod(s), outer...): phase p of axis d to the channels."""
    nd = len(s)
    split = a.reshape(lead + tuple(v for d in range(nd) for v in (outer[d], s[d])))
    order = (0, 1) + tuple(3 + 2 * d for d in range(nd)) + tuple(2 + 2 * d for d in range(nd))
    return np.ascontiguousarray(split.transpose(order)).reshape((lead[0], lead[1] * math.prod(s)) + outer)


def _space_to_depth(spec: ConvSpec, x_shape: tuple[int, ...], w_shape: tuple[int, ...], back: Map) -> Lowered:
    nd = spec.ndim
    n, c = x_shape[:2]
    m, cg = w_shape[:2]
    s = spec.strides
    k = tuple(spec.dilations[d] * (spec.kernel[d] - 1) + 1 for d in range(nd))
    padded = tuple(x_shape[2 + d] + spec.pads[d] + spec.pads[nd + d] for d in range(nd))
    out = tuple((padded[d] - k[d]) // s[d] + 1 for d in range(nd))
    xs = tuple(-(-padded[d] // s[d]) for d in range(nd))
    ks = tuple(-(-k[d] // s[d]) for d in range(nd))

    def x_map(a: np.ndarray) -> np.ndarray:
        full = np.zeros((n, c) + tuple(xs[d] * s[d] for d in range(nd)), dtype=a.dtype)
        full[(slice(None), slice(None)) + tuple(slice(0, p) for p in padded)] = pad_spatial(a.reshape(x_shape), spec.pads)
        return _polyphase(full, (n, c), xs, s)

    def w_map(wt: np.ndarray) -> np.ndarray:
        full = np.zeros((m, cg) + tuple(ks[d] * s[d] for d in range(nd)), dtype=wt.dtype)
        full[(slice(None), slice(None)) + tuple(slice(0, k[d], spec.dilations[d]) for d in range(nd))] = wt.reshape(w_shape)
        return _polyphase(full, (m, cg), ks, s)

    inner = ConvSpec(ks, (1,) * nd, (0,) * (2 * nd), (1,) * nd, spec.groups)
    crop = (slice(None), slice(None)) + tuple(slice(0, o) for o in out)
    return Lowered("conv", inner, (n, c * math.prod(s)) + xs, (m, cg * math.prod(s)) + ks, x_map, w_map,
                   lambda y: back(np.ascontiguousarray(y[crop])))


def _transpose(spec: ConvSpec, x_shape: tuple[int, ...], w_shape: tuple[int, ...], back: Map) -> Lowered:
    nd, g = spec.ndim, spec.groups
    n_batch, channels = x_shape[:2]
    cg, mg = channels // g, w_shape[1]
    up_shape = tuple((x_shape[2 + d] - 1) * spec.strides[d] + 1 for d in range(nd))
    op = spec.output_padding or (0,) * nd
    full = tuple(spec.dilations[d] * (spec.kernel[d] - 1) for d in range(nd))
    begin = [full[d] - spec.pads[d] for d in range(nd)]
    end = [full[d] - spec.pads[nd + d] + op[d] for d in range(nd)]
    crop = tuple(slice(max(0, -begin[d]), up_shape[d] - max(0, -end[d])) for d in range(nd))
    cropped = tuple(len(range(up_shape[d])[crop[d]]) for d in range(nd))
    inner = ConvSpec(spec.kernel, (1,) * nd, tuple(max(0, b) for b in begin) + tuple(max(0, e) for e in end), spec.dilations, g)

    def x_map(a: np.ndarray) -> np.ndarray:
        up = np.zeros((n_batch, channels) + up_shape, dtype=a.dtype)
        up[(slice(None), slice(None)) + tuple(slice(None, None, s) for s in spec.strides)] = a.reshape(x_shape)
        return np.ascontiguousarray(up[(slice(None), slice(None)) + crop])

    def w_map(w: np.ndarray) -> np.ndarray:
        grouped = w.reshape((g, cg, mg) + spec.kernel)
        flipped = np.swapaxes(grouped, 1, 2).reshape((g * mg, cg) + spec.kernel)
        return np.ascontiguousarray(flipped[(slice(None), slice(None)) + (slice(None, None, -1),) * nd])

    return Lowered("conv", inner, (n_batch, channels) + cropped, (g * mg, cg) + spec.kernel, x_map, w_map, back)


def _wire_bytes(low: Lowered, n: int) -> int:
    """Bytes on the wire of a lowered layer, estimated as ``he_encoding.conv_tiling`` does."""
    g = geometry(low.kind, low.spec, low.x_shape, low.w_shape, n)
    return 24 * n * g.input_polys() + 16 * (n + len(g.targets())) * g.output_polys()


def _transpose_polyphase(spec: ConvSpec, x_shape: tuple[int, ...], w_shape: tuple[int, ...], back: Map) -> Lowered:
    """conv_transpose with strides s as one stride-1 conv of x itself (no zero-upsampling) with
    prod(s) times the output channels, then depth-to-space (sub-pixel convolution). Per axis,
    output o = s q + r takes the taps k with r + pb - dil k = 0 (mod s) at input q + j_k,
    j_k = (r + pb - dil k) / s: an inner kernel of L = max j - min j + 1 taps on x shifted by
    min j. The input is prod(s) times smaller than the upsampled one; each phase r is its own
    output channel."""
    nd, g = spec.ndim, spec.groups
    n_batch, channels = x_shape[:2]
    cg, mg = channels // g, w_shape[1]
    s, size_in = spec.strides, x_shape[2:]
    out = spec.transpose_out_shape(size_in)
    q = tuple(-(-out[d] // s[d]) for d in range(nd))
    taps = [[[(k, (r + spec.pads[d] - spec.dilations[d] * k) // s[d]) for k in range(spec.kernel[d])
              if (r + spec.pads[d] - spec.dilations[d] * k) % s[d] == 0] for r in range(s[d])] for d in range(nd)]  # fmt: skip
    lo = tuple(min(j for phase in taps[d] for _, j in phase) for d in range(nd))
    span = tuple(max(j for phase in taps[d] for _, j in phase) - lo[d] + 1 for d in range(nd))
    xin = tuple(q[d] + span[d] - 1 for d in range(nd))
    phases = math.prod(s)

    def x_map(a: np.ndarray) -> np.ndarray:  # xp[u] = x[u + lo] (zero outside x)
        xp = np.zeros((n_batch, channels) + xin, dtype=a.dtype)
        src = tuple(slice(max(0, lo[d]), min(size_in[d], xin[d] + lo[d])) for d in range(nd))
        dst = tuple(slice(sl.start - lo[d], sl.stop - lo[d]) for d, sl in enumerate(src))
        xp[(slice(None), slice(None)) + dst] = a.reshape(x_shape)[(slice(None), slice(None)) + src]
        return xp

    def w_map(w: np.ndarray) -> np.ndarray:
        wg = w.reshape((g, cg, mg) + spec.kernel)
        v = np.zeros((g, mg) + s + (cg,) + span, dtype=w.dtype)
        for r in np.ndindex(*s):
            for combo in itertools.product(*(taps[d][r[d]] for d in range(nd))):
                ks = tuple(k for k, _ in combo)
                js = tuple(j - lo[d] for d, (_, j) in enumerate(combo))
                v[(slice(None), slice(None)) + r + (slice(None),) + js] = np.swapaxes(wg[(slice(None),) * 3 + ks], 1, 2)
        return v.reshape((g * mg * phases, cg) + span)

    def y_map(z: np.ndarray) -> np.ndarray:
        split = z.reshape((n_batch, g * mg) + s + q)
        order = (0, 1) + tuple(a for d in range(nd) for a in (2 + nd + d, 2 + d))
        full = split.transpose(order).reshape((n_batch, g * mg) + tuple(q[d] * s[d] for d in range(nd)))
        return back(np.ascontiguousarray(full[(slice(None), slice(None)) + tuple(slice(0, o) for o in out)]))

    inner = ConvSpec(span, (1,) * nd, (0,) * (2 * nd), (1,) * nd, g)
    return Lowered("conv", inner, (n_batch, channels) + xin, (g * mg * phases, cg) + span, x_map, w_map, y_map)
