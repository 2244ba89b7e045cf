"""Oblivious transfer: base OT over Curve25519, IKNP extension, 1-out-of-16 OT (numpy).

- Base OT: Chou-Orlandi "simplest OT" (LATINCRYPT 2015) in the prime-order subgroup of
  Curve25519. Scalar multiplications are X25519 from ``cryptography`` (x-only); the one point
  addition per OT (B = P + A) uses affine Montgomery formulas here, with the square root of the
  curve equation chosen canonically. Keys hash only x-coordinates, so the sign ambiguity of
  x-only arithmetic cancels: u([a]([b]G)) = u([b]([a]G)) for either sign of each point.
- IKNP (Ishai, Kilian, Nissim, Petrank, CRYPTO 2003, sec. 3) semi-honest OT extension with
  kappa = 128 base OTs in the reverse direction; G is privmed's AES-128-CTR PRG, and the
  correlation-robust hash is the fixed-key AES TCCR hash H(j, x) = pi(pi(x) ^ j) ^ pi(x)
  (Guo, Katz, Wang, Yu, S&P 2020), pi = AES-128 under a public key derived from the
  session label; j is a session-unique OT index.
- 1-out-of-16 OT from four random 1-of-2 OTs (Naor-Pinkas, SODA 2001: one key per
  index bit, a PRF of each key per message); the PRF output for message v is byte v of the
  128-bit OT key, so each pad byte is used for one message only.

Every party runs both an IKNP sender and an IKNP receiver (``OTSession``): comparisons need
OTs in both directions. Randomness: seeds from ``privmed.crypto.prg.PRG`` only.

A session can instead take its random OTs from a silent engine (``OTSession.silent``, Ferret in
``silent_ot``, bootstrapped from this IKNP's raw COTs, ``iknp_cot_send`` / ``iknp_cot_recv``):
``random_ot_send`` / ``random_ot_recv`` / ``random_ot_both`` forward to it, so ``ot16_*`` and
the protocols above run unchanged. A silent receiver may have to wait for its sender's next
extension, so a caller that is receiver and sender at once uses ``random_ot_both``.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Protocol

import numpy as np
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from privmed.crypto.prg import PRG, Stream
from privmed.errors import ProtocolError
from privmed.net.channel import Channel

KAPPA = 128
_P = 2**255 - 19
_A = 486662
_SQRT_M1 = pow(2, (_P - 1) // 4, _P)


# -- Curve25519 (Montgomery form v^2 = u^3 + A u^2 + u), affine, for one addition per OT ---------
def _curve_v(u: int) -> int:
    """The even square root v of u^3 + A u^2 + u (p = 5 mod 8 square root), or ProtocolError."""
    z = (u * u * u + _A * u * u + u) % _P
    r = pow(z, (_P + 3) // 8, _P)
    if r * r % _P != z:
        r = r * _SQRT_M1 % _P
    if r * r % _P != z:
        raise ProtocolError("base OT: a point is not on Curve25519")
    return r if r % 2 == 0 else _P - r


def _add(p1: tuple[int, int], p2: tuple[int, int]) -> tuple[int, int]:
    (u1, v1), (u2, v2) = p1, p2
    if u1 == u2:
        raise ProtocolError("base OT: degenerate point addition (equal x-coordinates)")
    lam = (v2 - v1) * pow(u2 - u1, _P - 2, _P) % _P
    u3 = (lam * lam - _A - u1 - u2) % _P
    return u3, (lam * (u1 - u3) - v1) % _P


def _u_bytes(u: int) -> bytes:
    return u.to_bytes(32, "little")


def _x25519(scalar: bytes, u: int) -> bytes:
    try:
        return X25519PrivateKey.from_private_bytes(scalar).exchange(X25519PublicKey.from_public_bytes(_u_bytes(u)))
    except ValueError as exc:  # the all-zero shared secret of a low-order point
        raise ProtocolError("base OT: peer sent a low-order point") from exc


def _key(label: str, i: int, a_u: int, b_u: int, shared: bytes) -> bytes:
    h = hashlib.sha256(f"{label}/{i}".encode() + _u_bytes(a_u) + _u_bytes(b_u) + shared)
    return h.digest()[:16]


def base_ot(ch: Channel, label: str, stream: Stream, choices: np.ndarray) -> tuple[list[tuple[bytes, bytes]], list[bytes]]:
    """Random base OTs in both directions at once (Chou-Orlandi, semi-honest).

    This party is the base-OT *sender* of ``KAPPA`` random key pairs (returned first) and the
    *receiver* of ``len(choices)`` keys for its choice bits (returned second); the peer plays
    the mirror roles with the same call.

    1. Each party sends A = [a]G (32 bytes, u-coordinate).
    2. As receiver with choice c_i: P_i = +-[b_i]G (x25519 gives u only; the sign of v is drawn
       at random, since a fixed rule would make B_i = P_i recognisable), sends
       B_i = P_i + c_i A_peer (64 bytes: u, v); its key is H(i, A, B_i, u([b_i] A_peer)).
    3. As sender: keys k0_i = H(i, A, B_i, u([a] B_i)), k1_i = H(i, A, B_i, u([a](B_i - A))).

    Rounds: 2. Bytes per party: 32 + 64 per OT received. Security (semi-honest, ROM for H, CDH
    on Curve25519): B_i hides c_i (P_i is a fresh X25519 public key, so B_i is as distributed
    with either choice up to the distribution of clamped scalars); the key the receiver did not
    choose is the hash of a CDH value.
    """
    a_scalar = bytes(stream.bytes(32))
    a_pub = int.from_bytes(X25519PrivateKey.from_private_bytes(a_scalar).public_key().public_bytes_raw(), "little")
    ch.send(f"{label}/A", np.frombuffer(_u_bytes(a_pub), dtype=np.uint8))
    peer_a = int.from_bytes(bytes(ch.recv(f"{label}/A", np.uint8, (32,))), "little") & ((1 << 255) - 1)
    peer_point = (peer_a, _curve_v(peer_a))
    mine, received = [], []
    for i, c in enumerate(choices.tolist()):
        b_scalar = bytes(stream.bytes(32))
        p_u = int.from_bytes(X25519PrivateKey.from_private_bytes(b_scalar).public_key().public_bytes_raw(), "little")
        v = _curve_v(p_u)
        point = (p_u, v if stream.bits(1)[0] else (_P - v) % _P)  # random sign: a canonical one would show c
        if c:
            point = _add(point, peer_point)
        mine.append(point)
        received.append(_key(label, i, peer_a, point[0], _x25519(b_scalar, peer_a)))
    ch.send(f"{label}/B", np.frombuffer(b"".join(_u_bytes(u) + _u_bytes(v) for u, v in mine), dtype=np.uint8).reshape(-1, 64))
    raw = ch.recv(f"{label}/B", np.uint8, (KAPPA, 64))
    a_point = (a_pub, _curve_v(a_pub))
    neg_a = (a_pub, (-a_point[1]) % _P)
    sent = []
    for i in range(KAPPA):
        bu, bv = int.from_bytes(bytes(raw[i, :32]), "little"), int.from_bytes(bytes(raw[i, 32:]), "little")
        if bu >= _P or bv >= _P or _curve_v(bu) not in (bv, (_P - bv) % _P):
            raise ProtocolError(f"base OT: point {i} from {ch.peer} is not on Curve25519")
        minus_a = _add((bu, bv), neg_a)
        sent.append((_key(label, i, a_pub, bu, _x25519(a_scalar, bu)), _key(label, i, a_pub, bu, _x25519(a_scalar, minus_a[0]))))
    return sent, received


# -- IKNP ------------------------------------------------------------------------------------
def transpose_bits(rows: np.ndarray) -> np.ndarray:
    """(k, mb) packed bit matrix -> (8 mb, k / 8): row j holds bit j of every row (k % 8 == 0).

    Works on 8 x 8 bit blocks held in uint64 words: byte r of a word is row r, bit 7 - c of it
    column c (numpy's MSB-first packing), so the wanted transpose maps word bit 8r + (7 - c) to
    8c + (7 - r): a flip about the anti-diagonal, three masked delta-swaps ("flipAntiDiag",
    Chess Programming Wiki; Warren, Hacker's Delight sec. 7-3). About 10x faster than
    unpackbits + transpose + packbits.
    """
    k, mb = rows.shape
    u = np.uint64
    x = np.ascontiguousarray(rows.reshape(k // 8, 8, mb).transpose(0, 2, 1)).view("<u8").reshape(k // 8, mb)
    t = x ^ (x << u(36))
    x = x ^ (u(0xF0F0F0F00F0F0F0F) & (t ^ (x >> u(36))))
    t = u(0xCCCC0000CCCC0000) & (x ^ (x << u(18)))
    x = x ^ t ^ (t >> u(18))
    t = u(0xAA00AA00AA00AA00) & (x ^ (x << u(9)))
    x = x ^ t ^ (t >> u(9))
    return np.ascontiguousarray(x.view(np.uint8).reshape(k // 8, mb, 8).transpose(1, 2, 0)).reshape(mb * 8, k // 8)


class TCCRHash:
    """H(j, x) = pi(pi(x) ^ j) ^ pi(x) with pi = AES-128 under a public fixed key (GKWY20)."""

    def __init__(self, label: str) -> None:
        self._aes = Cipher(algorithms.AES(hashlib.sha256(f"tccr/{label}".encode()).digest()[:16]), modes.ECB())

    def __call__(self, first_index: int, x: np.ndarray) -> np.ndarray:
        """x (m, 16) uint8 -> (m, 16) uint8, tweaks first_index .. first_index + m - 1.

        AES straight into preallocated buffers (``update_into`` wants 15 spare bytes) and the
        XORs on 64-bit words: the same function, about half the time of a bytes round trip."""
        m = len(x)
        enc = self._aes.encryptor()
        y = np.empty(16 * m + 16, dtype=np.uint8)
        enc.update_into(memoryview(np.ascontiguousarray(x).reshape(-1)), memoryview(y))  # type: ignore[arg-type]
        y64 = y[: 16 * m].view("<u8").reshape(m, 2)
        tweaked = y64.copy()
        tweaked[:, 0] ^= np.arange(first_index, first_index + m, dtype=np.uint64)
        z = np.empty(16 * m + 16, dtype=np.uint8)
        enc.update_into(memoryview(tweaked.reshape(-1).view(np.uint8)), memoryview(z))  # type: ignore[arg-type]
        z[: 16 * m].view("<u8").reshape(m, 2)[:] ^= y64
        return z[: 16 * m].reshape(m, 16)


class COTEngine(Protocol):
    """Another source of random OTs behind an ``OTSession`` (``silent_ot.FerretEngine``): the
    same three calls as the IKNP functions below, with the same message flow per call pair
    (the receiver's message first), so the protocols above do not see which engine runs."""

    def random_send(self, tag: str, m: int) -> tuple[np.ndarray, np.ndarray]: ...

    def random_recv(self, tag: str, choices: np.ndarray) -> np.ndarray: ...

    def random_both(self, tag: str, choices: np.ndarray, m: int) -> tuple[np.ndarray, tuple[np.ndarray, np.ndarray]]: ...


@dataclass
class OTSession:
    """One party's OT state: IKNP sender (delta s, seeds k_i^{s_i}) and receiver (seed pairs);
    ``silent``, when set, serves the random OTs instead (IKNP then only bootstrapped it)."""

    ch: Channel
    label: str
    delta: np.ndarray  # (KAPPA,) bits s of this party's IKNP-sender role
    sender_seeds: list[bytes]  # k_i^{s_i}
    receiver_seeds: list[tuple[bytes, bytes]]  # (k_i^0, k_i^1)
    send_hash: TCCRHash  # for the OTs this party sends (key: label + sender's role)
    recv_hash: TCCRHash
    sent: int = 0  # OTs done with this party as sender (indexes batches and tweaks)
    received: int = 0
    random_ots: int = 0  # counters for summaries
    silent: COTEngine | None = None

    @property
    def delta_packed(self) -> np.ndarray:
        return np.packbits(self.delta)


def ot_setup(ch: Channel, label: str, prg: PRG, is_data_owner: bool) -> OTSession:
    """Base OTs both ways (``base_ot``: 2 rounds, ~8.2 KiB per party), then IKNP is ready."""
    stream = prg.stream(f"{label}/base")
    delta = stream.bits(KAPPA)
    sent, received = base_ot(ch, f"{label}/bo", stream, delta)
    me, peer = ("d", "m") if is_data_owner else ("m", "d")
    return OTSession(ch, label, delta, received, sent, TCCRHash(f"{label}/{me}"), TCCRHash(f"{label}/{peer}"))


def _expand(seed: bytes, label: str, nbytes: int) -> np.ndarray:
    return PRG(seed).stream(label).uint8(nbytes)


def iknp_cot_send(ot: OTSession, tag: str, m: int) -> tuple[int, np.ndarray]:
    """IKNP sender, steps 1-2 of ``random_ot_send``: (index of the first OT, rows q_j (m, 16)
    uint8), a correlated OT with delta s: the receiver holds t_j = q_j ^ r_j s."""
    mb = (m + 7) // 8
    batch = f"{ot.label}/x{ot.sent}"
    u = ot.ch.recv(tag, np.uint8, (KAPPA, mb))
    q = np.stack([_expand(k, batch, mb) for k in ot.sender_seeds])
    q ^= u * ot.delta.reshape(-1, 1)
    first = ot.sent
    ot.sent += m
    return first, transpose_bits(q)[:m]


def iknp_cot_recv(ot: OTSession, tag: str, choices: np.ndarray) -> tuple[int, np.ndarray]:
    """IKNP receiver, step 1 of ``random_ot_recv`` and the transpose: (index of the first OT,
    rows t_j (m, 16) uint8) with t_j = q_j ^ r_j s for the sender's q_j and s."""
    m = len(choices)
    mb = (m + 7) // 8
    batch = f"{ot.label}/x{ot.received}"
    t = np.stack([_expand(k0, batch, mb) for k0, _ in ot.receiver_seeds])
    u = t ^ np.stack([_expand(k1, batch, mb) for _, k1 in ot.receiver_seeds]) ^ np.packbits(choices)
    ot.ch.send(tag, u)
    first = ot.received
    ot.received += m
    return first, transpose_bits(t)[:m]


def random_ot_send(ot: OTSession, tag: str, m: int) -> tuple[np.ndarray, np.ndarray]:
    """IKNP sender: m random OTs; returns (k0, k1), each (m, 16) uint8 (IKNP03 sec. 3,
    random-OT form: no sender message). With ``ot.silent`` set, that engine serves the call.

    1. Receive U (KAPPA x m bits) from the receiver (``random_ot_recv``).
    2. Q_i = G(k_i^{s_i}) ^ s_i U_i for each base seed, so row j of Q is t_j ^ r_j s.
    3. k_{b,j} = H(j, q_j ^ b s), b = 0, 1.
    Rounds: 1 (the receiver's message). Bytes: receiver 16 per OT, sender 0.
    Security: see ``random_ot_recv``; the receiver learns only k_{r_j, j} = H(j, t_j), since
    the other key needs s, which it never sees (correlation robustness of H, GKWY20).
    """
    ot.random_ots += m
    if ot.silent is not None:
        return ot.silent.random_send(tag, m)
    first, rows = iknp_cot_send(ot, tag, m)
    k0 = ot.send_hash(first, rows)
    return k0, ot.send_hash(first, rows ^ ot.delta_packed)


def random_ot_recv(ot: OTSession, tag: str, choices: np.ndarray) -> np.ndarray:
    """IKNP receiver: keys k_{r_j, j} for choice bits r (m,) uint8 0/1; (m, 16) uint8.
    With ``ot.silent`` set, that engine serves the call.

    1. T_i = G(k_i^0), U_i = T_i ^ G(k_i^1) ^ r for each of the KAPPA base-seed pairs; send U.
    2. Key j = H(j, t_j) with t_j row j of T (bit transpose).
    Rounds: 1. Bytes: 16 per OT (KAPPA m bits) plus one frame header.
    Security (semi-honest): the sender sees U_i = G(k_i^{s_i}) ^ G(k_i^{1 - s_i}) ^ ... masked
    by the PRG output G(k_i^{1 - s_i}) of a base-OT key it does not have, so U is
    pseudorandom whatever r is (simulator: send uniform bits); the receiver's view is its own
    randomness plus the sender's base-OT messages.
    """
    ot.random_ots += len(choices)
    if ot.silent is not None:
        return ot.silent.random_recv(tag, choices)
    first, rows = iknp_cot_recv(ot, tag, choices)
    return ot.recv_hash(first, rows)


def random_ot_both(ot: OTSession, tag: str, choices: np.ndarray, m: int) -> tuple[np.ndarray, tuple[np.ndarray, np.ndarray]]:
    """This party as receiver (``choices``, in the peer's OTs) and as sender (m OTs) at once:
    (my keys, (k0, k1)). The peer makes the mirror call. Same rounds and bytes as
    ``random_ot_recv`` then ``random_ot_send``, which is what IKNP runs; a silent engine
    must see both halves together, so that each party sends what its peer waits for before
    it waits itself (``silent_ot.FerretEngine.random_both``)."""
    if ot.silent is not None:
        ot.random_ots += len(choices) + m
        return ot.silent.random_both(tag, choices, m)
    mine = random_ot_recv(ot, tag, choices)
    return mine, random_ot_send(ot, tag, m)


# -- chosen-message and 1-out-of-16 OT on top of random OT ---------------------------------
def pack_small(values: np.ndarray, bits: int) -> np.ndarray:
    """(m, 16) uint8 values < 2^bits, bits in {1, 2, 4, 8} -> (m, 2 bits) bytes, MSB first.

    One shift-or per position in a byte (at most 8) rather than a reduction over a short
    axis: 5-13x faster, the data owner's largest online cost per ReLU after the waits."""
    per = 8 // bits
    grouped = values.reshape(len(values), -1, per)
    out = (grouped[:, :, 0] << np.uint8(8 - bits)).astype(np.uint8)
    for i in range(1, per):
        out |= grouped[:, :, i] << np.uint8(8 - bits - bits * i)
    return out


def unpack_small(packed: np.ndarray, bits: int) -> np.ndarray:
    per = 8 // bits
    shifts = (8 - bits - bits * np.arange(per, dtype=np.uint8)).astype(np.uint8)
    return ((packed[:, :, None] >> shifts) & np.uint8((1 << bits) - 1)).reshape(len(packed), -1)


def ot16_send(ot: OTSession, tag: str, tables: np.ndarray, bits: int) -> None:
    """Sender of m 1-out-of-16 OTs: tables (m, 16) uint8, entries < 2^bits (bits in 1, 2, 4, 8).

    1. Four random OTs per instance (the receiver's choice bits are its index bits, MSB first).
    2. Pad for message v: XOR over i < 4 of byte v of k_{v_i, i} (low ``bits`` bits).
    3. Send tables ^ pads packed: 2 bits bytes per instance.

    Rounds: 1 each way (random-OT matrix, then the padded tables). Bytes: receiver 64 per
    instance, sender 2 bits. Security: for v != c some index bit differs, and byte v of the
    corresponding unknown key is used in pad v only, so every other message is hidden.
    """
    if bits not in (1, 2, 4, 8):
        raise ValueError(f"ot16: expected message bits in (1, 2, 4, 8), got {bits}")
    m = len(tables)
    k0, k1 = random_ot_send(ot, f"{tag}/r", 4 * m)
    keys = np.stack([k0.reshape(m, 4, 16), k1.reshape(m, 4, 16)])  # (2, m, 4, 16)
    v = np.arange(16)
    pads = np.zeros((m, 16), dtype=np.uint8)
    for i in range(4):
        bit = (v >> (3 - i)) & 1
        pads ^= keys[bit, :, i, v].T
    masked = (tables ^ pads) & np.uint8((1 << bits) - 1)
    ot.ch.send(f"{tag}/t", pack_small(masked, bits))


def ot16_recv(ot: OTSession, tag: str, choices: np.ndarray, bits: int) -> np.ndarray:
    """Receiver of m 1-out-of-16 OTs for choices (m,) < 16: the chosen entries, (m,) uint8.

    The mirror of ``ot16_send`` (same steps, rounds, bytes and argument): its random-OT
    choice bits are the four index bits of c, and it removes the XOR of the four key bytes c.
    """
    m = len(choices)
    c = choices.astype(np.uint8)
    choice_bits = ((c.reshape(-1, 1) >> np.arange(3, -1, -1, dtype=np.uint8)) & 1).reshape(-1)
    keys = random_ot_recv(ot, f"{tag}/r", choice_bits).reshape(m, 4, 16)
    pad = np.bitwise_xor.reduce(keys[np.arange(m), :, c], axis=1)
    packed = ot.ch.recv(f"{tag}/t", np.uint8, (m, 2 * bits))
    return (unpack_small(packed, bits)[np.arange(m), c] ^ pad) & np.uint8((1 << bits) - 1)
