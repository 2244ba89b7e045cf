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

- conv (2-D and 3-D; groups, dilation, padding; stride by subsampling, though ``he_layers``
  hands over stride-1 convs only): the padded input of each group is cut into tiles of Cw
  channels x Dw x Hw x Ww (2-D: no Dw) with Cw Dw Hw Ww <= N, overlapping by kd - 1 / kh - 1 /
  kw - 1 (the halo), so the tiles' stride-1 outputs cover the whole output once; input
  polynomial x(X) = sum x[c, i, j, k] X^(c Dw Hw Ww + i Hw Ww + j Ww + k); kernel polynomial
  for output channel m, reversed, k(X) = sum w[m, c, a, b, e] X^(O - c Dw Hw Ww - a Hw Ww -
  b Ww - e), O = (Cw - 1) Dw Hw Ww + (kd - 1) Hw Ww + (kh - 1) Ww + kw - 1. Coefficient
  O + i Hw Ww + j Ww + k of x k is sum_{c,a,b,e} x[c, i + a, j + b, k + e] w[m, c, a, b, e],
  the stride-1 output at (i, j, k) (Cheetah's HomConv with one more axis). Why exactly: a
  term x[c, i', j', k'] w[c2, a, b, e] lands at O + (c - c2) Dw Hw Ww + (i' - a) Hw Ww +
  (j' - b) Ww + (k' - e); at a target the differences (k' - e) - k, (j' - b) - j, (i' - a) - i
  are smaller in size than Ww, Hw, Dw, so they are 0 and c = c2; exponents reach at most
  O + Cw Dw Hw Ww - 1 < O + N, so the terms past X^N wrap (negated) below O, under every
  target (targets lie in [O, Cw Dw Hw Ww)).
  Channel blocks (C > Cw) are summed homomorphically: one reply per output group and tile.
  Output batching (2-D): a reply carries Mw output channels, the kernel polynomial being
  sum_j X^(j D) k_j(X) with D = Cw Dw Hw Ww and Mw D <= N (Cheetah's n_w k_w m_w <= N for
  matrix products, applied to a conv tile); channel j's outputs sit at j D + O + ... . Why
  exactly: x k_j has its terms at exponents j D + [0, O + D - 1], and channel j's targets at
  j D + [O, D - 1]; a term of j' < j reaches at most (j - 1) D + O + D - 1 < j D + O, one of
  j' > j starts at j' D >= j D + D; so only channel j's own terms (the argument above) reach
  its targets; exponents reach at most Mw D + O - 1 <= N + O - 1, so the wrapped terms land
  below O, under no target. A layer with a few hundred outputs per channel (DenseNet-121's
  late 1x1 and 3x3 convs) then sends a handful of replies instead of one per output channel
  (DenseNet-121 64x64: 1,419 replies instead of 10,242, for 1,008 input ciphertexts instead
  of 231). Dilation is applied to the kernel (zeros). The tile extents, block widths and Mw
  minimise bytes (``conv_tiling``, every combination tried).
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
    """Public tile geometry of one group of an n-D convolution (n = 2 or 3; stride 1, padded
    input): ``cw`` channels of a ``win`` tile per polynomial, laid out row-major."""

    cw: int  # channels per polynomial
    win: tuple[int, ...]  # input tile extent per spatial axis (with halo)
    k: tuple[int, ...]  # dilated kernel extent per spatial axis
    n_cb: int  # channel blocks
    tiles: tuple[int, ...]  # tiles per spatial axis
    mw: int = 1  # output channels per reply polynomial, spaced cw * volume apart (mw cw volume <= N)

    @property
    def out(self) -> tuple[int, ...]:
        """Stride-1 outputs per tile and axis."""
        return tuple(w - k + 1 for w, k in zip(self.win, self.k, strict=True))

    @property
    def n_tiles(self) -> int:
        return math.prod(self.tiles)

    @property
    def volume(self) -> int:
        return math.prod(self.win)

    @property
    def steps(self) -> tuple[int, ...]:
        """Coefficient distance of one step along each spatial axis (row-major)."""
        return tuple(math.prod(self.win[d + 1 :]) for d in range(len(self.win)))

    @property
    def offset(self) -> int:
        return (self.cw - 1) * self.volume + sum((k - 1) * s for k, s in zip(self.k, self.steps, strict=True))

    def targets(self) -> np.ndarray:
        """Coefficients carrying the stride-1 outputs of a tile: (output channel j < mw of the
        reply, then row-major over ``out``), channel j shifted by j cw volume."""
        shift = (np.arange(self.mw, dtype=np.int64) * self.cw * self.volume).reshape((-1,) + (1,) * len(self.out))
        return (self.offset + shift + _grid(self.out, self.steps)).reshape(-1)


def _grid(extent: tuple[int, ...], steps: tuple[int, ...]) -> np.ndarray:
    """sum_d i_d steps[d] over the index grid of ``extent`` (shape ``extent``)."""
    nd = len(extent)
    acc = np.zeros((1,) * nd, dtype=np.int64)
    for d in range(nd):
        acc = acc + (np.arange(extent[d], dtype=np.int64) * steps[d]).reshape((1,) * d + (-1,) + (1,) * (nd - d - 1))
    return acc


MAX_BLOCKS_3D = 64  # channel blocks summed per 3-D reply: flooding room at l = 43 for 17-bit weights
MAX_BLOCKS_2D = 64  # the same cap for 2-D tilings, which since output batching may choose thin blocks


def conv_tiling(n: int, channels: int, padded: tuple[int, ...], k: tuple[int, ...], m_out: int,
                max_blocks: int | None = None, batch_outputs: bool = False) -> ConvTiling:
    """Tile sizes minimising bytes on the wire: about 24 N per (seeded) input ciphertext and
    16 (N + mw T) per reply (2 primes, c1 and the mw T result coefficients of c0); products
    break ties; among equal costs the first in row-major order of the tile extents wins. Every
    tile extent with k <= extent <= padded and volume <= N is tried (vectorised). With
    ``max_blocks``, tilings summing more channel blocks per reply are skipped where another
    fits (the flooding bound grows with the blocks summed: ``flood_bits``).

    Without ``batch_outputs`` a polynomial holds as many channels as fit (cw = N // volume)
    and a reply one output channel (mw = 1). With it, every block width cw = ceil(C / b) is
    tried too, and a reply carries mw = N // (cw volume) output channels (fewer, if the same
    number of replies needs fewer): small layers (a few hundred outputs per channel) then
    send a few replies instead of one per output channel."""
    nd = len(padded)
    ranges = [np.arange(k[d], min(padded[d], n // max(1, math.prod(k) // k[d])) + 1, dtype=np.int64) for d in range(nd)]
    if any(r.size == 0 for r in ranges):
        raise ValueError(f"a {'x'.join(map(str, k))} kernel tile does not fit in N = {n} coefficients")
    win = [g.reshape(-1) for g in np.meshgrid(*ranges, indexing="ij")]
    vol = np.prod(np.stack(win), axis=0)
    keep = vol <= n
    if not keep.any():
        raise ValueError(f"a {'x'.join(map(str, k))} kernel tile does not fit in N = {n} coefficients")
    win, vol = [w[keep] for w in win], vol[keep]
    cw = np.minimum(channels, n // vol)
    if batch_outputs:  # every (tile extent, block width) pair: widths ceil(C / b), b = 1..C
        widths = np.unique(-(-channels // np.arange(1, channels + 1, dtype=np.int64)))
        pick, width = np.nonzero(widths.reshape(1, -1) <= cw.reshape(-1, 1))
        win, vol, cw = [w[pick] for w in win], vol[pick], widths[width]
    n_cb = -(-channels // cw)
    mw = np.minimum(m_out, n // (cw * vol)) if batch_outputs else np.ones_like(cw)
    n_og = -(-m_out // mw)
    mw = -(-m_out // n_og)  # the same number of replies with the fewest channels each
    outs = [w - k[d] + 1 for d, w in enumerate(win)]
    tiles = np.prod(np.stack([-(-(padded[d] - k[d] + 1) // outs[d]) for d in range(nd)]), axis=0)
    results = np.prod(np.stack(outs), axis=0)
    cost = 24 * n * n_cb * tiles + 16 * (n + mw * results) * n_og * tiles + n_og * n_cb * tiles
    if max_blocks is not None and np.any(n_cb <= max_blocks):
        cost = np.where(n_cb <= max_blocks, cost, np.iinfo(np.int64).max)
    i = int(np.argmin(cost))
    ext = tuple(int(w[i]) for w in win)
    return ConvTiling(int(cw[i]), ext, tuple(k), int(n_cb[i]),
                      tuple(-(-(padded[d] - k[d] + 1) // (ext[d] - k[d] + 1)) for d in range(nd)), int(mw[i]))


def _dilate(weight: np.ndarray, dil: tuple[int, ...]) -> np.ndarray:
    k = weight.shape[2:]
    out = np.zeros(weight.shape[:2] + tuple(d * (kk - 1) + 1 for d, kk in zip(dil, k, strict=True)), dtype=weight.dtype)
    out[(slice(None), slice(None)) + tuple(slice(None, None, d) for d in dil)] = weight
    return out


def _conv_input_polys(x: np.ndarray, t: ConvTiling, n: int) -> np.ndarray:
    """x (C, *padded) -> (n_cb * tiles, N) coefficient vectors (zero beyond the edges)."""
    polys = np.zeros((t.n_cb, t.n_tiles, n), dtype=U64)
    size = t.cw * t.volume
    for cb in range(t.n_cb):
        for ti, idx in enumerate(np.ndindex(*t.tiles)):
            block = x[(slice(cb * t.cw, (cb + 1) * t.cw),) + tuple(slice(i * o, i * o + w) for i, o, w in zip(idx, t.out, t.win, strict=True))]
            tile = np.zeros((t.cw,) + t.win, dtype=U64)
            tile[tuple(slice(0, s) for s in block.shape)] = block
            polys[cb, ti, :size] = tile.reshape(-1)
    return polys.reshape(-1, n)


def _conv_kernel_poly(w: np.ndarray, t: ConvTiling, n: int, mask: int) -> np.ndarray:
    """The kernels of up to mw output channels for one channel block, w (mw', cw', *k) signed
    -> N coeffs: w[j, c, a] at j cw volume + O - c volume - sum_d a_d steps_d (reversed, so
    that x k has channel j's outputs at j cw volume + O + ...)."""
    poly = np.zeros(n, dtype=np.int64)
    j = np.arange(w.shape[0], dtype=np.int64).reshape((-1, 1) + (1,) * len(t.k))
    c = np.arange(w.shape[1], dtype=np.int64).reshape((1, -1) + (1,) * len(t.k))
    poly[(j * t.cw * t.volume + t.offset - c * t.volume - _grid(t.k, t.steps)).reshape(-1)] = w.reshape(-1)
    return poly.view(U64) & U64(mask)


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
            return self.tiling.targets()
        return np.arange(self.nm) * self.nk + self.nk - 1

    def input_polys(self) -> int:
        if self.tiling is not None:
            t = self.tiling
            return self.x_shape[0] * self.groups * t.n_cb * t.n_tiles
        rows = int(np.prod(self.x_shape[:-1]))
        return rows * -(-self.x_shape[-1] // self.nk)

    def output_groups(self) -> int:
        """Conv: replies per tile, batch element and group (mw output channels each)."""
        if self.tiling is None:
            raise ValueError("output_groups: a conv geometry only")
        return -(-(self.w_shape[0] // self.groups) // self.tiling.mw)

    def output_polys(self) -> int:
        if self.tiling is not None:
            return self.x_shape[0] * self.groups * self.output_groups() * self.tiling.n_tiles
        rows = int(np.prod(self.x_shape[:-1]))
        return rows * -(-self.w_shape[-1] // self.nm)


def geometry(kind: str, spec: ConvSpec | None, x_shape: tuple[int, ...], w_shape: tuple[int, ...], n: int) -> Geometry:
    """The public packing of one layer (2-D / 3-D conv or matmul; ``he_layers`` lowers the rest)."""
    if kind == "matmul":
        k, m = w_shape
        if x_shape[-1] != k:
            raise ValueError(f"matmul: expected x (..., {k}), got {x_shape}")
        nm = min(m, max(1, n // k))
        return Geometry(kind, x_shape, w_shape, None, nk=min(k, n // nm), nm=nm)
    if kind != "conv" or spec is None or spec.ndim not in (2, 3):
        raise NotImplementedError(f"HE linear layer for kind {kind!r} with ndim not in (2, 3) or no spec is not implemented")
    nd = spec.ndim
    m_out, cg = w_shape[:2]
    padded = tuple(x_shape[2 + d] + spec.pads[d] + spec.pads[nd + d] for d in range(nd))
    extent = tuple(spec.dilations[d] * (spec.kernel[d] - 1) + 1 for d in range(nd))
    # 3-D tilings keep one output channel per reply (their byte figures are documented)
    cap = MAX_BLOCKS_3D if nd == 3 else MAX_BLOCKS_2D
    return Geometry(kind, x_shape, w_shape, spec, conv_tiling(n, cg, padded, extent, m_out // spec.groups, cap, batch_outputs=nd == 2))


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
    """Model owner: the kernel polynomials of one output slot (conv: output group ``slot``, the
    output channels gi mg + og mw + j, j < mw, of conv group gi = slot // groups' output groups,
    one per channel block; matmul: output block ``slot``, one per input block). w is signed."""
    if g.tiling is not None and g.spec is not None:
        t = g.tiling
        mg, n_og = g.w_shape[0] // g.groups, g.output_groups()
        first = (slot // n_og) * mg + (slot % n_og) * t.mw
        last = min(first + t.mw, (slot // n_og + 1) * mg)
        wd = _dilate(w[first:last], g.spec.dilations)
        return [_conv_kernel_poly(wd[:, cb * t.cw : (cb + 1) * t.cw], t, n, mask) for cb in range(t.n_cb)]
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
    """(output_polys, N) product coefficients -> the layer output (N_b, M, *O) or (..., M)."""
    if g.tiling is not None and g.spec is not None:
        t, spec = g.tiling, g.spec
        nd, nb, m_out = len(t.k), g.x_shape[0], g.w_shape[0]
        mg, n_og = m_out // g.groups, g.output_groups()
        o1 = tuple(g.x_shape[2 + d] + spec.pads[d] + spec.pads[nd + d] - t.k[d] + 1 for d in range(nd))
        # replies (b, group, output group, tile) -> channels (b, group, output group, j) per tile
        per = coeffs.reshape((nb, g.groups, n_og, t.n_tiles, -1))[..., t.targets()].reshape((nb, g.groups, n_og, t.n_tiles, t.mw, -1))
        per = per.transpose(0, 1, 2, 4, 3, 5).reshape((nb, g.groups, n_og * t.mw, t.n_tiles, -1))[:, :, :mg]
        vals = per.reshape((nb, m_out) + t.tiles + t.out)
        order = (0, 1) + tuple(a for d in range(nd) for a in (2 + d, 2 + nd + d))  # (tile, offset) per axis
        full = vals.transpose(order).reshape((nb, m_out) + tuple(t.tiles[d] * t.out[d] for d in range(nd)))
        keep = tuple(slice(0, o1[d], spec.strides[d]) for d in range(nd))
        return np.ascontiguousarray(full[(slice(None), slice(None)) + keep])
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
        tiles, n_og = t.n_tiles, g.output_groups()
        for b in range(g.x_shape[0]):
            for slot in range(g.groups * n_og):  # output group og of conv group gi = slot // n_og
                base = (b * g.groups + slot // n_og) * t.n_cb * tiles
                for tile in range(tiles):
                    plan.append((slot, [base + cb * tiles + tile for cb in range(t.n_cb)]))
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
