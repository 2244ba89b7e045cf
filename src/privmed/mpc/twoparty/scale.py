"""A per-channel scale with the model owner's private weights on the data owner's random mask,
by vector correlated OTs instead of HE (the offline half of a ``channel_scale`` layer).

Why: lowered to HE (``he_layers``: a depthwise conv), a channel scale costs one ciphertext per
channel each way whatever the spatial size: 1,024 replies of ~140 kB for a 1024 x 4 x 4 map
(DenseNet-121's unfoldable BatchNorms after each concat: 34,336 of its 44,578 reply
ciphertexts at 64 x 64). Here it costs l COTs per channel whose correction is a vector over
the channel's m = batch x spatial positions: 8 l m bytes per channel from the data owner.

Construction (Gilboa's product, CRYPTO 1999, with vector correlations; the COT from random OT
with a PRG-expanded key as in IKNP03 sec. 4): for w_c = sum_k 2^k w_ck (w mod 2^l) and the
data owner's mask vector A_c of channel c,

1. Random OTs, model owner receiving with choice bits w_ck (C l of them), data owner sending.
2. Data owner, per (c, k): h0 = G(k0), h1 = G(k1) expanded to m elements of Z_2^l; sends
   e = h0 + 2^k A_c - h1. Its share: -sum_k h0. G(key) is fixed-key AES in the form of the
   GGM trees' PRG (``silent_ot.GGM``): block j of G(key) is pi(key ^ j) ^ key ^ j, pi = AES-128
   under a public key derived from the layer's label, two Z_2^64 words per block reduced
   mod 2^l: one AES call for every key of the layer (one AES-CTR key schedule per key
   before: 86,016 of them for DenseNet-121's 1,024-channel scale, ~2.6 s of the data owner).
3. Model owner: G(k_(w_ck)) + w_ck e = h0 + w_ck 2^k A_c; its share: the sum over k.
   Then the shares add up to w_c A_c mod 2^l, per position.
Rounds: 2. Bytes: model owner 16 C l (IKNP matrix), data owner 8 C l m (corrections).
Security (semi-honest): the matrix hides w (IKNP); each correction is masked by G(k1) for
choice 0 and by G(k0) for choice 1, keys the model owner does not hold, so it sees uniform
vectors (plus its own output); the data owner receives only the matrix. G's outputs on a key
the model owner does not hold are uniform in the random-permutation model for pi (the
assumption of the GGM trees and the TCCR hash here): its inputs key ^ j are unpredictable,
and two keys' inputs meet only if their XOR is below m / 2 (probability < m C^2 l^2 / 2^128). The number of COTs is
l per channel whatever the weights, so nothing about their width leaks.
"""

from __future__ import annotations

import hashlib

import numpy as np
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from privmed.mpc.twoparty.compare import ring_mask
from privmed.mpc.twoparty.ot import OTSession, random_ot_recv, random_ot_send

U64 = np.uint64


def _expand(keys: np.ndarray, label: str, m: int, bits: int) -> np.ndarray:
    """(n, 16) OT keys -> (n, m) elements of Z_2^bits: G(key) of the module docstring, block j
    = pi(key ^ j) ^ key ^ j (j in the low word), all keys in one AES call."""
    n, blocks = len(keys), (m + 1) // 2
    x = np.repeat(np.ascontiguousarray(keys).view("<u8").reshape(n, 1, 2), blocks, axis=1)
    x[:, :, 0] ^= np.arange(blocks, dtype=U64)
    words = x.reshape(-1)
    y = np.empty(words.size + 2, dtype=U64)  # ``update_into`` wants 15 spare bytes
    pi = Cipher(algorithms.AES(hashlib.sha256(f"privmed/scale/{label}".encode()).digest()[:16]), modes.ECB()).encryptor()
    pi.update_into(memoryview(words.view(np.uint8)), memoryview(y.view(np.uint8)))  # type: ignore[arg-type]
    return (y[: words.size] ^ words).reshape(n, 2 * blocks)[:, :m] & ring_mask(bits)


def _by_channel(x: np.ndarray) -> np.ndarray:
    """(B, C, ...) -> (C, B * prod(...)): the positions each channel's weight multiplies."""
    return np.moveaxis(x, 1, 0).reshape(x.shape[1], -1)


def channel_scale_shares(ot: OTSession, tag: str, is_data_owner: bool, x_shape: tuple[int, ...], bits: int,
                         mask: np.ndarray | None = None, weight: np.ndarray | None = None) -> np.ndarray:  # fmt: skip
    """This party's share over Z_2^bits of channel_scale(W, A) (y[b, c, ...] = w_c A[b, c, ...]),
    the data owner passing its mask A (``x_shape``), the model owner W (C,). See the module
    docstring for the steps, rounds, bytes and the argument."""
    channels = x_shape[1]
    m = int(np.prod(x_shape)) // channels
    ring = ring_mask(bits)
    if is_data_owner:
        if mask is None or mask.shape != x_shape:
            raise ValueError(f"channel_scale_shares: the data owner passes its mask of shape {x_shape}")
        k0, k1 = random_ot_send(ot, f"{tag}/cs", channels * bits)
        h0 = _expand(k0, f"{tag}/h", m, bits).reshape(channels, bits, m)
        h1 = _expand(k1, f"{tag}/h", m, bits).reshape(channels, bits, m)
        powers = (U64(1) << np.arange(bits, dtype=U64)).reshape(1, -1, 1)
        delta = powers * (_by_channel(mask) & ring)[:, None, :]
        ot.ch.send(f"{tag}/cs/e", ((h0 + delta - h1) & ring).reshape(-1))
        share = (U64(0) - h0.sum(axis=1, dtype=U64)) & ring
    else:
        if weight is None or weight.shape not in ((channels,), (1,)):
            raise ValueError(f"channel_scale_shares: the model owner passes weights of shape ({channels},) or (1,)")
        w = np.broadcast_to(weight.astype(np.int64).view(U64), (channels,)) & ring
        choice = ((w.reshape(-1, 1) >> np.arange(bits, dtype=U64).reshape(1, -1)) & U64(1)).astype(np.uint8)
        keys = random_ot_recv(ot, f"{tag}/cs", choice.reshape(-1))
        got = _expand(keys, f"{tag}/h", m, bits).reshape(channels, bits, m)
        e = ot.ch.recv(f"{tag}/cs/e", U64, (channels * bits * m,)).reshape(channels, bits, m)
        share = ((got + choice[:, :, None].astype(U64) * e).sum(axis=1, dtype=U64)) & ring
    # back from (C, B * spatial) to x's layout
    lead = (channels, x_shape[0], *x_shape[2:])
    return np.moveaxis(share.reshape(lead), 0, 1).copy()
