"""Products of two secret-shared values by OT, no dealer (Gilboa's multiplication).

Gilboa ("Two Party RSA Key Generation", CRYPTO 1999, sec. 3.3.1): for a held by one party and b
by the other, l correlated OTs give additive shares of a b over Z_2^l. The holder of b sends
with correlations delta_i = b 2^i; the holder of a receives with choice bits a_i and gets
h_i + a_i b 2^i; summed over i, the receiver holds sum h_i + a b and the sender -sum h_i.

``multiply`` computes x y for x, y both additively shared: x0 y0 and x1 y1 are local, the two
cross terms x0 y1 and x1 y0 are one Gilboa product each (one in each direction, run at once).
On random a, b it makes Beaver triples offline (``beaver_triples``), after which the online
product is the usual one round of openings (``privmed.mpc.arith``'s protocol).
"""

from __future__ import annotations

import numpy as np

from privmed.crypto.prg import Stream
from privmed.mpc.twoparty.compare import as_ring, ring_mask
from privmed.mpc.twoparty.ot import OTSession, random_ot_both

U64 = np.uint64


def _bits_of(values: np.ndarray, bits: int) -> np.ndarray:
    """(n,) uint64 -> (n * bits,) uint8, bit i of element j at j * bits + i."""
    shifts = np.arange(bits, dtype=U64).reshape(1, -1)
    return ((values.reshape(-1, 1) >> shifts) & U64(1)).astype(np.uint8).reshape(-1)


def multiply(ot: OTSession, tag: str, is_data_owner: bool, x: np.ndarray, y: np.ndarray, bits: int) -> np.ndarray:
    """Shares over Z_2^bits of x * y (elementwise, same shape), both additively shared.

    1. Each party is Gilboa receiver for its own x_i (choice bits: the l bits of x_i) and
       sender for its own y_i (correlations y_i 2^k): l random OTs per element each way.
    2. Senders send the corrections e_k = h0_k + y_i 2^k - h1_k (l ring elements per element).
    3. z_i = x_i y_i + (received: sum_k h_(x_k) + x_k e_k) - (sent: sum_k h0_k).
       Then z0 + z1 = x0 y0 + x1 y1 + x0 y1 + x1 y0 = x y.
    Rounds: 2. Bytes per element per party: 16 l (random-OT matrix) + 8 l (corrections):
    1,536 B at l = 64, 888 B at l = 37.
    Security (semi-honest): correlated OTs (``compare.b2a``'s argument): the matrix hides the
    choice bits, each correction is masked by a random-OT key the receiver does not hold, and
    the outputs are fresh additive shares.
    """
    if x.shape != y.shape:
        raise ValueError(f"multiply: expected x and y of one shape, got {x.shape} and {y.shape}")
    mask = ring_mask(bits)
    xs, ys = x.reshape(-1) & mask, y.reshape(-1) & mask
    n = xs.size
    choice = _bits_of(xs, bits)
    got, (k0, k1) = random_ot_both(ot, f"{tag}/g", choice, n * bits)
    received = as_ring(got, bits)
    h0, h1 = as_ring(k0, bits), as_ring(k1, bits)
    powers = (U64(1) << np.arange(bits, dtype=U64)).reshape(1, -1)
    delta = (ys.reshape(-1, 1) * powers).reshape(-1)
    ot.ch.send(f"{tag}/ge", (h0 + delta - h1) & mask)
    e = ot.ch.recv(f"{tag}/ge", U64, (n * bits,))
    mine = (received + choice.astype(U64) * e).reshape(n, bits).sum(axis=1, dtype=U64)
    sent = h0.reshape(n, bits).sum(axis=1, dtype=U64)
    return ((xs * ys + mine - sent) & mask).reshape(x.shape)


def beaver_triples(ot: OTSession, tag: str, is_data_owner: bool, n: int, bits: int, stream: Stream) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """n Beaver triples over Z_2^bits: this party's shares of random a, b and of c = a b.

    Input-independent (an offline step): a_i, b_i drawn from this party's PRG, c by
    ``multiply``. Same rounds and bytes as ``multiply`` on n elements.
    """
    a = stream.uint64(n) & ring_mask(bits)
    b = stream.uint64(n) & ring_mask(bits)
    return a, b, multiply(ot, tag, is_data_owner, a, b, bits)
