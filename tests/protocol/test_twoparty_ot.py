"""OT extension against its definition: random OT, chosen-choice bits, 1-out-of-16 OT."""

from __future__ import annotations

import numpy as np
import pytest

from privmed.crypto.prg import PRG
from privmed.mpc.twoparty.ot import (
    KAPPA,
    base_ot,
    ot16_recv,
    ot16_send,
    ot_setup,
    pack_small,
    random_ot_recv,
    random_ot_send,
    transpose_bits,
    unpack_small,
)
from privmed.net.channel import Channel
from tests.protocol.twoparty_harness import run_two


def test_base_ots_give_the_receiver_exactly_the_chosen_key() -> None:
    # Prepare
    choices = [np.random.default_rng(i).integers(0, 2, KAPPA).astype(np.uint8) for i in range(2)]

    # Execute
    r0, r1, _ = run_two(
        lambda ch: base_ot(ch, "bo", PRG.fresh().stream("b"), choices[0]),
        lambda ch: base_ot(ch, "bo", PRG.fresh().stream("b"), choices[1]),
    )

    # Assert: party i received from party 1 - i the key of its choice, never the other one
    for (sent, _), (_, received), c in ((r1, r0, choices[0]), (r0, r1, choices[1])):
        assert [pair[bit] for pair, bit in zip(sent, c.tolist(), strict=True)] == received
        assert all(pair[1 - bit] != key for pair, bit, key in zip(sent, c.tolist(), received, strict=True))
        assert len({k for pair in sent for k in pair}) == 2 * KAPPA


@pytest.mark.parametrize("m", [1, 7, 8, 129, 10_000])
def test_random_ot_both_directions_match_the_definition(m: int) -> None:
    # Prepare
    rng = np.random.default_rng(m)
    c1, c0 = rng.integers(0, 2, m).astype(np.uint8), rng.integers(0, 2, m).astype(np.uint8)

    def party(is_do: bool, choice: np.ndarray):  # type: ignore[no-untyped-def]
        def run(ch):  # type: ignore[no-untyped-def]
            ot = ot_setup(ch, "s", PRG.fresh(), is_do)
            got = random_ot_recv(ot, "r", choice)  # this party's choice in the peer's OTs
            keys = random_ot_send(ot, "r", m)
            second = random_ot_recv(ot, "r2", choice) if is_do else None  # a second batch
            keys2 = None if is_do else random_ot_send(ot, "r2", m)
            return got, keys, second, keys2
        return run

    # Execute
    (got0, keys0, second0, _), (got1, keys1, _, keys2), _ = run_two(party(True, c0), party(False, c1))

    # Assert
    for got, (k0, k1), c in ((got1, keys0, c1), (got0, keys1, c0), (second0, keys2, c0)):
        assert np.array_equal(got, np.where(c[:, None] == 1, k1, k0))
        assert np.all(np.any(got != np.where(c[:, None] == 1, k0, k1), axis=1))
    assert not np.array_equal(keys2[0], keys1[0][: len(keys2[0])])  # fresh keys per batch


@pytest.mark.parametrize("bits", [1, 2, 4, 8])
def test_ot16_delivers_the_chosen_entry(bits: int) -> None:
    # Prepare
    rng = np.random.default_rng(bits)
    n = 3000
    tables = rng.integers(0, 1 << bits, (n, 16)).astype(np.uint8)
    choices = rng.integers(0, 16, n).astype(np.uint8)
    choices[:16] = np.arange(16)

    # Execute
    _, got, _ = run_two(
        lambda ch: ot16_send(ot_setup(ch, "s", PRG.fresh(), True), "t", tables, bits),
        lambda ch: ot16_recv(ot_setup(ch, "s", PRG.fresh(), False), "t", choices, bits),
    )

    # Assert
    assert np.array_equal(got, tables[np.arange(n), choices])


def test_ot_traffic_is_16_bytes_per_random_ot_plus_headers() -> None:
    # Prepare
    m = 40_000

    # Execute
    _, _, (ch0, ch1) = run_two(
        lambda ch: random_ot_send(ot_setup(ch, "s", PRG.fresh(), True), "r", m),
        lambda ch: random_ot_recv(ot_setup(ch, "s", PRG.fresh(), False), "r", np.ones(m, np.uint8)),
    )

    # Assert: the receiver sends KAPPA x m bits; the sender sends only its base-OT messages
    setup = 32 + 64 * KAPPA + 2 * 136
    assert ch1.counters.bytes_sent == setup + KAPPA * m // 8 + 136
    assert ch0.counters.bytes_sent == setup


@pytest.mark.parametrize("mb", [1, 3, 1000])
def test_bit_transpose_equals_the_unpacked_definition(mb: int) -> None:
    rows = np.random.default_rng(mb).integers(0, 256, (128, mb), dtype=np.uint8)
    want = np.packbits(np.unpackbits(rows, axis=1).T, axis=1)
    assert np.array_equal(transpose_bits(rows), want)


@pytest.mark.parametrize(("bits", "cols"), [(1, 16), (2, 16), (4, 16), (4, 2), (8, 16)])
def test_small_values_pack_msb_first_as_defined(bits: int, cols: int) -> None:
    # Prepare: the definition, byte j = sum_i v[8 j / bits + i] << (8 - bits - bits i)
    values = np.random.default_rng(bits).integers(0, 1 << bits, (37, cols), dtype=np.uint8)
    per = 8 // bits
    want = np.zeros((37, cols // per), dtype=np.int64)
    for i in range(per):
        want += values[:, i::per].astype(np.int64) << (8 - bits - bits * i)

    # Execute
    packed = pack_small(values, bits)

    # Assert: the bytes, and the way back
    assert packed.dtype == np.uint8 and np.array_equal(packed, want)
    assert np.array_equal(unpack_small(packed, bits), values)


def test_base_ot_receiver_points_do_not_reveal_the_choice_by_their_sign(monkeypatch: pytest.MonkeyPatch) -> None:
    # Prepare: record the receiver's points B_i when every choice is 0 (B_i = +-[b_i]G)
    sent: dict[str, np.ndarray] = {}
    original = Channel.send

    def spy(self, tag, arr):  # type: ignore[no-untyped-def]
        if tag == "bo/B":
            sent[self.me] = np.array(arr)
        return original(self, tag, arr)

    monkeypatch.setattr(Channel, "send", spy)
    zeros = np.zeros(KAPPA, dtype=np.uint8)

    # Execute
    run_two(
        lambda ch: base_ot(ch, "bo", PRG.fresh().stream("b"), zeros),
        lambda ch: base_ot(ch, "bo", PRG.fresh().stream("b"), zeros),
    )

    # Assert: the parity of v (byte 32, little-endian) is balanced, as it is when c_i = 1
    odd = int((sent["data-owner"][:, 32] & 1).sum())
    assert 30 < odd < KAPPA - 30
