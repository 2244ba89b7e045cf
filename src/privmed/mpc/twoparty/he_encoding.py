"""Cheetah's coefficient encoding of convolutions and matrix products (pure functions).

The packing follows Cheetah (Huang, Lu, Hong, Ding, "Cheetah: Lean and Fast Secure Two-Party
Deep Neural Network Inference", USENIX Security 2022, sec. 3-4): tensors are packed into the
*coefficients* of polynomials so that one plaintext-ciphertext polynomial product evaluates many
inner products of a convolution or a matrix product at once, with no rotations and no
relinearisation (so no Galois or relinearisation keys are ever sent).

Ring. The two-party mode computes over Z_2^l with l = ``HEParams.plain_bits`` (plaintext modulus
t = 2^l, SEAL allows l <= 59; 37 by default; the flooding noise must fit below the reply's
Delta = q0 q1 / t, which allows l <= 43 with 16-bit weights summed over 64 channel blocks;
``flood_bits`` checks each layer). Arrays are uint64 holding values in [0, 2^l). A share
over Z_2^64 reduces to Z_2^l by masking the low l bits (reduction mod 2^l is a ring
homomorphism), but shares mod 2^l do *not* lift to Z_2^64 without a wrap-bit protocol: the
two-party mode therefore runs in the smaller ring throughout (DESIGN.md sec. 9: the ring width
is a plan parameter), and ``compare`` works for any l.

Encodings (all indices public, derived from shapes only):

- conv (2-D; groups, stride, dilation, padding): the padded input is cut into tiles of Cw
  channels x Hw x Ww with Cw Hw Ww <= N, overlapping by kh - 1 / kw - 1; input polynomial
  x(X) = sum x[c, i, j] X^(c Hw Ww + i Ww + j); kernel polynomial for output channel m
  k(X) = sum w[m, c, a, b] X^(O - c Hw Ww - a Ww - b), O = (Cw - 1) Hw Ww + (kh - 1) Ww + kw - 1.
  Coefficient O + i Ww + j of x k is the stride-1 output at (i, j) (Cheetah's HomConv; no
  negacyclic wrap reaches these indices since Cw Hw Ww <= N). Dilation is applied to the
  kernel (zeros), stride by subsampling the stride-1 output.
- matmul x (B, K) @ W (K, M): per row, nk inputs and nm outputs per polynomial (nk nm <= N);
  x(X) = sum_j x_j X^j, w(X) = sum w[j, i] X^(i nk + nk - 1 - j); coefficient i nk + nk - 1
  of the product is sum_j x_j w[j, i].
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from privmed.mpc.twoparty.seal_io import HEParams
from privmed.ring.linalg import ConvSpec, linear, pad_spatial

U64 = np.uint64


@dataclass(frozen=True)
class ConvTiling:
    """Public tile geometry of one group of a 2-D convolution (stride 1, padded input)."""

    cw: int  # channels per polynomial
    hw: int  # input tile height (with halo)
    ww: int  # input tile width (with halo)
    kh: int  # dilated kernel height
    kw: int
    n_cb: int  # channel blocks
    tiles_h: int
    tiles_w: int

    @property
    def out_h(self) -> int:
        return self.hw - self.kh + 1

    @property
    def out_w(self) -> int:
        return self.ww - self.kw + 1

    @property
    def offset(self) -> int:
        return (self.cw - 1) * self.hw * self.ww + (self.kh - 1) * self.ww + self.kw - 1


def conv_tiling(n: int, channels: int, hp: int, wp: int, kh: int, kw: int, m_out: int) -> ConvTiling:
    """Tile sizes minimising bytes on the wire: about 24 N per (seeded) input ciphertext and
    16 (N + T) per reply (2 primes, c1 and the T result coefficients of c0); products break ties."""
    best: tuple[float, ConvTiling] | None = None
    for hw in range(kh, hp + 1):
        for ww in range(kw, wp + 1):
            if hw * ww > n:
                break
            cw = min(channels, n // (hw * ww))
            tiling = ConvTiling(cw, hw, ww, kh, kw, -(-channels // cw), -(-(hp - kh + 1) // (hw - kh + 1)),
                                -(-(wp - kw + 1) // (ww - kw + 1)))
            tiles = tiling.tiles_h * tiling.tiles_w
            results = (hw - kh + 1) * (ww - kw + 1)
            cost = 24 * n * tiling.n_cb * tiles + 16 * (n + results) * m_out * tiles + m_out * tiling.n_cb * tiles
            if best is None or cost < best[0]:
                best = (cost, tiling)
    if best is None:
        raise ValueError(f"a {kh}x{kw} kernel tile does not fit in N = {n} coefficients")
    return best[1]


def _dilate(weight: np.ndarray, dil: tuple[int, ...]) -> np.ndarray:
    m, c, kh, kw = weight.shape
    out = np.zeros((m, c, dil[0] * (kh - 1) + 1, dil[1] * (kw - 1) + 1), dtype=weight.dtype)
    out[:, :, :: dil[0], :: dil[1]] = weight
    return out


def _conv_input_polys(x: np.ndarray, t: ConvTiling, n: int) -> np.ndarray:
    """x (C, Hp, Wp) -> (n_cb * tiles, N) coefficient vectors (zero beyond the edges)."""
    c_all, hp, wp = x.shape
    polys = np.zeros((t.n_cb, t.tiles_h, t.tiles_w, n), dtype=U64)
    for cb in range(t.n_cb):
        for ti in range(t.tiles_h):
            for tj in range(t.tiles_w):
                i0, j0 = ti * t.out_h, tj * t.out_w
                block = x[cb * t.cw : (cb + 1) * t.cw, i0 : i0 + t.hw, j0 : j0 + t.ww]
                tile = np.zeros((t.cw, t.hw, t.ww), dtype=U64)
                tile[: block.shape[0], : block.shape[1], : block.shape[2]] = block
                polys[cb, ti, tj, : t.cw * t.hw * t.ww] = tile.reshape(-1)
    return polys.reshape(-1, n)


def _conv_kernel_poly(w: np.ndarray, t: ConvTiling, n: int, mask: int) -> np.ndarray:
    """One output channel's kernel for one channel block, w (cw', kh, kw) signed -> N coeffs."""
    poly = np.zeros(n, dtype=np.int64)
    c = np.arange(w.shape[0]).reshape(-1, 1, 1)
    a = np.arange(t.kh).reshape(1, -1, 1)
    b = np.arange(t.kw).reshape(1, 1, -1)
    poly[(t.offset - c * t.hw * t.ww - a * t.ww - b).reshape(-1)] = w.reshape(-1)
    return poly.view(U64) & U64(mask)


def _conv_extract(coeffs: np.ndarray, t: ConvTiling, ho: int, wo: int) -> np.ndarray:
    """(tiles, N) product coefficients -> stride-1 output map (ho, wo)."""
    idx = t.offset + np.arange(t.out_h).reshape(-1, 1) * t.ww + np.arange(t.out_w).reshape(1, -1)
    vals = coeffs.reshape(t.tiles_h, t.tiles_w, -1)[:, :, idx]  # (th, tw, oh, ow)
    full = vals.transpose(0, 2, 1, 3).reshape(t.tiles_h * t.out_h, t.tiles_w * t.out_w)
    return full[:ho, :wo]


@dataclass(frozen=True)
class Geometry:
    """Everything both parties derive from the public shapes: what goes in which polynomial."""

    kind: str
    x_shape: tuple[int, ...]
    w_shape: tuple[int, ...]
    spec: ConvSpec | None
    tiling: ConvTiling | None = None
    nk: int = 0  # matmul: inputs per polynomial
    nm: int = 0  # matmul: outputs per polynomial

    @property
    def groups(self) -> int:
        return self.spec.groups if self.spec is not None else 1

    def targets(self) -> np.ndarray:
        """Coefficient indices of each output polynomial that carry results (the rest are not sent)."""
        if self.tiling is not None:
            t = self.tiling
            return (t.offset + np.arange(t.out_h).reshape(-1, 1) * t.ww + np.arange(t.out_w).reshape(1, -1)).reshape(-1)
        return np.arange(self.nm) * self.nk + self.nk - 1

    def input_polys(self) -> int:
        if self.tiling is not None:
            t = self.tiling
            return self.x_shape[0] * self.groups * t.n_cb * t.tiles_h * t.tiles_w
        rows = int(np.prod(self.x_shape[:-1]))
        return rows * -(-self.x_shape[-1] // self.nk)

    def output_polys(self) -> int:
        if self.tiling is not None:
            t = self.tiling
            return self.x_shape[0] * self.w_shape[0] * t.tiles_h * t.tiles_w
        rows = int(np.prod(self.x_shape[:-1]))
        return rows * -(-self.w_shape[-1] // self.nm)


def geometry(kind: str, spec: ConvSpec | None, x_shape: tuple[int, ...], w_shape: tuple[int, ...], n: int) -> Geometry:
    """The public packing of one layer; raises for kinds not implemented yet."""
    if kind == "matmul":
        k, m = w_shape
        if x_shape[-1] != k:
            raise ValueError(f"matmul: expected x (..., {k}), got {x_shape}")
        nm = min(m, max(1, n // k))
        return Geometry(kind, x_shape, w_shape, None, nk=min(k, n // nm), nm=nm)
    if kind != "conv" or spec is None or spec.ndim != 2:
        raise NotImplementedError(f"HE linear layer for kind {kind!r} with ndim != 2 or no spec is not implemented")
    m_out, cg = w_shape[:2]
    hp = x_shape[2] + spec.pads[0] + spec.pads[2]
    wp = x_shape[3] + spec.pads[1] + spec.pads[3]
    kh = spec.dilations[0] * (spec.kernel[0] - 1) + 1
    kw = spec.dilations[1] * (spec.kernel[1] - 1) + 1
    return Geometry(kind, x_shape, w_shape, spec, conv_tiling(n, cg, hp, wp, kh, kw, m_out // spec.groups))


def encode_input(g: Geometry, x: np.ndarray, n: int) -> np.ndarray:
    """The data owner's polynomials, (input_polys, N) uint64, in the order the model owner reads."""
    if g.tiling is not None and g.spec is not None:
        xp = pad_spatial(x, g.spec.pads)
        cg = x.shape[1] // g.groups
        parts = [
            _conv_input_polys(xp[b, gi * cg : (gi + 1) * cg], g.tiling, n)
            for b in range(x.shape[0])
            for gi in range(g.groups)
        ]
        return np.concatenate(parts)
    rows = x.reshape(-1, x.shape[-1])
    nb = -(-rows.shape[1] // g.nk)
    polys = np.zeros((rows.shape[0], nb, n), dtype=U64)
    for j in range(nb):
        chunk = rows[:, j * g.nk : (j + 1) * g.nk]
        polys[:, j, : chunk.shape[1]] = chunk
    return polys.reshape(-1, n)


def weight_polys(g: Geometry, w: np.ndarray, slot: int, n: int, mask: int) -> list[np.ndarray]:
    """Model owner: the kernel polynomials of one output slot (conv: output channel ``slot``,
    one per channel block; matmul: output block ``slot``, one per input block). w is signed."""
    if g.tiling is not None and g.spec is not None:
        t = g.tiling
        wd = _dilate(w[slot : slot + 1], g.spec.dilations)[0]
        return [_conv_kernel_poly(wd[cb * t.cw : (cb + 1) * t.cw], t, n, mask) for cb in range(t.n_cb)]
    k = w.shape[0]
    polys = []
    for ib in range(-(-k // g.nk)):
        blk = w[ib * g.nk : (ib + 1) * g.nk, slot * g.nm : (slot + 1) * g.nm]  # (nk', nm')
        poly = np.zeros(n, dtype=np.int64)
        j = np.arange(blk.shape[0]).reshape(-1, 1)
        i = np.arange(blk.shape[1]).reshape(1, -1)
        poly[(i * g.nk + g.nk - 1 - j).reshape(-1)] = blk.reshape(-1)
        polys.append(poly.view(U64) & U64(mask))
    return polys


def decode_output(g: Geometry, coeffs: np.ndarray) -> np.ndarray:
    """(output_polys, N) product coefficients -> the layer output (N_b, M, Ho, Wo) or (..., M)."""
    if g.tiling is not None and g.spec is not None:
        t, spec = g.tiling, g.spec
        nb, m_out = g.x_shape[0], g.w_shape[0]
        ho1 = g.x_shape[2] + spec.pads[0] + spec.pads[2] - t.kh + 1
        wo1 = g.x_shape[3] + spec.pads[1] + spec.pads[3] - t.kw + 1
        per = coeffs.reshape(nb, m_out, t.tiles_h * t.tiles_w, -1)
        full = np.stack([np.stack([_conv_extract(per[b, m], t, ho1, wo1) for m in range(m_out)]) for b in range(nb)])
        return np.ascontiguousarray(full[:, :, :: spec.strides[0], :: spec.strides[1]])
    m_all = g.w_shape[-1]
    rows = int(np.prod(g.x_shape[:-1]))
    ob = -(-m_all // g.nm)
    idx = np.arange(g.nm) * g.nk + g.nk - 1
    vals = coeffs.reshape(rows, ob, -1)[:, :, idx].reshape(rows, ob * g.nm)[:, :m_all]
    return vals.reshape(g.x_shape[:-1] + (m_all,))


def block_plan(g: Geometry) -> list[tuple[int, list[int]]]:
    """For each output polynomial (in order): (weight slot, input polynomial indices summed)."""
    plan: list[tuple[int, list[int]]] = []
    if g.tiling is not None:
        t = g.tiling
        tiles = t.tiles_h * t.tiles_w
        mg = g.w_shape[0] // g.groups
        for b in range(g.x_shape[0]):
            for m in range(g.w_shape[0]):
                base = (b * g.groups + m // mg) * t.n_cb * tiles
                for tile in range(tiles):
                    plan.append((m, [base + cb * tiles + tile for cb in range(t.n_cb)]))
        return plan
    rows = int(np.prod(g.x_shape[:-1]))
    nin = -(-g.x_shape[-1] // g.nk)
    for r in range(rows):
        for ob in range(-(-g.w_shape[-1] // g.nm)):
            plan.append((ob, [r * nin + ib for ib in range(nin)]))
    return plan


def flood_bits(params: HEParams, weight_bits: int, terms: int) -> int:
    """log2 F of the flooding noise, uniform in [-2^F, 2^F): 2^(sigma + log2 N) times a
    worst-case bound 2^b on the reply's noise, so that the reply is within N 2^b / 2^(F + 1)
    = 2^-(sigma + 1) in statistical distance of one with noise independent of W.

    Before the modulus switch, each of ``terms`` products x(X) w(X) adds at most
    N 2^weight_bits (t + 19) (SEAL lifts w to (-t/2, t/2]; 19 = SEAL's 6-sigma error clip;
    the t comes from r_t(q) times the carry of x w over t), the re-randomising Enc_pk(0) adds
    at most 2^20. Dropping the last prime divides that by it and adds at most (1 + N) / 2.
    Raises if F does not fit below Delta / 2 of the reply modulus.
    """
    n_bits = int(math.log2(params.n))
    top = math.log2(terms) + n_bits + weight_bits + params.plain_bits + 1 + 1
    after = max(top - params.data_bits[-1], n_bits) + 1
    bits = math.ceil(after) + params.flood_sigma + n_bits
    if bits + 2 > params.reply_bits - params.plain_bits:
        raise ValueError(
            f"flooding needs {bits} bits but the reply modulus leaves {params.reply_bits - params.plain_bits}:"
            f" lower plain_bits ({params.plain_bits}) or weight bits ({weight_bits})"
        )
    return bits


def signed_weights(weight: np.ndarray, weight_bits: int) -> np.ndarray:
    w = weight.view(np.int64) if weight.dtype == U64 else weight.astype(np.int64)
    if np.any(np.abs(w) >= (1 << weight_bits)):
        raise ValueError(f"expected weights with |w| < 2^{weight_bits}, got max |w| = {int(np.abs(w).max())}")
    return w


def plaintext_product(kind: str, spec: ConvSpec | None, weight: np.ndarray, x: np.ndarray, bits: int) -> np.ndarray:
    """L(W, x) mod 2^bits with privmed's exact ring linear algebra (the model owner's local part)."""
    return linear(kind, spec, weight.astype(np.int64).view(U64), x) & U64((1 << bits) - 1)
