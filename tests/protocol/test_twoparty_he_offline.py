"""The HE layers of an offline phase run beside its OT steps (``he_offline.overlapped``):
every layer's shares exact against the ring's linear algebra, the OT steps run between the
ciphertexts and the replies, and a bad ciphertext found by the model owner's worker thread or
helper process stops the session with the layer named."""

from __future__ import annotations

import numpy as np
import pytest

from privmed.crypto.prg import PRG
from privmed.mpc.twoparty.ot import ot_setup, random_ot_both
from privmed.ring.linalg import ConvSpec, linear
from tests.protocol.twoparty_harness import run_two

pytest.importorskip("tenseal", reason="tenseal not installed: pip install 'privmed[twoparty]'")

from privmed.mpc.twoparty.he_linear import he_layer, he_setup, recv_inputs  # noqa: E402
from privmed.mpc.twoparty.he_offline import ModelOwnerLayer, overlapped  # noqa: E402
from privmed.mpc.twoparty.seal_io import HEParams, SealIO  # noqa: E402

U64 = np.uint64
BITS = 40
LAYERS = [  # (kind, spec, x_shape, w_shape): a batched-output conv, a strided one, a matmul
    ("conv", ConvSpec((3, 3), (1, 1), (1, 1, 1, 1), (1, 1), 1), (1, 16, 4, 4), (8, 16, 3, 3)),
    ("conv", ConvSpec((3, 3), (2, 2), (1, 1, 1, 1), (1, 1), 1), (1, 3, 9, 9), (4, 3, 3, 3)),
    ("matmul", None, (1, 40), (40, 6)),
]


def _session(corrupt_layer: int | None = None, helper: bool = False):  # type: ignore[no-untyped-def]
    rng = np.random.default_rng(3)
    masks = [rng.integers(0, 1 << BITS, x, dtype=U64) for _, _, x, _ in LAYERS]
    weights = [rng.integers(-127, 128, w, dtype=np.int64) for _, _, _, w in LAYERS]
    order: list[str] = []

    def ot_steps(ot, who):  # type: ignore[no-untyped-def]
        def run() -> None:
            order.append(f"{who} ot")
            random_ot_both(ot, "ot", np.ones(8, np.uint8), 8)
        return run

    def data_owner(ch):  # type: ignore[no-untyped-def]
        he = he_setup(SealIO(HEParams(plain_bits=BITS)), ch, True)
        ot = ot_setup(ch, "t", PRG.fresh(), True)
        layers = [he_layer(he, f"L{i}", *spec) for i, spec in enumerate(LAYERS)]
        if corrupt_layer is not None:  # one byte of one input ciphertext flipped on the way out
            real = he.io.to_bytes
            calls = iter(range(10**6))
            first = sum(layer.n_in for layer in layers[:corrupt_layer])

            def to_bytes(obj):  # type: ignore[no-untyped-def]
                blob = bytearray(real(obj))
                if next(calls) == first:
                    blob[40] ^= 0xFF
                return bytes(blob)

            he.io.to_bytes = to_bytes  # type: ignore[method-assign]
        return overlapped(he, ch, layers, ot_steps(ot, "data-owner"), masks=masks)

    def model_owner(ch):  # type: ignore[no-untyped-def]
        he = he_setup(SealIO(HEParams(plain_bits=BITS)), ch, False)
        ot = ot_setup(ch, "t", PRG.fresh(), False)
        layers = [he_layer(he, f"L{i}", *spec) for i, spec in enumerate(LAYERS)]
        private = [ModelOwnerLayer(w, 8, PRG.fresh().stream(f"he{i}")) for i, w in enumerate(weights)]
        return overlapped(he, ch, layers, ot_steps(ot, "model-owner"), private=private, helper=helper)

    y0, y1, _ = run_two(data_owner, model_owner, timeout_s=30)
    return masks, weights, y0, y1, order


@pytest.mark.parametrize("helper", [False, True], ids=["thread", "process"])
def test_overlapped_layers_give_exact_shares_of_every_layer(helper: bool) -> None:
    # Execute: the model owner's products in its worker thread, or in a helper process
    masks, weights, y0, y1, order = _session(helper=helper)

    # Assert: shares of L(W, A) mod 2^l per layer, and each party ran its OT steps once
    for (kind, spec, _, _), a, w, s0, s1 in zip(LAYERS, masks, weights, y0, y1, strict=True):
        want = linear(kind, spec, w.view(U64), a) & U64((1 << BITS) - 1)
        assert np.array_equal((s0 + s1) & U64((1 << BITS) - 1), want)
    assert sorted(order) == ["data-owner ot", "model-owner ot"]


@pytest.mark.parametrize("helper", [False, True], ids=["thread", "process"])
def test_bad_ciphertext_seen_by_the_worker_stops_both_parties_naming_the_layer(helper: bool) -> None:
    # Execute / Assert: SEAL refuses layer 1's first input in the worker (or the helper
    # process); the model owner raises it after its OT steps, the data owner sees the peer gone
    with pytest.raises(RuntimeError) as err:
        _session(corrupt_layer=1, helper=helper)
    text = str(err.value)
    assert "model-owner:" in text and "L1: input ciphertext 0" in text
    assert "data-owner:" in text


def test_helper_process_ends_when_the_model_owner_is_killed(tmp_path) -> None:  # type: ignore[no-untyped-def]
    # Prepare: a model owner process with an idle helper, then SIGKILL (no clean-up runs)
    import os
    import signal
    import subprocess
    import sys
    import time

    script = tmp_path / "owner.py"
    script.write_text(
        "import os, time\n"
        "from privmed.mpc.twoparty.seal_io import HEParams, SealIO\n"
        "from privmed.mpc.twoparty.he_offline import HEHelper\n"
        "if __name__ == '__main__':\n"
        "    io = SealIO(HEParams())\n"
        "    pk = io.s.PublicKey(); io.s.KeyGenerator(io.ctx).create_public_key(pk)\n"
        "    helper = HEHelper(io.params, io.ct_array(pk.data()))\n"
        "    print(helper._pool.submit(os.getpid).result(), flush=True)\n"
        "    time.sleep(60)\n"
    )
    owner = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True)
    assert owner.stdout is not None
    child = int(owner.stdout.readline())

    # Execute
    owner.send_signal(signal.SIGKILL)
    owner.wait(10)
    deadline = time.monotonic() + 10

    # Assert: the helper notices within its check interval and exits
    while time.monotonic() < deadline:
        try:
            os.kill(child, 0)
        except ProcessLookupError:
            return
        time.sleep(0.2)
    os.kill(child, signal.SIGKILL)
    raise AssertionError("the helper outlived its killed model owner")


def _honest_and_lying(liar: str, lie):  # type: ignore[no-untyped-def]
    """An honest party running ``overlapped`` against a peer that follows the protocol up to
    ``lie(he, ch, layers, ot)``, where it sends something false instead."""
    rng = np.random.default_rng(5)

    def setup(ch, is_data_owner):  # type: ignore[no-untyped-def]
        he = he_setup(SealIO(HEParams(plain_bits=BITS)), ch, is_data_owner)
        ot = ot_setup(ch, "t", PRG.fresh(), is_data_owner)
        return he, ot, [he_layer(he, f"L{i}", *spec) for i, spec in enumerate(LAYERS)]

    def data_owner(ch):  # type: ignore[no-untyped-def]
        he, ot, layers = setup(ch, True)
        if liar == "data-owner":
            return lie(he, ch, layers, ot)
        masks = [rng.integers(0, 1 << BITS, x, dtype=U64) for _, _, x, _ in LAYERS]
        return overlapped(he, ch, layers, lambda: random_ot_both(ot, "ot", np.ones(8, np.uint8), 8), masks=masks)

    def model_owner(ch):  # type: ignore[no-untyped-def]
        he, ot, layers = setup(ch, False)
        if liar == "model-owner":
            return lie(he, ch, layers, ot)
        private = [ModelOwnerLayer(rng.integers(-127, 128, w, dtype=np.int64), 8, PRG.fresh().stream(f"he{i}"))
                   for i, (_, _, _, w) in enumerate(LAYERS)]  # fmt: skip
        return overlapped(he, ch, layers, lambda: random_ot_both(ot, "ot", np.ones(8, np.uint8), 8), private=private)

    with pytest.raises(RuntimeError) as err:
        run_two(data_owner, model_owner, timeout_s=30)
    return str(err.value)


def test_a_data_owner_announcing_oversized_ciphertexts_is_refused_before_they_are_received() -> None:
    """The model owner bounds every announced length by what a ciphertext of its own parameters
    can take (so the whole batch's inputs it holds are bounded by the plan) and refuses the
    announcement, naming the layer, before it reads or allocates the blobs."""

    def lie(he, ch, layers, ot):  # type: ignore[no-untyped-def]
        ch.send("L0/he/len", np.full(layers[0].n_in, 1 << 40, dtype=U64))

    text = _honest_and_lying("data-owner", lie)
    assert "model-owner:" in text and "L0: expected ciphertext sizes up to" in text


@pytest.mark.parametrize("lie_kind", ["one-reply-short", "unreduced"])
def test_a_model_owner_lying_about_its_replies_is_refused_before_decryption(lie_kind: str) -> None:
    """The data owner receives each layer's replies at the shape it computed from the public
    layer (frame header checked) and refuses residues not reduced modulo the primes, before
    anything is loaded into SEAL or combined with its key."""

    def lie(he, ch, layers, ot):  # type: ignore[no-untyped-def]
        for layer in layers:
            recv_inputs(he, ch, layer)
        random_ot_both(ot, "ot", np.ones(8, np.uint8), 8)
        k, n, t = len(he.io.params.data_bits) - 1, he.io.params.n, len(layers[0].targets)
        rows = layers[0].n_out - (1 if lie_kind == "one-reply-short" else 0)
        ch.send("L0/he/y", np.full((rows, k, n + t), (1 << 62) if lie_kind == "unreduced" else 0, dtype=U64))

    text = _honest_and_lying("model-owner", lie)
    assert "data-owner:" in text
    if lie_kind == "one-reply-short":
        assert "unexpected message from model-owner: shape (0, 2, 8320), expected (1, 2, 8320)" in text
    else:
        assert "L0: reply ciphertexts: expected coefficients reduced modulo the RNS primes" in text
