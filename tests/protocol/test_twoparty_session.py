"""The two-party session (no dealer) in process: a small conv-ReLU-maxpool-Gemm model against the
fixed-point reference, plans the mode cannot run refused in one line, and a crafted plan refused
before the data owner sends anything but the abort.

Tolerance against the reference: each truncation (fused into a ReLU or not) is floor or
floor - 1 (``compare.truncate``), and the ReLU's comparison ignores the low ``drop`` bits (an
error below one unit after the shift), so every non-linear layer adds at most 2 ulp of its
output; a following linear layer of K terms with |w| <= W multiplies an ulp error by at most
K W. For the model below that is below 2 + 2 * 9 * 0.5 * (1 + 2 * 4 * 0.5) ulp < 64 ulp.
"""

from __future__ import annotations

import json
import threading
from pathlib import Path

import numpy as np
import pytest
from onnx import helper

from privmed.compiler.compile import compile_model
from privmed.errors import PeerError, ProtocolError
from privmed.ir.check import PlanError
from privmed.ir.ops import postprocess
from privmed.ir.walk import run_plan
from privmed.net.channel import in_process_pair
from privmed.reference.executors import FixedBackend
from tests.protocol.onnx_models import build, rand
from tests.protocol.twoparty_harness import run_two

pytest.importorskip("tenseal", reason="tenseal not installed: pip install 'privmed[twoparty]'")

from privmed.mpc.twoparty.protocols import ProductsNotSupported, ring_bits  # noqa: E402
from privmed.runtime.twoparty import check_two_party, data_owner_2p, merge_two, model_owner_2p  # noqa: E402

H = helper.make_node


def _tiny(tmp_path: Path, rng: np.random.Generator) -> Path:
    inits = {"w1": rand(rng, 4, 2, 3, 3), "b1": rand(rng, 4), "w2": rand(rng, 3, 16), "b2": rand(rng, 3)}
    nodes = [
        H("Conv", ["x", "w1", "b1"], ["c"], pads=[1, 1, 1, 1]),
        H("Relu", ["c"], ["r"]),
        H("MaxPool", ["r"], ["p"], kernel_shape=[2, 2], strides=[2, 2]),
        H("GlobalAveragePool", ["p"], ["g"]),
        H("Flatten", ["g"], ["f"]),
        H("Gemm", ["f", "w2", "b2"], ["y"], transB=0),
    ]
    inits["w2"] = rand(rng, 4, 3)
    return build(tmp_path / "tiny.onnx", nodes, inits, [2, 2, 6, 6])


def test_conv_relu_maxpool_gemm_equals_the_fixed_point_reference(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    path = _tiny(tmp_path, rng)
    x = rand(rng, 2, 2, 6, 6, scale=1.0)
    plan, weights = compile_model(path, calibration=x)
    x_batches = [x[:1], x[1:]]  # two batches in one session: fresh offline material each

    (out, do_stats), mo_stats, _ = run_two(lambda ch: data_owner_2p(ch, iter(x_batches), total_batches=2),
                                           lambda ch: model_owner_2p(ch, plan, weights), timeout_s=60)  # fmt: skip
    ref_ring, _ = run_plan(plan, FixedBackend(plan, weights, x.astype(np.float64)), 2)
    ref = postprocess(ref_ring, plan.node(plan.output_name).attrs.get("post", {}))
    ulp = 2.0**-plan.frac_bits
    np.testing.assert_allclose(out, ref, rtol=0, atol=64 * ulp)
    assert do_stats["ring_bits"] == ring_bits(plan) <= 43  # narrow mode: no products
    assert len(do_stats["batches"]) == 2 and all(b["offline_bytes"] > b["online_bytes"] > 0 for b in do_stats["batches"])
    for role in (do_stats, mo_stats):  # the set-up (HE key, base OTs) counted once, inside batch 0
        assert role["offline_bytes"] == sum(b["offline_bytes"] for b in role["batches"])
        assert role["offline_bytes"] + role["online_bytes"] <= role["bytes_sent"]
        assert role["offline_s"] + role["online_s"] <= role["wall_s"]
    stats = merge_two({"data-owner": do_stats, "model-owner": mo_stats}, 1.0)
    assert set(stats.bytes_sent) == {"data-owner", "model-owner"} and stats.rounds == do_stats["rounds"] > 0


def test_instance_norm_runs_in_the_wide_ring_and_equals_the_reference(tmp_path: Path) -> None:
    """Products of two secrets (the norm's squares and 1/sqrt products) switch the session to
    Z_2^64 shares with Beaver triples from OT. Tolerance: the dealer mode's for the instance
    norm (``test_ops.test_instance_normalization``: rtol 3e-3 + atol 2e-3; its truncations in
    the variance, the Newton steps for 1/sqrt and the affine each move by an ulp, amplified by
    1/sigma); measured 7.6e-5 (2026-11-30)."""
    rng = np.random.default_rng(1)
    nodes = [H("Conv", ["x", "w"], ["c"], pads=[1, 1, 1, 1]), H("InstanceNormalization", ["c", "s", "b"], ["n"]), H("Relu", ["n"], ["y"])]
    inits = {"w": rand(rng, 3, 2, 3, 3), "s": rand(rng, 3) + 1.0, "b": rand(rng, 3)}
    path = build(tmp_path / "norm.onnx", nodes, inits, [1, 2, 5, 5])
    x = rand(rng, 1, 2, 5, 5, scale=1.0)
    plan, weights = compile_model(path, calibration=x)
    assert check_two_party(plan)[0] == 64

    (out, stats), _, _ = run_two(lambda ch: data_owner_2p(ch, x), lambda ch: model_owner_2p(ch, plan, weights), timeout_s=60)
    ref_ring, _ = run_plan(plan, FixedBackend(plan, weights, x.astype(np.float64)), 1)
    ref = postprocess(ref_ring, plan.node(plan.output_name).attrs.get("post", {}))
    np.testing.assert_allclose(out, ref, rtol=3e-3, atol=2e-3)
    assert stats["ring_bits"] == 64


def test_silu_and_softmax_inside_the_network_equal_the_reference(tmp_path: Path) -> None:
    """x * sigmoid(x) (a public piecewise cubic: signs and products) and a softmax over
    channels (max tree, exp cubic, Newton 1/S) in the wide ring. Tolerance: the dealer mode's
    for these ops (``test_approx``: the tables' 1e-4 plus truncations, 2e-3 here); measured
    4.2e-5 (2026-11-30)."""
    rng = np.random.default_rng(5)
    nodes = [H("Conv", ["x", "w"], ["c"], pads=[1, 1, 1, 1]), H("Sigmoid", ["c"], ["s"]), H("Mul", ["c", "s"], ["m"]),
             H("Softmax", ["m"], ["sm"], axis=1), H("Conv", ["sm", "w2"], ["y"])]  # fmt: skip
    path = build(tmp_path / "act.onnx", nodes, {"w": rand(rng, 4, 2, 3, 3), "w2": rand(rng, 3, 4, 1, 1)}, [1, 2, 6, 6])
    x = rand(rng, 1, 2, 6, 6, scale=1.0)
    plan, weights = compile_model(path, calibration=x)
    assert {"approx", "softmax"} <= {n.op for n in plan.nodes}

    (out, stats), _, _ = run_two(lambda ch: data_owner_2p(ch, x), lambda ch: model_owner_2p(ch, plan, weights), timeout_s=60)
    ref_ring, _ = run_plan(plan, FixedBackend(plan, weights, x.astype(np.float64)), 1)
    ref = postprocess(ref_ring, plan.node(plan.output_name).attrs.get("post", {}))
    np.testing.assert_allclose(out, ref, rtol=0, atol=2e-3)
    assert stats["ring_bits"] == 64


def test_attention_matrix_products_equal_the_reference_and_large_ones_are_refused(tmp_path: Path) -> None:
    """x x^T and (x x^T) x of two secret tensors by matrix triples made by expansion; within
    64 ulp of the reference (two products, each followed by a truncation of 0 or -1 ulp,
    times |x| <= 4 and 4 terms). The same op over 256 tokens is refused in one line."""
    rng = np.random.default_rng(10)
    nodes = [H("Transpose", ["x"], ["t"], perm=[0, 2, 1]), H("MatMul", ["x", "t"], ["s"]), H("MatMul", ["s", "x"], ["y"])]
    path = build(tmp_path / "att.onnx", nodes, {}, [1, 4, 3])
    x = rand(rng, 1, 4, 3, scale=1.0)
    plan, weights = compile_model(path, calibration=x)
    assert check_two_party(plan)[0] == 64

    (out, _), _, _ = run_two(lambda ch: data_owner_2p(ch, x), lambda ch: model_owner_2p(ch, plan, weights), timeout_s=60)
    ref_ring, _ = run_plan(plan, FixedBackend(plan, weights, x.astype(np.float64)), 1)
    ref = postprocess(ref_ring, plan.node(plan.output_name).attrs.get("post", {}))
    np.testing.assert_allclose(out, ref, rtol=0, atol=64 * 2.0**-plan.frac_bits)

    big_nodes = [nodes[0], H("MatMul", ["x", "t"], ["y"])]
    big, _ = compile_model(build(tmp_path / "big.onnx", big_nodes, {}, [1, 256, 32]))
    with pytest.raises(ProductsNotSupported, match=r"matrix products of two secret tensors larger than") as info:
        check_two_party(big)
    assert "\n" not in str(info.value)


def test_crafted_plan_is_refused_before_anything_is_sent(tmp_path: Path) -> None:
    """The model owner sends a plan whose declared shape lies: the data owner refuses it and
    its first message is the abort (no batch size, no public key, nothing input-derived)."""
    rng = np.random.default_rng(2)
    plan, _ = compile_model(_tiny(tmp_path, rng))
    raw = json.loads(plan.to_json())
    raw["nodes"][1]["shape"] = [1]  # the conv's output declared as one element
    d_m, m_d = in_process_pair("data-owner", "model-owner", bytes(16), 5)
    errors: list[BaseException] = []

    def data_owner() -> None:
        try:
            data_owner_2p(d_m, rand(rng, 1, 2, 6, 6))
        except BaseException as exc:  # noqa: BLE001 - inspected below
            errors.append(exc)

    t = threading.Thread(target=data_owner)
    t.start()
    m_d.send_text("plan", json.dumps(raw))
    with pytest.raises(PeerError, match="data-owner aborted the session: refused the model owner's plan"):
        m_d.recv("batch", np.int64, (1,))
    t.join(10)
    assert len(errors) == 1 and isinstance(errors[0], PlanError) and "\n" not in str(errors[0])


def test_plan_the_two_party_mode_cannot_run_is_refused_by_the_data_owner(tmp_path: Path) -> None:
    """A well-formed plan with a product of two secret tensors too large for triples by
    expansion (x x^T over 256 tokens): refused after the plan check, before the batch size,
    with the abort as the first message. (3-D convolutions, refused here before, now run.)"""
    rng = np.random.default_rng(3)
    nodes = [H("Transpose", ["x"], ["t"], perm=[0, 2, 1]), H("MatMul", ["x", "t"], ["y"])]
    plan, _ = compile_model(build(tmp_path / "big.onnx", nodes, {}, [1, 256, 32]))
    d_m, m_d = in_process_pair("data-owner", "model-owner", bytes(16), 5)
    errors: list[BaseException] = []

    def data_owner() -> None:
        try:
            data_owner_2p(d_m, rand(rng, 1, 256, 32))
        except BaseException as exc:  # noqa: BLE001 - inspected below
            errors.append(exc)

    t = threading.Thread(target=data_owner)
    t.start()
    m_d.send_text("plan", plan.to_json())
    with pytest.raises(PeerError, match="data owner refused the plan: two-party mode: matrix products"):
        m_d.recv("batch", np.int64, (1,))
    t.join(10)
    assert len(errors) == 1 and isinstance(errors[0], ProtocolError)


def test_3d_convolutions_pass_the_two_party_check(tmp_path: Path) -> None:
    rng = np.random.default_rng(3)
    nodes = [H("Conv", ["x", "w"], ["c"], pads=[1] * 6, strides=[2, 1, 1]), H("ConvTranspose", ["c", "v"], ["y"], strides=[2, 2, 2])]
    plan, _ = compile_model(build(tmp_path / "c3.onnx", nodes, {"w": rand(rng, 2, 1, 3, 3, 3), "v": rand(rng, 2, 3, 2, 2, 2)}, [1, 1, 4, 4, 4]))
    assert check_two_party(plan)[0] < 64  # narrow ring: no products


def test_model_owner_gone_mid_session_data_owner_names_it_within_the_deadline(tmp_path: Path) -> None:
    """The model owner sends an honest plan, takes the batch size, then disappears: the data
    owner's next receive fails naming the model owner, well within its 5 s deadline."""
    import time

    rng = np.random.default_rng(4)
    plan, _ = compile_model(_tiny(tmp_path, rng))
    d_m, m_d = in_process_pair("data-owner", "model-owner", bytes(16), 5)
    errors: list[BaseException] = []

    def data_owner() -> None:
        try:
            data_owner_2p(d_m, rand(rng, 1, 2, 6, 6))
        except BaseException as exc:  # noqa: BLE001 - inspected below
            errors.append(exc)

    t0 = time.monotonic()
    t = threading.Thread(target=data_owner)
    t.start()
    m_d.send_text("plan", plan.to_json())
    m_d.recv("batch", np.int64, (1,))
    m_d.close()  # gone before the HE key set-up answers anything
    t.join(10)
    assert len(errors) == 1 and isinstance(errors[0], PeerError) and "model-owner" in str(errors[0]), errors
    assert time.monotonic() - t0 < 5


def test_pinned_fingerprint_refuses_another_plan_before_anything_is_sent(tmp_path: Path) -> None:
    rng = np.random.default_rng(6)
    plan, _ = compile_model(_tiny(tmp_path, rng))
    d_m, m_d = in_process_pair("data-owner", "model-owner", bytes(16), 5)
    errors: list[BaseException] = []

    def data_owner() -> None:
        try:
            data_owner_2p(d_m, rand(rng, 1, 2, 6, 6), expect_plan="0" * 64)
        except BaseException as exc:  # noqa: BLE001 - inspected below
            errors.append(exc)

    t = threading.Thread(target=data_owner)
    t.start()
    m_d.send_text("plan", plan.to_json())
    with pytest.raises(PeerError, match=f"fingerprint {plan.fingerprint()} is not the approved"):
        m_d.recv("batch", np.int64, (1,))
    t.join(10)
    assert len(errors) == 1 and isinstance(errors[0], PlanError)


@pytest.mark.parametrize("y_shape", [(2, 3, 4), (3, 1), (1,), None])
def test_beaver_products_with_broadcast_and_squares_are_exact_mod_2_64(y_shape: tuple[int, ...] | None) -> None:
    """``products``: x * broadcast(y) (and x * x) over Z_2^64, exact, for y of x's shape, a
    broadcast column, a scalar-like vector, and squares; shares of random ring elements."""
    from privmed.crypto.prg import PRG
    from privmed.mpc.twoparty.ot import ot_setup
    from privmed.mpc.twoparty.products import product_offline, product_online

    rng = np.random.default_rng(7)
    x_shape = (2, 3, 4)
    u64 = np.uint64
    x = rng.integers(0, 2**64 - 1, x_shape, dtype=u64, endpoint=True)
    y = None if y_shape is None else rng.integers(0, 2**64 - 1, y_shape, dtype=u64, endpoint=True)
    x0 = rng.integers(0, 2**64 - 1, x_shape, dtype=u64, endpoint=True)
    y0 = None if y is None else rng.integers(0, 2**64 - 1, y.shape, dtype=u64, endpoint=True)

    def party(is_do: bool):  # type: ignore[no-untyped-def]
        def run(ch):  # type: ignore[no-untyped-def]
            prg = PRG.fresh()
            ot = ot_setup(ch, "t", prg, is_do)
            mat = product_offline(ot, "p", is_do, x_shape, y_shape, 64, prg.stream("m"))
            xi = x0 if is_do else x - x0
            yi = None if y is None or y0 is None else (y0 if is_do else y - y0)
            return product_online(ot, "p", is_do, xi, yi, mat)
        return run

    z0, z1, _ = run_two(party(True), party(False), timeout_s=30)
    want = x * (x if y is None else np.broadcast_to(y, x_shape))
    np.testing.assert_array_equal(z0 + z1, want)


@pytest.mark.parametrize(("x_shape", "w_len"), [((2, 3, 4, 5), 3), ((1, 4, 2, 2, 2), 4), ((1, 3, 6), 1)])
def test_channel_scale_by_vector_cots_is_exact(x_shape: tuple[int, ...], w_len: int) -> None:
    """``scale.channel_scale_shares``: shares of w_c * A over Z_2^42 equal numpy's, for batch 2,
    a 3-D map and one slope broadcast over every channel; signed weights."""
    from privmed.crypto.prg import PRG
    from privmed.mpc.twoparty.ot import ot_setup
    from privmed.mpc.twoparty.scale import channel_scale_shares

    rng = np.random.default_rng(8)
    bits, ring = 42, np.uint64((1 << 42) - 1)
    a = rng.integers(0, 2**64 - 1, x_shape, dtype=np.uint64, endpoint=True) & ring
    w = rng.integers(-(2**17) + 1, 2**17, w_len).astype(np.int64)

    def party(is_do: bool):  # type: ignore[no-untyped-def]
        def run(ch):  # type: ignore[no-untyped-def]
            ot = ot_setup(ch, "t", PRG.fresh(), is_do)
            return channel_scale_shares(ot, "cs", is_do, x_shape, bits, mask=a if is_do else None, weight=None if is_do else w.view(np.uint64))
        return run

    y0, y1, _ = run_two(party(True), party(False), timeout_s=30)
    want = (a * np.broadcast_to(w, (x_shape[1],)).view(np.uint64).reshape((1, -1) + (1,) * (len(x_shape) - 2))) & ring
    np.testing.assert_array_equal((y0 + y1) & ring, want)


def test_channel_scale_key_expansion_is_fixed_key_aes_as_documented() -> None:
    """``scale._expand``: block j of G(key) is pi(key ^ j) ^ key ^ j, pi = AES-128 under
    SHA-256("privmed/scale/" + label)[:16], two words per block, reduced mod 2^l; one block
    at a time with ``cryptography`` as the oracle."""
    import hashlib

    from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

    from privmed.mpc.twoparty.scale import _expand

    keys = np.random.default_rng(4).integers(0, 256, (3, 16), dtype=np.uint8)
    pi = Cipher(algorithms.AES(hashlib.sha256(b"privmed/scale/L").digest()[:16]), modes.ECB()).encryptor()
    want = np.zeros((3, 6), dtype=np.uint64)
    for i, key in enumerate(keys):
        for j in range(3):
            x = key.view("<u8").copy()
            x[0] ^= np.uint64(j)
            want[i, 2 * j : 2 * j + 2] = np.frombuffer(pi.update(x.tobytes()), "<u8") ^ x
    np.testing.assert_array_equal(_expand(keys, "L", 5, 42), want[:, :5] & np.uint64((1 << 42) - 1))


def test_prelu_and_unfoldable_batchnorm_equal_the_reference(tmp_path: Path) -> None:
    """Private per-channel scales (PReLU slopes, a BatchNorm after a concat) go through vector
    COTs, not HE; within 64 ulp of the reference as the first test."""
    rng = np.random.default_rng(9)
    nodes = [H("Conv", ["x", "w"], ["c"], pads=[1, 1, 1, 1]), H("Concat", ["c", "x"], ["k"], axis=1),
             H("BatchNormalization", ["k", "s", "b", "mu", "var"], ["n"]), H("PRelu", ["n", "slope"], ["y"])]  # fmt: skip
    inits = {"w": rand(rng, 3, 2, 3, 3), "s": rand(rng, 5) + 1.0, "b": rand(rng, 5), "mu": rand(rng, 5),
             "var": np.abs(rand(rng, 5)) + 0.5, "slope": rand(rng, 5, 1, 1)}  # fmt: skip
    path = build(tmp_path / "bn.onnx", nodes, inits, [1, 2, 5, 5])
    x = rand(rng, 1, 2, 5, 5, scale=1.0)
    plan, weights = compile_model(path, calibration=x)
    assert [n.attrs["kind"] for n in plan.nodes if n.op == "linear"].count("channel_scale") >= 1

    (out, _), _, _ = run_two(lambda ch: data_owner_2p(ch, x), lambda ch: model_owner_2p(ch, plan, weights), timeout_s=60)
    ref_ring, _ = run_plan(plan, FixedBackend(plan, weights, x.astype(np.float64)), 1)
    ref = postprocess(ref_ring, plan.node(plan.output_name).attrs.get("post", {}))
    np.testing.assert_allclose(out, ref, rtol=0, atol=64 * 2.0**-plan.frac_bits)


def test_model_owner_reveal_outside_the_ring_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A model owner whose output share has bits above 2^l (narrow ring): the data owner
    refuses it with one line instead of decoding a wrapped value."""
    import privmed.runtime.twoparty as rt
    from privmed.mpc.twoparty.protocols import TwoPartyOnline

    class Lying(TwoPartyOnline):
        def reveal(self, x: np.ndarray) -> np.ndarray | None:
            if self.is_data_owner:
                return super().reveal(x)
            self.s.ch.send(f"b{self.batch_index}:{self.node}/reveal", (x & self.s.ring) | np.uint64(1 << 63))
            return None

    monkeypatch.setattr(rt, "TwoPartyOnline", Lying)
    rng = np.random.default_rng(11)
    x = rand(rng, 1, 2, 6, 6, scale=1.0)
    plan, weights = compile_model(_tiny(tmp_path, rng), calibration=x)
    with pytest.raises(RuntimeError, match=r"ProtocolError: .*/reveal: expected elements of Z_2\^\d+ from the model owner"):
        run_two(lambda ch: data_owner_2p(ch, x), lambda ch: model_owner_2p(ch, plan, weights), timeout_s=20)
