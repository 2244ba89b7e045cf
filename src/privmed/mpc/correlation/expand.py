"""Seed expansion and the dealer's corrections.

Each party expands from its own 16-byte seed everything it can; the dealer, which holds both
seeds, computes the remaining *correction* terms, which only the model owner (party 1)
receives. Material per request (n elements, m = (bits - drop) / 4 comparison chunks):

- linear layer L(W, x): party 0 gets A (input mask) and C0; party 1 gets B (weight mask, fixed
  for the session) and C1 = L(B, A) - C0 (correction, |out| ring elements).
- truncation by s: r (both seeded, r = r0 + r1, each r_i = h_i 2^s + low_i), shares of
  (r >> s) - carry from the seeds up to a wrap bit w, and shares of msb(r); correction to
  party 1: w and msb(r), 2n elements of Z_2^s (``expand_nonlinear``).
- ReLU (with optional truncation): additionally a random bit c_hat shared arithmetically,
  shares of c_hat * r_high and c_hat * r_msb, the comparison of v with r_j for [v < r_j] and
  [v == r_j] of every 4-bit chunk r_j of r's bits [drop, bits), given as an XOR-shared truth
  table of [v < r_j] only (``lt_tables``: [v == r_j] = [v - 1 < r_j] XOR [v < r_j] is linear
  in it, ``compare._borrow``), the bit r_bits XOR c_hat (``e_mask``), and AND triples for
  the comparison tree. Correction to party 1: 3n ring elements + 2n elements of Z_2^s (n ring
  elements when s = 0) + 2m n bytes of tables + about (2m + 1) n / 8 bytes of bits.
- product x * y (or x * x, or einsum(x, y)): Beaver triple a, b, c = B(a, b); correction
  |B(x, y)| ring elements.
- k thresholds of n elements: one r per element and its tables (shared by the k
  comparisons), and per comparison a fresh c_hat, its e_mask bit and the AND triples.
  Correction to party 1: k n ring elements + 2m n bytes of tables + about k (2m - 1) n / 8
  bytes of bits.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from privmed.crypto.prg import PRG, Stream
from privmed.mpc.correlation.requests import (
    CHUNK,
    NonlinearSpec,
    Request,
    ThresholdSpec,
    ands_per_level,
    packed_len,
)
from privmed.ring.fixed import reduce
from privmed.ring.linalg import linear

U64 = np.uint64


@dataclass
class LinearShares:
    mask: np.ndarray  # party 0: A (input mask); party 1: B (weight mask)
    product: np.ndarray  # party 0: C0; party 1: C1 with C0 + C1 = L(B, A)


@dataclass
class NonlinearShares:
    """One party's comparison/truncation material (arithmetic shares unless noted)."""

    r: np.ndarray  # the mask r of the opening c = x + 2^(l-2) + r, r = h 2^shift + low
    r_high: np.ndarray  # h: with r_wrap, the shares of r >> shift (``expand_nonlinear``)
    r_wrap: np.ndarray | None = None  # w, the wrap of h_0 + h_1 (truncations only; needed mod 2^shift)
    r_msb: np.ndarray | None = None  # msb(r) (truncations only)
    c_hat: np.ndarray | None = None  # the dealer's random bit that hides the sign
    c_hat_r_high: np.ndarray | None = None  # c_hat * (r >> shift)
    c_hat_r_msb: np.ndarray | None = None  # c_hat * msb(r)
    lt_tables: np.ndarray | None = None  # (m, n) uint16, XOR-shared: bit v of entry j is [v < r_j]
    e_mask: np.ndarray | None = None  # packed XOR shares of bit_l(r) XOR c_hat
    triples: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = field(default_factory=list)  # packed AND triples per tree level


@dataclass
class ProductShares:
    a: np.ndarray
    b: np.ndarray | None  # None for a square (b = a)
    c: np.ndarray  # party 0: seeded; party 1: the dealer's correction


def expand_linear(prg: PRG, req: Request, index: int) -> LinearShares:
    """Party 0: A and C0 (fresh per batch); party 1: B, fixed for the whole session so that the
    masked weights W - B are sent once per session and reused for every batch."""
    spec = req.linear
    assert spec is not None
    if index == 0:
        s = prg.stream(req.key)
        return LinearShares(s.uint64(spec.x_shape), s.uint64(spec.out_shape))
    return LinearShares(prg.stream(req.weight_mask_key).uint64(spec.w_shape), np.zeros(0, dtype=U64))


def expand_nonlinear(stream: Stream, index: int, spec: NonlinearSpec, ring: int = 64) -> NonlinearShares:
    """Seeded material; bits (e_mask, triples) are kept packed, 8 elements per byte.

    With a shift s > 0, each party's share of the mask is r_i = h_i 2^s + low_i with h_i
    uniform below 2^(l-s) and low_i below 2^s, so r = r_0 + r_1 is uniform in Z_2^l (each r_i
    alone is) and r >> s = h_0 + h_1 + carry - w 2^(l-s), where carry = [low_0 + low_1 >= 2^s]
    and w = [h_0 + h_1 + carry >= 2^(l-s)]. The parties use h_i - w_i 2^(l-s) as their shares
    of r >> s, i.e. of (r >> s) - carry: the dropped carry adds at most one unit to the
    truncation (``mpc.compare`` step 2), and w enters only times 2^(l-s), so the dealer
    corrects it mod 2^s (2 bytes) instead of sending a full share of r >> s."""
    n, nb = spec.n, packed_len(spec.n)
    h = stream.uint64(n)
    if spec.shift:
        narrow = _narrow(stream, spec.shift)  # values needed mod 2^shift: drawn at that width
        h &= U64((1 << (ring - spec.shift)) - 1)
        r = (h << U64(spec.shift)) + (narrow(n) & U64((1 << spec.shift) - 1))
    else:
        r = h
    sh = NonlinearShares(r=r, r_high=h)
    m = spec.chunks
    if index == 0:
        if spec.shift:
            sh.r_wrap, sh.r_msb = narrow(n), narrow(n)
        if spec.relu:
            sh.c_hat = stream.uint64(n)
            if spec.select:
                sh.c_hat_r_high = stream.uint64(n)
                sh.c_hat_r_msb = narrow(n) if spec.shift else None
            sh.lt_tables = stream.uint16((m, n))
            sh.e_mask = stream.uint8(nb)
    sh.triples = _and_triples(stream, index, m, nb)
    return sh


def _narrow(stream: Stream, bits: int):  # type: ignore[no-untyped-def]
    """The stream's draw of uniform values needed mod 2^bits only: uint16 or uint32 words when
    they hold ``bits`` (numpy widens them to uint64 in arithmetic with the shares), else uint64.
    Uniform mod 2^bits either way; fewer keystream bytes."""
    if bits <= 16:
        return stream.uint16
    return stream.uint32 if bits <= 32 else stream.uint64


def expand_thresholds(stream: Stream, index: int, spec: ThresholdSpec) -> NonlinearShares:
    """Seeded material of a threshold comparison: r and the tables per element (n), c_hat,
    e_mask and the AND triples per comparison (k n; bits packed 8 per byte)."""
    n, kn, m = spec.n, spec.k * spec.n, spec.chunks
    nb = packed_len(kn)
    sh = NonlinearShares(r=stream.uint64(n), r_high=np.zeros(0, U64))
    if index == 0:
        sh.c_hat = stream.uint64(kn)
        sh.lt_tables = stream.uint16((m, n))
        sh.e_mask = stream.uint8(nb)
    sh.triples = _and_triples(stream, index, m, nb)
    return sh


def thresholds_correction(spec: ThresholdSpec, s0: Stream, s1: Stream, private: Stream) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(c_hat corrections (k n) u64, tables (m, n) u16, packed bits: e_mask then triples)."""
    p0, p1 = expand_thresholds(s0, 0, spec), expand_thresholds(s1, 1, spec)
    assert p0.c_hat is not None and p0.lt_tables is not None and p0.e_mask is not None
    r = p0.r + p1.r
    c_hat_bits = private.bits(spec.k * spec.n)
    tables = _lt_tables(nibbles(r, 0, spec.chunks)) ^ p0.lt_tables
    r_top = np.tile(((r >> U64(spec.bits)) & U64(1)).astype(np.uint8), spec.k)  # the same r for every threshold
    bits = [np.packbits(r_top ^ c_hat_bits) ^ p0.e_mask]
    bits += _and_corrections(p0, p1)
    return c_hat_bits.astype(U64) - p0.c_hat, tables, np.concatenate(bits)


def _and_triples(stream: Stream, index: int, m: int, nb: int) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """The seeded AND triples of an m-chunk comparison tree, ``nb`` packed bytes per gate: a and
    b for both parties, z seeded for party 0 (party 1's z is the dealer's correction)."""
    triples = []
    for k in ands_per_level(m):
        a, b = stream.uint8((k, nb)), stream.uint8((k, nb))
        z = stream.uint8((k, nb)) if index == 0 else np.zeros((k, nb), np.uint8)
        triples.append((a, b, z))
    return triples


def _and_corrections(p0: NonlinearShares, p1: NonlinearShares) -> list[np.ndarray]:
    """Party 1's z = (a0 ^ a1) & (b0 ^ b1) ^ z0 of every tree level, flat packed bytes."""
    return [(((a0 ^ a1) & (b0 ^ b1)) ^ z0).reshape(-1) for (a0, b0, z0), (a1, b1, _) in zip(p0.triples, p1.triples, strict=True)]


def expand_product(prg: PRG, req: Request, index: int) -> ProductShares:
    spec = req.product
    assert spec is not None
    s = prg.stream(req.key)
    a = s.uint64(spec.x_shape)
    b = None if spec.square else s.uint64(spec.y_shape)
    c = s.uint64(spec.out_shape) if index == 0 else np.zeros(0, U64)
    return ProductShares(a, b, c)


def arith_fields(spec: NonlinearSpec) -> tuple[list[str], list[str]]:
    """The arithmetic fields the dealer corrects for party 1, in the order it sends them:
    (full-width fields, fields needed only mod 2^shift).

    w (``expand_nonlinear``), msb(r) and c_hat msb(r) enter the protocols only multiplied by
    2^(l - shift) (``compare._truncated``, ``compare._wrap_gate``), so their shares matter mod
    2^shift only, and the dealer sends their corrections at ceil(shift / 8) bytes."""
    select = spec.relu and spec.select
    wide = (["c_hat"] + (["c_hat_r_high"] if select else [])) if spec.relu else []
    msb = (["r_wrap", "r_msb"] + (["c_hat_r_msb"] if select else [])) if spec.shift else []
    return wide, msb


def linear_correction(req: Request, prg0: PRG, prg1: PRG) -> np.ndarray:
    """C1 = L(B, A) - C0 (mod 2^ring: the GEMM skips the limb products above)."""
    spec = req.linear
    assert spec is not None
    p0, p1 = expand_linear(prg0, req, 0), expand_linear(prg1, req, 1)
    return linear(spec.kind, spec.conv, p1.mask, p0.mask, ring_bits=req.ring) - p0.product


def product_correction(req: Request, prg0: PRG, prg1: PRG) -> np.ndarray:
    """c1 = B(a, b) - c0: a * b (b broadcast over a's shape), a * a for a square, or the
    einsum of a and b."""
    spec = req.product
    assert spec is not None
    p0, p1 = expand_product(prg0, req, 0), expand_product(prg1, req, 1)
    a = p0.a + p1.a
    b = a if p0.b is None or p1.b is None else p0.b + p1.b
    return spec.bilinear(a, b) - p0.c


def nonlinear_correction(
    spec: NonlinearSpec, s0: Stream, s1: Stream, private: Stream, ring: int = 64
) -> tuple[np.ndarray, np.ndarray, np.ndarray | None, np.ndarray]:
    """(full-width corrections (k, n) u64, msb corrections (k', n) u64 (``arith_fields``),
    tables (m, n) u16 or None, packed bits u8), for shares of Z_2^ring."""
    p0, p1 = expand_nonlinear(s0, 0, spec, ring), expand_nonlinear(s1, 1, spec, ring)
    r = reduce(p0.r + p1.r, ring)
    s_ = spec.shift
    full = {"r_high": r >> U64(s_), "r_msb": r >> U64(ring - 1)}
    if s_:
        low = U64((1 << s_) - 1)
        carry = ((p0.r & low) + (p1.r & low)) >> U64(s_)
        full["r_wrap"] = (p0.r_high + p1.r_high + carry) >> U64(ring - s_)
        full["r_high"] = full["r_high"] - carry  # what the parties' shares h_i - w_i 2^(l-s) sum to
    bits: list[np.ndarray] = []
    tables = None
    if spec.relu:
        c_hat_bits = private.bits(spec.n)
        c_hat = c_hat_bits.astype(U64)
        full["c_hat"] = c_hat
        if spec.select:
            full.update(c_hat_r_high=c_hat * full["r_high"], c_hat_r_msb=c_hat * full["r_msb"])
        assert p0.lt_tables is not None
        tables = _lt_tables(nibbles(r, spec.drop, spec.chunks)) ^ p0.lt_tables
        r_top = ((r >> U64(spec.bits)) & U64(1)).astype(np.uint8)
        bits.append(np.packbits(r_top ^ c_hat_bits) ^ p0.e_mask)  # type: ignore[operator]
    wide, msb = arith_fields(spec)
    arith = [np.empty((len(names), spec.n), dtype=U64) for names in (wide, msb)]
    for names, out in zip((wide, msb), arith, strict=True):
        for i, name in enumerate(names):
            np.subtract(full[name], getattr(p0, name), out=out[i])
    bits += _and_corrections(p0, p1)
    packed = np.concatenate(bits) if bits else np.zeros(0, np.uint8)
    return arith[0], arith[1], tables, packed


def _lt_tables(rj: np.ndarray) -> np.ndarray:
    """The truth table of v -> [v < r_j] for each 4-bit chunk r_j: bits v = 0 .. r_j - 1 set."""
    return (np.uint16(1) << rj) - np.uint16(1)


def nibbles(v: np.ndarray, drop: int, m: int) -> np.ndarray:
    """The m 4-bit chunks of v's bits [drop, drop + 4m) as uint16 (m, n).

    With drop a multiple of 4 the chunks are read from the little-endian bytes of v, which
    touches 8x less memory than 64-bit shifts.
    """
    out = np.empty((m, v.shape[0]), dtype=np.uint16)
    if drop % CHUNK == 0:
        by = v.view(np.uint8).reshape(-1, 8)
        for j in range(m):
            off = drop + CHUNK * j
            col = by[:, off // 8]
            np.bitwise_and(col >> np.uint8(off % 8) if off % 8 else col, np.uint8(15), out=out[j], casting="unsafe")
        return out
    for j in range(m):
        out[j] = (v >> U64(drop + CHUNK * j)) & U64(15)
    return out
