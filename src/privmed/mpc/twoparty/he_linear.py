"""Linear layers with the model owner's private weights by BFV HE, no dealer (Cheetah).

``he_setup`` runs once per session (the data owner's public key, for re-randomisation), then
``he_linear`` gives additive shares over Z_2^l (l = ``HEParams.plain_bits``) of L(W, x), where
the data owner holds x0 (or an input-independent random mask A, for the offline phase) and the
model owner holds W and optionally x1. See ``he_encoding`` for the packing and the ring.

Parameter set: see ``seal_io`` (N = 8192, log2 q = 218 with the special prime, t = 2^37:
128-bit classical security by the HE standard's tables for ternary secrets).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from privmed.crypto.prg import Stream
from privmed.errors import ProtocolError
from privmed.mpc.twoparty.he_encoding import (
    Geometry,
    block_plan,
    decode_output,
    encode_input,
    flood_bits,
    geometry,
    plaintext_product,
    signed_weights,
    weight_polys,
)
from privmed.mpc.twoparty.he_layers import Lowered, lower
from privmed.mpc.twoparty.seal_io import SealIO
from privmed.net.channel import Channel
from privmed.ring.linalg import ConvSpec

U64 = np.uint64


@dataclass
class HESession:
    """One party's HE state: the data owner holds the secret key, the model owner the public key."""

    io: SealIO
    is_data_owner: bool
    encryptor: Any  # data owner: symmetric (secret key); model owner: public key
    decryptor: Any = None
    public_key: np.ndarray | None = None  # model owner: the key as received (for a helper process)


def he_setup(io: SealIO, ch: Channel, is_data_owner: bool) -> HESession:
    """Key set-up: the data owner generates a BFV key pair and sends the public key (one message,
    2 x 4 x N ring elements mod the key-level primes: 512 KiB at N = 8192). The model owner uses
    it only to add fresh encryptions of zero; no relinearisation or Galois keys exist.

    Security: a BFV public key is an RLWE sample, pseudorandom under RLWE (128-bit parameters);
    the model owner sends nothing here. SEAL's key generator draws from the OS's randomness.
    """
    s = io.s
    if is_data_owner:
        keygen = s.KeyGenerator(io.ctx)
        secret = keygen.secret_key()
        public = s.PublicKey()
        keygen.create_public_key(public)
        ch.send("he/pk", io.ct_array(public.data()))
        return HESession(io, True, s.Encryptor(io.ctx, secret), s.Decryptor(io.ctx, secret))
    pk = ch.recv("he/pk", U64, (2, len(io.primes), io.params.n))
    io.check_rns(pk, "public key")
    return HESession(io, False, s.Encryptor(io.ctx, io.public_key(pk)), public_key=pk)


def he_linear(
    he: HESession,
    ch: Channel,
    label: str,
    kind: str,
    spec: ConvSpec | None,
    x_shape: tuple[int, ...],
    w_shape: tuple[int, ...],
    x: np.ndarray | None = None,
    weight: np.ndarray | None = None,
    weight_bits: int = 16,
    stream: Stream | None = None,
) -> np.ndarray:
    """Shares over Z_2^l of L(W, x0 + x1) for every kind of ``ring.linalg.linear`` (conv 1-D/2-D/3-D,
    conv_transpose 1-D/2-D/3-D, matmul, channel_scale; ``he_layers`` lowers them to stride-1
    2-D / 3-D conv or matmul): the data owner passes x (its share x0, or a random mask
    A), the model owner passes weight (signed int64, |w| < 2^weight_bits), optionally x (its share
    x1), and a PRG stream for its masks. Returns this party's share, values in [0, 2^l).

    Steps (Cheetah, sec. 3-4, with the coefficient encodings of ``he_encoding``):

    1. Data owner: encodes x0 into polynomials, encrypts each under its secret key (BFV, fresh
       symmetric encryptions, 3 primes), sends them in SEAL's seeded form (c1 as a seed) with
       their lengths.
    2. Model owner: for each output polynomial, sums the products of the received ciphertexts with
       its plaintext weight polynomials (NTT domain), subtracts a uniform mask R(X) mod t on
       *all* N coefficients, adds a fresh Enc_pk(0), drops one 60-bit prime, adds flooding noise
       uniform in [-2^F, 2^F) to the first component (F = ``flood_bits``), and sends c1 with
       only the T result coefficients of c0 (decryption is coefficient-wise in c0, as in
       Cheetah). Its share is R at the result coefficients, plus L(W, x1) if it holds x1.
    3. Data owner: sets the unsent c0 coefficients to 0, decrypts; its share is the result
       coefficients of L(W, x0) - R.

    Rounds: 1 (one exchange; the public key is sent once per session by ``he_setup``).
    Bytes: data owner about 24 N per input polynomial (measured 196.8 kB at N = 8192, seeded and
    compressed), model owner 16 (N + T) per output polynomial (2 primes); counts from
    ``Geometry.input_polys`` / ``output_polys`` / ``targets``.

    Security (semi-honest): the model owner sees only RLWE ciphertexts under the data owner's key
    (IND-CPA, RLWE at 128 bits). The data owner decrypts a plaintext that is uniform (every
    coefficient masked by R, used once), and a ciphertext whose noise is within statistical
    distance 2^-(sigma + 1) (sigma = ``HEParams.flood_sigma`` = 40, union bound over the N
    coefficients included) of noise independent of W: Enc_pk(0) re-randomises the second
    component (which otherwise equals the data owner's own c1 times W, revealing W), and the
    flooding noise, 2^(sigma + log2 N) times the worst-case noise bound, hides the noise's
    dependence on W (noise flooding / smudging, Gentry 2009). We flood rather than rely on a
    tighter circuit-privacy argument: it costs bits of modulus (``flood_bits``), not time.
    A simulator for the data owner encrypts its own uniform output polynomial under the public
    key and floods it the same way.

    3-D convolutions (and 3-D conv-transposes, lowered to them) change nothing in this
    argument: a kernel polynomial is still N coefficients with |w| < 2^weight_bits, at most
    Cw kd kh kw <= N of them non-zero, so the per-product noise bound behind ``flood_bits``
    (N 2^weight_bits (t + 19)) holds as for 2-D; the only layer-dependent term is the number
    of channel blocks summed into one reply, which ``flood_bits`` takes from the block plan
    (3-D tilings keep it at most ``he_encoding.MAX_BLOCKS_3D`` = 64 where possible, the count
    ``protocols.MAX_RING_BITS`` = 43 leaves room for with 17-bit weights). The coefficients
    outside the T targets, where partial sums of the halo and of other kernel offsets land,
    are masked by R like the rest and their c0 part is not even sent.

    Output batching (2-D convs, ``he_encoding.conv_tiling``: a reply carries Mw output
    channels) changes nothing either: a kernel polynomial sum_j X^(j D) k_j(X) still has at
    most N non-zero coefficients with |w| < 2^weight_bits, so the per-product bound is the same;
    the channel blocks summed per reply are capped at ``he_encoding.MAX_BLOCKS_2D`` = 64 where a
    tiling allows and ``flood_bits`` is computed from the block plan as before; the
    cross-channel terms land outside the targets (``he_encoding``'s proof), so, like the halo's
    partial sums, their c0 coefficients are not sent. Flooding noise is drawn for the T sent c0
    coefficients only: decryption is coefficient-wise in c0, and the unsent ones are zero.
    """
    layer = he_layer(he, label, kind, spec, x_shape, w_shape)
    if he.is_data_owner:
        if x is None:
            raise ValueError("he_linear: the data owner must pass its input share or mask")
        send_inputs(he, ch, layer, x)
        return recv_outputs(he, ch, layer)
    if weight is None or stream is None:
        raise ValueError("he_linear: the model owner must pass its weights and a PRG stream")
    replies, share = evaluate(he, layer, recv_inputs(he, ch, layer), weight, weight_bits, stream, x)
    ch.send(f"{label}/he/y", replies)
    return share


@dataclass(frozen=True)
class HELayer:
    """What both parties derive from a layer's public shapes for ``he_linear``: its lowering to
    a stride-1 conv or a matmul, the packing, which input polynomials each reply sums."""

    label: str
    kind: str
    spec: ConvSpec | None
    x_shape: tuple[int, ...]
    w_shape: tuple[int, ...]
    low: Lowered
    g: Geometry
    plan: list[tuple[int, list[int]]]
    targets: np.ndarray

    @property
    def n_in(self) -> int:
        return self.g.input_polys()

    @property
    def n_out(self) -> int:
        return self.g.output_polys()


def he_layer(he: HESession, label: str, kind: str, spec: ConvSpec | None, x_shape: tuple[int, ...], w_shape: tuple[int, ...]) -> HELayer:
    """The public geometry of one ``he_linear`` (pure; both parties compute the same)."""
    low = lower(kind, spec, x_shape, w_shape)  # conv-transpose, 1-D, channel scale -> 2-D conv
    g = geometry(low.kind, low.spec, low.x_shape, low.w_shape, he.io.params.n)
    return HELayer(label, kind, spec, tuple(x_shape), tuple(w_shape), low, g, block_plan(g), g.targets())


def send_inputs(he: HESession, ch: Channel, layer: HELayer, x: np.ndarray) -> None:
    """Data owner, step 1 of ``he_linear``: x encoded, encrypted, sent (lengths, then the blobs)."""
    io, n, t_mask = he.io, he.io.params.n, (1 << he.io.params.plain_bits) - 1
    polys = encode_input(layer.g, layer.low.x_map(x.reshape(layer.x_shape) & U64(t_mask)), n)
    blobs = [io.to_bytes(he.encryptor.encrypt_symmetric(io.plaintext(polys[i]))) for i in range(layer.n_in)]
    ch.send(f"{layer.label}/he/len", np.array([len(b) for b in blobs], dtype=U64))
    ch.send(f"{layer.label}/he/x", np.frombuffer(b"".join(blobs), dtype=np.uint8))


def recv_outputs(he: HESession, ch: Channel, layer: HELayer) -> np.ndarray:
    """Data owner, step 3 of ``he_linear``: the replies (shape and residues checked), decrypted;
    its share, values in [0, 2^l)."""
    io, n, k_top = he.io, he.io.params.n, len(he.io.params.data_bits)
    targets = layer.targets
    replies = ch.recv(f"{layer.label}/he/y", U64, (layer.n_out, k_top - 1, n + len(targets)))
    io.check_rns(replies, f"{layer.label}: reply ciphertexts")
    level = io.ctx.first_context_data().next_context_data().parms_id()
    out = np.empty((layer.n_out, n), dtype=U64)
    where = np.sort(targets)
    for i in range(layer.n_out):
        data = np.zeros((2, k_top - 1, n), dtype=U64)
        data[0][:, targets] = replies[i, :, n:]  # other c0 coefficients only decrypt to unused slots
        data[1] = replies[i, :, :n]
        pt = io.s.Plaintext()
        he.decryptor.decrypt(io.ciphertext(data, level), pt)
        out[i] = io.plain_coeffs(pt, where)  # decode_output reads the targets only
    return layer.low.y_map(decode_output(layer.g, out))


def recv_inputs(he: HESession, ch: Channel, layer: HELayer) -> list[bytes]:
    """Model owner, step 1 of ``he_linear``: the data owner's ciphertext blobs, each length
    bounded (SEAL validates each blob when ``evaluate`` loads it)."""
    n, k_top = he.io.params.n, len(he.io.params.data_bits)
    lengths = ch.recv(f"{layer.label}/he/len", U64, (layer.n_in,))
    if np.any(lengths < 16) or np.any(lengths > 16 * 2 * k_top * n + 4096):
        raise ProtocolError(f"{layer.label}: expected ciphertext sizes up to {16 * 2 * k_top * n + 4096} bytes")
    blob = bytes(ch.recv(f"{layer.label}/he/x", np.uint8, (int(lengths.sum()),)))
    ends = np.cumsum(lengths.astype(np.int64)).tolist()
    return [blob[end - int(size) : end] for end, size in zip(ends, lengths.tolist(), strict=True)]


def evaluate(he: HESession, layer: HELayer, blobs: list[bytes], weight: np.ndarray, weight_bits: int, stream: Stream,
             x: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:  # fmt: skip
    """Model owner, step 2 of ``he_linear``, no channel: (the replies to send, its share). Uses
    only this party's SEAL objects and ``stream``, so it may run beside the OT protocols."""
    w, masks, noise = draw(he, layer, weight, weight_bits, stream)
    replies = replies_of(he, layer, blobs, layer.low.w_map(w), masks, noise)
    return replies, model_owner_share(he, layer, masks, w, x)


def draw(he: HESession, layer: HELayer, weight: np.ndarray, weight_bits: int, stream: Stream) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Model owner: (signed weights, checked against ``weight_bits``; the masks R, one per reply
    and coefficient, uniform mod t; the flooding noise, residues per reply, prime and result
    coefficient), all protocol randomness of one layer, from ``stream``."""
    params = he.io.params
    w = signed_weights(weight.reshape(layer.w_shape), weight_bits)
    flood = flood_bits(params, weight_bits, max(len(ins) for _, ins in layer.plan))
    masks = stream.uint64((layer.n_out, params.n)) & U64((1 << params.plain_bits) - 1)
    noise = _flood_noise(stream, layer.n_out, len(layer.targets), flood, he.io.primes[: len(params.data_bits) - 1])  # c0 sent only
    return w, masks, noise


def model_owner_share(he: HESession, layer: HELayer, masks: np.ndarray, w: np.ndarray, x: np.ndarray | None = None) -> np.ndarray:
    """Model owner's share: R at the result coefficients, plus L(W, x1) if it holds x1."""
    bits = he.io.params.plain_bits
    share = layer.low.y_map(decode_output(layer.g, masks))
    if x is not None:
        share = share + plaintext_product(layer.kind, layer.spec, w, x.reshape(layer.x_shape), bits)
    return share & U64((1 << bits) - 1)


def replies_of(he: HESession, layer: HELayer, blobs: list[bytes], w_low: np.ndarray, masks: np.ndarray, noise: np.ndarray) -> np.ndarray:
    """Model owner: the reply array of one layer (step 2 of ``he_linear``) from the data
    owner's ciphertext blobs, the lowered signed weights and the drawn masks and noise."""
    io, params = he.io, he.io.params
    n, t_mask, k_top = params.n, (1 << params.plain_bits) - 1, len(params.data_bits)
    g, plan, targets = layer.g, layer.plan, layer.targets
    ev, first = io.evaluator, io.ctx.first_parms_id()
    ntt_in = []
    for i, blob in enumerate(blobs):
        ct = io.load_fresh_ciphertext(blob, f"{layer.label}: input ciphertext {i}")
        ev.transform_to_ntt_inplace(ct)
        ntt_in.append(ct)
    replies = np.empty((layer.n_out, k_top - 1, n + len(targets)), dtype=U64)
    # SEAL refuses a product by the zero polynomial (a transparent result): a kernel block that
    # is all zero (a phase with no taps after space-to-depth or polyphase, or weights all 0) is
    # multiplied by a stand-in (the constant 1) for the same work and left out of the sum
    stand_in = _ntt_plain(io, np.eye(1, n, dtype=U64)[0], first)
    cache: dict[int, list[tuple[Any, bool]]] = {}
    for o in sorted(range(len(plan)), key=lambda i: plan[i][0]):  # by weight slot: encode each once
        slot, inputs = plan[o]
        if slot not in cache:  # keep only the current slot's NTT plaintexts in memory
            cache.clear()
            cache[slot] = [(_ntt_plain(io, p, first), not p.any()) for p in weight_polys(g, w_low, slot, n, t_mask)]
        acc: Any = None
        prod = io.s.Ciphertext()
        for j, idx in enumerate(inputs):
            pt, is_zero = cache[slot][j]
            ev.multiply_plain(ntt_in[idx], stand_in if is_zero else pt, prod)
            if is_zero:
                continue
            if acc is None:
                acc, prod = prod, io.s.Ciphertext()
            else:
                ev.add_inplace(acc, prod)
        if acc is None:  # every block zero: the product is an encryption of 0
            acc = io.s.Ciphertext()
            he.encryptor.encrypt_zero(acc)
        else:
            ev.transform_from_ntt_inplace(acc)
        ev.sub_plain_inplace(acc, io.plaintext(masks[o]))
        zero = io.s.Ciphertext()
        he.encryptor.encrypt_zero(zero)
        ev.add_inplace(acc, zero)
        ev.mod_switch_to_next_inplace(acc)
        rns = io.ct_array(acc)
        replies[o, :, :n] = rns[1]
        replies[o, :, n:] = _add_mod(rns[0][:, targets], noise[o], io.primes[: k_top - 1])
    return replies


def _ntt_plain(io: SealIO, coeffs: np.ndarray, parms_id: list[int]) -> Any:
    pt = io.plaintext(coeffs)
    io.evaluator.transform_to_ntt_inplace(pt, parms_id)
    return pt


def _flood_noise(stream: Stream, count: int, n: int, bits: int, primes: list[int]) -> np.ndarray:
    """Residues (count, k, n) modulo each prime of e uniform in [-2^bits, 2^bits), bits <= 95.

    e = u - 2^bits with u = u_hi 2^32 + u_lo uniform in [0, 2^(bits + 1)); u_hi mod q is shifted
    left by 32 bits in steps of 4 (each step stays below 2^64 because q < 2^60).
    """
    if not 32 < bits <= 95:
        raise ProtocolError(f"flooding noise of {bits} bits is outside the supported 33..95")
    u_hi = stream.uint64((count, 1, n)) >> U64(64 - (bits + 1 - 32))
    u_lo = stream.uint64((count, 1, n)) >> U64(32)
    q = np.array(primes, dtype=U64).reshape(1, -1, 1)
    acc = u_hi % q
    for _ in range(8):
        acc = (acc << U64(4)) % q
    offset = np.array([pow(2, bits, p) for p in primes], dtype=U64).reshape(1, -1, 1)
    return (acc + u_lo % q + q - offset) % q


def _add_mod(a: np.ndarray, b: np.ndarray, primes: list[int]) -> np.ndarray:
    """(k, N) residues a + b modulo each prime (both reduced; primes < 2^62, no overflow)."""
    q = np.array(primes, dtype=U64).reshape(-1, 1)
    s = a + b
    return np.where(s >= q, s - q, s)


def online_linear(
    ch: Channel,
    label: str,
    is_data_owner: bool,
    kind: str,
    spec: ConvSpec | None,
    x: np.ndarray,
    product_share: np.ndarray,
    bits: int,
    mask: np.ndarray | None = None,
    weight: np.ndarray | None = None,
) -> np.ndarray:
    """The online half of a linear layer after an offline ``he_linear`` on a random mask A.

    Offline (input-independent): the data owner draws A uniform mod 2^l and runs ``he_linear``
    on it; the parties hold C0 + C1 = L(W, A). Online:

    1. Data owner sends E = x0 - A (|x| ring elements; uniform because A is used once).
    2. Model owner: y1 = L(W, E + x1) + C1. Data owner: y0 = C0.
       Then y0 + y1 = L(W, x - A) + L(W, A) = L(W, x) mod 2^l.

    Rounds: 1. Bytes: 8 |x| from the data owner. The same message flow as the dealer's
    ``private_linear`` with W itself in place of the masked weights W - B.
    Security: E is x0 masked by the uniform one-time A (the model owner never saw A: it only
    handled A encrypted), so the model owner's view is uniform; the data owner receives nothing.
    """
    ring = U64((1 << bits) - 1)
    if is_data_owner:
        if mask is None:
            raise ValueError("online_linear: the data owner must pass its offline mask A")
        ch.send(f"{label}/E", (x - mask) & ring)
        return product_share & ring
    if weight is None:
        raise ValueError("online_linear: the model owner must pass its weights")
    masked = ch.recv(f"{label}/E", U64, x.shape)
    if np.any(masked > ring):
        raise ProtocolError(f"{label}/E: expected elements of Z_2^{bits}")
    return (plaintext_product(kind, spec, weight, masked + x, bits) + product_share) & ring
