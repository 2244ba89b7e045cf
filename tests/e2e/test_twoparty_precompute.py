"""``privmed party --parties 2 --precompute N --store DIR`` with two processes over mutual TLS:
N = 2 sets made before any image exists, then two sessions that each run one image online only
on a stored set, and a third that finds the store empty and computes its offline phase inline,
saying so in one line. A data owner whose store was restored from a copy is refused by the
model owner, naming its store.

Tolerance 2e-3 on the demo model's probabilities, as ``test_twoparty_infer`` (a stored set is
the same protocol as the inline offline phase, only made earlier).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

from tests.e2e.conftest import CertSet, PartyRun, free_port
from tests.e2e.test_twoparty_faults import write_session_2p

pytest.importorskip("tenseal", reason="tenseal not installed: pip install 'privmed[twoparty]'")

DEMO = Path(__file__).resolve().parents[2] / "src/privmed/assets/models/chest_smallcnn.onnx"
PARTIES = ("--parties", "2")


def _run(tmp_path: Path, name: str, pki: CertSet, mo_args: list, do_args: list) -> PartyRun:
    """One session (both roles by ``privmed party``) to its end; fails with both stderrs."""
    work = tmp_path / name
    work.mkdir()
    run = PartyRun(work, write_session_2p(work / "session.toml", pki, free_port(), timeout_s=30.0))
    try:
        run.start("model-owner", *PARTIES, "--model", DEMO, *mo_args)
        run.start("data-owner", *PARTIES, *do_args, "--stats", work / "stats.json", progress=False)
        ended = run.wait_exits(("data-owner", "model-owner"), 120.0)
    finally:
        run.kill_all()
    assert all(t is not None for t in ended.values()), run.report()
    return run


def test_precompute_two_sets_then_two_online_only_sessions_and_a_fallback(tmp_path: Path, session_ca: CertSet) -> None:
    x = np.random.default_rng(3).standard_normal((1, 1, 64, 64)).astype(np.float32)
    np.save(tmp_path / "x.npy", x)
    sess = ort.InferenceSession(str(DEMO), providers=["CPUExecutionProvider"])
    want = sess.run(None, {sess.get_inputs()[0].name: x})[0]
    do_store, mo_store = tmp_path / "do-store", tmp_path / "mo-store"

    pre = _run(tmp_path, "pre", session_ca, ["--precompute", "2", "--store", mo_store], ["--precompute", "2", "--store", do_store])
    assert pre.code("data-owner") == 0 and pre.code("model-owner") == 0, pre.report()
    assert "precomputed 2 sets of 1 image(s) into" in pre.stderr("data-owner"), pre.report()
    pre_stats = json.loads((tmp_path / "pre" / "stats.json").read_text())
    assert pre_stats["offline_bytes"] > 1_000_000 and pre_stats["online_s"] == 0
    shutil.copytree(do_store, tmp_path / "do-copy")

    session = ["--input", tmp_path / "x.npy", "--store", do_store]
    for i in range(3):
        run = _run(tmp_path, f"s{i}", session_ca, ["--store", mo_store], [*session, "--output", tmp_path / f"y{i}.npy"])
        assert run.code("data-owner") == 0 and run.code("model-owner") == 0, run.report()
        np.testing.assert_allclose(np.load(tmp_path / f"y{i}.npy"), want, rtol=0, atol=2e-3)
        stats = json.loads((tmp_path / f"s{i}" / "stats.json").read_text())
        err = run.stderr("data-owner")
        if i < 2:  # online only
            assert f"1 of 1 batches ran on precomputed sets (online only), {1 - i} sets left" in err, run.report()
            assert stats["precomputed_batches"] == 1 and stats["offline_bytes"] < 1000 and stats["online_bytes"] > 0
            assert not (do_store / f"set-{i:04d}.npz").exists() and not (mo_store / f"set-{i:04d}.npz").exists()
        else:  # the store is empty: inline, in one line
            notes = [line for line in err.splitlines() if "offline phase computed inline" in line]
            assert len(notes) == 1 and "has no precomputed set left (2 used)" in notes[0], run.report()
            assert stats["precomputed_batches"] == 0 and stats["offline_bytes"] > 1_000_000

    # the data owner's store restored from its copy: the model owner refuses set 0 a second time
    run = _run(tmp_path, "again", session_ca, ["--store", mo_store],
               ["--input", tmp_path / "x.npy", "--store", tmp_path / "do-copy", "--output", tmp_path / "again.npy"])  # fmt: skip
    assert run.code("data-owner") not in (None, 0) and run.code("model-owner") not in (None, 0), run.report()
    assert "which this party already used; a correlation is never used twice" in run.message("model-owner")
    assert "mo-store/store.json" in run.message("data-owner")
    assert not (tmp_path / "again.npy").exists()


def test_privmed_infer_precompute_then_store(tmp_path: Path) -> None:
    """The local form: ``privmed infer --parties 2 --precompute 1 --store DIR`` (no input), then
    ``--store DIR`` runs online only and a second run falls back inline, saying so once."""
    x = np.random.default_rng(4).standard_normal((1, 1, 64, 64)).astype(np.float32)
    np.save(tmp_path / "x.npy", x)
    base = [sys.executable, "-m", "privmed.cli.main", "infer", "--parties", "2", "--model", str(DEMO), "--store", str(tmp_path / "st")]
    pre = subprocess.run([*base, "--precompute", "1"], capture_output=True, text=True, timeout=240)
    assert pre.returncode == 0 and "precomputed 1 sets of 1 image(s)" in pre.stdout, pre.stdout + pre.stderr
    assert sorted(p.name for p in (tmp_path / "st").iterdir()) == ["data-owner", "model-owner", "pki"]
    sess = ort.InferenceSession(str(DEMO), providers=["CPUExecutionProvider"])
    want = sess.run(None, {sess.get_inputs()[0].name: x})[0]
    for i, expect in enumerate(["1 of 1 batches ran on precomputed sets (online only), 0 sets left", "offline phase computed inline"]):
        run = subprocess.run([*base, "--input", str(tmp_path / "x.npy"), "--output", str(tmp_path / f"y{i}.npy"),
                              "--stats", str(tmp_path / f"s{i}.json")], capture_output=True, text=True, timeout=240)  # fmt: skip
        assert run.returncode == 0 and expect in run.stdout, run.stdout + run.stderr
        np.testing.assert_allclose(np.load(tmp_path / f"y{i}.npy"), want, rtol=0, atol=2e-3)
        stats = json.loads((tmp_path / f"s{i}.json").read_text())
        assert stats["precomputed_batches"] == (1 - i) and stats["online_bytes"] > 0
    assert "offline from the store" not in run.stdout  # the summary of the inline run shows its own offline phase
