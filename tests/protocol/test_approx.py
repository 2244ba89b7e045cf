"""Smooth activations on shares (Sigmoid, Tanh, Erf, SiLU, GELU) and secret x secret products.

Tolerances. Each table is fitted to within EPS = 1e-4 of the exact function (``fit_error``,
re-measured here over the whole real line); the fixed-point evaluation adds at most
``fixed_point_error`` (about 3e-5 at 16 fractional bits) and the consumer's truncation one
ulp. Secure and reference differ where the secure +1-ulp truncation of the input moves it
across a knot: both neighbouring cubics are within EPS of the function there, so the two
results are within 2 EPS plus a few ulps.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
from onnx import helper

from privmed.compiler.approx import ASYMPTOTES, EPS, fit_table
from privmed.compiler.compile import compile_model
from privmed.ir.approx import FUNCTIONS, PlainApproxOps, exact, fixed_point_error, piecewise
from privmed.ir.walk import run_plan
from privmed.reference.executors import FixedBackend
from privmed.ring.fixed import decode, encode
from tests.protocol.harness import run_three
from tests.protocol.onnx_models import build, rand

H = helper.make_node


@pytest.fixture(scope="module")
def tables() -> dict[str, dict]:
    return {fn: fit_table(fn) for fn in FUNCTIONS}


@pytest.mark.parametrize("f", [12, 16, 20])
@pytest.mark.parametrize("fn", FUNCTIONS)
def test_fixed_point_table_is_within_its_bound_over_the_whole_real_line(tables: dict, fn: str, f: int) -> None:
    """Every 2^-10 step on [-64, 64] plus magnitudes up to 2^20 (any width calibration allows)."""
    t = tables[fn]
    x = np.concatenate([np.arange(-64.0, 64.0, 2.0**-10), np.geomspace(64.0, 2.0**20, 200), -np.geomspace(64.0, 2.0**20, 200)])
    x = decode(encode(x, f), f)  # the values the ring can hold
    y = decode(piecewise(PlainApproxOps(), encode(x, f), t, f), 2 * f)
    err = np.abs(y - exact(fn)(x))
    assert t["fit_error"] <= EPS
    assert err.max() <= t["fit_error"] + fixed_point_error(t, f) + 1e-12, (fn, f, err.max(), x[err.argmax()])
    assert err.max() > EPS / 4  # not vacuous: the approximation error is really there


@pytest.mark.parametrize("fn", FUNCTIONS)
def test_asymptotes_hold_beyond_the_outer_knots(tables: dict, fn: str) -> None:
    low, (const, slope) = ASYMPTOTES[fn]
    t = tables[fn]
    assert t["coeffs"][0] == [low, 0.0, 0.0, 0.0] and t["coeffs"][-1] == [const, slope, 0.0, 0.0]
    assert len(t["knots"]) <= 16  # cost: one comparison per knot


def _act_model(path: Path, fn: str) -> Path:
    """x -> activation -> times a private 1.0 (so the activation is not the final op)."""
    one = {"one": np.ones((1, 2, 1), np.float32)}
    if fn == "silu":
        nodes = [H("Sigmoid", ["x"], ["s"]), H("Mul", ["x", "s"], ["a"])]
    elif fn == "gelu":
        consts = {"r2": np.array(np.sqrt(2.0), np.float32), "c1": np.array(1.0, np.float32), "ch": np.array(0.5, np.float32)}
        one.update(consts)
        nodes = [H("Div", ["x", "r2"], ["d"]), H("Erf", ["d"], ["e"]), H("Add", ["e", "c1"], ["p"]), H("Mul", ["x", "p"], ["m"]),
                 H("Mul", ["m", "ch"], ["a"])]
    elif fn == "gelu_tanh":
        nodes = [H("Gelu", ["x"], ["a"], approximate="tanh")]  # ONNX opset 20
    else:
        nodes = [H({"sigmoid": "Sigmoid", "tanh": "Tanh", "erf": "Erf"}[fn], ["x"], ["a"])]
    return build(path, [*nodes, H("Mul", ["a", "one"], ["y"])], one, [1, 2, 600], opset=20 if fn == "gelu_tanh" else 17)


@pytest.mark.parametrize("fn", [fn for fn in FUNCTIONS if fn != "expneg"])  # expneg: softmax's (test_softmax_inside)
def test_secure_activation_matches_numpy_over_the_whole_range(tmp_path: Path, tables: dict, fn: str) -> None:
    t = tables[fn]
    radius = max(abs(k) for k in t["knots"])
    x = np.linspace(-radius - 4, radius + 4, 1200).reshape(1, 2, 600).astype(np.float32)
    x[0, 0, :4] = [-300.0, 300.0, -2.0**-16, 0.0]  # far out in both tails, and at zero
    path = _act_model(tmp_path / f"{fn}.onnx", fn)
    plan, weights = compile_model(path, calibration=x)
    approx = [n for n in plan.nodes if n.op == "approx"]
    assert [n.attrs["fn"] for n in approx] == [fn] and "mul" not in {n.op for n in plan.nodes}  # fused: one node
    f = plan.frac_bits
    secure, stats = run_three(plan, weights, x)
    ref, _ = run_plan(plan, FixedBackend(plan, weights, x.astype(np.float64)), 1)
    onnx_out = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    bound = t["fit_error"] + fixed_point_error(approx[0].attrs, f) + 3 * 2.0**-f
    np.testing.assert_allclose(secure, exact(fn)(x.astype(np.float64)), rtol=0, atol=bound)
    np.testing.assert_allclose(secure, onnx_out, rtol=0, atol=bound + 1e-6 * (1 + np.abs(x).max()))  # + float32 rounding
    np.testing.assert_allclose(secure, ref, rtol=0, atol=2 * t["fit_error"] + 4 * 2.0**-f)
    m = approx[0].attrs["bits"] // 4
    rounds_approx = 2 + int(np.ceil(np.log2(m))) + 5
    assert stats["data-owner"]["rounds"] == rounds_approx + 3  # + the truncation, the private Mul, the reveal


def test_attention_gate_secret_product_with_channel_broadcast(tmp_path: Path) -> None:
    """AttentionUnet's gate: x * Sigmoid(psi(x)), psi with one channel broadcast over x's four."""
    rng = np.random.default_rng(3)
    inits = {"w": rand(rng, 4, 2, 3, 3), "wp": rand(rng, 1, 4, 1, 1), "w2": rand(rng, 2, 4, 1, 1)}
    nodes = [H("Conv", ["x", "w"], ["c"], pads=[1, 1, 1, 1]), H("Conv", ["c", "wp"], ["p"]), H("Sigmoid", ["p"], ["g"]),
             H("Mul", ["c", "g"], ["m"]), H("Conv", ["m", "w2"], ["y"])]
    path = build(tmp_path / "gate.onnx", nodes, inits, [1, 2, 6, 7])
    x = rand(rng, 1, 2, 6, 7, scale=1.0)
    plan, weights = compile_model(path, calibration=x)
    mul = next(n for n in plan.nodes if n.op == "mul")
    assert mul.shape == [4, 6, 7] and plan.node(mul.inputs[1]).shape == [1, 6, 7]
    secure, _ = run_three(plan, weights, x)
    onnx_out = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    # sigmoid error (2e-4 with the truncations) times |c| (< 4) times 4 weights of |w2| < 1.5, plus rounding
    np.testing.assert_allclose(secure, onnx_out, rtol=0, atol=5e-3)
    assert np.abs(secure - onnx_out).max() < 0.5 * np.abs(onnx_out).max()


@pytest.mark.parametrize("length", [5, 16])
def test_softmax_inside_the_network_matches_numpy(tmp_path: Path, length: int) -> None:
    """Rows with a wide spread (scores from -12 to 12, as attention logits can be) and rows of
    equal values. Bound (privmed.ir.softmax): 1.3e-4 (1 + L p_i) plus a few ulps, and the
    secure result must sum to 1 over each row within L times that."""
    rng = np.random.default_rng(4)
    x = rng.uniform(-12, 12, (1, 3, length)).astype(np.float32)
    x[0, 1] = 0.5  # all equal: p = 1/L
    path = build(tmp_path / "sm.onnx", [H("Softmax", ["x"], ["s"], axis=-1), H("Mul", ["s", "one"], ["y"])],
                 {"one": np.ones((1, 3, 1), np.float32)}, [1, 3, length])
    plan, weights = compile_model(path, calibration=x)
    node = next(n for n in plan.nodes if n.op == "softmax")
    secure, stats = run_three(plan, weights, x)
    want = np.exp(x - x.max(axis=-1, keepdims=True))
    want = want / want.sum(axis=-1, keepdims=True)
    f = plan.frac_bits
    bound = 1.3e-4 * (1 + length * want) + 8 * 2.0**-f
    assert np.all(np.abs(secure - want) <= bound), np.abs(secure - want).max()
    np.testing.assert_allclose(secure.sum(axis=-1), 1.0, atol=1.3e-4 * 2 * length + length * 8 * 2.0**-f)
    ref, _ = run_plan(plan, FixedBackend(plan, weights, x.astype(np.float64)), 1)
    assert np.all(np.abs(ref - want) <= bound)
    m = node.attrs["bits"] // 4
    per_compare = 2 + int(np.ceil(np.log2(m)))
    max_tree = int(np.ceil(np.log2(length)))
    assert stats["data-owner"]["rounds"] == (max_tree + 2) * per_compare + 5 + 1 + 4 * 4 + 1 + 3  # + trunc, Mul, reveal


def test_threshold_signs_with_one_shared_opening_are_exact() -> None:
    """compare.sign_thresholds: x is opened once and compared with every knot; every bit
    [x >= t_j] must be exact for |x - t_j| < 2^bits, including x equal to a knot and one ulp
    on either side, and the data owner sends one ring element per x, not one per knot."""
    import threading

    from privmed.crypto.prg import PRG, StreamKey
    from privmed.mpc import compare
    from privmed.mpc.correlation.expand import thresholds_correction
    from privmed.mpc.correlation.requests import Purpose, Request, ThresholdSpec
    from privmed.mpc.correlation.source import DealerSource
    from privmed.mpc.party import Party
    from privmed.net.channel import in_process_pair

    f, bits = 16, 28
    knots = encode(np.array([-9.25, -2.5, -0.5, 0.0, 0.5, 3.0, 100.0]), f)
    rng = np.random.default_rng(11)
    near = (knots.view(np.int64)[:, None] + np.array([-1, 0, 1])).reshape(-1)
    x = np.concatenate([near, rng.integers(-(2**26), 2**26, 5000)]).astype(np.int64).view(np.uint64)
    spec = ThresholdSpec(x.size, knots.size, bits)
    sid = bytes(16)
    p0_ch, p1_ch = in_process_pair("data-owner", "model-owner", sid, 30)
    d_ch, p1_dealer = in_process_pair("dealer", "model-owner", sid, 30)
    s0, s1 = PRG.fresh().seed, PRG.fresh().seed
    req = Request("T", StreamKey(0, 0, Purpose.NONLINEAR), 0, thresholds=spec)
    c_hat, tables, packed = thresholds_correction(spec, PRG(s0).stream(req.key), PRG(s1).stream(req.key), PRG.fresh().stream(req.key))
    for tag, value in (("T/A", c_hat), ("T/T", tables), ("T/B", packed)):
        d_ch.send(tag, value)
    x0 = PRG.fresh().stream("share").uint64(x.shape)
    shares, out, sent = {0: x0, 1: x - x0}, {}, {}

    def party(i: int) -> None:
        p = Party(i, p0_ch if i == 0 else p1_ch, DealerSource(i, s0 if i == 0 else s1, None if i == 0 else p1_dealer))
        out[i] = compare.sign_thresholds(p, req, shares[i], knots)
        sent[i] = p.peer.counters.bytes_sent

    threads = [threading.Thread(target=party, args=(i,)) for i in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert set(out) == {0, 1}, "a party failed"
    want = (x.view(np.int64)[None, :] >= knots.view(np.int64)[:, None]).astype(np.uint64)
    np.testing.assert_array_equal(out[0] + out[1], want)
    # one opening (8 B per x) + per knot 9 AND gates of 2 bits and the 1-bit e (m = 7): ~25 B
    # per x; separate signs would send 8 + 2.4 B per knot, 73 B per x
    assert sent[0] < x.size * (8 + knots.size * 3) + 4096
