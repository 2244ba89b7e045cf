"""Silent correlated OT: Ferret's primal-LPN COT extension, semi-honest (numpy).

Follows Yang, Weng, Lan, Zhang, Wang, "Ferret: Fast Extension for coRRElated oT with small
communication", CCS 2020 (the semi-honest COT extension from primal LPN with regular noise);
written from the paper's description, with the parameter sets of its authors' EMP-OT.

A correlated OT (COT) with global Delta: the sender holds Delta and blocks q_i, the receiver
bits b_i and blocks t_i = q_i ^ b_i Delta (128-bit blocks, held here as (m, 2) uint64).
IKNP (``ot.py``) outputs exactly this before hashing, with Delta = its s, at 16 bytes per COT;
one Ferret extension turns ``reserve`` = k + t h COTs into n, sending about 0.4 bytes per
output COT (0.05 with ``FERRET_LARGE``), and keeps ``reserve`` of its output for the next one.

One extension, sender S (holds Delta), receiver R; P = ``FerretParams`` (n = t 2^h):

1. **MPCOT by t GGM trees (SPCOT each, regular noise).** S draws t seeds and expands every tree
   level by level at once with the length-doubling PRG G(x) = (pi_0(x) ^ x, pi_1(x) ^ x), pi_b
   fixed-key AES-128 under public keys (Matyas-Meyer-Oseas; a PRG when pi_b is modelled as a
   random permutation, as in Ferret's implementation), 2^h leaves per tree. For level i it
   forms K_i^0, K_i^1, the XORs of all left / right children. With the tree's base COT i
   (S: q, R: b, t): S sends K_i^0 ^ H(q), K_i^1 ^ H(q ^ Delta) (H = ``TCCRHash`` with a fresh
   tweak per COT), and R, who can open only side b_i, learns K_i^(b_i). R's punctured point
   is alpha = the path with alpha_i = 1 - b_i (so its base choice bits choose it: no message
   from R), and K_i^(b_i) is the XOR of the level's children on the side off the path: R
   rebuilds every node except the path, level by level. S also sends c = Delta ^ (XOR of all
   leaves), from which R gets leaf alpha ^ Delta. So S holds s (the n leaves), R holds e (one
   1 per 2^h block, at alpha) and w = s ^ e Delta.
2. **Primal LPN.** A public n x k matrix A with ``D`` = 10 non-zeros per row (column indices
   from a PRG seeded by a hash of the session label, the same for both parties and every
   extension); with the k LPN base COTs (S: u_q; R: u, u_t): S outputs q = s ^ A u_q, R
   outputs b = e ^ A u and t = w ^ A u_t. Then t = q ^ b Delta (A is linear), and b is
   pseudorandom by primal LPN with regular noise (e has weight t, one per block).
3. The last ``reserve`` outputs are the next extension's base COTs; the other ``usable`` go
   to the caller.

Rounds per extension: 1 (S to R; both parties can do it in the same round for the two
directions). Bytes per extension: S sends t (2h + 1) 16 + one header; R sends nothing.
Set-up: ``reserve`` IKNP COTs each way (16 bytes each), once per session.

Random and chosen-choice OT on top (``FerretEngine``; the ``ot.COTEngine`` calls that
``random_ot_send`` / ``random_ot_recv`` / ``random_ot_both`` forward to): R with choices r
sends d = r ^ b (packed, 1 bit per OT); S's keys are k_0 = H(j, q ^ d Delta) and
k_1 = H(j, q ^ (1 - d) Delta), R's is H(j, t) = k_r (Beaver's derandomisation). Rounds: 1
(R to S), as IKNP's call; bytes: m / 8 instead of 16 m. 1-out-of-16 OT (``ot.ot16_*``) and
the chosen-message COTs of ``compare`` run on these unchanged. Extensions run inside the
calls, when a side's buffer is empty (both sides count the same OTs, so they agree when): a
receiver may then wait for its sender's level message, so ``random_both`` makes and sends its
own extensions before it waits, and two parties that are receiver and sender at once (AND
triples, MUX, Gilboa products) use it, never ``random_recv`` then ``random_send``.

Security, semi-honest only (there is **no consistency check**: Ferret's malicious check and
its extra COTs are left out, so a cheating sender could make R's output depend on alpha and
learn bits of it from R's later behaviour (selective failure); the session model, DESIGN.md
sec. 1, is semi-honest). Simulating R: its view is S's level messages and c; the sum off the
path at each level follows from R's output, the sum on the path side is masked by the hash of
the base-COT key R does not hold (correlation robustness of H), and c follows from w. Simulating S: S receives
only d = r ^ b with b pseudorandom given S's view (primal LPN with regular noise for A, a
random local code; EMP-OT uses the same code shape), so d is simulated by uniform bits.
The GGM leaves off R's point are pseudorandom to R (GGM over the PRG above), which is what
the LPN output needs. The matrix's column indices are drawn by rejection sampling, so they
are uniform in [0, k).

``open_session`` uses ``FERRET_MEDIUM``: its matrix (24 MB of indices) is drawn once and kept,
and its k base blocks (1.1 MB) stay in cache during the gathers; ``FERRET_LARGE`` would redraw
424 MB of indices per extension and gather from 9.4 MB, several times slower per COT in numpy
(docs/twoparty.md, "Silent OT"), for bytes that are already negligible (0.4 B per COT).

Parameters (128-bit security for primal LPN with regular noise, as chosen by Ferret's
authors in EMP-OT, emp-ot/ferret/constants.h): ``FERRET_LARGE`` n = 10,608,640,
k = 589,824, t = 1,295, h = 13 (N_REG/K_REG/T_REG there); ``FERRET_MEDIUM`` n = 607,232,
k = 69,454, t = 593, h = 10 (N_REG_PRIMAL_RD2 there, their set-up round). ``INSECURE_TEST_PARAMS``
are for fast tests only.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from privmed.crypto.prg import PRG, Stream
from privmed.errors import ProtocolError
from privmed.mpc.twoparty.ot import OTSession, TCCRHash, iknp_cot_recv, iknp_cot_send
from privmed.net.channel import Channel

U64 = np.uint64
D = 10  # non-zeros per row of the LPN matrix (Ferret's local code)
_LPN_ROWS = 1 << 15  # rows of A per chunk: each gather is 512 kB of blocks
_GGM_LEAVES = 1 << 18  # leaves per chunk of trees expanded together (memory bound)
_LPN_CACHE_BYTES = 64 << 20


@dataclass(frozen=True)
class FerretParams:
    """n COTs per extension from k LPN base COTs and t GGM trees of 2^depth leaves (n = t 2^depth)."""

    n: int
    k: int
    t: int
    depth: int
    name: str

    def __post_init__(self) -> None:
        if self.n != self.t << self.depth or not 0 < self.k < self.n or self.depth < 1:
            raise ValueError(f"Ferret parameters {self.name}: expected n = t 2^depth and 0 < k < n, got {self}")
        if self.usable < 1:
            raise ValueError(f"Ferret parameters {self.name}: reserve {self.reserve} leaves no output of {self.n}")

    @property
    def reserve(self) -> int:
        """Base COTs one extension consumes: k for the LPN, one per tree level."""
        return self.k + self.t * self.depth

    @property
    def usable(self) -> int:
        return self.n - self.reserve


FERRET_LARGE = FerretParams(10_608_640, 589_824, 1_295, 13, "EMP-OT N_REG (128-bit)")
FERRET_MEDIUM = FerretParams(607_232, 69_454, 593, 10, "EMP-OT N_REG_PRIMAL_RD2 (128-bit)")
INSECURE_TEST_PARAMS = FerretParams(4_096, 600, 32, 7, "tests only: far below 128-bit security")


def _blocks(raw: np.ndarray) -> np.ndarray:
    """(m, 16) uint8 -> (m, 2) uint64, the same bytes."""
    return np.ascontiguousarray(raw).view("<u8").reshape(-1, 2)


def _raw(blocks: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(blocks).view(np.uint8).reshape(-1, 16)


def _public_key(label: str) -> bytes:
    return hashlib.sha256(f"privmed/ferret/{label}".encode()).digest()[:16]


def _xor_fold(a: np.ndarray) -> np.ndarray:
    """XOR over axis -2 of a (..., 2^j, 2) array by halving (contiguous XORs; numpy's reduce
    along a middle axis is several times slower)."""
    while a.shape[-2] > 1:
        half = a.shape[-2] // 2
        a = a[..., :half, :] ^ a[..., half:, :]
    return a[..., 0, :]


class GGM:
    """Level-by-level GGM expansion of many trees with G(x) = (pi_0(x) ^ x, pi_1(x) ^ x).

    Layout: a level of W nodes per tree is (T, W, 2) uint64; the next level is every node's
    child 0, then every node's child 1, so node j's children are j and W + j, and a leaf's
    index has the first level's side as its lowest bit (the order is a public relabelling of
    GGM's leaves; it keeps every XOR contiguous)."""

    def __init__(self, label: str) -> None:
        self._keys = (_public_key(f"{label}/ggm0"), _public_key(f"{label}/ggm1"))

    def children(self, nodes: np.ndarray) -> np.ndarray:
        """(T, W, 2) uint64 nodes -> (T, 2, W, 2): [:, side, j] is child ``side`` of node j."""
        nodes = np.ascontiguousarray(nodes)
        words = nodes.size
        out = np.empty((nodes.shape[0], 2, *nodes.shape[1:]), dtype=U64)
        cipher = np.empty(words + 2, dtype=U64)  # ``update_into`` wants 15 spare bytes
        for side, key in enumerate(self._keys):
            enc = Cipher(algorithms.AES(key), modes.ECB()).encryptor()
            enc.update_into(memoryview(nodes.reshape(-1).view(np.uint8)), memoryview(cipher.view(np.uint8)))  # type: ignore[arg-type]
            np.bitwise_xor(cipher[:words].reshape(nodes.shape), nodes, out=out[:, side])
        return out

    def expand(self, seeds: np.ndarray, depth: int) -> tuple[np.ndarray, np.ndarray]:
        """Sender: seeds (T, 2) -> (leaves (T, 2^depth, 2), level sums (T, depth, 2 sides, 2))."""
        nodes = seeds.reshape(-1, 1, 2)
        sums = np.empty((len(seeds), depth, 2, 2), dtype=U64)
        for level in range(depth):
            kids = self.children(nodes)  # (T, 2, W, 2)
            sums[:, level] = _xor_fold(kids)
            nodes = kids.reshape(len(seeds), -1, 2)
        return nodes, sums

    def punctured(self, learned: np.ndarray, off_path: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Receiver: from the off-path sums ``learned`` (T, depth, 2) and the off-path sides
        ``off_path`` (T, depth) 0/1, every leaf but the path's (left 0) and the path alpha (T,),
        alpha = sum_i (1 - off_path_i) 2^i in this layout.

        Level by level: expand every known node (the path node is 0, its children garbage),
        then the path node's off-path child is the learned sum XOR the same side's children of
        every other node; the path continues on the other side.
        """
        trees, depth = off_path.shape
        rows = np.arange(trees)
        nodes = np.zeros((trees, 1, 2), dtype=U64)
        path = np.zeros(trees, dtype=np.int64)
        for level in range(depth):
            kids = self.children(nodes)  # (T, 2, W, 2)
            side = off_path[:, level].astype(np.int64)
            side_sum = _xor_fold(kids)[rows, side]  # (T, 2)
            kids[rows, side, path] = learned[:, level] ^ side_sum ^ kids[rows, side, path]
            kids[rows, 1 - side, path] = 0
            path = path + ((1 - side) << level)
            nodes = kids.reshape(trees, -1, 2)
        return nodes, path


class LPNCode:
    """The public local code A (n x k, ``D`` non-zeros per row) and y ^= A x over blocks."""

    def __init__(self, label: str, n: int, k: int) -> None:
        self.n, self.k = n, k
        self._prg = PRG(_public_key(f"{label}/lpn/{n}/{k}"))
        # the column table is kept when small (FERRET_MEDIUM: 24 MB), redrawn per use otherwise
        self._cache: dict[int, np.ndarray] | None = {} if n * D * 4 <= _LPN_CACHE_BYTES else None

    def columns(self, chunk: int) -> np.ndarray:
        """(D, rows) column indices of the rows of chunk ``chunk`` (rows ``_LPN_ROWS`` chunk on).

        Uniform in [0, k) by Lemire's multiply-shift with rejection (x k >> 32 for a 32-bit x,
        rejected when x k mod 2^32 < 2^32 mod k), from the chunk's own stream: deterministic,
        so both parties get the same matrix."""
        if self._cache is not None and chunk in self._cache:
            return self._cache[chunk]
        rows = min(_LPN_ROWS, self.n - chunk * _LPN_ROWS)
        if rows <= 0:
            raise ValueError(f"LPN columns: chunk {chunk} is past the {self.n} rows")
        stream = self._prg.stream(f"rows/{chunk}")
        need, k, floor = rows * D, np.uint64(self.k), np.uint64((1 << 32) % self.k)
        kept: list[np.ndarray] = []
        have = 0
        while have < need:
            wide = stream.uint32(need - have + (need - have) // 256 + 64).astype(U64) * k
            ok = wide[(wide & np.uint64(0xFFFFFFFF)) >= floor] >> np.uint64(32)
            kept.append(ok.astype(np.uint32))
            have += len(ok)
        cols = np.concatenate(kept)[:need].reshape(D, rows)
        if self._cache is not None:
            self._cache[chunk] = cols
        return cols

    def apply(self, out: np.ndarray, base: np.ndarray, out_bits: np.ndarray | None = None, base_bits: np.ndarray | None = None) -> None:
        """out (n, 2) ^= A base for base (k, 2) uint64 blocks, and out_bits (n,) ^= A base_bits
        (uint8 0/1) when given; ``_LPN_ROWS`` rows at a time, one gather per non-zero."""
        if out.shape != (self.n, 2) or base.shape != (self.k, 2):
            raise ValueError(f"LPN: expected ({self.n}, 2) ^= A ({self.k}, 2), got {out.shape}, {base.shape}")
        words = np.ascontiguousarray(base).view(np.complex128).reshape(-1)  # one 16-byte item per block
        for chunk, start in enumerate(range(0, self.n, _LPN_ROWS)):
            cols = self.columns(chunk)
            stop = start + cols.shape[1]
            acc = out[start:stop]
            for j in range(D):
                acc ^= np.take(words, cols[j]).view(U64).reshape(-1, 2)
            if out_bits is not None and base_bits is not None:
                bits = out_bits[start:stop]
                for j in range(D):
                    bits ^= np.take(base_bits, cols[j])


class _Sender:
    """This party's side of one direction as Ferret sender: Delta, base q's, current output."""

    def __init__(self, ch: Channel, label: str, params: FerretParams, code: LPNCode, delta: np.ndarray, base: np.ndarray,
                 stream: Stream) -> None:  # fmt: skip
        self.ch, self.label, self.p, self.code = ch, label, params, code
        self.delta = delta  # (2,) uint64
        self.base = base  # (reserve, 2): the t depth tree COTs, then the k LPN COTs
        self.stream = stream  # tree seeds
        self.ggm = GGM(label)
        self.hash = TCCRHash(f"{label}/spcot")
        self.buf = np.zeros((0, 2), dtype=U64)
        self.pos = 0
        self.extensions = 0

    def extend(self) -> None:
        """One extension (module docstring, steps 1-3), sending the level messages and c."""
        p = self.p
        nodes = p.t * p.depth
        tree_q = self.base[:nodes]
        tweak = self.extensions * nodes
        pads0 = _blocks(self.hash(tweak, _raw(tree_q))).reshape(p.t, p.depth, 2)
        pads1 = _blocks(self.hash(tweak, _raw(tree_q ^ self.delta))).reshape(p.t, p.depth, 2)
        out = np.empty((p.n, 2), dtype=U64)
        msg = np.empty((p.t, 2 * p.depth + 1, 2), dtype=U64)
        per = max(1, _GGM_LEAVES >> p.depth)
        for first in range(0, p.t, per):
            last = min(first + per, p.t)
            leaves, sums = self.ggm.expand(self.stream.uint64((last - first, 2)), p.depth)
            msg[first:last, : p.depth] = sums[:, :, 0] ^ pads0[first:last]
            msg[first:last, p.depth : 2 * p.depth] = sums[:, :, 1] ^ pads1[first:last]
            msg[first:last, -1] = _xor_fold(leaves) ^ self.delta
            out[first << p.depth : last << p.depth] = leaves.reshape(-1, 2)
        self.ch.send(f"{self.label}/spcot", msg)
        self.code.apply(out, self.base[nodes:])
        self.base = out[p.usable :].copy()
        self.buf, self.pos = out[: p.usable], 0
        self.extensions += 1

    def take(self, m: int) -> np.ndarray:
        """The next m COTs (q's, (m, 2)), extending (and sending) as often as needed."""
        parts, need = [], m
        while need:
            if self.pos == len(self.buf):
                self.extend()
            got = self.buf[self.pos : self.pos + need]
            self.pos += len(got)
            need -= len(got)
            parts.append(got)
        if len(parts) == 1:
            return parts[0]
        return np.concatenate(parts) if parts else np.zeros((0, 2), dtype=U64)


class _Receiver:
    """This party's side of one direction as Ferret receiver: base (bits, t's), current output."""

    def __init__(self, ch: Channel, label: str, params: FerretParams, code: LPNCode, bits: np.ndarray, base: np.ndarray) -> None:
        self.ch, self.label, self.p, self.code = ch, label, params, code
        self.base, self.base_bits = base, bits.astype(np.uint8)  # (reserve, 2), (reserve,): trees first
        self.ggm = GGM(label)
        self.hash = TCCRHash(f"{label}/spcot")
        self.buf, self.buf_bits = np.zeros((0, 2), dtype=U64), np.zeros(0, dtype=np.uint8)
        self.pos = 0
        self.extensions = 0

    def extend(self) -> None:
        """The receiver's half of one extension: receive the sender's levels and c, rebuild."""
        p = self.p
        nodes = p.t * p.depth
        tree_b = self.base_bits[:nodes].astype(np.int64).reshape(p.t, p.depth)
        msg = self.ch.recv(f"{self.label}/spcot", U64, (p.t, 2 * p.depth + 1, 2))
        pads = _blocks(self.hash(self.extensions * nodes, _raw(self.base[:nodes]))).reshape(p.t, p.depth, 2)
        sides = msg[:, : 2 * p.depth].reshape(p.t, 2, p.depth, 2)
        learned = sides[np.arange(p.t)[:, None], tree_b, np.arange(p.depth)[None, :]] ^ pads
        out = np.empty((p.n, 2), dtype=U64)
        out_bits = np.zeros(p.n, dtype=np.uint8)
        per = max(1, _GGM_LEAVES >> p.depth)
        for first in range(0, p.t, per):
            last = min(first + per, p.t)
            leaves, alpha = self.ggm.punctured(learned[first:last], tree_b[first:last])
            rows = np.arange(last - first)
            leaves[rows, alpha] = msg[first:last, -1] ^ _xor_fold(leaves)
            out[first << p.depth : last << p.depth] = leaves.reshape(-1, 2)
            out_bits[((rows + first) << p.depth) + alpha] = 1
        self.code.apply(out, self.base[nodes:], out_bits, self.base_bits[nodes:])
        self.base, self.base_bits = out[p.usable :].copy(), out_bits[p.usable :].copy()
        self.buf, self.buf_bits, self.pos = out[: p.usable], out_bits[: p.usable], 0
        self.extensions += 1

    def take(self, m: int) -> tuple[np.ndarray, np.ndarray]:
        """The next m COTs: (bits (m,) uint8, t's (m, 2)), receiving extensions as needed."""
        parts, bit_parts, need = [], [], m
        while need:
            if self.pos == len(self.buf):
                self.extend()
            got = self.buf[self.pos : self.pos + need]
            bit_parts.append(self.buf_bits[self.pos : self.pos + len(got)])
            self.pos += len(got)
            need -= len(got)
            parts.append(got)
        if len(parts) == 1:
            return bit_parts[0], parts[0]
        if not parts:
            return np.zeros(0, dtype=np.uint8), np.zeros((0, 2), dtype=U64)
        return np.concatenate(bit_parts), np.concatenate(parts)


class FerretEngine:
    """Random OTs from Ferret COTs in both directions (``ot.COTEngine``; module docstring)."""

    def __init__(self, ch: Channel, sender: _Sender, receiver: _Receiver, send_hash: TCCRHash, recv_hash: TCCRHash) -> None:
        self.ch, self.sender, self.receiver = ch, sender, receiver
        self.send_hash, self.recv_hash = send_hash, recv_hash
        self.sent = 0  # random OTs done as sender: the hash tweaks
        self.received = 0

    def _flips_out(self, tag: str, choices: np.ndarray) -> np.ndarray:
        """Receiver: send d = r ^ b for the next COTs, return H(j, t_j)."""
        bits, t = self.receiver.take(len(choices))
        self.ch.send(f"{tag}/d", np.packbits(choices.astype(np.uint8) ^ bits))
        keys = self.recv_hash(self.received, _raw(t))
        self.received += len(choices)
        return keys

    def _flips_in(self, tag: str, q: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Sender: receive d (checked: length, zero padding), return H(j, q_j ^ d_j Delta) and
        H(j, q_j ^ (1 - d_j) Delta)."""
        m = len(q)
        packed = self.ch.recv(f"{tag}/d", np.uint8, ((m + 7) // 8,))
        if m % 8 and packed[-1] & np.uint8((1 << (8 - m % 8)) - 1):
            raise ProtocolError(f"silent OT {tag}: padding bits of the choice flips from {self.ch.peer} are not zero")
        flips = np.unpackbits(packed, count=m).astype(U64)
        np.negative(flips, out=flips)  # d = 1 -> all ones: q0 = q ^ d Delta without a branch
        delta = self.sender.delta
        q0 = flips[:, None] & delta
        q0 ^= q
        k0 = self.send_hash(self.sent, _raw(q0))
        q0 ^= delta
        k1 = self.send_hash(self.sent, _raw(q0))
        self.sent += m
        return k0, k1

    def random_send(self, tag: str, m: int) -> tuple[np.ndarray, np.ndarray]:
        """Sender of m random OTs: (k0, k1), each (m, 16) uint8 (``ot.random_ot_send``)."""
        return self._flips_in(tag, self.sender.take(m))

    def random_recv(self, tag: str, choices: np.ndarray) -> np.ndarray:
        """Receiver: keys k_(r_j) (m, 16) uint8 for choices r (``ot.random_ot_recv``)."""
        return self._flips_out(tag, choices)

    def random_both(self, tag: str, choices: np.ndarray, m: int) -> tuple[np.ndarray, tuple[np.ndarray, np.ndarray]]:
        """Both roles at once (``ot.random_ot_both``): sender extensions are made and sent
        before any receive, so two parties in this call never wait on each other."""
        q = self.sender.take(m)
        mine = self._flips_out(tag, choices)
        return mine, self._flips_in(tag, q)


def attach_ferret(ot: OTSession, prg: PRG, is_data_owner: bool, params: FerretParams = FERRET_MEDIUM) -> FerretEngine:
    """Bootstrap Ferret in both directions from ``reserve`` IKNP COTs each way and make it
    serve ``ot``'s random OTs from now on (both parties call this at the same point).

    Rounds: 1 (each party's IKNP matrix; no extension runs until a call needs COTs).
    Bytes per party: 16 ``reserve`` (9.7 MB for ``FERRET_LARGE``, 1.2 MB for ``FERRET_MEDIUM``).
    The IKNP COTs are the Ferret sender's base COTs with Delta = IKNP's s (rows q_j, t_j before
    the hash, which is the COT functionality IKNP realises); choice bits from this party's PRG.
    """
    if ot.silent is not None:
        raise ValueError("attach_ferret: this OT session already has a silent engine")
    me, peer = ("d", "m") if is_data_owner else ("m", "d")
    stream = prg.stream(f"{ot.label}/ferret/{me}")
    bits = stream.bits(params.reserve)
    _, t_rows = iknp_cot_recv(ot, f"{ot.label}/ferret-boot", bits)
    _, q_rows = iknp_cot_send(ot, f"{ot.label}/ferret-boot", params.reserve)
    delta = _blocks(ot.delta_packed.reshape(1, 16)).reshape(2)
    code = LPNCode(ot.label, params.n, params.k)  # public: one matrix for both directions
    sender = _Sender(ot.ch, f"{ot.label}/ferret/{me}", params, code, delta, _blocks(q_rows), stream)
    receiver = _Receiver(ot.ch, f"{ot.label}/ferret/{peer}", params, code, bits, _blocks(t_rows))
    engine = FerretEngine(ot.ch, sender, receiver, TCCRHash(f"{ot.label}/ferret-rot/{me}"), TCCRHash(f"{ot.label}/ferret-rot/{peer}"))
    ot.silent = engine
    return engine
