"""One Beaver protocol over a bilinear map: secret products, squares, AND gates and
private-weight linear layers are all this function with a different map and ring.

Beaver (CRYPTO 1991); the matrix/convolution form is SecureML's (Mohassel-Zhang, S&P 2017,
sec. 4.1) and CrypTen's generic ``beaver_protocol``. For a map B, bilinear over the ring
(Z_2^l with +, l the plan's ``ring_bits``, or GF(2)^n with XOR), and a triple a, b, c = B(a, b) shared between the
parties:

1. Open d = x - a and e = y - b (one round). Who learns what depends on who holds y:
   - ``y`` secret-shared: both open d and e to each other (both learn both);
   - ``y`` is x (a square, with b = a): only d is opened, and e = d;
   - ``y`` private to the model owner (its weights; a and b are then one-sided: the data
     owner holds all of a, the model owner all of b): the data owner sends x_0 - a to the
     model owner only, who learns d = (x_0 - a) + x_1; the model owner sends e = y - b to the
     data owner only, once per session (``e_cache``).
2. Each party i outputs z_i = c_i + B(d, b_i) + B(a_i, e), and the party that knows both d
   and e (party 0 when both are public, the model owner for private weights) adds B(d, e).
   Then sum z_i = B(a, b) + B(d, b) + B(a, e) + B(d, e) = B(d + a, e + b) = B(x, y).

Cost: one round; |x| + |y| ring elements (or bits) each way when y is shared, |x| for a
square, |x| from the data owner and |y| once per session from the model owner for private
weights. The dealer sends the model owner c_1 (|B(x, y)| elements).

Security (semi-honest, dealer not colluding): a and b are uniform, fresh per use and never
broadcast (``require_shape``), so each opened d and e is uniform and independent of x and y:
the receiver's view is simulated by uniform values.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from privmed.mpc.correlation.requests import require_shape
from privmed.mpc.party import MODEL_OWNER, Party

Bilinear = Callable[[np.ndarray, np.ndarray], np.ndarray]


@dataclass(frozen=True)
class Ring:
    """Addition and subtraction of the ring the shares live in; ``arith`` rings open their
    values at the session ring's width (``Party.exchange_ring``)."""

    add: Callable[[np.ndarray, np.ndarray], np.ndarray]
    sub: Callable[[np.ndarray, np.ndarray], np.ndarray]
    arith: bool = True


ARITH = Ring(np.add, np.subtract)  # Z_2^l on uint64 (wraps mod 2^64, so mod 2^l), l = Party.ring_bits
BITS = Ring(np.bitwise_xor, np.bitwise_xor, arith=False)  # GF(2), 8 bits packed per byte


@dataclass
class Triple:
    """This party's share of a, b and c = B(a, b); None is a zero share (one-sided masks)."""

    a: np.ndarray | None
    b: np.ndarray | None
    c: np.ndarray


def beaver(
    p: Party,
    tag: str,
    x: np.ndarray,
    y: np.ndarray | None,
    triple: Triple,
    bilinear: Bilinear,
    ring: Ring = ARITH,
    *,
    y_private: bool = False,
    y_bilinear: Bilinear | None = None,
    e_cache: dict[str, np.ndarray] | None = None,
    e_tag: str = "",
    e_shape: tuple[int, ...] | None = None,
) -> np.ndarray:
    """Shares of B(x, y) (steps 1-2 of the module docstring).

    ``y`` None means y = x (a square; ``triple.b`` is then ignored and b = a). With
    ``y_private`` the model owner passes its y (the data owner passes None) and
    ``y_bilinear`` (B with the knowledge that y is the real, small weight: a faster GEMM);
    e is sent once under ``e_tag`` and kept in ``e_cache`` (data owner) for later batches.
    """
    if y_private:
        return _private_y(p, tag, x, y, triple, bilinear, y_bilinear or bilinear, e_cache, e_tag, e_shape)
    assert triple.a is not None
    require_shape(tag, "triple a", triple.a, x.shape)
    if y is None:  # square: open d only
        mine = ring.sub(x, triple.a)
        opening = p.exchange_ring if ring.arith else p.exchange
        d = ring.add(mine, opening(f"{tag}/d", mine.reshape(-1)).reshape(x.shape))
        e, b = d, triple.a
    else:
        assert triple.b is not None
        require_shape(tag, "triple b", triple.b, y.shape)
        mine = np.concatenate([ring.sub(x, triple.a).reshape(-1), ring.sub(y, triple.b).reshape(-1)])
        both = ring.add(mine, (p.exchange_ring if ring.arith else p.exchange)(f"{tag}/de", mine))
        d, e, b = both[: x.size].reshape(x.shape), both[x.size :].reshape(y.shape), triple.b
    # party 0 knows d and e: it adds B(d, e), folded into B(d, b_0 + e)
    z = ring.add(bilinear(d, ring.add(b, e) if p.is_data_owner else b), bilinear(triple.a, e))
    require_shape(tag, "triple c", triple.c, z.shape)
    return ring.add(z, triple.c)


def _private_y(
    p: Party, tag: str, x: np.ndarray, y: np.ndarray | None, triple: Triple, bilinear: Bilinear,
    y_bilinear: Bilinear, e_cache: dict[str, np.ndarray] | None, e_tag: str, e_shape: tuple[int, ...] | None,
) -> np.ndarray:  # fmt: skip
    cache = {} if e_cache is None else e_cache
    first = e_tag not in cache
    if p.index != MODEL_OWNER:
        assert triple.a is not None and e_shape is not None
        require_shape(tag, "input mask a", triple.a, x.shape)
        p.send_ring(f"{tag}/E", x - triple.a)  # d's data-owner part: to the model owner only
        if first:
            cache[e_tag] = p.recv_ring(e_tag, e_shape)  # e = y - b
        p.rounds += 1
        z = bilinear(triple.a, cache[e_tag])  # z_0 = c_0 + B(a, e)
    else:
        assert y is not None and triple.b is not None
        require_shape(tag, "weight mask b", triple.b, y.shape)
        if first:
            p.send_ring(e_tag, y - triple.b)
            cache[e_tag] = np.zeros(0, y.dtype)  # only remember that e was sent
        d = p.recv_ring(f"{tag}/E", x.shape) + x
        p.rounds += 1
        z = y_bilinear(d, y)  # z_1 = c_1 + B(d, b) + B(d, e) = c_1 + B(d, y)
    require_shape(tag, "triple c", triple.c, z.shape)
    return z + triple.c
