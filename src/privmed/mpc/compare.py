"""Truncation, ReLU, sign, signs against many public thresholds with one opening
(``sign_thresholds``) and the reveal, on shares over Z_2^l (l = the plan's ``ring_bits``,
40-64, carried in uint64 arrays; max-pooling and LeakyReLU are built from ReLU by
``privmed.runtime.backend``).

All comparisons follow one construction (a dealer-assisted variant of the masked comparison in
"Improved Primitives for MPC over Mixed Arithmetic-Binary Circuits", Escudero et al., CRYPTO
2020, with lookup-table chunks as in "One-time truth tables", Ishai et al., TCC 2013, and the
log-depth prefix merge of Garay-Schoenmakers-Villegas, PKC 2007):

1. Open c = x + 2^(l-2) + r mod 2^l, with r uniform in Z_2^l from the dealer (one round). c is
   uniform whatever x is: perfectly hiding. When the value is then truncated by s and compared
   on bits >= s only (a fused ReLU, a truncation), each party sends only the bits [s, l) of its
   share c_i (ceil((l - s) / 8) bytes instead of ceil(l / 8)), and both take
   c* = ((c_0 >> s) + (c_1 >> s)) 2^s = c - eps with eps = (c mod 2^s) + carry 2^s in
   [0, 2^(s+1)): c* is the opening, under the same r, of x* = x - eps, and every later step
   runs on (x*, c*). The receiver learns c_i >> s of a share masked by uniform r_i: uniform.
2. Exact truncation by s (Escudero et al. sec. 5.1 "probabilistic truncation" made exact with
   msb(r)): for x' = x* + 2^(l-2) in [0, 2^(l-1)), x' + r wraps iff msb(r) = 1 and
   msb(c*) = 0. Hence floor(x'/2^s) = (c* >> s) - (r >> s) + msb(r)(1 - msb(c*)) 2^(l-s)
   - borrow, with borrow in {0, 1} from the low s bits, which we drop. The parties' shares
   of r >> s are those of (r >> s) - carry, carry in {0, 1} (``expand_nonlinear``: each share
   of r is h_i 2^s + low_i, and only a wrap bit w, needed mod 2^s, comes from the dealer).
   With eps and carry the result is floor(x / 2^s) + {-1, 0, +1, +2} units in the last
   place (measured: 5 %, 44 %, 45 %, 5 %), never anything else: there is no probabilistic
   wrap, so a catastrophic error has probability 0 (not merely < 2^-40) as long as
   |x| < 2^(l-2) - 2^(s+1), which the compiler's choice of l guarantees with its margin over
   calibration data (``compiler.calibrate.choose_ring_bits``).
3. Sign: for |x| < 2^b (b <= l - 3, checked on receipt of the plan), x < 0 iff bit b of
   (c - r) mod 2^(b+1) is 1, i.e. c_b XOR r_b XOR [c mod 2^b < r mod 2^b]. The comparison of
   the public c with the dealer's r is done on bits [d, b) only (d >= s), in 4-bit chunks:
   the dealer provides an XOR-shared truth table of v -> [v < r_j] for each chunk (2 bytes
   per chunk); [v == r_j] = [v - 1 < r_j] XOR [v < r_j] (1 XOR [0 < r_j] at v = 0) is
   GF(2)-linear in it, so each party derives its share of the [v == r_j] table locally, and
   looks both up at the public c_j. A log-depth tree of AND gates (Beaver triples on bits)
   merges chunk results. Ignoring the low d bits, and eps, can
   only misjudge the sign when 0 <= x < 2^(d+1); with d = s that is x / 2^s < 2 units in the
   last place, where ReLU's output is then 0 instead of at most 1 unit.
4. Open e = b XOR c_hat where b = [x >= 0] and c_hat is the dealer's random bit (one round,
   one bit each way); then b = e + (1 - 2e) c_hat arithmetically, and
   b * t (t the truncated value) is linear in the dealer's shares of c_hat, R, c_hat R, M, c_hat M
   (R = (r >> s) - carry, M = msb(r)): no further multiplication round. M, c_hat M and R's
   wrap bit w enter only multiplied by 2^(l-s), so they are needed mod 2^s only. With t_i
   this party's share of t and u_i its share of c_hat t (c_hat P - c_hat R + gate c_hat M, P
   public), b t = e t + (1 - 2e) c_hat t, so each party outputs u_i where e = 0 and
   t_i - u_i where e = 1 (a select on the public e, no further arithmetic).

Rounds per ReLU: 2 + ceil(log2 m) for m = (b - d) / 4 chunks. Bytes per element and party,
with w(k) = ceil(k / 8): w(l - s) (open c) + (2m - 1) * 2 / 8 (AND openings) + 1/8 (open e);
dealer to model owner: 2 w(l) + 3 w(s) (c_hat, c_hat R; w, M, c_hat M; 2 w(l) when s = 0)
+ 2m + about (2m + 1) / 8. Truncation alone: 1 round, w(l - s) bytes per party, 2 w(s) from
the dealer. DenseNet-121 (l = 44, s = 16, b = 40, m = 6, 7 AND gates): 4 + 1.9 per party and
12 + 6 + 12 + 1 from the dealer per ReLU element, about 43 bytes in all (85 with Z_2^64, full
openings, a full share of r >> s and dealer tables of both [v < r_j] and [v == r_j]).

Security (semi-honest, non-colluding dealer): every opened value (the c_i >> s, the AND-gate
maskings, e) is masked by fresh uniform dealer randomness the receiver does not know, so each
party's view is simulatable from its own input and output; the dealer's corrections are
masked by the seed-expanded shares of the other party.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from privmed.mpc.beaver import BITS, Triple, beaver
from privmed.mpc.correlation.expand import NonlinearShares, nibbles
from privmed.mpc.correlation.requests import CHUNK, Request, merge_schedule, require_shape
from privmed.mpc.party import Party
from privmed.ring.fixed import U64, public_const, reduce, sign_extend


def offset(ring: int) -> np.uint64:
    """2^(l-2): added before the opening so that x' = x + 2^(l-2) is in [0, 2^(l-1))."""
    return U64(1 << (ring - 2))


def _and(p: Party, tag: str, x: np.ndarray, y: np.ndarray, triple: tuple[np.ndarray, np.ndarray, np.ndarray]) -> np.ndarray:
    """XOR-shared x AND y on packed bits (8 gates per byte): ``beaver`` over GF(2) with B = AND.

    One round; each party sends 2 bits per gate.
    """
    a, b, z = triple
    require_shape(tag, "AND triple z", z, x.shape)
    return beaver(p, tag, x, y, Triple(a, b, z), np.bitwise_and, BITS)


def _borrow(p: Party, label: str, c: np.ndarray, corr: NonlinearShares, bits: int, drop: int) -> np.ndarray:
    """Packed XOR share of [c mod 2^bits < r mod 2^bits] on bits [drop, bits) (step 3)."""
    m = (bits - drop) // CHUNK
    cj = nibbles(c, drop, m)
    table = corr.lt_tables
    assert table is not None
    require_shape(label, "comparison table", table, cj.shape)
    # [v == r_j] = [v - 1 < r_j] XOR [v < r_j] (and 1 XOR [0 < r_j] at v = 0): linear in the table
    eq_table = table ^ (table << np.uint16(1))
    if p.is_data_owner:
        eq_table ^= np.uint16(1)
    lt, eq = _lookup(table, cj), _lookup(eq_table, cj)
    nodes: list[tuple[np.ndarray, np.ndarray | None]] = [(lt[j], eq[j]) for j in range(m)]
    for lvl, pairs in enumerate(merge_schedule(m)):
        xs, ys = [], []
        for lo, hi, need_eq in pairs:
            hi_eq = nodes[hi][1]
            assert hi_eq is not None  # element 0 is never a high half (merge_schedule)
            xs.append(hi_eq)
            ys.append(nodes[lo][0])
            if need_eq:
                lo_eq = nodes[lo][1]
                assert lo_eq is not None
                xs.append(hi_eq)
                ys.append(lo_eq)
        prod = _and(p, f"{label}/and{lvl}", np.stack(xs), np.stack(ys), corr.triples[lvl])  # type: ignore[arg-type]
        merged, k = [], 0
        for _lo, hi, need_eq in pairs:
            new_lt = nodes[hi][0] ^ prod[k]
            k += 1
            new_eq = None
            if need_eq:
                new_eq, k = prod[k], k + 1
            merged.append((new_lt, new_eq))
        if len(nodes) % 2:
            merged.append(nodes[-1])
        nodes = merged
    return nodes[0][0]


def _lookup(table: np.ndarray, index: np.ndarray) -> np.ndarray:
    """Bit ``index`` of each 16-bit table entry (m, n), packed 8 per byte along n."""
    bits = np.empty(table.shape, dtype=np.uint8)
    np.bitwise_and(table >> index, np.uint16(1), out=bits, casting="unsafe")  # the cast keeps 0/1
    return np.packbits(bits, axis=1)


def _open_sign_mask(p: Party, label: str, c: np.ndarray, corr: NonlinearShares, n: int, bits: int, drop: int) -> np.ndarray:
    """Steps 3-4 up to the opening: e = [x >= 0] XOR c_hat, public, as 0/1 uint8."""
    assert corr.e_mask is not None
    borrow = _borrow(p, label, c, corr, bits, drop)
    require_shape(label, "sign mask", corr.e_mask, borrow.shape)
    e_mine = borrow ^ corr.e_mask
    if p.is_data_owner:
        e_mine ^= np.packbits((1 ^ ((c >> U64(bits)) & U64(1))).astype(np.uint8))
    return np.unpackbits(e_mine ^ p.exchange(f"{label}/e", e_mine), count=n)


def _open_masked(p: Party, req: Request, x: np.ndarray, corr: NonlinearShares, low: int = 0) -> np.ndarray:
    """Step 1: c = x + 2^(l-2) + r mod 2^l, opened to both parties (one round, one packed ring
    element each way); with ``low`` > 0 only the bits [low, l) of each share travel and the
    result is c* (see the module docstring, step 1)."""
    label, ring = req.label, req.ring
    flat = x.reshape(-1)
    require_shape(label, "mask r", corr.r, flat.shape)
    for name in ("r_high", "r_wrap", "r_msb", "c_hat", "c_hat_r_high", "c_hat_r_msb"):
        value = getattr(corr, name)
        if value is not None and value.size:
            require_shape(label, f"correlation {name}", value, flat.shape)
    mine = flat + corr.r
    if p.is_data_owner:
        mine = mine + offset(ring)
    if not low:
        return reduce(mine + p.exchange_ring(f"{label}/c", mine), ring)
    high = reduce(mine, ring) >> U64(low)
    return reduce((high + p.exchange_ring(f"{label}/c", high, ring - low)) << U64(low), ring)


@dataclass
class _Truncation:
    """Step 2 on one opening: this party's shares t of x >> shift, the public part P of t,
    its share R of (r >> s) - carry and the wrap gate, each computed once (ReLU reuses them)."""

    t: np.ndarray
    public: np.ndarray
    r_high: np.ndarray
    gate: np.ndarray | None


def _truncated(c: np.ndarray, corr: NonlinearShares, shift: int, ring: int, data_owner: bool) -> _Truncation:
    """Step 2: shares of t = x >> shift (-1 to +2 ulp), and the public part P of t."""
    public = (c >> U64(shift)) - public_const(1 << (ring - 2 - shift))
    r_high = _r_high(corr, shift, ring)
    t = -r_high
    gate = None
    if shift:
        assert corr.r_msb is not None
        gate = _wrap_gate(c, shift, ring)
        t = t + corr.r_msb * gate
    if data_owner:
        t = t + public
    return _Truncation(t, public, r_high, gate)


def _r_high(corr: NonlinearShares, shift: int, ring: int) -> np.ndarray:
    """This party's share of (r >> s) - carry: h_i - w_i 2^(l-s) (``expand_nonlinear``)."""
    if not shift:
        return corr.r_high
    assert corr.r_wrap is not None
    return corr.r_high - (corr.r_wrap << U64(ring - shift))


def _wrap_gate(c: np.ndarray, shift: int, ring: int) -> np.ndarray:
    """(1 - msb(c)) 2^(l - shift): the weight of msb(r) in the truncation (step 2). A multiple
    of 2^(l - shift), so shares of msb(r) only matter mod 2^shift (the dealer sends them at
    that width)."""
    return (U64(1) - (c >> U64(ring - 1))) << U64(ring - shift)


def truncate(p: Party, req: Request, x: np.ndarray) -> np.ndarray:
    """Shares of floor(x / 2^s) + {-1, 0, 1, 2} ulp (steps 1-2). 1 round; ceil((l - s) / 8)
    bytes each way; 2 ceil(s / 8) from the dealer (see the module docstring)."""
    assert req.nonlinear is not None
    corr = p.source.nonlinear(req)
    c = _open_masked(p, req, x, corr, low=req.nonlinear.shift)
    return _truncated(c, corr, req.nonlinear.shift, req.ring, p.is_data_owner).t.reshape(x.shape)


def relu(p: Party, req: Request, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Shares of (ReLU(x >> s), x >> s) (steps 1-4); see the module docstring for costs."""
    spec = req.nonlinear
    assert spec is not None and spec.relu
    corr = p.source.nonlinear(req)
    c = _open_masked(p, req, x, corr, low=min(spec.shift, spec.drop))
    tr = _truncated(c, corr, spec.shift, req.ring, p.is_data_owner)
    e = _open_sign_mask(p, req.label, c, corr, spec.n, spec.bits, spec.drop).view(bool)
    assert corr.c_hat is not None and corr.c_hat_r_high is not None
    # b t = e t + (1 - 2e) c_hat t, and this party's share of c_hat t is
    # u = c_hat P - (c_hat R) + gate (c_hat M): the output share is u where e = 0, t - u where e = 1
    u = corr.c_hat * tr.public
    u -= corr.c_hat_r_high
    if tr.gate is not None:
        assert corr.c_hat_r_msb is not None
        u += tr.gate * corr.c_hat_r_msb
    out = np.where(e, tr.t - u, u)
    return out.reshape(x.shape), tr.t.reshape(x.shape)


def sign(p: Party, req: Request, x: np.ndarray) -> np.ndarray:
    """Arithmetic shares (scale 0) of the bit [x >= 0], for |x| < 2^bits (steps 1, 3, 4 with
    s = 0 and drop = 0: exact). Same rounds and party-to-party bytes as a ReLU without
    truncation; the dealer sends c_hat's correction but not c_hat R's (no select follows)."""
    spec = req.nonlinear
    assert spec is not None and spec.relu and spec.drop == 0
    corr = p.source.nonlinear(req)
    c = _open_masked(p, req, x, corr)
    e = _open_sign_mask(p, req.label, c, corr, spec.n, spec.bits, spec.drop).astype(U64)
    assert corr.c_hat is not None
    b = (U64(1) - U64(2) * e) * corr.c_hat  # b = e + (1 - 2e) c_hat
    if p.is_data_owner:
        b = b + e
    return b.reshape(x.shape)


def sign_thresholds(p: Party, req: Request, x: np.ndarray, thresholds: np.ndarray) -> np.ndarray:
    """Arithmetic shares (scale 0) of the bits [x >= t_j] for k public ring-encoded thresholds
    t_j, shape (k, *x.shape), for |x - t_j| < 2^bits: steps 1, 3 and 4 with ONE opening of
    x for all k comparisons (piecewise approximations compare x with every knot).

    1. Open c = x + 2^(l-2) + r once (r uniform per element); then c_j = c - t_j is the opening
       of x - t_j with the same r, computed locally by both parties.
    2. For each j, steps 3-4 on c_j: look up the XOR-shared tables of r's chunks (one
       set per element, shared by its k comparisons), merge the chunk results with fresh AND
       triples per comparison, open e_j = [x >= t_j] XOR c_hat_j with a fresh c_hat_j.

    Rounds: 2 + ceil(log2 m), as one sign. Bytes per element and party: w + k (g / 4 + 1/8)
    for g AND gates (7 at m = 6) and w = ceil(l / 8), instead of k (w + g / 4 + 1/8) for k
    separate signs. Dealer to the model owner: w k + 2m + about k (g + 1) / 8 bytes per
    element.
    Security (semi-honest, non-colluding dealer): c is uniform (one fresh r per element,
    opened once); the table shares and their lookups are never opened, only combined in AND
    gates whose openings are masked by fresh triples, and each e_j by a fresh c_hat_j, so the
    view (c, the AND openings, the e_j) is uniform and independent of x: simulatable exactly as
    for k signs. The k comparisons of one element do share r's tables; nothing derived from a
    table is opened without a fresh mask.
    """
    spec = req.thresholds
    assert spec is not None
    corr = p.source.thresholds(req)
    flat = x.reshape(-1)
    require_shape(req.label, "mask r", corr.r, flat.shape)
    assert corr.lt_tables is not None and corr.c_hat is not None
    m = spec.chunks
    require_shape(req.label, "comparison table", corr.lt_tables, (m, flat.size))
    require_shape(req.label, "sign masks c_hat", corr.c_hat, (spec.k * flat.size,))
    mine = flat + corr.r
    if p.is_data_owner:
        mine = mine + offset(req.ring)
    c = mine + p.exchange_ring(f"{req.label}/c", mine)
    cj = (c[None, :] - thresholds.reshape(-1, 1)).reshape(-1)  # public: the openings of x - t_j
    per_comparison = NonlinearShares(
        r=corr.r, r_high=corr.r_high, lt_tables=np.tile(corr.lt_tables, (1, spec.k)),
        e_mask=corr.e_mask, triples=corr.triples,
    )  # fmt: skip
    e = _open_sign_mask(p, req.label, cj, per_comparison, cj.size, spec.bits, 0).astype(U64)
    b = (U64(1) - U64(2) * e) * corr.c_hat
    if p.is_data_owner:
        b = b + e
    return b.reshape(spec.k, *x.shape)


def reveal_to_data_owner(p: Party, label: str, x: np.ndarray) -> np.ndarray | None:
    """Open x to the data owner only (one message, |x| ring elements from the model owner),
    sign-extended from Z_2^l to Z_2^64 so that ``ring.fixed.decode`` reads it."""
    if p.is_data_owner:
        theirs = p.recv_ring(f"{label}/reveal", x.shape)
        p.rounds += 1
        return sign_extend(x + theirs, p.ring_bits)
    p.send_ring(f"{label}/reveal", x)
    return None
