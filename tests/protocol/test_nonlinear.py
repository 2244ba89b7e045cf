"""Truncation and ReLU protocols on extreme inputs: no catastrophic error, ever.

The truncation of ``privmed.mpc.compare`` is exact up to +1 ulp for every |x| < 2^62 (no
probabilistic wrap), so over a million inputs spread over the whole admissible range, including
values next to +-2^61 and to 0, every result must be floor(x / 2^s) or floor(x / 2^s) + 1.
"""

from __future__ import annotations

import threading

import numpy as np
import pytest

from privmed.crypto.prg import PRG, StreamKey
from privmed.mpc import compare as nl
from privmed.mpc.correlation.dealer import serve
from privmed.mpc.correlation.requests import NonlinearSpec, Purpose, Request
from privmed.mpc.correlation.source import DealerSource
from privmed.mpc.party import Party
from privmed.net.channel import in_process_pair
from privmed.ring.fixed import sign_extend

U64 = np.uint64


def run_protocol(spec: NonlinearSpec, x: np.ndarray, relu: bool, ring: int = 64) -> tuple[np.ndarray, np.ndarray]:
    """Share x, run truncate or relu between two threads over Z_2^ring, return reconstructed
    (out, t), sign-extended to 64 bits."""
    sid = bytes(16)
    p0_ch, p1_ch = in_process_pair("data-owner", "model-owner", sid, 30)
    d_ch, p1_dealer = in_process_pair("dealer", "model-owner", sid, 30)
    s0, s1 = PRG.fresh().seed, PRG.fresh().seed
    req = Request("L", StreamKey(0, 0, Purpose.NONLINEAR), 0, nonlinear=spec, ring=ring)
    serve(req, (PRG(s0), PRG(s1), PRG.fresh()), d_ch)
    x0 = PRG.fresh().stream("share").uint64(x.shape)
    shares = {0: x0, 1: x - x0}
    out: dict[int, tuple[np.ndarray, np.ndarray]] = {}

    def party(i: int) -> None:
        p = Party(i, p0_ch if i == 0 else p1_ch, DealerSource(i, s0 if i == 0 else s1, None if i == 0 else p1_dealer), ring_bits=ring)
        if relu:
            out[i] = nl.relu(p, req, shares[i])
        else:
            t = nl.truncate(p, req, shares[i])
            out[i] = (t, t)

    threads = [threading.Thread(target=party, args=(i,)) for i in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert set(out) == {0, 1}, "a party failed"
    return sign_extend(out[0][0] + out[1][0], ring), sign_extend(out[0][1] + out[1][1], ring)


def spread(rng: np.random.Generator, n: int, top: int) -> np.ndarray:
    """Signed values with magnitudes spread log-uniformly up to 2^top, plus edge cases."""
    mags = np.exp2(rng.uniform(0, top, n)).astype(np.float64)
    vals = (np.floor(mags) * rng.choice([-1, 1], n)).astype(np.int64)
    edges = np.array([0, 1, -1, 2**top - 1, -(2**top) + 1, 2**16, -(2**16), 2**16 - 1, -(2**16) + 1], dtype=np.int64)
    return np.concatenate([edges, vals]).view(U64)


@pytest.mark.parametrize("shift", [12, 16, 20])
def test_truncation_never_wraps_over_the_full_range(shift: int) -> None:
    rng = np.random.default_rng(shift)
    x = spread(rng, 1_000_000, 61)
    t, _ = run_protocol(NonlinearSpec(x.size, shift), x, relu=False)
    floor = x.view(np.int64) >> shift
    diff = t.view(np.int64) - floor
    assert set(np.unique(diff)) <= {-1, 0, 1, 2}


def test_relu_with_truncation_is_exact_up_to_one_ulp() -> None:
    rng = np.random.default_rng(7)
    bits, shift = 40, 16  # |x| < 2^40 at scale 2f = 32: activations up to 256
    x = spread(rng, 300_000, bits - 1)
    out, t = run_protocol(NonlinearSpec(x.size, shift, bits, shift, True), x, relu=True)
    floor = x.view(np.int64) >> shift
    expected = np.maximum(floor, 0)
    diff = out.view(np.int64) - expected
    assert set(np.unique(diff)) <= {-1, 0, 1, 2}
    assert set(np.unique(t.view(np.int64) - floor)) <= {-1, 0, 1, 2}


@pytest.mark.parametrize(("ring", "shift"), [(44, 16), (40, 12), (48, 20)])
def test_truncation_in_a_narrow_ring_never_wraps(ring: int, shift: int) -> None:
    """Over Z_2^l the contract is |x| < 2^(l-2); the wire carries ceil(l/8) bytes."""
    x = spread(np.random.default_rng(ring), 300_000, ring - 3)
    t, _ = run_protocol(NonlinearSpec(x.size, shift), x, relu=False, ring=ring)
    assert set(np.unique(t.view(np.int64) - (x.view(np.int64) >> shift))) <= {-1, 0, 1, 2}


@pytest.mark.parametrize(("ring", "bits"), [(44, 40), (40, 36)])
def test_relu_in_a_narrow_ring_is_exact_up_to_one_ulp(ring: int, bits: int) -> None:
    x = spread(np.random.default_rng(bits), 200_000, bits - 1)
    out, t = run_protocol(NonlinearSpec(x.size, 16, bits, 16, True), x, relu=True, ring=ring)
    floor = x.view(np.int64) >> 16
    assert set(np.unique(out.view(np.int64) - np.maximum(floor, 0))) <= {-1, 0, 1, 2}
    assert set(np.unique(t.view(np.int64) - floor)) <= {-1, 0, 1, 2}


def test_relu_without_truncation_is_exact() -> None:
    rng = np.random.default_rng(8)
    bits = 24
    x = spread(rng, 200_000, bits - 1)
    out, _ = run_protocol(NonlinearSpec(x.size, 0, bits, 0, True), x, relu=True)
    assert np.array_equal(out.view(np.int64), np.maximum(x.view(np.int64), 0))


def test_the_lt_table_alone_gives_both_lookups_for_every_public_chunk() -> None:
    """The dealer XOR-shares only the table of v -> [v < r_j]; each party derives its share of
    the [v == r_j] table from it (``compare._borrow``): check every (v, r_j) and a random split."""
    from privmed.mpc.correlation.expand import _lt_tables

    v, r = np.meshgrid(np.arange(16, dtype=np.uint16), np.arange(16, dtype=np.uint16), indexing="ij")
    split = np.random.default_rng(0).integers(0, 1 << 16, v.shape, dtype=np.uint16)
    shares = (split, _lt_tables(r) ^ split)
    one = np.uint16(1)
    eq_tables = [t ^ (t << one) ^ (one if i == 0 else np.uint16(0)) for i, t in enumerate(shares)]
    lt = ((shares[0] >> v) ^ (shares[1] >> v)) & one
    eq = ((eq_tables[0] >> v) ^ (eq_tables[1] >> v)) & one
    assert np.array_equal(lt, (v < r).astype(np.uint16)) and np.array_equal(eq, (v == r).astype(np.uint16))
