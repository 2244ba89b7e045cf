"""Exact linear algebra in Z_2^64 with float64 BLAS.

numpy has no BLAS for integer matmul, so a product mod 2^64 is assembled from float64 GEMMs on
limbs (measured on the 2-core build machine, one thread, DenseNet shapes: 1.0-2.4x faster
than numpy 2.4's uint64 matmul; see README):

- general case (both operands uniform in Z_2^64): split each into three 22-bit limbs;
  a*b mod 2^64 = sum_{i+j<=2} a_i b_j 2^(22(i+j)) (terms with i+j >= 3 vanish mod 2^64).
  One dot product of limbs over K terms is below K * 2^44, exact in float64 for K <= 511, so
  K is processed in chunks of 511. Six limb products in three GEMMs per chunk (measured
  10-35% faster than four 16-bit limbs with ten products).
- small-weight case (one operand signed with |w| < 2^wb, e.g. the model owner's plaintext
  fixed-point weights): only the other operand is split, into L-bit limbs with
  K * 2^(L+wb) < 2^52 (L = 22 for typical weights: three limbs); one GEMM.

``linear(kind, spec, weight, x)`` is the one bilinear map L(W, x) that the Beaver protocol in
``privmed.mpc.linear`` uses for every linear layer kind.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

U64 = np.uint64


LIMB = 22  # three limbs cover 64 bits
_K_CHUNK = 511  # 511 * (2^22 - 1)^2 < 2^53: a limb dot product over one chunk is exact


def _limbs(x: np.ndarray, bits: int, ring_bits: int = 64) -> np.ndarray:
    """The low ``ring_bits`` of uint64 x split into ceil(ring_bits / bits) limbs of ``bits``
    bits: float64 (count, *x.shape), written in place (one pass per limb, no copies)."""
    mask = U64((1 << bits) - 1)
    count = -(-ring_bits // bits)
    out = np.empty((count,) + x.shape, dtype=np.float64)
    tmp = np.empty(x.shape, dtype=U64)
    for i in range(count):
        np.right_shift(x, U64(bits * i), out=tmp)
        np.bitwise_and(tmp, mask, out=tmp)
        out[i] = tmp
    return out


def _matmul_uniform(a: np.ndarray, b: np.ndarray, ring_bits: int = 64) -> np.ndarray:
    """Both operands uniform: L = ceil(ring_bits / 22) limbs of 22 bits, products a_i b_j
    with i + j < L (the others only reach bits >= 22 L >= ring_bits), K split into chunks of
    511 so every limb dot product is exact. Exact mod 2^ring_bits (L = 3 for Z_2^64: six
    products; L = 2 for rings up to 2^44: three)."""
    return _uniform_from_limbs(_limbs(a, LIMB, ring_bits), b, ring_bits)


def _uniform_from_limbs(al: np.ndarray, b: np.ndarray, ring_bits: int) -> np.ndarray:
    """``_matmul_uniform`` with a's 22-bit limbs (L, ..., K) already split."""
    out = np.zeros(al.shape[1:-1] + b.shape[-1:], dtype=U64)
    k, n = al.shape[-1], b.shape[-1]
    count = al.shape[0]
    bl = _limbs(b, LIMB, ring_bits)
    for start in range(0, k, _K_CHUNK):
        sl = slice(start, min(k, start + _K_CHUNK))
        for i in range(count):
            # a_i times [b_0 | ... | b_{L-1-i}] in one GEMM (a wider N runs faster)
            wide = np.concatenate([bl[j][sl] for j in range(count - i)], axis=1) if i < count - 1 else bl[0][sl]
            prod = al[i][..., sl] @ wide
            for j in range(count - i):
                out += prod[..., j * n : (j + 1) * n].astype(U64) << U64(LIMB * (i + j))
    return out


def _small_limb(k: int, b_bits: int) -> int:
    """The limb width L of a for ``_matmul_small_right``: L + b_bits + ceil(log2 K) <= 52."""
    return min(LIMB, 52 - b_bits - math.ceil(math.log2(max(k, 2))))


def _matmul_small_right(a: np.ndarray, b_signed: np.ndarray, b_bits: int, ring_bits: int = 64) -> np.ndarray:
    """a uniform uint64 (..., K); b signed int64 (K, N) with |b| < 2^b_bits: one GEMM.

    a is split into L-bit limbs with L + b_bits + ceil(log2 K) <= 52, so every limb dot product
    (a signed sum of K terms below 2^(L + b_bits)) is exact in float64.
    """
    limb = _small_limb(a.shape[-1], b_bits)
    if limb < 12:
        return _matmul_uniform(a, b_signed.view(U64), ring_bits)
    return _small_from_limbs(_limbs(a, limb, ring_bits), b_signed, limb)


def _small_from_limbs(al: np.ndarray, b_signed: np.ndarray, limb: int) -> np.ndarray:
    """``_matmul_small_right`` with a's ``limb``-bit limbs (L, ..., K) already split."""
    return _combine(al @ b_signed.astype(np.float64), limb)  # (L, ..., K) @ (K, N)


def _combine(prod: np.ndarray, limb: int) -> np.ndarray:
    """sum_i prod[i] 2^(limb i) mod 2^64 for exact signed float64 limb products (L, ...)."""
    out = prod[0].astype(np.int64).view(U64)
    for i in range(1, len(prod)):
        out += prod[i].astype(np.int64).view(U64) << U64(limb * i)
    return out


def matmul(a: np.ndarray, b: np.ndarray, *, b_bits: int | None = None, ring_bits: int = 64) -> np.ndarray:
    """a @ b mod 2^ring_bits for uint64 a (..., K) and b (K, N) (bits above ``ring_bits`` of
    the result are not meaningful when ring_bits < 64).

    If ``b_bits`` is given, b holds signed values with |b| < 2^b_bits (two's complement in
    uint64) and a cheaper limb split is used; the result is identical.
    """
    if a.dtype.kind == "f":  # plaintext float path (calibration), same layout code
        return a @ b.astype(a.dtype, copy=False)
    a = np.ascontiguousarray(a, dtype=U64)
    b = np.ascontiguousarray(b, dtype=U64)
    if b_bits is not None:
        return _matmul_small_right(a, b.view(np.int64), b_bits, ring_bits)
    return _matmul_uniform(a, b, ring_bits)


@dataclass(frozen=True)
class ConvSpec:
    """Public geometry of an N-d convolution (ONNX Conv / ConvTranspose attributes)."""

    kernel: tuple[int, ...]
    strides: tuple[int, ...]
    pads: tuple[int, ...]  # begin..., end... (ONNX order)
    dilations: tuple[int, ...]
    groups: int = 1
    output_padding: tuple[int, ...] = ()

    @property
    def ndim(self) -> int:
        return len(self.kernel)

    def out_shape(self, spatial: Sequence[int]) -> tuple[int, ...]:
        n = self.ndim
        return tuple(
            (spatial[d] + self.pads[d] + self.pads[n + d] - self.dilations[d] * (self.kernel[d] - 1) - 1)
            // self.strides[d]
            + 1
            for d in range(n)
        )

    def transpose_out_shape(self, spatial: Sequence[int]) -> tuple[int, ...]:
        n = self.ndim
        op = self.output_padding or (0,) * n
        return tuple(
            self.strides[d] * (spatial[d] - 1)
            + op[d]
            + (self.kernel[d] - 1) * self.dilations[d]
            + 1
            - self.pads[d]
            - self.pads[n + d]
            for d in range(n)
        )


def pad_spatial(x: np.ndarray, pads: Sequence[int], mode: str = "constant") -> np.ndarray:
    n = len(pads) // 2
    width = [(0, 0)] * (x.ndim - n) + [(pads[d], pads[n + d]) for d in range(n)]
    if not any(p for pair in width for p in pair):
        return x
    return np.pad(x, width, mode=mode)  # type: ignore[call-overload]


def im2col(x: np.ndarray, spec: ConvSpec) -> tuple[np.ndarray, tuple[int, ...]]:
    """Patches of x (N, C, *S) as a strided view (N, *O, C, *k) plus the output shape O.

    Nothing is copied here; ``conv`` copies the view tile by tile.
    """
    n = spec.ndim
    xp = pad_spatial(x, spec.pads)
    extent = tuple(spec.dilations[d] * (spec.kernel[d] - 1) + 1 for d in range(n))
    win = np.lib.stride_tricks.sliding_window_view(xp, extent, axis=tuple(range(2, 2 + n)))
    # win: (N, C, *O_full, *extent) -> apply stride on O and dilation on extent
    sl = (slice(None), slice(None))
    sl += tuple(slice(None, None, spec.strides[d]) for d in range(n))
    sl += tuple(slice(None, None, spec.dilations[d]) for d in range(n))
    win = win[sl]
    out_spatial = win.shape[2 : 2 + n]
    # (N, C, *O, *k) -> (N, *O, C, *k)
    order = (0,) + tuple(range(2, 2 + n)) + (1,) + tuple(range(2 + n, 2 + 2 * n))
    return win.transpose(order), out_spatial


TILE_ELEMENTS = 1 << 23  # unfolded patch elements per tile: 64 MB of uint64, ~200 MB of limbs


def conv(x: np.ndarray, weight: np.ndarray, spec: ConvSpec, *, w_bits: int | None = None, ring_bits: int = 64) -> np.ndarray:
    """ONNX Conv without bias in Z_2^64: x (N, C, *S), weight (M, C/groups, *k) -> (N, M, *O).

    The unfolded input (im2col) is materialised in tiles of at most ``TILE_ELEMENTS`` along
    the batch and first output axis, so memory stays bounded for large 3-D convolutions.
    """
    n_batch, channels = x.shape[:2]
    m_out = weight.shape[0]
    g = spec.groups
    pointwise = all(k == 1 for k in spec.kernel) and all(s == 1 for s in spec.strides) and not any(spec.pads)
    if pointwise and g == 1 and x[0].size <= TILE_ELEMENTS:
        if x.dtype.kind == "f":  # plaintext float path (calibration): W @ x_n, same layout
            wf = weight.reshape(m_out, channels).astype(x.dtype, copy=False)
            return np.matmul(wf, x.reshape(n_batch, channels, -1)).reshape((n_batch, m_out) + x.shape[2:])
        return _conv_pointwise(x, weight.reshape(m_out, channels), w_bits, ring_bits)
    if (x.dtype == U64 or x.dtype.kind == "f") and g == 1 and channels >= 8 and all(s == 1 for s in spec.strides) and int(np.prod(spec.kernel)) > 1:
        return _conv_shifted(x, weight, spec, w_bits, ring_bits)
    cg, mg = channels // g, m_out // g
    win, out_spatial = im2col(x, spec)
    kg = cg * int(np.prod(spec.kernel))
    ksz = channels * int(np.prod(spec.kernel))
    wmats = [weight[gi * mg : (gi + 1) * mg].reshape(mg, kg).T for gi in range(g)]

    def apply(patches: np.ndarray) -> np.ndarray:
        outs = [matmul(patches[:, gi * kg : (gi + 1) * kg], wmats[gi], b_bits=w_bits, ring_bits=ring_bits) for gi in range(g)]
        return outs[0] if g == 1 else np.concatenate(outs, axis=1)

    per_row = ksz * int(np.prod(out_spatial[1:]))  # one step along the first output axis
    fits = n_batch * out_spatial[0] * per_row <= TILE_ELEMENTS
    if fits and x.dtype == U64 and int(np.prod(spec.kernel)) > 1:
        limb = LIMB if w_bits is None else _small_limb(kg, w_bits)
        if limb >= 12:  # split into limbs before unfolding: prod(kernel) times fewer elements to split
            y = _conv_limbs_first(x, spec, wmats, limb, w_bits, ring_bits, kg, ksz)
            return np.ascontiguousarray(np.moveaxis(y.reshape((n_batch,) + tuple(out_spatial) + (m_out,)), -1, 1))
    if fits:
        y = apply(np.ascontiguousarray(win).reshape(-1, ksz))
        y = y.reshape((n_batch,) + tuple(out_spatial) + (m_out,))
    else:
        step = max(1, TILE_ELEMENTS // max(per_row, 1))
        y = np.empty((n_batch,) + tuple(out_spatial) + (m_out,), dtype=U64 if x.dtype == U64 else x.dtype)
        for b in range(n_batch):
            for start in range(0, out_spatial[0], step):
                tile = np.ascontiguousarray(win[b, start : start + step]).reshape(-1, ksz)
                y[b, start : start + step] = apply(tile).reshape(y[b, start : start + step].shape)
    return np.ascontiguousarray(np.moveaxis(y, -1, 1))


def _conv_pointwise(x: np.ndarray, w: np.ndarray, w_bits: int | None, ring_bits: int) -> np.ndarray:
    """A 1x1 convolution as W (M, C) @ x_n (C, H W) per sample, with W on the left: the input
    and the output keep their (N, C, *S) layout (no unfolding copy, no output transpose).
    The same limb arithmetic as ``_matmul_uniform`` / ``_matmul_small_right``, transposed."""
    n_batch, channels = x.shape[:2]
    xs = np.ascontiguousarray(x).reshape(n_batch, channels, -1)
    out = np.empty((n_batch, w.shape[0], xs.shape[2]), dtype=U64)
    limb = LIMB if w_bits is None else _small_limb(channels, w_bits)
    if w_bits is not None and limb >= 12:
        wf = w.view(np.int64).astype(np.float64)  # once for all samples
        for b in range(n_batch):
            out[b] = _combine(wf @ _limbs(xs[b], limb, ring_bits), limb)  # (M, C) @ (L, C, HW)
    else:
        stacks = _stacked_limbs(_limbs(w, LIMB, ring_bits))  # once for all samples
        for b in range(n_batch):
            out[b] = _uniform_left(stacks, xs[b], ring_bits)
    return out.reshape((n_batch, w.shape[0]) + x.shape[2:])


def _stacked_limbs(wl: np.ndarray) -> list[np.ndarray]:
    """For each limb j of the other operand, W's 22-bit limbs i < L - j stacked along M:
    wl (L, ..., M, K) -> [(..., (L - j) M, K) for j < L], so that one GEMM per j gives every
    product a_i b_j that reaches below 2^(22 L) (``_add_stacked`` adds them up)."""
    count = wl.shape[0]
    return [np.ascontiguousarray(np.moveaxis(wl[: count - j], 0, -3).reshape(wl.shape[1:-2] + ((count - j) * wl.shape[-2], wl.shape[-1])))
            for j in range(count)]  # fmt: skip


def _add_stacked(out: np.ndarray, prod: np.ndarray, j: int, count: int) -> None:
    """out += sum_i prod[i M : (i + 1) M] 2^(22 (i + j)) mod 2^64: the exact float64 products
    of one GEMM on ``_stacked_limbs(...)[j]`` (M = out's rows)."""
    m = out.shape[0]
    for i in range(count - j):
        out += prod[i * m : (i + 1) * m].astype(U64) << U64(LIMB * (i + j))


def _uniform_left(stacks: list[np.ndarray], xm: np.ndarray, ring_bits: int) -> np.ndarray:
    """W (M, K) @ xm (K, P) mod 2^ring_bits, both uniform, from ``_stacked_limbs`` of W's 22-bit
    limbs (``_matmul_uniform`` with the operands' roles swapped, so the result is (M, P))."""
    count, k = len(stacks), xm.shape[0]
    xl = _limbs(xm, LIMB, ring_bits)
    out = np.zeros((stacks[0].shape[0] // count, xm.shape[1]), dtype=U64)
    for start in range(0, k, _K_CHUNK):
        sl = slice(start, min(k, start + _K_CHUNK))
        for j in range(count):
            _add_stacked(out, stacks[j][:, sl] @ xl[j][sl], j, count)
    return out


def _conv_shifted(x: np.ndarray, weight: np.ndarray, spec: ConvSpec, w_bits: int | None, ring_bits: int) -> np.ndarray:
    """A stride-1 convolution as one GEMM per kernel tap on contiguous slices of the flattened
    padded input (no unfolding): with the input padded and flattened to (C, P), tap t reads
    x_flat[:, off_t : off_t + R] where off_t is the tap's flat offset and R covers the output
    rows at the padded width; the positions past the output width wrap and are cropped.

    The limb products of each tap are summed in float64 before the one conversion to Z_2^l:
    for the small-weight case the limb width is chosen for K = C * prod(kernel) terms exactly
    as ``_small_limb`` does for the unfolded GEMM; for the uniform case at most ``_K_CHUNK``
    channel-terms are summed before a conversion. Exact mod 2^ring_bits, the same sums as
    ``conv`` with im2col, without its prod(kernel)-fold copy and output transpose.
    """
    n = spec.ndim
    n_batch, channels = x.shape[:2]
    m_out = weight.shape[0]
    sp = tuple(x.shape[2 + d] + spec.pads[d] + spec.pads[n + d] for d in range(n))
    out_spatial = spec.out_shape(x.shape[2:])
    inner = int(np.prod(sp[1:]))
    strides_flat = [int(np.prod(sp[d + 1 :])) for d in range(n)]
    taps = list(np.ndindex(*spec.kernel))
    offsets = [sum(t[d] * spec.dilations[d] * strides_flat[d] for d in range(n)) for t in taps]
    rows = out_spatial[0] * inner
    flat_len = max(offsets) + rows
    xf = np.zeros((n_batch, channels, max(flat_len, int(np.prod(sp)))), dtype=x.dtype)
    inside = (slice(None), slice(None)) + tuple(slice(spec.pads[d], spec.pads[d] + x.shape[2 + d]) for d in range(n))
    xf[:, :, : int(np.prod(sp))].reshape((n_batch, channels) + sp)[inside] = x  # zero padding written in place
    wt = np.moveaxis(weight.reshape(m_out, channels, -1), -1, 0)  # (T, M, C)
    out = np.empty((n_batch, m_out, rows), dtype=x.dtype)
    if x.dtype.kind == "f":  # plaintext float path (calibration), same layout code
        wf = np.ascontiguousarray(wt, dtype=x.dtype)
        for b in range(n_batch):
            out[b] = wf[0] @ xf[b, :, offsets[0] : offsets[0] + rows]
            for t in range(1, len(taps)):
                out[b] += wf[t] @ xf[b, :, offsets[t] : offsets[t] + rows]
    elif w_bits is not None and _small_limb(channels * len(taps), w_bits) >= 12:
        limb = _small_limb(channels * len(taps), w_bits)
        wf = np.ascontiguousarray(wt).view(np.int64).astype(np.float64)
        for b in range(n_batch):
            xl = _limbs(xf[b], limb, ring_bits)  # (L, C, P)
            acc = np.zeros((xl.shape[0], m_out, rows))
            tmp = np.empty_like(acc)
            for t, off in enumerate(offsets):
                np.matmul(wf[t], xl[:, :, off : off + rows], out=tmp)
                acc += tmp
            out[b] = _combine(acc, limb)
    else:
        stacks = _stacked_limbs(_limbs(np.ascontiguousarray(wt), LIMB, ring_bits))  # [(T, (L - j) M, C)]: one GEMM per (tap, j)
        count = len(stacks)
        c_step = min(channels, _K_CHUNK)
        pieces = [(t, c0) for t in range(len(taps)) for c0 in range(0, channels, c_step)]
        per_flush = max(1, _K_CHUNK // c_step)
        for b in range(n_batch):
            xl = _limbs(xf[b], LIMB, ring_bits)
            res = np.zeros((m_out, rows), dtype=U64)
            for start in range(0, len(pieces), per_flush):
                accs = [np.zeros(((count - j) * m_out, rows)) for j in range(count)]
                for t, c0 in pieces[start : start + per_flush]:
                    off, cs = offsets[t], slice(c0, c0 + c_step)
                    for j in range(count):
                        accs[j] += stacks[j][t][:, cs] @ xl[j, cs, off : off + rows]
                for j in range(count):
                    _add_stacked(res, accs[j], j, count)
            out[b] = res
    grid = out.reshape((n_batch, m_out, out_spatial[0]) + tuple(sp[1:]))
    crop = (slice(None), slice(None), slice(None)) + tuple(slice(0, o) for o in out_spatial[1:])
    return np.ascontiguousarray(grid[crop])


def _conv_limbs_first(x: np.ndarray, spec: ConvSpec, wmats: list[np.ndarray], limb: int, w_bits: int | None,
                      ring_bits: int, kg: int, ksz: int) -> np.ndarray:  # fmt: skip
    """``conv`` with x split into float64 limbs first and the limbs unfolded (the same sums,
    the same exact result): rows (N * prod(O), M)."""
    xl = _limbs(x, limb, ring_bits)  # (L, N, C, *S)
    count = xl.shape[0]
    win, _ = im2col(xl.reshape((count * x.shape[0],) + x.shape[1:]), spec)
    al = np.ascontiguousarray(win).reshape(count, -1, ksz)
    outs = []
    for gi, wm in enumerate(wmats):
        part = al[..., gi * kg : (gi + 1) * kg]
        outs.append(_uniform_from_limbs(part, wm, ring_bits) if w_bits is None else _small_from_limbs(part, wm.view(np.int64), limb))
    return outs[0] if len(outs) == 1 else np.concatenate(outs, axis=1)


def conv_transpose(
    x: np.ndarray, weight: np.ndarray, spec: ConvSpec, *, w_bits: int | None = None, ring_bits: int = 64
) -> np.ndarray:
    """ONNX ConvTranspose without bias: x (N, C, *S), weight (C, M/groups, *k) -> (N, M, *O).

    Computed as a stride-1 convolution of the zero-upsampled input with the flipped kernel.
    """
    n = spec.ndim
    n_batch, channels = x.shape[:2]
    g = spec.groups
    cg = channels // g
    mg = weight.shape[1]
    up_shape = tuple((x.shape[2 + d] - 1) * spec.strides[d] + 1 for d in range(n))
    up = np.zeros((n_batch, channels) + up_shape, dtype=x.dtype)
    up[(slice(None), slice(None)) + tuple(slice(None, None, s) for s in spec.strides)] = x
    op = spec.output_padding or (0,) * n
    full = tuple(spec.dilations[d] * (spec.kernel[d] - 1) for d in range(n))
    begin = [full[d] - spec.pads[d] for d in range(n)]
    end = [full[d] - spec.pads[n + d] + op[d] for d in range(n)]
    # negative pads crop
    crop = tuple(slice(max(0, -begin[d]), up.shape[2 + d] - max(0, -end[d]) or None) for d in range(n))
    up = up[(slice(None), slice(None)) + crop]
    pads = tuple(max(0, b) for b in begin) + tuple(max(0, e) for e in end)
    # weight (C, M/g, *k) -> per group (M/g, C/g, *k) flipped
    flip = (slice(None), slice(None)) + (slice(None, None, -1),) * n
    w = weight.reshape((g, cg, mg) + spec.kernel)
    w = np.swapaxes(w, 1, 2).reshape((g * mg, cg) + spec.kernel)[flip]
    inner = ConvSpec(spec.kernel, (1,) * n, pads, spec.dilations, g)
    return conv(up, np.ascontiguousarray(w), inner, w_bits=w_bits, ring_bits=ring_bits)


def channel_scale(x: np.ndarray, weight: np.ndarray) -> np.ndarray:
    """y[n, c, ...] = weight[c] * x[n, c, ...] mod 2^64 (a private per-channel affine's linear part)."""
    shape = (1, -1) + (1,) * (x.ndim - 2)
    return x * weight.reshape(shape)


def linear(kind: str, spec: ConvSpec | None, weight: np.ndarray, x: np.ndarray, *, w_bits: int | None = None,
           ring_bits: int = 64) -> np.ndarray:
    """The bilinear map L(W, x) of one linear layer, exact in Z_2^ring_bits (the bits above are
    not meaningful when ring_bits < 64: the GEMMs then skip the limb products that only reach
    them).

    kind: "conv" | "conv_transpose" | "matmul" (x (..., K) @ W (K, N)) | "channel_scale".
    """
    if kind == "conv":
        assert spec is not None
        return conv(x, weight, spec, w_bits=w_bits, ring_bits=ring_bits)
    if kind == "conv_transpose":
        assert spec is not None
        return conv_transpose(x, weight, spec, w_bits=w_bits, ring_bits=ring_bits)
    if kind == "matmul":
        return matmul(x, weight, b_bits=w_bits, ring_bits=ring_bits)
    if kind == "channel_scale":
        return channel_scale(x, weight)
    raise ValueError(f"unknown linear kind {kind!r}")
