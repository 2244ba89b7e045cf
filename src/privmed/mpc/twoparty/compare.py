"""Comparison, DReLU, ReLU and bit-to-arithmetic conversion by OT, no dealer (CrypTFlow2).

Values are additive shares over Z_2^l (uint64 arrays holding [0, 2^l), 2 <= l <= 64); bits are
XOR shares (uint8 0/1). The data owner is party 0, the model owner party 1. Constructions, from
Rathee, Rastogi, Gupta, Chandran, Gupta, Sharma, "CrypTFlow2: Practical 2-Party Secure
Inference", CCS 2020:

- ``millionaire``: the millionaires' protocol (sec. 3) with 4-bit chunks and 1-out-of-16 OT (``ot.ot16_*``),
  then the log-depth AND tree over (lt, eq) pairs.
- ``and_triples``: bit Beaver triples from two random OTs (one in each direction): with
  random-OT messages (m0, m1) and choice c, m0 ^ m_c is an XOR sharing of (m0 ^ m1) c.
- ``drelu``: DReLU over Z_2^l (sec. 4): msb(x) = msb(x0) ^ msb(x1) ^ [x0' + x1' >= 2^(l-1)] where x' are the low
  l - 1 bits; the carry is the millionaires' bit [2^(l-1) - 1 - x0' < x1'].
- ``mux`` / ``relu``: CrypTFlow2's multiplexer from two correlated OTs, ReLU(x) = DReLU(x) x.
- ``b2a``: CrypTFlow2's bit-to-arithmetic conversion by one correlated OT.
- ``truncate``: SiRNN's truncation (Rathee et al., S&P 2021) with its known-MSB shortcut: after adding 2^(l-2)
  the value's MSB is 0, so the wrap bit of the shares is the OR of the shares' MSBs: one COT.
- ``extend``: SiRNN's signed extension from Z_2^l to a wider ring with the same shortcut.
- ``maximum``: max over candidates by a tree of max(a, b) = b + ReLU(a - b).

A correlated OT (COT) with correlation delta: the sender gets h0, the receiver with choice c gets
h0 + c delta (mod 2^l), from one random OT and one l-bit correction from the sender.

Costs per element and party (m = ceil((l - 1) / 4) chunks, T = 2m - 3 AND gates; measured in
``benchmarks/twoparty_primitives.py`` and ``docs/twoparty.md``): ReLU over Z_2^37 is
304 B (data owner) and 844 B (model owner), over Z_2^64 559 B and 1519 B, in
5 + ceil(log2 m) rounds (triples 1, OT16 2, ANDs ceil(log2 m), MUX 2).
Truncation: 8 B and 16 B, 2 rounds.

Byte counts here are IKNP's (16 B per random OT); on the Ferret engine (``silent_ot``) a random
OT costs 1 bit plus ~0.4 B of amortised extension instead, the rest unchanged.

Security (semi-honest, two parties, no dealer): every message is either an OT-extension
message (an IKNP matrix, or Ferret's level sums and choice flips: pseudorandom to its
receiver), a table or correction masked by a one-time pad from an OT key
the receiver lacks, or an AND-gate opening masked by a triple used once; each party's view is
simulated by uniform strings plus its own output shares, and the protocols compose
sequentially (CrypTFlow2 sec. 3-4).
"""

from __future__ import annotations

import numpy as np

from privmed.crypto.prg import Stream
from privmed.mpc.beaver import BITS, beaver
from privmed.mpc.beaver import Triple as BeaverTriple
from privmed.mpc.twoparty.ot import (
    OTSession,
    ot16_recv,
    ot16_send,
    random_ot_both,
    random_ot_recv,
    random_ot_send,
)
from privmed.net.channel import Channel
from privmed.ring.fixed import ring_mask

U64 = np.uint64
CHUNK = 4


def as_ring(keys: np.ndarray, bits: int) -> np.ndarray:
    """First 8 bytes of each 16-byte OT key as an element of Z_2^bits."""
    return np.ascontiguousarray(keys[:, :8]).view("<u8").reshape(-1) & ring_mask(bits)


def exchange_bits(ch: Channel, tag: str, bits: np.ndarray) -> np.ndarray:
    """Send my 0/1 array packed, receive the peer's of the same length (one round)."""
    ch.send(tag, np.packbits(bits))
    theirs = ch.recv(tag, np.uint8, ((len(bits) + 7) // 8,))
    return np.unpackbits(theirs, count=len(bits))


def and_triples(ot: OTSession, tag: str, n: int, stream: Stream) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """n XOR-shared bit triples (a, b, c), c = a AND b (0/1 uint8 arrays).

    1. Each party draws its choice bits b_i; both run n random OTs with themselves as receiver
       (sending the IKNP matrix), then n as sender.
    2. Sender role: a_i = m0 ^ m1 (lsb of each key), share of a_i b_peer: m0.
       Receiver role: share of a_peer b_i: m_c.
    3. c_i = a_i b_i ^ (both cross-term shares).
    Rounds: 1. Bytes per triple per party: 16 (random-OT matrix). Security: the IKNP random
    OTs (``ot``); a_i, b_i are uniform and independent of the peer's view.
    """
    b = stream.bits(n)
    got, (k0, k1) = random_ot_both(ot, f"{tag}/a", b, n)
    mine = got[:, 0] & 1
    m0, m1 = k0[:, 0] & 1, k1[:, 0] & 1
    a = m0 ^ m1
    return a, b, (a & b) ^ m0 ^ mine


Triple = tuple[np.ndarray, np.ndarray, np.ndarray]


class _BitPeer:
    """What ``privmed.mpc.beaver.beaver`` needs of a party, for 0/1 bit arrays sent packed."""

    def __init__(self, ch: Channel, is_data_owner: bool) -> None:
        self.ch, self.is_data_owner, self.rounds = ch, is_data_owner, 0

    def exchange(self, tag: str, mine: np.ndarray) -> np.ndarray:
        self.rounds += 1
        return exchange_bits(self.ch, tag, mine)


def _and(ch: Channel, tag: str, is_data_owner: bool, x: np.ndarray, y: np.ndarray, triple: Triple) -> np.ndarray:
    """XOR-shared x AND y with a bit triple: ``privmed.mpc.beaver.beaver`` over GF(2) with
    B = AND (open d = x ^ a, e = y ^ b: 1 round, 2 bits each)."""
    a, b, c = triple
    return beaver(_BitPeer(ch, is_data_owner), tag, x, y, BeaverTriple(a, b, c), np.bitwise_and, BITS)  # type: ignore[arg-type]


def tree_ands(m: int) -> int:
    """AND gates per element of the comparison tree over m chunks (2m - 3 for m > 1)."""
    count, total = m, 0
    while count > 1:
        pairs = count // 2
        count = pairs + count % 2
        total += 2 * pairs - (1 if count == 1 else 0)
    return total


def millionaire(ot: OTSession, tag: str, is_data_owner: bool, value: np.ndarray, bits: int, stream: Stream) -> np.ndarray:
    """XOR shares of [a < b] for a held by the data owner, b by the model owner, both in
    [0, 2^bits) (uint64 (n,)). Returns this party's share bits (n,) uint8.

    1. Cut into m = ceil(bits / 4) chunks a_j, b_j (j = 0 least significant).
    2. Data owner draws lt0_j, eq0_j and offers, for every v < 16, the 2-bit message
       (lt0_j ^ [a_j < v], eq0_j ^ [a_j == v]); the model owner picks v = b_j by 1-of-16 OT and
       holds lt1_j, eq1_j: XOR shares of [a_j < b_j], [a_j == b_j].
    3. Merge adjacent chunks (lo, hi): lt = lt_hi ^ (eq_hi AND lt_lo), eq = eq_hi AND eq_lo (the
       XOR is an OR of disjoint events), ceil(log2 m) levels of ANDs on triples from
       ``and_triples``.
    Rounds: 1 (triples) + 2 (OT16) + ceil(log2 m). Bytes per element per party:
    model owner 64 m (random-OT matrices) + 16 T + T/4, data owner 4 m + 16 T + T/4 for
    T = 2m - 3 AND gates (m > 1), plus 136-byte headers per message.
    Security: the OT16 hides b_j and the other 15 messages; every message is masked by the
    data owner's fresh lt0, eq0; AND openings are masked by triples used once.
    """
    n, m = len(value), -(-bits // CHUNK)
    chunks = split_chunks(value, m)
    triples = and_triples(ot, f"{tag}/tr", n * tree_ands(m), stream)
    if is_data_owner:
        lt, eq = stream.bits((m, n)), stream.bits((m, n))
        ot16_send(ot, f"{tag}/ot16", chunk_tables(chunks, lt, eq), 2)
    else:
        got = ot16_recv(ot, f"{tag}/ot16", chunks.reshape(-1), 2).reshape(m, n)
        lt, eq = got & 1, got >> 1
    return and_tree(ot.ch, tag, is_data_owner, lt, eq, triples)


def split_chunks(value: np.ndarray, m: int) -> np.ndarray:
    """(n,) uint64 -> (m, n) uint8 4-bit chunks, least significant first."""
    shifts = (CHUNK * np.arange(m, dtype=U64)).reshape(-1, 1)
    return ((value.reshape(1, -1) >> shifts) & U64(15)).astype(np.uint8)


def chunk_tables(chunks: np.ndarray, lt: np.ndarray, eq: np.ndarray) -> np.ndarray:
    """The sender's 1-of-16 tables (m n, 16): entry v = (lt ^ [a_j < v]) | (eq ^ [a_j == v]) << 1."""
    v = np.arange(16, dtype=np.uint8).reshape(1, 1, 16)
    less = (chunks[..., None] < v).astype(np.uint8) ^ lt[..., None]
    equal = (chunks[..., None] == v).astype(np.uint8) ^ eq[..., None]
    return (less | (equal << 1)).reshape(-1, 16)


def and_tree(ch: Channel, tag: str, is_data_owner: bool, lt: np.ndarray, eq: np.ndarray, triples: Triple) -> np.ndarray:
    """Step 3 of ``millionaire``: merge (m, n) chunk shares into the share of [a < b], using
    ``tree_ands(m)`` triples per element, one round per level."""
    n, m = lt.shape[1], lt.shape[0]
    nodes = [(lt[j], eq[j]) for j in range(m)]
    used, level = 0, 0
    while len(nodes) > 1:
        pairs = len(nodes) // 2
        final = pairs + len(nodes) % 2 == 1
        xs = [nodes[2 * p + 1][1] for p in range(pairs)] + ([] if final else [nodes[2 * p + 1][1] for p in range(pairs)])
        ys = [nodes[2 * p][0] for p in range(pairs)] + ([] if final else [nodes[2 * p][1] for p in range(pairs)])
        k = len(xs) * n
        tri = (triples[0][used : used + k], triples[1][used : used + k], triples[2][used : used + k])
        used += k
        prod = _and(ch, f"{tag}/and{level}", is_data_owner, np.concatenate(xs), np.concatenate(ys), tri).reshape(-1, n)
        merged = [(nodes[2 * p + 1][0] ^ prod[p], prod[pairs + p] if not final else prod[p]) for p in range(pairs)]
        nodes = merged + ([nodes[-1]] if len(nodes) % 2 else [])
        level += 1
    return nodes[0][0]


def drelu(ot: OTSession, tag: str, is_data_owner: bool, x: np.ndarray, bits: int, stream: Stream, drop: int = 0) -> np.ndarray:
    """XOR shares of [x >= 0] for x additively shared over Z_2^bits (two's complement sign);
    with ``drop`` = d > 0, exact for |x| >= 2^d and possibly wrong for |x| < 2^d.

    1. Data owner's millionaire input: (2^(l-1) - 1 - (x0 mod 2^(l-1))) >> d; model owner's:
       (x1 mod 2^(l-1)) >> d; ``millionaire`` on l - 1 - d bits gives XOR shares of the carry of
       the low parts (with d > 0, of their top l - 1 - d bits: the dropped bits' carry can flip
       it only when x mod 2^(l-1) is within 2^d of 0, as in the dealer mode's ``drop``).
    2. Locally: DReLU = 1 ^ msb(x0) ^ msb(x1) ^ carry (the data owner adds the 1).
    Rounds and bytes: those of ``millionaire`` on l - 1 - d bits (d = 12 at l = 37 saves a third).
    Security: ``millionaire``; step 2 is local.
    """
    value = drelu_input(x, bits, is_data_owner, drop)
    carry = millionaire(ot, tag, is_data_owner, value, bits - 1 - drop, stream)
    return drelu_output(x, carry, bits, is_data_owner)


def drelu_input(x: np.ndarray, bits: int, is_data_owner: bool, drop: int = 0) -> np.ndarray:
    """Step 1 of ``drelu``: this party's millionaires' input from its share (NOT of the low
    l - 1 bits commutes with the shift, so the data owner's input is 2^(l-1-d) - 1 - (x0' >> d))."""
    if not 0 <= drop < bits - 1:
        raise ValueError(f"drelu: expected 0 <= drop < {bits - 1}, got {drop}")
    low_mask = U64((1 << (bits - 1)) - 1)
    low = (low_mask - (x & low_mask)) if is_data_owner else x & low_mask
    return low >> U64(drop)


def drelu_output(x: np.ndarray, carry: np.ndarray, bits: int, is_data_owner: bool) -> np.ndarray:
    """Step 2 of ``drelu``: 1 ^ msb(x0) ^ msb(x1) ^ carry, locally on XOR shares."""
    msb = ((x >> U64(bits - 1)) & U64(1)).astype(np.uint8)
    return msb ^ carry ^ np.uint8(1) if is_data_owner else msb ^ carry


def _cot_send(ot: OTSession, tag: str, delta: np.ndarray, bits: int) -> np.ndarray:
    """COT sender: returns -h0; the receiver ends with h0 + c delta (sends the l-bit correction)."""
    k0, k1 = random_ot_send(ot, tag, len(delta))
    h0, h1 = as_ring(k0, bits), as_ring(k1, bits)
    ot.ch.send(f"{tag}/e", (h0 + delta - h1) & ring_mask(bits))
    return (U64(0) - h0) & ring_mask(bits)


def _cot_recv(ot: OTSession, tag: str, choice: np.ndarray, bits: int) -> np.ndarray:
    h = as_ring(random_ot_recv(ot, tag, choice), bits)
    e = ot.ch.recv(f"{tag}/e", U64, (len(choice),))
    return (h + choice.astype(U64) * e) & ring_mask(bits)


def b2a(ot: OTSession, tag: str, is_data_owner: bool, bit: np.ndarray, bits: int) -> np.ndarray:
    """Arithmetic shares over Z_2^bits of the XOR-shared bit b = b0 ^ b1 = b0 + b1 - 2 b0 b1.

    One COT, data owner sending with delta = 1 - 2 b0, model owner choosing b1: the shares of
    b1 (1 - 2 b0) are -h0 and h0 + b1 (1 - 2 b0); the data owner adds b0.
    Rounds: 2 (random-OT matrix, then correction). Bytes per bit: model owner 16, data owner 8.
    Security: COT (``ot``); the correction is masked by h1, a random-OT key the receiver
    lacks when b1 = 0, and the receiver's view when b1 = 1 is h0 + delta with h0 unknown to it.
    """
    if is_data_owner:
        b0 = bit.astype(U64)
        return (b0 + _cot_send(ot, f"{tag}/b2a", U64(1) - U64(2) * b0, bits)) & ring_mask(bits)
    return _cot_recv(ot, f"{tag}/b2a", bit, bits)


def mux(ot: OTSession, tag: str, is_data_owner: bool, d: np.ndarray, x: np.ndarray, bits: int) -> np.ndarray:
    """Arithmetic shares of d x for XOR-shared bit d and additively shared x (CrypTFlow2 F_MUX).

    d x_i = d_i x_i + d_peer (1 - 2 d_i) x_i: each party is COT sender for its own x_i
    (delta = (1 - 2 d_i) x_i) and receiver (choice d_i) for the peer's. Both COTs run at once.
    Rounds: 2. Bytes per element per party: 16 (random-OT matrix) + 8 (correction).
    Security: two COTs (see ``b2a``); each correction is masked by a random-OT key the
    receiver lacks, and the outputs are fresh additive shares.
    """
    di = d.astype(U64)
    mine, (k0, k1) = random_ot_both(ot, f"{tag}/mux", d, len(d))  # my choice d_i in the peer's COT
    h0, h1 = as_ring(k0, bits), as_ring(k1, bits)
    delta = (U64(1) - U64(2) * di) * x
    ot.ch.send(f"{tag}/mux/e", (h0 + delta - h1) & ring_mask(bits))
    e = ot.ch.recv(f"{tag}/mux/e", U64, (len(d),))
    received = as_ring(mine, bits) + di * e
    return (di * x - h0 + received) & ring_mask(bits)


def relu(
    ot: OTSession, tag: str, is_data_owner: bool, x: np.ndarray, bits: int, stream: Stream, drop: int = 0, compare_bits: int | None = None
) -> np.ndarray:
    """Arithmetic shares of ReLU(x) = DReLU(x) x over Z_2^bits (``drelu`` then ``mux``); with
    ``drop`` = d the result may be x instead of 0 or 0 instead of x when |x| < 2^d, an error
    below one unit once x is truncated by d bits (use d <= the following truncation).

    ``compare_bits`` = L < bits runs the DReLU on x mod 2^L (reduction is free), exact when
    |x| < 2^(L-1): the comparison costs what the value's range needs, not the ring's width
    (the dealer mode's ``NonlinearSpec.bits`` plays this role).
    Rounds: those of ``drelu`` + 2. Bytes: ``drelu`` (on L bits) + 16 + bits / 8 per element
    per party. Security: sequential composition of ``drelu`` and ``mux`` (the bit stays XOR-shared).
    """
    width = bits if compare_bits is None else compare_bits
    if not 2 <= width <= bits:
        raise ValueError(f"relu: expected 2 <= compare_bits <= {bits}, got {width}")
    sign_bit = drelu(ot, tag, is_data_owner, x & ring_mask(width), width, stream, drop)
    return mux(ot, tag, is_data_owner, sign_bit, x, bits)


def truncate(ot: OTSession, tag: str, is_data_owner: bool, x: np.ndarray, bits: int, shift: int) -> np.ndarray:
    """Shares of floor(x / 2^shift) or that minus 1, for |x| < 2^(bits - 2), over Z_2^bits.

    1. Data owner adds 2^(bits-2): x' = x + 2^(bits-2) is in [0, 2^(bits-1)), so msb(x') = 0.
    2. With a_i = msb(x'_i), the shares' sum is x' + w 2^bits where w = a0 OR a1 (the top bits
       a0 + a1 + carry are even, so they are 0 or 2): w = a0 + a1 - a0 a1, with a0 a1 from one
       COT (data owner sends, delta = a0; model owner chooses a1).
    3. t_i = (x'_i >> s) - w_i 2^(bits-s), and the data owner subtracts 2^(bits-2-s). The carry
       of the low s bits is dropped: the result is floor(x / 2^s) - c with c in {0, 1}; there is
       no probabilistic wrap, so no catastrophic error while |x| < 2^(bits-2).
    Rounds: 2. Bytes per element: model owner 16 (random-OT matrix), data owner 8 (correction).
    Security: COT (``ot``); nothing else is sent.
    """
    mask = ring_mask(bits)
    xs, wrap = _offset_and_wrap(ot, f"{tag}/tr", is_data_owner, x, bits, bits)
    out = (xs >> U64(shift)) - (wrap << U64(bits - shift))
    if is_data_owner:
        out = out - U64(1 << (bits - 2 - shift))
    return out & mask


def _offset_and_wrap(ot: OTSession, tag: str, is_data_owner: bool, x: np.ndarray, bits: int, out_bits: int) -> tuple[np.ndarray, np.ndarray]:
    """Steps 1-2 of ``truncate``: my share of x' = x + 2^(bits-2) in Z_2^bits, and my share over
    Z_2^out_bits of its wrap bit w = a0 OR a1 (one COT over Z_2^out_bits)."""
    xs = (x + U64(1 << (bits - 2))) & ring_mask(bits) if is_data_owner else x & ring_mask(bits)
    top = (xs >> U64(bits - 1)).astype(np.uint8)
    if is_data_owner:
        prod = _cot_send(ot, tag, top.astype(U64), out_bits)  # my share of a0 a1
    else:
        prod = _cot_recv(ot, tag, top, out_bits)
    return xs, (top.astype(U64) - prod) & ring_mask(out_bits)


def extend(ot: OTSession, tag: str, is_data_owner: bool, x: np.ndarray, bits: int, to_bits: int) -> np.ndarray:
    """Shares over Z_2^to_bits of x shared over Z_2^bits (bits < to_bits), exactly, for
    |x| < 2^(bits - 2): SiRNN's signed extension with the same known-MSB shortcut as
    ``truncate``. Lets Z_2^l results of ``he_linear`` rejoin a Z_2^64 computation.

    1-2. As ``truncate``: x' = x + 2^(bits-2), wrap w = a0 OR a1 as shares mod 2^to_bits.
    3. y_i = x'_i - w_i 2^bits (mod 2^to_bits); the data owner subtracts 2^(bits-2). Then
       y0 + y1 = x'0 + x'1 - w 2^bits - 2^(bits-2) = x over the integers, hence mod 2^to_bits.
    Rounds: 2. Bytes per element: model owner 16, data owner 8. Security: one COT.
    """
    if not 2 < bits < to_bits <= 64:
        raise ValueError(f"extend: expected 2 < bits < to_bits <= 64, got {bits} -> {to_bits}")
    xs, wrap = _offset_and_wrap(ot, f"{tag}/ext", is_data_owner, x, bits, to_bits)
    out = xs - (wrap << U64(bits))
    if is_data_owner:
        out = out - U64(1 << (bits - 2))
    return out & ring_mask(to_bits)


def maximum(ot: OTSession, tag: str, is_data_owner: bool, xs: np.ndarray, bits: int, stream: Stream) -> np.ndarray:
    """Shares of the maximum over axis 0 of xs (k, n) (|values| < 2^(bits-2) so differences
    do not wrap): ceil(log2 k) levels of max(a, b) = b + ReLU(a - b), each a batched ``relu``.

    Rounds: ceil(log2 k) times those of ``relu``; bytes: (k - 1) ReLUs per output element.
    Security: sequential composition of ``relu``; subtraction and addition are local.
    """
    level = 0
    while len(xs) > 1:
        half = len(xs) // 2
        a, b = xs[:half], xs[half : 2 * half]
        diff = relu(ot, f"{tag}/x{level}", is_data_owner, ((a - b) & ring_mask(bits)).reshape(-1), bits, stream)
        merged = (b + diff.reshape(a.shape)) & ring_mask(bits)
        xs = np.concatenate([merged, xs[2 * half :]])
        level += 1
    return xs[0]
