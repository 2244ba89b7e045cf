"""ReLU split into an input-independent offline phase (all OT extension) and a light online phase.

Beaver's OT precomputation ("Precomputing Oblivious Transfer", CRYPTO 1995) turns random OTs
made ahead of time into OTs on the real inputs with a few bits of online traffic:

- 1-of-16: offline the receiver holds a random c' and pad P[c'], the sender all pads P[v];
  online the receiver sends d = c ^ c' (4 bits), the sender y[v] = T[v] ^ P[v ^ d], and the
  receiver reads T[c] = y[c] ^ P[c'].
- correlated OT over Z_2^l: offline random keys (h0, h1), receiver's random b' and h_b';
  online the receiver sends f = b ^ b' (1 bit), the sender relabels (h'_0, h'_1) = (h_f, h_(1^f))
  and sends e = h'_0 + delta - h'_1, so the receiver's h_b' = h'_b gives h'_0 + b delta.

``relu_offline`` prepares, for n elements over Z_2^l, the random 1-of-16 OTs (data owner
sending), the AND triples of the comparison tree and random COTs in both directions for the
MUX; ``relu_online`` is CrypTFlow2's ReLU (``compare.relu``) on that material.

Online cost per element (m = ceil((l - 1 - drop) / 4) chunks, T = 2m - 3 ANDs): model owner m / 2 + T / 4
+ 1/8 + 8 bytes, data owner 4 m + T / 4 + 1/8 + 8 bytes; rounds 2 + ceil(log2 m) + 2. No OT
extension, no AES online. Offline cost: that of ``compare.relu`` (IKNP matrices).

Security: the derandomised messages d and f are uniform (c', b' are uniform and used once);
y and e are masked by random-OT pads the receiver lacks, exactly as in the protocols they
replace; the material is input-independent, so precomputing it reveals nothing.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from privmed.crypto.prg import Stream
from privmed.mpc.twoparty.compare import (
    CHUNK,
    Triple,
    and_tree,
    and_triples,
    as_ring,
    chunk_tables,
    drelu_input,
    drelu_output,
    ring_mask,
    split_chunks,
    tree_ands,
)
from privmed.mpc.twoparty.ot import (
    OTSession,
    pack_small,
    random_ot_both,
    random_ot_recv,
    random_ot_send,
    unpack_small,
)
from privmed.net.channel import Channel

U64 = np.uint64


@dataclass
class ReluMaterial:
    """One party's precomputed material for n ReLUs over Z_2^bits (see the module docstring)."""

    n: int
    bits: int
    drop: int  # low bits ignored by the comparison (see ``compare.drelu``)
    pads: np.ndarray  # data owner: (n m, 16) 2-bit pads; model owner: (n m,) pad of its choice
    choices: np.ndarray  # model owner: (n m,) random c' < 16; data owner: empty
    triples: Triple
    send_keys: tuple[np.ndarray, np.ndarray]  # my COT as sender: (h0, h1) over Z_2^bits
    recv_choice: np.ndarray  # my COT as receiver: random b' (0/1)
    recv_key: np.ndarray  # h_b'
    tables_mask: tuple[np.ndarray, np.ndarray]  # data owner: lt0, eq0 (m, n); model owner: empty
    spent: bool = False  # one-time pads: a second use would leak the difference of two inputs


def relu_offline(ot: OTSession, tag: str, is_data_owner: bool, n: int, bits: int, stream: Stream, drop: int = 0) -> ReluMaterial:
    """Input-independent material for ``relu_online`` (n ReLUs over Z_2^bits, comparison on
    bits [drop, bits - 1) as ``compare.relu`` with ``drop``).

    1. n m random 1-of-16 OTs from 4 n m random OTs (data owner sending).
    2. n ``tree_ands(m)`` AND triples (``compare.and_triples``).
    3. n random OTs each way for the MUX's correlated OTs.
    Rounds: 3 (could all share one). Bytes: those of ``compare.relu`` except the online parts.
    """
    m = -(-(bits - 1 - drop) // CHUNK)
    triples = and_triples(ot, f"{tag}/tr", n * tree_ands(m), stream)
    if is_data_owner:
        k0, k1 = random_ot_send(ot, f"{tag}/o16", 4 * n * m)
        keys = np.stack([k0.reshape(-1, 4, 16), k1.reshape(-1, 4, 16)])
        v = np.arange(16)
        pads = np.zeros((n * m, 16), dtype=np.uint8)
        for i in range(4):
            pads ^= keys[(v >> (3 - i)) & 1, :, i, v].T
        pads &= np.uint8(3)
        choices = np.zeros(0, np.uint8)
        masks = (stream.bits((m, n)), stream.bits((m, n)))
    else:
        choices = stream.uint8(n * m) & np.uint8(15)
        choice_bits = ((choices.reshape(-1, 1) >> np.arange(3, -1, -1, dtype=np.uint8)) & 1).reshape(-1)
        keys_r = random_ot_recv(ot, f"{tag}/o16", choice_bits).reshape(-1, 4, 16)
        pads = np.bitwise_xor.reduce(keys_r[np.arange(n * m), :, choices], axis=1) & np.uint8(3)
        masks = (np.zeros((0, 0), np.uint8), np.zeros((0, 0), np.uint8))
    recv_choice = stream.bits(n)
    got, (s0, s1) = random_ot_both(ot, f"{tag}/mux", recv_choice, n)
    recv_key = as_ring(got, bits)
    return ReluMaterial(n, bits, drop, pads, choices, triples, (as_ring(s0, bits), as_ring(s1, bits)), recv_choice, recv_key, masks)


def relu_online(ch: Channel, tag: str, is_data_owner: bool, x: np.ndarray, mat: ReluMaterial) -> np.ndarray:
    """Shares of ReLU(x) over Z_2^bits from precomputed material (used once).

    1. DReLU (``compare.drelu`` steps): millionaires' inputs cut into 4-bit chunks; the model
       owner sends d = c ^ c' (4 bits per chunk, two per byte); the data owner sends its
       tables y[v] = T[v] ^ P[v ^ d] (2 bits x 16 per chunk); the model owner reads T[c]; then
       the AND tree on the precomputed triples, and the local DReLU output.
    2. MUX: each party sends f = d_i ^ b' (1 bit per element), then the COT correction for its
       own x_i with relabelled keys (8 bytes per element); shares of d x as ``compare.mux``.
    Rounds: 2 + ceil(log2 m) + 2. Bytes per element: see the module docstring.
    Security: as ``compare.relu``; d and f are uniform one-time pads of the real choices.
    """
    bits, n = mat.bits, len(x)
    if n != mat.n:
        raise ValueError(f"relu_online: material for {mat.n} elements, got {n}")
    if mat.spent:
        raise ValueError("relu_online: this material was already used (its pads are one-time)")
    mat.spent = True
    m = -(-(bits - 1 - mat.drop) // CHUNK)
    chunks = split_chunks(drelu_input(x, bits, is_data_owner, mat.drop), m)  # (m, n)
    if is_data_owner:
        d = unpack_small(ch.recv(f"{tag}/d", np.uint8, ((n * m + 1) // 2, 1)), 4).reshape(-1)[: n * m]
        tables = chunk_tables(chunks, *mat.tables_mask)
        shifted = np.take_along_axis(mat.pads, np.arange(16, dtype=np.uint8)[None, :] ^ d[:, None], axis=1)
        ch.send(f"{tag}/y", pack_small(tables ^ shifted, 2))
        lt, eq = mat.tables_mask
    else:
        d = chunks.reshape(-1) ^ mat.choices
        padded = np.concatenate([d, np.zeros(len(d) % 2, np.uint8)])
        ch.send(f"{tag}/d", pack_small(padded.reshape(-1, 2), 4).reshape(-1, 1))
        y = unpack_small(ch.recv(f"{tag}/y", np.uint8, (n * m, 4)), 2)
        got = (y[np.arange(n * m), chunks.reshape(-1)] ^ mat.pads).reshape(m, n)
        lt, eq = got & 1, got >> 1
    bit = drelu_output(x, and_tree(ch, tag, is_data_owner, lt, eq, mat.triples), bits, is_data_owner)
    return _mux_online(ch, tag, bit, x, mat)


def _mux_online(ch: Channel, tag: str, d: np.ndarray, x: np.ndarray, mat: ReluMaterial) -> np.ndarray:
    ring = ring_mask(mat.bits)
    flips = d ^ mat.recv_choice
    ch.send(f"{tag}/f", np.packbits(flips))
    peer_flips = np.unpackbits(ch.recv(f"{tag}/f", np.uint8, ((len(d) + 7) // 8,)), count=len(d)).astype(bool)
    h0, h1 = mat.send_keys
    r0, r1 = np.where(peer_flips, h1, h0), np.where(peer_flips, h0, h1)
    di = d.astype(U64)
    ch.send(f"{tag}/e", (r0 + (U64(1) - U64(2) * di) * x - r1) & ring)
    e = ch.recv(f"{tag}/e", U64, (len(d),))
    return (di * x - r0 + mat.recv_key + di * e) & ring
