"""Millionaires' comparison, DReLU, ReLU, MUX and B2A by OT against numpy, edge values included."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import pytest

from privmed.crypto.prg import PRG
from privmed.mpc.twoparty import arith, offline
from privmed.mpc.twoparty import compare as cmp
from privmed.mpc.twoparty.ot import OTSession, ot_setup
from tests.protocol.twoparty_harness import run_two

U64 = np.uint64


def _both(f0: Callable[[OTSession, Any], Any], f1: Callable[[OTSession, Any], Any]) -> tuple[Any, Any]:
    def party(is_do: bool, f: Callable[[OTSession, Any], Any]) -> Callable[[Any], Any]:
        return lambda ch: f(ot_setup(ch, "s", PRG.fresh(), is_do), PRG.fresh().stream("p"))

    r0, r1, _ = run_two(party(True, f0), party(False, f1))
    return r0, r1


def _mask(bits: int) -> np.uint64:
    return U64((1 << bits) - 1)


def _share(x: np.ndarray, bits: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    x0 = rng.integers(0, 2**64 - 1, len(x), dtype=U64, endpoint=True) & _mask(bits)
    return x0, (x.view(U64) - x0) & _mask(bits)


def _edge_signed(bits: int, n: int, rng: np.random.Generator) -> np.ndarray:
    lo, hi = -(1 << (bits - 1)), (1 << (bits - 1)) - 1
    x = rng.integers(lo, hi, n, endpoint=True, dtype=np.int64)
    x[:8] = [0, -1, 1, lo, hi, lo + 1, hi - 1, 16]
    return x


@pytest.mark.parametrize("bits", [1, 4, 5, 12, 37, 63, 64])
def test_millionaire_equals_numpy_less_than_with_ties_and_extremes(bits: int) -> None:
    # Prepare
    rng = np.random.default_rng(bits)
    n = 1500
    a = rng.integers(0, 2**64 - 1, n, dtype=U64, endpoint=True) & _mask(bits)
    b = rng.integers(0, 2**64 - 1, n, dtype=U64, endpoint=True) & _mask(bits)
    b[:200] = a[:200]  # ties
    b[200:210] = a[200:210] + U64(1) & _mask(bits)  # off by one
    a[210:220], b[220:230], a[230:240] = 0, _mask(bits), _mask(bits)

    # Execute
    s0, s1 = _both(
        lambda ot, st: cmp.millionaire(ot, "m", True, a, bits, st),
        lambda ot, st: cmp.millionaire(ot, "m", False, b, bits, st),
    )

    # Assert
    assert np.array_equal(s0 ^ s1, (a < b).astype(np.uint8))


@pytest.mark.parametrize("bits", [2, 16, 37, 64])
def test_drelu_and_relu_equal_numpy_over_the_whole_signed_range(bits: int) -> None:
    # Prepare
    rng = np.random.default_rng(100 + bits)
    x = _edge_signed(bits, 2000, rng)
    x0, x1 = _share(x, bits, rng)

    # Execute
    (d0, y0), (d1, y1) = _both(
        lambda ot, st: (cmp.drelu(ot, "d", True, x0, bits, st), cmp.relu(ot, "r", True, x0, bits, st)),
        lambda ot, st: (cmp.drelu(ot, "d", False, x1, bits, st), cmp.relu(ot, "r", False, x1, bits, st)),
    )

    # Assert
    assert np.array_equal(d0 ^ d1, (x >= 0).astype(np.uint8))
    assert np.array_equal((y0 + y1) & _mask(bits), np.maximum(x, 0).view(U64) & _mask(bits))


@pytest.mark.parametrize("bits", [1, 37, 64])
def test_b2a_and_mux_equal_numpy(bits: int) -> None:
    # Prepare
    rng = np.random.default_rng(bits)
    n = 1000
    bit = rng.integers(0, 2, n).astype(np.uint8)
    b0 = rng.integers(0, 2, n).astype(np.uint8)
    x = rng.integers(-(2**62), 2**62, n, dtype=np.int64)
    x0, x1 = _share(x, bits, rng)

    # Execute
    (a0, m0), (a1, m1) = _both(
        lambda ot, st: (cmp.b2a(ot, "b", True, b0, bits), cmp.mux(ot, "x", True, b0, x0, bits)),
        lambda ot, st: (cmp.b2a(ot, "b", False, b0 ^ bit, bits), cmp.mux(ot, "x", False, b0 ^ bit, x1, bits)),
    )

    # Assert
    assert np.array_equal((a0 + a1) & _mask(bits), bit.astype(U64))
    assert np.array_equal((m0 + m1) & _mask(bits), (bit.astype(np.int64) * x).view(U64) & _mask(bits))


def test_and_triples_are_correct_and_shares_look_uniform() -> None:
    # Execute
    (a0, b0, c0), (a1, b1, c1) = _both(
        lambda ot, st: cmp.and_triples(ot, "t", 20_000, st),
        lambda ot, st: cmp.and_triples(ot, "t", 20_000, st),
    )

    # Assert: c = a AND b, and each party's a-share is balanced (not a constant)
    assert np.array_equal(c0 ^ c1, (a0 ^ a1) & (b0 ^ b1))
    for share in (a0, a1, b0, b1, c0):
        assert 0.45 < share.mean() < 0.55


@pytest.mark.parametrize(("bits", "shift"), [(37, 12), (64, 16), (20, 1)])
def test_truncation_is_floor_or_one_below_and_never_wraps(bits: int, shift: int) -> None:
    # Prepare: the whole admissible range |x| < 2^(bits - 2), edges included
    rng = np.random.default_rng(bits + shift)
    lim = 1 << (bits - 2)
    x = rng.integers(-lim + 1, lim - 1, 20_000, dtype=np.int64, endpoint=True)
    x[:6] = [0, -1, 1, lim - 1, -lim + 1, -(1 << shift)]
    x0, x1 = _share(x, bits, rng)

    # Execute
    t0, t1 = _both(
        lambda ot, st: cmp.truncate(ot, "t", True, x0, bits, shift),
        lambda ot, st: cmp.truncate(ot, "t", False, x1, bits, shift),
    )

    # Assert
    got = ((t0 + t1) << U64(64 - bits)).view(np.int64) >> (64 - bits)  # sign-extend from bit l - 1
    assert set(np.unique(got - (x >> shift)).tolist()) <= {-1, 0}


def test_maximum_over_a_pooling_window_equals_numpy() -> None:
    # Prepare: 9 candidates (a 3x3 window) for 500 outputs, ties included
    rng = np.random.default_rng(9)
    bits = 37
    x = rng.integers(-(1 << 30), 1 << 30, (9, 500), dtype=np.int64)
    x[:, :20] = 5
    x0, x1 = (a.reshape(9, 500) for a in _share(x.reshape(-1), bits, rng))

    # Execute
    m0, m1 = _both(
        lambda ot, st: cmp.maximum(ot, "p", True, x0, bits, st),
        lambda ot, st: cmp.maximum(ot, "p", False, x1, bits, st),
    )

    # Assert
    assert np.array_equal((m0 + m1) & _mask(bits), x.max(axis=0).view(U64) & _mask(bits))


@pytest.mark.parametrize("bits", [16, 37, 64])
def test_relu_from_precomputed_material_equals_numpy_and_the_online_phase_is_light(bits: int) -> None:
    # Prepare
    rng = np.random.default_rng(200 + bits)
    n = 3001  # odd: the 4-bit packing of d has a padding nibble
    x = _edge_signed(bits, n, rng)
    x0, x1 = _share(x, bits, rng)
    online_bytes: dict[int, int] = {}

    def party(is_do: bool, share: np.ndarray):  # type: ignore[no-untyped-def]
        def run(ch):  # type: ignore[no-untyped-def]
            stream = PRG.fresh().stream("p")
            mat = offline.relu_offline(ot_setup(ch, "s", PRG.fresh(), is_do), "r", is_do, n, bits, stream)
            before = ch.counters.bytes_sent
            y = offline.relu_online(ch, "r", is_do, share, mat)
            online_bytes[int(not is_do)] = ch.counters.bytes_sent - before
            with pytest.raises(ValueError, match="already used"):
                offline.relu_online(ch, "r2", is_do, share, mat)
            return y
        return run

    # Execute
    y0, y1, _ = run_two(party(True, x0), party(False, x1))

    # Assert: exact, and the online phase sends tens of bytes per element, not hundreds
    assert np.array_equal((y0 + y1) & _mask(bits), np.maximum(x, 0).view(U64) & _mask(bits))
    m = -(-(bits - 1) // 4)
    ands = (2 * m - 3) / 4  # two opened bits per AND gate
    assert online_bytes[1] / n < m / 2 + ands + 1 / 8 + 8 + 1  # d, openings, flip, correction (+ headers)
    assert online_bytes[0] / n < 4 * m + ands + 1 / 8 + 8 + 1  # tables instead of d


@pytest.mark.parametrize("online", [False, True])
def test_relu_ignoring_low_bits_errs_only_below_2_to_the_drop(online: bool) -> None:
    # Prepare: values near 0 (where dropping bits may misjudge the sign) and far from it
    rng = np.random.default_rng(int(online))
    bits, drop, n = 37, 12, 6000
    x = np.concatenate([rng.integers(-(1 << 14), 1 << 14, n // 2), rng.integers(-(1 << 34), 1 << 34, n // 2)]).astype(np.int64)
    x[:4] = [0, -1, (1 << drop), -(1 << drop)]
    x0, x1 = _share(x, bits, rng)

    def party(is_do: bool, share: np.ndarray):  # type: ignore[no-untyped-def]
        def run(ch):  # type: ignore[no-untyped-def]
            ot, stream = ot_setup(ch, "s", PRG.fresh(), is_do), PRG.fresh().stream("p")
            if online:
                return offline.relu_online(ch, "r", is_do, share, offline.relu_offline(ot, "r", is_do, n, bits, stream, drop))
            return cmp.relu(ot, "r", is_do, share, bits, stream, drop)
        return run

    # Execute
    y0, y1, _ = run_two(party(True, x0), party(False, x1))

    # Assert: exact for |x| >= 2^drop; otherwise 0 or x, i.e. off by less than 2^drop
    got = ((y0 + y1) << U64(64 - bits)).view(np.int64) >> (64 - bits)
    want = np.maximum(x, 0)
    far = np.abs(x) >= (1 << drop)
    assert np.array_equal(got[far], want[far])
    assert np.all((got[~far] == 0) | (got[~far] == x[~far]))
    assert np.abs(got - want).max() < (1 << drop)


@pytest.mark.parametrize(("bits", "to_bits"), [(37, 64), (20, 37), (5, 64)])
def test_extension_to_a_wider_ring_is_exact(bits: int, to_bits: int) -> None:
    # Prepare: signed values over the admissible range |x| < 2^(bits - 2)
    rng = np.random.default_rng(bits * to_bits)
    lim = (1 << (bits - 2)) - 1
    x = rng.integers(-lim, lim, 5000, dtype=np.int64, endpoint=True)
    x[:4] = [0, -1, lim, -lim]
    x0, x1 = _share(x, bits, rng)

    # Execute
    y0, y1 = _both(
        lambda ot, st: cmp.extend(ot, "e", True, x0, bits, to_bits),
        lambda ot, st: cmp.extend(ot, "e", False, x1, bits, to_bits),
    )

    # Assert
    assert np.array_equal((y0 + y1) & _mask(to_bits), x.view(U64) & _mask(to_bits))


def test_relu_on_z2_64_shares_compares_only_the_bits_the_range_needs() -> None:
    # Prepare: Z_2^64 shares of values with |x| < 2^36, compared on 37 bits
    rng = np.random.default_rng(64)
    x = _edge_signed(37, 3000, rng)
    x0, x1 = _share(x, 64, rng)

    # Execute
    (y0, _), (y1, b1) = _both(
        lambda ot, st: (cmp.relu(ot, "r", True, x0, 64, st, compare_bits=37), ot.ch.counters.bytes_sent),
        lambda ot, st: (cmp.relu(ot, "r", False, x1, 64, st, compare_bits=37), ot.ch.counters.bytes_sent),
    )

    # Assert: exact over Z_2^64, with the traffic of a 37-bit comparison plus a 64-bit MUX
    assert np.array_equal(y0 + y1, np.maximum(x, 0).view(U64))
    assert b1 / 3000 < 844 + 10


@pytest.mark.parametrize("bits", [64, 37])
def test_gilboa_products_and_beaver_triples_equal_numpy(bits: int) -> None:
    # Prepare
    rng = np.random.default_rng(bits + 1)
    n = 700
    x = rng.integers(0, 2**64 - 1, n, dtype=U64, endpoint=True) & _mask(bits)
    y = rng.integers(0, 2**64 - 1, n, dtype=U64, endpoint=True) & _mask(bits)
    x[:3], y[:3] = [0, _mask(bits), 1], [_mask(bits), _mask(bits), 0]
    x0, x1 = _share(x.view(np.int64), bits, rng)
    y0, y1 = _share(y.view(np.int64), bits, rng)

    # Execute
    (z0, t0), (z1, t1) = _both(
        lambda ot, st: (arith.multiply(ot, "m", True, x0, y0, bits), arith.beaver_triples(ot, "t", True, 300, bits, st)),
        lambda ot, st: (arith.multiply(ot, "m", False, x1, y1, bits), arith.beaver_triples(ot, "t", False, 300, bits, st)),
    )

    # Assert
    assert np.array_equal((z0 + z1) & _mask(bits), (x * y) & _mask(bits))
    a, b, c = ((u + v) & _mask(bits) for u, v in zip(t0, t1, strict=True))
    assert np.array_equal(c, (a * b) & _mask(bits))
