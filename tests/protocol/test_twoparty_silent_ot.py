"""Ferret silent COT (``mpc/twoparty/silent_ot``) against its definition, and the two-party
comparison protocols running on it.

Tests use ``INSECURE_TEST_PARAMS`` (n = 4,096 per extension, k = 600, t = 32 trees of 128
leaves; far below 128-bit security) so that a few thousand OTs already cross several
extensions and the whole file runs in seconds; the code paths are the ones the 128-bit sets
take (only n, k, t and the depth differ).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import pytest

from privmed.crypto.prg import PRG
from privmed.errors import ProtocolError
from privmed.mpc.twoparty import silent_ot as so
from privmed.mpc.twoparty.ot import (
    OTSession,
    ot16_recv,
    ot16_send,
    ot_setup,
    random_ot_both,
    random_ot_recv,
    random_ot_send,
)
from privmed.net.channel import Channel
from tests.protocol import test_twoparty_compare as compare_tests
from tests.protocol.twoparty_harness import run_two

U64 = np.uint64
P = so.INSECURE_TEST_PARAMS


def _ferret(ch: Channel, is_do: bool, params: so.FerretParams = P) -> OTSession:
    prg = PRG.fresh()
    ot = ot_setup(ch, "s", prg, is_do)
    so.attach_ferret(ot, prg, is_do, params)
    return ot


def _on_both(f: Callable[[OTSession, bool], Any], params: so.FerretParams = P) -> tuple[Any, Any, tuple[Channel, Channel]]:
    return run_two(lambda ch: f(_ferret(ch, True, params), True), lambda ch: f(_ferret(ch, False, params), False))


def _engine(ot: OTSession) -> so.FerretEngine:
    assert isinstance(ot.silent, so.FerretEngine)
    return ot.silent


@pytest.mark.parametrize("m", [1, P.usable, P.usable + 1, 3 * P.usable + 5])
def test_every_cot_is_q_xor_b_delta_in_both_directions(m: int) -> None:
    # Execute: each party takes m COTs as sender, then m as receiver (as ``random_both`` does)
    def take(ot: OTSession, _: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        eng = _engine(ot)
        q = eng.sender.take(m)
        bits, t = eng.receiver.take(m)
        return eng.sender.delta, q, bits, t

    (delta0, q0, b0, t0), (delta1, q1, b1, t1), _ = _on_both(take)

    # Assert: t = q ^ b Delta for every output, in each direction; the choice bits are not constant
    for delta, q, b, t in ((delta0, q0, b1, t1), (delta1, q1, b0, t0)):
        assert q.shape == t.shape == (m, 2) and b.shape == (m,)
        assert np.array_equal(t, q ^ np.where(b[:, None] == 1, delta, U64(0)))
        if m > 1000:
            assert 0.45 < b.mean() < 0.55
            assert len(np.unique(q, axis=0)) == m  # no repeated block
    assert not np.array_equal(delta0, delta1)


def test_ggm_receiver_learns_every_leaf_but_the_punctured_one() -> None:
    # Prepare: 5 trees of depth 6, random off-path sides
    ggm = so.GGM("g")
    stream = PRG.fresh().stream("t")
    seeds = stream.uint64((5, 2))
    off_path = stream.bits((5, 6))

    # Execute
    leaves, sums = ggm.expand(seeds, 6)
    learned = sums[np.arange(5)[:, None], np.arange(6)[None, :], off_path.astype(np.int64)]
    rebuilt, alpha = ggm.punctured(learned, off_path)

    # Assert: alpha is the path of the complemented sides, every other leaf equal, alpha's unknown
    want_alpha = ((1 - off_path.astype(np.int64)) << np.arange(6)).sum(axis=1)  # first level lowest
    assert np.array_equal(alpha, want_alpha)
    for tree in range(5):
        others = np.arange(64) != alpha[tree]
        assert np.array_equal(rebuilt[tree, others], leaves[tree, others])
        assert np.all(rebuilt[tree, alpha[tree]] == 0) and np.any(leaves[tree, alpha[tree]] != 0)
    assert len(np.unique(leaves.reshape(-1, 2), axis=0)) == 5 * 64


class _NoCode(so.LPNCode):
    """A = 0: the extension's output is the MPCOT's (s; e, w) alone."""

    def apply(self, out: np.ndarray, base: np.ndarray, out_bits: np.ndarray | None = None, base_bits: np.ndarray | None = None) -> None:
        return None


def test_mpcot_puts_one_delta_per_block_at_the_point_the_base_bits_choose(monkeypatch: pytest.MonkeyPatch) -> None:
    # Prepare: without the LPN map, the sender's output is s and the receiver's (e, w)
    monkeypatch.setattr(so, "LPNCode", _NoCode)

    def one(ot: OTSession, _: bool) -> tuple[Any, ...]:
        eng = _engine(ot)
        tree_bits = eng.receiver.base_bits[: P.t * P.depth].copy()
        eng.sender.extend()
        eng.receiver.extend()
        return eng.sender.delta, eng.sender.buf.copy(), eng.sender.base.copy(), tree_bits, eng.receiver.buf.copy(), eng.receiver.buf_bits.copy(), \
            eng.receiver.base.copy(), eng.receiver.base_bits.copy()  # fmt: skip

    # Execute
    (delta, s_buf, s_base, _, _, _, _, _), (_, _, _, tree_bits, w_buf, e_buf, w_base, e_base), _ = _on_both(one)

    # Assert: w = s ^ e Delta over all n outputs, e one-hot per block at alpha_i = 1 - b_i
    s, w, e = np.concatenate([s_buf, s_base]), np.concatenate([w_buf, w_base]), np.concatenate([e_buf, e_base])
    assert np.array_equal(w, s ^ np.where(e[:, None] == 1, delta, U64(0)))
    blocks = e.reshape(P.t, 1 << P.depth)
    assert np.array_equal(blocks.sum(axis=1), np.ones(P.t))
    alpha = ((1 - tree_bits.reshape(P.t, P.depth).astype(np.int64)) << np.arange(P.depth)).sum(axis=1)
    assert np.array_equal(blocks.argmax(axis=1), alpha)


def test_lpn_map_equals_a_dense_gf2_product_on_a_small_instance() -> None:
    # Prepare: two chunks of rows, a 64-column secret of blocks and of bits
    n, k = (1 << 15) + 1000, 64
    code = so.LPNCode("lpn-test", n, k)
    stream = PRG.fresh().stream("x")
    base, base_bits = stream.uint64((k, 2)), stream.bits(k)
    # signalling / quiet NaN and infinity bit patterns: the gather moves blocks as complex128
    base[:3] = [[0x7FF0000000000001, 0xFFF0000000000001], [0x7FF8000000000000, 0x7FF0000000000000], [0, 1]]
    out, out_bits = stream.uint64((n, 2)), stream.bits(n)
    want, want_bits = out.copy(), out_bits.copy()
    dense = np.zeros((n, k), dtype=np.uint8)
    for chunk in range(2):
        cols = code.columns(chunk)
        assert cols.shape == (so.D, min(1 << 15, n - chunk * (1 << 15))) and cols.max() < k
        rows = np.arange(cols.shape[1]) + chunk * (1 << 15)
        for j in range(so.D):
            np.add.at(dense, (rows, cols[j].astype(np.int64)), 1)
    dense &= 1  # a column drawn twice in a row cancels

    # Execute
    code.apply(out, base, out_bits, base_bits)

    # Assert: every bit of every block, and the choice bits, as A x over GF(2)
    for word in range(2):
        for bit in range(64):
            x = ((base[:, word] >> U64(bit)) & U64(1)).astype(np.int64)
            y = (dense.astype(np.int64) @ x) & 1
            assert np.array_equal((out[:, word] >> U64(bit)) & U64(1), ((want[:, word] >> U64(bit)) & U64(1)) ^ y.astype(U64))
    assert np.array_equal(out_bits, want_bits ^ ((dense.astype(np.int64) @ base_bits.astype(np.int64)) & 1).astype(np.uint8))
    assert np.array_equal(so.LPNCode("lpn-test", n, k).columns(1), code.columns(1))  # both parties derive the same A


@pytest.mark.parametrize("m", [0, 7, 10_000])
def test_random_and_chosen_choice_ots_on_ferret_match_the_definition(m: int) -> None:
    # Prepare
    rng = np.random.default_rng(m)
    c0, c1 = rng.integers(0, 2, m).astype(np.uint8), rng.integers(0, 2, m).astype(np.uint8)

    def run(ot: OTSession, is_do: bool) -> tuple[Any, ...]:
        got, keys = random_ot_both(ot, "r", c0 if is_do else c1, m)
        second = random_ot_recv(ot, "r2", c0) if is_do else random_ot_send(ot, "r2", m)
        return got, keys, second

    # Execute
    (got0, keys0, second0), (got1, keys1, keys2), (ch0, ch1) = _on_both(run)

    # Assert: the chosen key, never the other one; fresh keys per batch; 1 bit per OT on the wire
    for got, (k0, k1), c in ((got1, keys0, c1), (got0, keys1, c0), (second0, keys2, c0)):
        assert np.array_equal(got, np.where(c[:, None] == 1, k1, k0))
        assert np.all(np.any(got != np.where(c[:, None] == 1, k0, k1), axis=1))
    assert m == 0 or not np.array_equal(keys2[0], keys1[0])
    assert ch1.counters.by_step["session setup"] < 16 * 2 * m + 16 * P.reserve + 40_000


def test_one_of_16_ot_on_ferret_delivers_the_chosen_entry() -> None:
    # Prepare
    rng = np.random.default_rng(16)
    n = 3000
    tables = rng.integers(0, 4, (n, 16)).astype(np.uint8)
    choices = rng.integers(0, 16, n).astype(np.uint8)

    # Execute
    _, got, _ = _on_both(lambda ot, is_do: ot16_send(ot, "t", tables, 2) if is_do else ot16_recv(ot, "t", choices, 2))

    # Assert
    assert np.array_equal(got, tables[np.arange(n), choices])


def test_choice_flips_with_padding_bits_set_are_refused() -> None:
    # Prepare: a receiver that sets the 5 padding bits of 3 flips
    def sender(ot: OTSession, is_do: bool) -> Any:
        if is_do:
            return random_ot_send(ot, "r", 3)
        ot.ch.send("r/d", np.array([0xFF], np.uint8))
        return None

    # Execute / Assert
    with pytest.raises(RuntimeError, match="padding bits") as err:
        _on_both(sender)
    assert ProtocolError.__name__ in str(err.value)


def test_a_level_message_of_the_wrong_shape_is_refused_before_use() -> None:
    # Prepare: a sender whose extension message has one GGM tree fewer than the parameters imply
    def party(ot: OTSession, is_do: bool) -> Any:
        if is_do:
            short = np.zeros((P.t - 1, 2 * P.depth + 1, 2), U64)
            ot.ch.send(f"{_engine(ot).sender.label}/spcot", short)
            return None
        return random_ot_recv(ot, "r", np.zeros(5, np.uint8))  # the first call extends

    # Execute / Assert: the receiver checks the frame against its own parameters
    with pytest.raises(RuntimeError) as err:
        _on_both(party)
    assert ProtocolError.__name__ in str(err.value) and f"shape ({P.t - 1}, {2 * P.depth + 1}, 2), expected ({P.t}," in str(err.value)


@pytest.fixture
def ferret_in_compare_tests(monkeypatch: pytest.MonkeyPatch) -> None:
    """The comparison tests' own code and oracles, with every OT session on Ferret."""

    def setup(ch: Channel, label: str, prg: PRG, is_do: bool) -> OTSession:
        ot = ot_setup(ch, label, prg, is_do)
        so.attach_ferret(ot, prg, is_do, P)
        return ot

    monkeypatch.setattr(compare_tests, "ot_setup", setup)


@pytest.mark.parametrize("bits", [16, 37, 64])
def test_drelu_and_relu_on_ferret(ferret_in_compare_tests: None, bits: int) -> None:
    compare_tests.test_drelu_and_relu_equal_numpy_over_the_whole_signed_range(bits)


@pytest.mark.parametrize(("bits", "shift"), [(37, 12), (64, 16)])
def test_truncation_on_ferret(ferret_in_compare_tests: None, bits: int, shift: int) -> None:
    compare_tests.test_truncation_is_floor_or_one_below_and_never_wraps(bits, shift)


def test_millionaire_b2a_mux_triples_and_max_on_ferret(ferret_in_compare_tests: None) -> None:
    compare_tests.test_millionaire_equals_numpy_less_than_with_ties_and_extremes(37)
    compare_tests.test_b2a_and_mux_equal_numpy(37)
    compare_tests.test_and_triples_are_correct_and_shares_look_uniform()
    compare_tests.test_maximum_over_a_pooling_window_equals_numpy()


@pytest.mark.parametrize("bits", [37, 64])
def test_precomputed_relu_and_products_on_ferret(ferret_in_compare_tests: None, bits: int) -> None:
    compare_tests.test_relu_from_precomputed_material_equals_numpy_and_the_online_phase_is_light(bits)
    compare_tests.test_gilboa_products_and_beaver_triples_equal_numpy(bits)


def test_extension_and_low_bit_relu_on_ferret(ferret_in_compare_tests: None) -> None:
    compare_tests.test_extension_to_a_wider_ring_is_exact(37, 64)
    compare_tests.test_relu_ignoring_low_bits_errs_only_below_2_to_the_drop(True)


def test_parties_on_different_ot_engines_stop_and_name_both() -> None:
    from privmed.mpc.twoparty.protocols import agree_ot_engine

    # Execute / Assert: each party refuses, before any OT message
    with pytest.raises(RuntimeError) as err:
        run_two(lambda ch: agree_ot_engine(ch, "ferret"), lambda ch: agree_ot_engine(ch, "iknp"))
    assert "this party runs ferret, model-owner runs 'iknp'" in str(err.value)
    assert "this party runs iknp, data-owner runs 'ferret'" in str(err.value)


def test_two_party_sessions_on_ferret_equal_the_reference(tmp_path: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """The session tests' own models and tolerances, with ``open_session`` on Ferret: ReLU
    material, truncations and the per-channel scales' COTs. With the test parameters an
    extension (3,272 COTs) runs every few calls, so extensions fall inside every kind of
    OT call of the executor's offline and online phases (none may wait on its peer)."""
    pytest.importorskip("tenseal", reason="tenseal not installed: pip install 'privmed[twoparty]'")
    from privmed.mpc.twoparty import protocols
    from tests.protocol import test_twoparty_session as session_tests

    engines: list[so.FerretEngine] = []

    def attach(*args: Any) -> so.FerretEngine:
        engines.append(so.attach_ferret(*args))
        return engines[-1]

    monkeypatch.setenv(protocols.OT_ENGINE_ENV, "ferret")
    monkeypatch.setattr(protocols, "attach_ferret", attach)
    monkeypatch.setattr(protocols, "FERRET_MEDIUM", P)
    session_tests.test_conv_relu_maxpool_gemm_equals_the_fixed_point_reference(tmp_path)
    session_tests.test_prelu_and_unfoldable_batchnorm_equal_the_reference(tmp_path)
    # measured (4, 2), (2, 4), (2, 1), (1, 2) since the compiler moved max-pools before their ReLUs
    # (a86045f: fewer comparisons); (3, 8), (8, 3), (2, 1), (1, 2) before
    counts = [(e.sender.extensions, e.receiver.extensions) for e in engines]
    assert len(engines) == 4 and min(min(c) for c in counts) >= 1 and min(counts[0]) >= 2
