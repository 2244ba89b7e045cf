"""Precomputed two-party correlations (``--precompute`` / ``--store``) in process: a store of 2
sets made before any input, used once each by later sessions whose output equals the inline
session's; files private and deleted when used; a set used twice, a set whose arrays or
binding were altered refused in one line naming the file; stores that do not match the
session (other plan, other peer, other batch size, empty) fall back to the inline offline
phase with a one-line note.

The model: the shipped demo (``chest_smallcnn.onnx``, 1x64x64). Tolerance against the inline
two-party output: both are the same protocol on the same plan, differing only in the random
masks and in each truncation's floor-or-floor-1 (``compare.truncate``), so within the bound of
``test_twoparty_session`` (64 ulp of the fixed-point output, applied to probabilities through
a sigmoid whose slope is at most 1/4).
"""

from __future__ import annotations

import json
import shutil
import stat
from pathlib import Path

import numpy as np
import pytest
from onnx import helper

from privmed.compiler.compile import compile_model
from privmed.errors import ProtocolError
from privmed.ir.ops import postprocess
from privmed.ir.walk import run_plan
from privmed.net.channel import in_process_pair
from privmed.reference.executors import FixedBackend
from tests.protocol.onnx_models import build, rand
from tests.protocol.twoparty_harness import run_two

pytest.importorskip("tenseal", reason="tenseal not installed: pip install 'privmed[twoparty]'")

from privmed.mpc.twoparty.stored import StoreError  # noqa: E402
from privmed.runtime.twoparty import data_owner_2p, merge_two, model_owner_2p  # noqa: E402
from privmed.runtime.twoparty_precompute import data_owner_precompute, model_owner_precompute  # noqa: E402
from privmed.runtime.twoparty_store import Store, StoreUse, answer_offer, check_writable, open_use  # noqa: E402

H = helper.make_node
DEMO = Path(__file__).resolve().parents[2] / "src/privmed/assets/models/chest_smallcnn.onnx"
DO_CERT, MO_CERT = "sha256:" + "d" * 64, "sha256:" + "m" * 64


@pytest.fixture(scope="module")
def demo() -> tuple:
    plan, weights = compile_model(DEMO)
    x = np.random.default_rng(0).standard_normal((3, 1, 64, 64)).astype(np.float32)
    return plan, weights, x


def _precompute(root: Path, plan, weights, sets: int = 2, batch: int = 1) -> tuple[dict, dict]:
    do, mo, _ = run_two(lambda ch: data_owner_precompute(ch, root / "do", sets, batch, MO_CERT),
                        lambda ch: model_owner_precompute(ch, plan, weights, root / "mo", sets, DO_CERT), timeout_s=60)  # fmt: skip
    return do, mo


def _session(root: Path, plan, weights, x: np.ndarray, *, do_peer: str = MO_CERT, mo_peer: str = DO_CERT, chunk: int = 1,
             do_dir: str = "do", mo_dir: str = "mo") -> tuple[np.ndarray, dict, dict, StoreUse | None, StoreUse | None]:  # fmt: skip
    do_use, mo_use = open_use(root / do_dir, "data-owner", do_peer), open_use(root / mo_dir, "model-owner", mo_peer)
    parts = [x[i : i + chunk] for i in range(0, len(x), chunk)]
    try:
        (out, do_stats), mo_stats, _ = run_two(lambda ch: data_owner_2p(ch, iter(parts), total_batches=len(parts), store=do_use),
                                               lambda ch: model_owner_2p(ch, plan, weights, store=mo_use), timeout_s=60)  # fmt: skip
    finally:
        for use in (do_use, mo_use):
            if use:
                use.close()
    return out, do_stats, mo_stats, do_use, mo_use


def test_precomputed_sets_run_online_only_once_each_and_match_the_inline_session(tmp_path: Path, demo: tuple) -> None:
    plan, weights, x = demo
    do_pre, mo_pre = _precompute(tmp_path, plan, weights)
    assert do_pre["offline_bytes"] > 1_000_000 and mo_pre["offline_bytes"] > 1_000_000 and do_pre["online_s"] == 0
    for role in ("do", "mo"):
        root = tmp_path / role
        assert stat.S_IMODE(root.stat().st_mode) == 0o700
        assert sorted(p.name for p in root.iterdir()) == [".lock", "set-0000.npz", "set-0001.npz", "store.json"]
        assert all(stat.S_IMODE(p.stat().st_mode) == 0o600 for p in root.iterdir())
    ids = {json.loads((tmp_path / r / "store.json").read_text())["store"] for r in ("do", "mo")}
    assert len(ids) == 1  # both parties agreed on one id
    seeds = [np.load(tmp_path / "do" / f"set-{k:04d}.npz", allow_pickle=False)["ot.sender"] for k in (0, 1)]
    assert not np.array_equal(*seeds)  # base-OT seeds derived per set: one file says nothing of another's OTs

    inline, inline_stats, _, _, _ = _session(tmp_path, plan, weights, x[:2], do_dir="none-do", mo_dir="none-mo")
    ulp = 2.0**-plan.frac_bits
    out, do_stats, mo_stats, do_use, mo_use = _session(tmp_path, plan, weights, x[:1])
    assert do_use and mo_use and do_use.used == mo_use.used == [0] and not do_use.note
    assert do_stats["precomputed_batches"] == 1 and do_stats["offline_bytes"] < 1000 and mo_stats["offline_bytes"] < 1000
    assert do_stats["online_bytes"] == inline_stats["batches"][0]["online_bytes"]  # the same online phase
    stats = merge_two({"data-owner": do_stats, "model-owner": mo_stats}, 1.0)
    assert stats.precomputed_batches == 1 and stats.online_bytes > 0
    assert not (tmp_path / "do" / "set-0000.npz").exists() and not (tmp_path / "mo" / "set-0000.npz").exists()
    np.testing.assert_allclose(out, inline[:1], rtol=0, atol=16 * ulp)
    # two images in one session: the last set, then the store is empty and the HE/OT set-up runs inline
    out, do_stats, _, do_use, mo_use = _session(tmp_path, plan, weights, x[:2])
    assert do_use and mo_use and do_use.used == mo_use.used == [1]
    assert do_use.inline == 1 and "no precomputed set left (2 used)" in do_use.note and "\n" not in do_use.note
    first, second = do_stats["batches"]
    assert first["offline_bytes"] < 1000 < 1_000_000 < second["offline_bytes"] and do_stats["precomputed_batches"] == 1
    np.testing.assert_allclose(out, inline, rtol=0, atol=16 * ulp)
    assert sorted(p.name for p in (tmp_path / "do").iterdir()) == [".lock", "store.json"]


def test_the_wide_ring_products_and_channel_scales_run_from_a_store(tmp_path: Path) -> None:
    """Instance norm (Beaver products by OT, results extended to Z_2^64) and a PReLU (its slope
    a per-channel scale by vector COTs): every kind of stored material. Tolerance: the inline
    session's for this model (``test_twoparty_session``: rtol 3e-3 + atol 2e-3)."""
    rng = np.random.default_rng(1)
    nodes = [H("Conv", ["x", "w"], ["c"], pads=[1, 1, 1, 1]), H("InstanceNormalization", ["c", "s", "b"], ["n"]),
             H("PRelu", ["n", "slope"], ["y"])]  # fmt: skip
    inits = {"w": rand(rng, 3, 2, 3, 3), "s": rand(rng, 3) + 1.0, "b": rand(rng, 3), "slope": rand(rng, 3, 1, 1) * 0.2}
    x = rand(rng, 1, 2, 5, 5, scale=1.0)
    plan, weights = compile_model(build(tmp_path / "norm.onnx", nodes, inits, [1, 2, 5, 5]), calibration=x)
    _precompute(tmp_path, plan, weights, sets=1)
    out, do_stats, _, do_use, _ = _session(tmp_path, plan, weights, x)
    assert do_use and do_use.used == [0] and do_stats["ring_bits"] == 64 and do_stats["precomputed_batches"] == 1
    ref_ring, _ = run_plan(plan, FixedBackend(plan, weights, x.astype(np.float64)), 1)
    ref = postprocess(ref_ring, plan.node(plan.output_name).attrs.get("post", {}))
    np.testing.assert_allclose(out, ref, rtol=3e-3, atol=2e-3)


def test_a_set_used_twice_is_refused(tmp_path: Path, demo: tuple) -> None:
    plan, weights, x = demo
    _precompute(tmp_path, plan, weights, sets=1)
    shutil.copytree(tmp_path / "do", tmp_path / "do-copy")
    _session(tmp_path, plan, weights, x[:1])
    # the set file restored: refused by the owner's own record
    shutil.copy(tmp_path / "do-copy" / "set-0000.npz", tmp_path / "do" / "set-0000.npz")
    with pytest.raises(StoreError, match=r"do/set-0000\.npz: set 0 of store \w+ was already used; a correlation is never used twice"):
        Store.open(tmp_path / "do", "data-owner")
    # the whole directory restored (its record too): refused by the peer's record
    with pytest.raises(RuntimeError, match=r"mo/store\.json: the data owner offered set 0 of store \w+, which this party already used"):
        _session(tmp_path, plan, weights, x[:1], do_dir="do-copy")
    # and precomputing over unused sets is refused before connecting
    with pytest.raises(StoreError, match=r"do-copy: holds 1 unused precomputed sets"):
        check_writable(tmp_path / "do-copy")


def _rewrite(path: Path, change) -> None:
    with np.load(path, allow_pickle=False) as npz:
        arrays = {k: npz[k] for k in npz.files}
    change(arrays)
    path.unlink()
    np.savez(path, **arrays)


def test_a_tampered_set_is_refused_naming_the_file(tmp_path: Path, demo: tuple) -> None:
    plan, weights, x = demo
    _precompute(tmp_path, plan, weights, sets=2)
    shutil.copytree(tmp_path / "do", tmp_path / "do2")

    def shorter(arrays: dict) -> None:
        arrays["0.mask"] = arrays["0.mask"][..., :-1]

    _rewrite(tmp_path / "do" / "set-0000.npz", shorter)
    with pytest.raises(RuntimeError, match=r"do/set-0000\.npz: array 0\.mask is uint64 \(1, 1, 64, 63\), the plan implies uint64 \(1, 1, 64, 64\)"):
        _session(tmp_path, plan, weights, x[:1])

    def other_plan(arrays: dict) -> None:
        meta = json.loads(bytes(arrays["meta"]))
        arrays["meta"] = np.frombuffer(json.dumps(meta | {"plan": "0" * 64}).encode(), np.uint8)

    _rewrite(tmp_path / "do2" / "set-0000.npz", other_plan)
    with pytest.raises(RuntimeError, match=r"do2/set-0000\.npz: bound to plan '0000000000.*', its store .*store\.json says"):
        _session(tmp_path, plan, weights, x[:1], do_dir="do2")
    assert (tmp_path / "mo" / "set-0000.npz").exists()  # refused before the model owner used its half


@pytest.mark.parametrize("case", ["batch", "peer", "plan"])
def test_a_store_that_does_not_match_falls_back_in_one_line(tmp_path: Path, demo: tuple, case: str) -> None:
    plan, weights, x = demo
    _precompute(tmp_path, plan, weights, sets=1)
    kwargs: dict = {}
    if case == "batch":
        x, kwargs = x[:2], {"chunk": 2}
        want = "holds sets of batch size 1, this batch has 2"
    elif case == "peer":
        kwargs = {"do_peer": "sha256:" + "e" * 64}
        want = "was precomputed with another peer"
    else:
        plan2, weights2 = compile_model(DEMO, frac_bits=plan.frac_bits - 1)
        plan, weights = plan2, weights2
        want = "was precomputed for plan"
    out, do_stats, mo_stats, do_use, mo_use = _session(tmp_path, plan, weights, x[:1] if case != "batch" else x, **kwargs)
    assert do_use and want in do_use.note and do_use.note.endswith("offline phase computed inline") and "\n" not in do_use.note
    assert do_stats["precomputed_batches"] == 0 and do_stats["offline_bytes"] > 1_000_000
    assert (tmp_path / "do" / "set-0000.npz").exists() and (tmp_path / "mo" / "set-0000.npz").exists()  # kept for a matching session
    assert out.shape[0] == (2 if case == "batch" else 1)


def test_one_session_at_a_time_per_store_and_a_wild_offer_is_refused(tmp_path: Path) -> None:
    binding = {"store": "ab" * 16, "role": "model-owner", "plan": "0" * 64, "peer": DO_CERT, "batch": 1, "bits": 42, "he_bits": 42}
    Store.create(tmp_path / "mo", binding).close()
    use = open_use(tmp_path / "mo", "model-owner", DO_CERT)
    try:
        with pytest.raises(StoreError, match=r"mo: in use by another session"):
            open_use(tmp_path / "mo", "model-owner", DO_CERT)
        ch0, ch1 = in_process_pair("data-owner", "model-owner", bytes(16), 5.0)
        ch0.send("store/offer", np.frombuffer(bytes(16) + np.array([1 << 40], "<i8").tobytes(), np.uint8))
        with pytest.raises(ProtocolError, match=r"data-owner offered precomputed set 1099511627776: expected 0\.\.9999"):
            answer_offer(ch1, use, {}, lambda *a: None)
    finally:
        assert use is not None
        use.close()
    open_use(tmp_path / "mo", "model-owner", DO_CERT).close()  # released
