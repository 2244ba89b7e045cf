"""A model owner that deviates from the protocol: crafted plans, lying shapes, colliding keys.

Every crafted plan is refused by the data owner (and the dealer) with one line naming the
node and the rule, and the first message the data owner sends after it is an ``abort``:
nothing derived from the image ever leaves it. Also: stream keys are injective, a mask of the
wrong shape aborts a protocol, frames are capped before allocation, two weight sets of one
architecture give plans that differ only in the integer width fields, and the model owner's
whole view is uniform and the same for two very different images.
"""

from __future__ import annotations

import copy
import json
import os
import threading
from pathlib import Path

import numpy as np
import pytest

from privmed.compiler.compile import compile_model
from privmed.crypto.prg import SESSION, StreamKey
from privmed.errors import PeerError, ProtocolError
from privmed.ir.check import MAX_PLAN_BYTES, PlanError, check_plan, parse_plan
from privmed.ir.plan import Plan
from privmed.ir.walk import run_plan
from privmed.mpc import compare as nl
from privmed.mpc.correlation.expand import NonlinearShares
from privmed.mpc.correlation.requests import NonlinearSpec, Purpose, Request
from privmed.mpc.party import Party
from privmed.mpc.protocols import Schedule
from privmed.net.channel import in_process_pair
from privmed.net.frame import HEADER, MAGIC, VERSION, unpack_header
from privmed.runtime import session
from privmed.runtime.backend import SecureBackend

from .harness import run_three

DEMO = Path(__file__).resolve().parents[2] / "src/privmed/assets/models/chest_smallcnn.onnx"


@pytest.fixture(scope="module")
def demo() -> tuple[Plan, object]:
    return compile_model(DEMO)


def _raw(plan: Plan) -> dict:
    return json.loads(plan.to_json())


def _ids(raw: dict, op: str) -> list[int]:
    return [i for i, n in enumerate(raw["nodes"]) if n["op"] == op]


def _image(plan: Plan, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((1, *plan.input_shape))


def _offer(text: str, x: np.ndarray) -> tuple[BaseException | None, str, str]:
    """A model owner sends ``text`` as its plan; returns (the data owner's error, the first
    message the model owner and the dealer then receive from the data owner)."""
    sid = os.urandom(16)
    d_m, m_d = in_process_pair("data-owner", "model-owner", sid, 5)
    d_x, x_d = in_process_pair("data-owner", "dealer", sid, 5)
    error: list[BaseException] = []

    def data_owner() -> None:
        try:
            session.data_owner(d_m, d_x, x)
        except BaseException as exc:  # noqa: BLE001 - inspected below
            error.append(exc)

    t = threading.Thread(target=data_owner)
    t.start()
    m_d.send_text("plan", text)
    firsts = []
    for ch in (m_d, x_d):
        try:
            ch.recv("batch", np.int64, (1,))
            firsts.append("batch")
        except PeerError as exc:
            firsts.append(str(exc))
    t.join(10)
    return (error[0] if error else None), firsts[0], firsts[1]


def _refused(raw: dict, x: np.ndarray, rule: str) -> None:
    err, to_model, to_dealer = _offer(json.dumps(raw), x)
    assert isinstance(err, PlanError), f"plan accepted: {err!r}"
    assert rule in str(err) and "\n" not in str(err)
    for first in (to_model, to_dealer):  # the data owner's first message is the abort
        assert first.startswith("data-owner aborted the session: refused the model owner's plan"), first


def test_honest_plan_is_accepted_and_matches_the_reference(demo) -> None:
    plan, weights = demo
    x = _image(plan)
    out, stats = run_three(plan, weights, x)
    assert out.shape[0] == 1 and stats["data-owner"]["plan"]["fingerprint"] == plan.fingerprint()


def test_colliding_ids_attack_is_refused(demo) -> None:
    """The published attack: a ReLU with id 'spy/0' and a max-pool 'spy' drew the same mask."""
    raw = _raw(demo[0])
    relu, pool = _ids(raw, "relu")[:2]  # (the demo model has no max-pool: a second ReLU stands in)
    old = {raw["nodes"][relu]["id"]: "spy/0", raw["nodes"][pool]["id"]: "spy"}
    for n in raw["nodes"]:
        n["id"] = old.get(n["id"], n["id"])
        n["inputs"] = [old.get(i, i) for i in n["inputs"]]
    _refused(raw, _image(demo[0]), "does not match")


def test_duplicate_ids_are_refused(demo) -> None:
    raw = _raw(demo[0])
    a, b = _ids(raw, "relu")[:2]
    raw["nodes"][b]["id"] = raw["nodes"][a]["id"]
    _refused(raw, _image(demo[0]), "duplicate node id")


def test_broadcast_mask_attack_is_refused(demo) -> None:
    """The published attack: one extra trunc declared [1] masks every pixel with one r."""
    raw = _raw(demo[0])
    first = raw["nodes"][0]
    spy = {"id": "spy", "op": "trunc", "inputs": [first["id"]], "shape": [1], "scale": 0, "attrs": {"shift": 0}}
    raw["nodes"].insert(1, spy)
    _refused(raw, _image(demo[0]), "declared shape [1] but its inputs and attributes give")


@pytest.mark.parametrize("mutate, rule", [
    (lambda raw: raw["nodes"].insert(2, raw["nodes"].pop(1)), "not earlier nodes"),
    (lambda raw: raw["nodes"][1].__setitem__("shape", [1 << 40, 1]), "entries must be integers"),
    (lambda raw: raw["nodes"].insert(-1, copy.deepcopy(raw["nodes"][-1])), "only it, must be the output"),
    (lambda raw: raw.__setitem__("input_shape", [1, 32, 32]), "declared shape [1, 64, 64] but"),
    (lambda raw: raw["nodes"][1]["attrs"].__setitem__("bound", 3.5), "not allowed"),
    (lambda raw: raw["nodes"][1].__setitem__("op", "reveal_to_model_owner"), "unknown op"),
    (lambda raw: raw["nodes"][-1].__setitem__("id", "elsewhere"), "does not name the output node"),
    (lambda raw: raw["nodes"][2]["attrs"].__setitem__("shift", 99), "shift must be an integer"),
    (lambda raw: raw.__setitem__("frac_bits", 40), "frac_bits must be an integer"),
    (lambda raw: raw.__setitem__("ring_bits", 80), "ring_bits must be an integer"),
    (lambda raw: raw.__setitem__("ring_bits", 36), "does not fit ring_bits 36"),
    (lambda raw: raw.pop("ring_bits"), "top-level keys must be"),
], ids=["order", "huge-dim", "extra-output", "input-shape", "extra-attr", "unknown-op", "output-name", "range", "frac-bits",
        "ring-range", "ring-too-narrow", "ring-missing"])
def test_crafted_plan_classes_are_refused(demo, mutate, rule) -> None:
    raw = _raw(demo[0])
    mutate(raw)
    _refused(raw, _image(demo[0]), rule)


def test_plans_over_the_size_cap_and_non_json_are_refused(demo) -> None:
    x = _image(demo[0])
    err, to_model, _ = _offer("{" * 100_000, x)
    assert isinstance(err, PlanError) and "not valid JSON" in str(err)
    assert to_model.startswith("data-owner aborted")
    with pytest.raises(PlanError, match="more than"):
        parse_plan(" " * (MAX_PLAN_BYTES + 1))


def test_a_pinned_fingerprint_refuses_any_other_plan(demo) -> None:
    plan, _ = demo
    sid = os.urandom(16)
    d_m, m_d = in_process_pair("data-owner", "model-owner", sid, 5)
    d_x, _x_d = in_process_pair("data-owner", "dealer", sid, 5)
    m_d.send_text("plan", plan.to_json())
    with pytest.raises(PlanError, match="is not the approved 00"):
        session.data_owner(d_m, d_x, _image(plan), expect_plan="00" * 32)


def requests(plan: Plan, batch: int, index: int) -> list[Request]:
    """Every request of one batch, as the dealer's recording walk serves them."""
    served: list[Request] = []
    run_plan(plan, SecureBackend(plan, Schedule(index, served.append)), batch)
    return served


def _norm_and_pool_plans(tmp_path: Path) -> list[Plan]:
    from onnx import helper

    from .onnx_models import build, rand

    rng = np.random.default_rng(1)
    h = helper.make_node
    norm = build(tmp_path / "norm.onnx", [
        h("Conv", ["x", "w"], ["c"], pads=[1, 1, 1, 1]),
        h("InstanceNormalization", ["c", "g", "b"], ["n"], epsilon=1e-5),
        h("Relu", ["n"], ["r"]), h("MaxPool", ["r"], ["y"], kernel_shape=[3, 3], strides=[2, 2]),
    ], {"w": rand(rng, 3, 2, 3, 3), "g": np.full(3, 1.2, np.float32), "b": np.full(3, 0.1, np.float32)}, [1, 2, 9, 9])
    pool3d = build(tmp_path / "pool3d.onnx", [
        h("Conv", ["x", "w"], ["c"], pads=[1, 1, 1, 1, 1, 1]), h("Relu", ["c"], ["r"]),
        h("MaxPool", ["r"], ["m"], kernel_shape=[2, 2, 2], strides=[2, 2, 2]), h("Relu", ["m"], ["y"]),
    ], {"w": rand(rng, 2, 1, 3, 3, 3)}, [1, 1, 4, 6, 6])
    return [compile_model(norm)[0], compile_model(pool3d)[0]]


def test_stream_keys_of_every_request_are_distinct_over_plans_and_batches(demo, issue13_plan: Plan, tmp_path: Path) -> None:
    """Over whole sessions of several batches (of different sizes): no key is drawn twice."""
    for plan in [demo[0], *_norm_and_pool_plans(tmp_path), issue13_plan]:
        drawn: list[StreamKey] = []
        session_wide: set[StreamKey] = set()
        for index, batch in enumerate((1, 4, 2, 3)):
            for r in requests(plan, batch, index):
                drawn += [r.key, StreamKey(r.key.batch, r.key.node, Purpose.DEALER_BITS, r.key.step)]
                if r.linear is not None:
                    session_wide.add(r.weight_mask_key)  # the same B for every batch, by design
        assert len(set(drawn)) == len(drawn), plan.model_name
        assert not session_wide & set(drawn)
        assert all(k.batch == SESSION for k in session_wide)
        assert {r.key.purpose for r in requests(plan, 1, 0)} >= {Purpose.LINEAR, Purpose.NONLINEAR}


def test_stream_key_encoding_is_fixed_width_and_range_checked() -> None:
    blocks = {StreamKey(b, n, p, s).counter_block() for b in (0, 1, 255, 256) for n in (0, 1, 256) for p in (1, 2) for s in (0, 1, 256)}
    assert len(blocks) == 4 * 3 * 2 * 3 and all(len(b) == 16 and b.endswith(bytes(4)) for b in blocks)
    for bad in ((-1, 0, 1, 0), (1 << 32, 0, 1, 0), (0, 0, 256, 0), (0, 0, 1, 1 << 16)):
        with pytest.raises(ValueError, match="outside"):
            StreamKey(*bad)


def test_a_mask_of_the_wrong_shape_aborts_the_protocol() -> None:
    a, _b = in_process_pair("data-owner", "model-owner", bytes(16), 1)

    class OneMask:
        def nonlinear(self, req: Request) -> NonlinearShares:
            return NonlinearShares(r=np.zeros(1, np.uint64), r_high=np.zeros(1, np.uint64), r_msb=np.zeros(1, np.uint64))

    req = Request("b0:1/0", StreamKey(0, 1, Purpose.NONLINEAR), 1, nonlinear=NonlinearSpec(1, 8))
    p = Party(0, a, OneMask())  # type: ignore[arg-type]
    with pytest.raises(ProtocolError, match="mask r has shape \\(1,\\), the value it protects \\(16,\\)"):
        nl.truncate(p, req, np.arange(16, dtype=np.uint64))
    assert a.counters.messages_sent == 0  # nothing was opened


def test_frames_are_checked_before_allocation() -> None:
    huge = HEADER.pack(MAGIC, VERSION, 1, 2, 0, bytes(16), 0, b"x", 1 << 40, 1 << 40, 0, 0, 0, 0, 0, 0, 8)
    with pytest.raises(ProtocolError, match="does not match shape"):
        unpack_header(huge)
    a, b = in_process_pair("data-owner", "model-owner", bytes(16), 1)
    b.send("plan", np.zeros(2048, np.uint8))
    with pytest.raises(ProtocolError, match="at most 1024 expected"):
        a.recv("plan", np.uint8, None, max_bytes=1024)
    with pytest.raises(ValueError, match="needs max_bytes"):
        b.send("x", np.zeros(1, np.uint8))
        a.recv("x", np.uint8, None)
    c, d = in_process_pair("data-owner", "model-owner", bytes(16), 1)
    d.send_text("abort", "x" * 10_000)
    with pytest.raises(ProtocolError, match="an abort of 10000 bytes"):
        c.recv("batch", np.int64, (1,))


def test_packed_ring_frames_of_another_length_or_dtype_are_refused() -> None:
    """A peer's Z_2^l elements must arrive as exactly wire_len(count, l) bytes: a frame one byte
    longer, or whole uint64 words instead, is refused from its header, before its payload is
    read or anything is unpacked (the count and width are the receiver's own)."""
    from privmed.ring.fixed import wire_len

    a, b = in_process_pair("data-owner", "model-owner", bytes(16), 1)
    b.send("x/c", np.zeros(wire_len(10, 44) + 1, np.uint8))
    with pytest.raises(ProtocolError, match=r"shape \(56,\), expected \(55,\)"):
        a.recv_ring("x/c", (10,), 44)
    c, d = in_process_pair("data-owner", "model-owner", bytes(16), 1)
    d.send("x/c", np.zeros(10, np.uint64))
    with pytest.raises(ProtocolError, match="dtype uint64, expected uint8"):
        c.recv_ring("x/c", (10,), 44)


def test_a_dealer_sending_a_relu_select_correction_for_a_sign_is_refused() -> None:
    """A sign needs only c_hat's correction from the dealer (``NonlinearSpec.select`` False):
    the model owner expects one row of Z_2^l elements, from its own spec, so a dealer that also
    sends c_hat (r >> s) (the frame a ReLU's select would take) is refused from the header."""
    from privmed.mpc.correlation.source import DealerSource
    from privmed.ring.fixed import wire_len

    mo, dealer = in_process_pair("model-owner", "dealer", bytes(16), 1)
    spec = NonlinearSpec(10, 0, 16, 0, True, select=False)
    req = Request("b0:3/0", StreamKey(0, 3, Purpose.NONLINEAR), 3, nonlinear=spec, ring=44)
    dealer.send(f"{req.label}/A", np.zeros(wire_len(2 * 10, 44), np.uint8))  # two rows: c_hat and c_hat R
    with pytest.raises(ProtocolError, match=rf"shape \({wire_len(20, 44)},\), expected \({wire_len(10, 44)},\)"):
        DealerSource(1, bytes(16), mo).nonlinear(req)


def test_two_weight_sets_give_plans_that_differ_only_in_integer_widths(tmp_path: Path) -> None:
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(DEMO))
    rng = np.random.default_rng(7)
    for init in model.graph.initializer:
        w = numpy_helper.to_array(init)
        if w.dtype.kind == "f" and w.size > 1:
            init.CopyFrom(numpy_helper.from_array((w * rng.uniform(0.2, 3.0, w.shape)).astype(w.dtype), init.name))
    other = tmp_path / "other.onnx"
    onnx.save(model, str(other))
    a, b = _raw(compile_model(DEMO)[0]), _raw(compile_model(other)[0])
    allowed = {"bits", "k_hi", "sign_bits", "sum_first", "pre"}
    assert len(a["nodes"]) == len(b["nodes"])
    for na, nb in zip(a["nodes"], b["nodes"], strict=True):
        assert {k: v for k, v in na.items() if k != "attrs"} == {k: v for k, v in nb.items() if k != "attrs"}
        diff = {k for k in set(na["attrs"]) | set(nb["attrs"]) if na["attrs"].get(k) != nb["attrs"].get(k)}
        assert diff <= allowed, (na["id"], diff)
    widths = ("nodes", "frac_bits", "ring_bits")
    assert {k: v for k, v in a.items() if k not in widths} == {k: v for k, v in b.items() if k not in widths}
    assert "bound" not in json.dumps(a) and "headroom" not in json.dumps(a)
    check_plan(Plan.from_json(json.dumps(b)))


def _model_owner_view(plan: Plan, weights: object, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """What the model owner receives in a session on ``x``: every ring element as a number in
    [0, 1) (its value over the size of its ring, Z_2^l or, for the dealer's msb corrections,
    Z_2^shift), and every other byte (packed bits, tables)."""
    from privmed.net import channel as channel_mod

    words: list[np.ndarray] = []
    small: list[np.ndarray] = []
    original, original_ring = channel_mod.Channel.recv, channel_mod.Channel.recv_ring
    inside: set[int] = set()  # channels inside recv_ring (each party runs in its own thread)

    def recording(self, tag, dtype, shape, timeout_s=None, max_bytes=None):  # type: ignore[no-untyped-def]
        arr = original(self, tag, dtype, shape, timeout_s, max_bytes)
        if self.me == "model-owner" and tag not in ("batch", "seed", "done") and id(self) not in inside:
            assert arr.dtype != np.uint64, f"{tag}: ring elements must come through recv_ring"
            small.append(np.asarray(arr).reshape(-1).view(np.uint8))
        return arr

    def recording_ring(self, tag, shape, bits=64, timeout_s=None):  # type: ignore[no-untyped-def]
        inside.add(id(self))
        try:
            arr = original_ring(self, tag, shape, bits, timeout_s).reshape(-1)
        finally:
            inside.discard(id(self))
        if self.me == "model-owner":
            assert int(arr.max(initial=0)) < 2**bits
            top = max(0, bits - 53)
            words.append((arr >> np.uint64(top)).astype(np.float64) / 2.0 ** (bits - top))
        return arr.reshape(shape)

    channel_mod.Channel.recv, channel_mod.Channel.recv_ring = recording, recording_ring  # type: ignore[method-assign]
    try:
        run_three(plan, weights, x)  # type: ignore[arg-type]
    finally:
        channel_mod.Channel.recv, channel_mod.Channel.recv_ring = original, original_ring  # type: ignore[method-assign]
    return np.concatenate(words), np.concatenate([s.view(np.uint8) for s in small])


def test_model_owner_view_is_uniform_and_independent_of_the_image(demo) -> None:
    from scipy import stats

    plan, weights = demo
    dark = np.zeros((1, *plan.input_shape))
    bright = np.abs(np.random.default_rng(3).standard_normal((1, *plan.input_shape))) * 4.0
    w_dark, b_dark = _model_owner_view(plan, weights, dark)
    w_bright, b_bright = _model_owner_view(plan, weights, bright)
    assert w_dark.size == w_bright.size > 100_000 and b_dark.size == b_bright.size > 10_000  # same message sizes
    u_dark, u_bright = w_dark, w_bright
    # p-values are uniform under the simulation claim; 1e-4 keeps false alarms rare
    assert stats.kstest(u_dark, "uniform").pvalue > 1e-4
    assert stats.kstest(u_bright, "uniform").pvalue > 1e-4
    assert stats.ks_2samp(u_dark, u_bright).pvalue > 1e-4
    for view in (b_dark, b_bright):  # packed bits and tables: every byte value equally likely
        counts = np.bincount(view, minlength=256)
        assert stats.chisquare(counts).pvalue > 1e-4


@pytest.fixture(scope="module")
def issue13_plan(tmp_path_factory: pytest.TempPathFactory) -> Plan:
    """A plan with every op of issue 13: approx, softmax, mul, einsum, interp."""
    from onnx import helper

    from .onnx_models import build

    h = helper.make_node
    rng = np.random.default_rng(0)
    inits = {"w": (rng.standard_normal((2, 1, 1, 1)) * 0.5).astype(np.float32), "w1": (rng.standard_normal((1, 2, 1, 1)) * 0.5).astype(np.float32),
             "roi": np.zeros(0, np.float32), "sc": np.array([1, 1, 2, 2], np.float32)}  # fmt: skip
    nodes = [h("Conv", ["x", "w"], ["c"]), h("Conv", ["c", "w1"], ["q"]), h("Sigmoid", ["q"], ["s"]), h("Mul", ["c", "s"], ["g"]),
             h("Softmax", ["g"], ["p"], axis=-1), h("Transpose", ["g"], ["t"], perm=[0, 1, 3, 2]), h("MatMul", ["p", "t"], ["m"]),
             h("Tanh", ["m"], ["a"]), h("Resize", ["a", "roi", "sc"], ["y"], mode="linear")]  # fmt: skip
    path = build(tmp_path_factory.mktemp("i13") / "m.onnx", nodes, inits, [1, 1, 4, 4])
    return compile_model(path)[0]


def _node_of(raw: dict, op: str) -> dict:
    return next(n for n in raw["nodes"] if n["op"] == op)


@pytest.mark.parametrize("mutate, rule", [
    (lambda raw: _node_of(raw, "approx")["attrs"]["knots"].reverse(), "increasing knots"),
    (lambda raw: _node_of(raw, "approx")["attrs"]["knots"].__setitem__(0, -9.2501), "on the 2^-6 grid"),
    (lambda raw: _node_of(raw, "approx")["attrs"]["coeffs"][1].append(0.0), "same number of coefficients"),
    (lambda raw: _node_of(raw, "approx")["attrs"].__setitem__("coeffs", [[0.0, 1.0]] * 100), "one coefficient list per interval"),
    (lambda raw: _node_of(raw, "approx")["attrs"].__setitem__("fn", "exp"), "fn must be one of"),
    (lambda raw: _node_of(raw, "softmax")["attrs"].__setitem__("axis", 5), "softmax axis 5"),
    (lambda raw: _node_of(raw, "einsum")["attrs"].__setitem__("equation", "abc,acd->zbd"), "einsum equation"),
    (lambda raw: _node_of(raw, "einsum")["attrs"].__setitem__("equation", "abc,abd->abcd"), "declared shape"),
    (lambda raw: _node_of(raw, "mul")["inputs"].reverse(), "must broadcast to the first"),
    (lambda raw: _node_of(raw, "interp")["attrs"]["taps"][0][0].__setitem__(0, 4), "outside [0, 4)"),
    (lambda raw: _node_of(raw, "interp")["attrs"]["weights"][0].append([0.5] * 8), "same length"),
    (lambda raw: _node_of(raw, "interp")["attrs"].update(taps=[[[0] * 8] * 4] * 2 + [[[0] * 8] * 4], weights=[[[0.5] * 8] * 4] * 3),
     "tap lists"),
    (lambda raw: raw.__setitem__("ring_bits", 48), "needs ring_bits 64"),
], ids=["knots-order", "knot-grid", "ragged-coeffs", "too-many-intervals", "unknown-fn", "softmax-axis", "einsum-batch-letter",
        "einsum-shape", "mul-broadcast", "interp-taps", "interp-weights", "interp-rank", "narrow-ring-polynomial"])  # fmt: skip
def test_crafted_issue13_attributes_are_refused(issue13_plan: Plan, mutate, rule) -> None:
    """A hostile model owner's tables, equations and taps are checked like every attribute:
    they decide which masks are drawn and how large, so nothing unchecked reaches a protocol."""
    raw = _raw(issue13_plan)
    parse_plan(json.dumps(raw), [1, 4, 4])  # the honest plan passes
    mutate(raw)
    with pytest.raises(PlanError, match=rule.replace("[", r"\[").replace("^", r"\^").replace("(", r"\(").replace(")", r"\)")):
        parse_plan(json.dumps(raw), [1, 4, 4])


def test_interpolation_tap_combinations_are_capped() -> None:
    """Each combination of taps is one gather of the whole output: 4 taps on 4 axes (256) would
    multiply the data owner's work and memory by 256; tricubic (64) is the most allowed."""
    from privmed.ir.shapes import ShapeError, infer_shape

    def attrs(axes: int) -> dict:
        return {"taps": [[[0, 1]] * 4] * axes, "weights": [[[0.25, 0.25]] * 4] * axes}

    assert infer_shape("interp", [[1, 4, 4, 4]], attrs(3)) == [1, 2, 2, 2]
    with pytest.raises(ShapeError, match="256 tap combinations"):
        infer_shape("interp", [[1, 4, 4, 4, 4]], attrs(4))


def test_model_owner_view_with_smooth_activations_and_softmax_is_uniform(tmp_path: Path) -> None:
    """The same simulation check for the issue-13 protocols (one opening per element for all
    knots, shared truth tables, Beaver cubics, the softmax's max tree and Newton steps): every
    word the model owner receives is uniform and its distribution does not depend on the image
    (all zeros, i.e. every element exactly on a knot, vs. large values)."""
    from onnx import helper
    from scipy import stats

    from .onnx_models import build

    h = helper.make_node
    nodes = [h("Sigmoid", ["x"], ["s"]), h("Softmax", ["s"], ["p"], axis=-1), h("Mul", ["p", "one"], ["y"])]
    path = build(tmp_path / "act.onnx", nodes, {"one": np.ones((1, 2, 1, 1), np.float32)}, [1, 2, 48, 48])
    rng = np.random.default_rng(4)
    plan, weights = compile_model(path, calibration=rng.standard_normal((1, 2, 48, 48)) * 4.0)
    dark = np.zeros((1, 2, 48, 48))
    bright = np.abs(rng.standard_normal((1, 2, 48, 48))) * 4.0
    w_dark, b_dark = _model_owner_view(plan, weights, dark)
    w_bright, b_bright = _model_owner_view(plan, weights, bright)
    assert w_dark.size == w_bright.size > 50_000 and b_dark.size == b_bright.size > 10_000
    u_dark, u_bright = w_dark, w_bright
    assert stats.kstest(u_dark, "uniform").pvalue > 1e-4
    assert stats.kstest(u_bright, "uniform").pvalue > 1e-4
    assert stats.ks_2samp(u_dark, u_bright).pvalue > 1e-4
    for view in (b_dark, b_bright):
        assert stats.chisquare(np.bincount(view, minlength=256)).pvalue > 1e-4


@pytest.mark.parametrize("drop, rule", [(None, "comparison window"), (2, "comparison window"), (61, "drop must be")],
                         ids=["drop-at-bits", "drop-off-chunk", "drop-out-of-range"])  # fmt: skip
def test_crafted_maxpool_comparison_window_is_refused(tmp_path: Path, drop, rule) -> None:
    """A max-pool before its ReLU compares from bit ``drop`` up (the compiler sets drop = f for
    a pool at 2f); a plan whose window is empty, not whole 4-bit chunks or out of range is
    refused before the data owner draws a mask or sends anything but the abort."""
    from onnx import helper

    from .onnx_models import build, rand

    h = helper.make_node
    model = build(tmp_path / "stem.onnx", [
        h("Conv", ["x", "w"], ["c"], pads=[1, 1, 1, 1]), h("Relu", ["c"], ["r"]),
        h("MaxPool", ["r"], ["y"], kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1]),
    ], {"w": rand(np.random.default_rng(2), 2, 1, 3, 3)}, [1, 1, 8, 8])  # fmt: skip
    plan = compile_model(model)[0]
    raw = _raw(plan)
    pool = _node_of(raw, "maxpool")["attrs"]
    assert pool["drop"] == plan.frac_bits  # the honest plan: the pool runs before its ReLU, at 2f
    parse_plan(json.dumps(raw), plan.input_shape)
    pool["drop"] = pool["bits"] if drop is None else (pool["bits"] - drop if drop == 2 else drop)
    _refused(raw, _image(plan), rule)
