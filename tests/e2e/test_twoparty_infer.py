"""The two-party mode end to end: `privmed infer --parties 2` runs the shipped demo model with two
processes (this CLI process as the data owner, one model-owner process) over mutual TLS on
127.0.0.1, no dealer, and matches onnxruntime.

Tolerance: f = 16 fractional bits; each of the 4 ReLU layers adds at most 2 ulp (both
truncations floor or floor - 1, the comparison ignoring bits below the shift), amplified by the
next layers' weights, and weights and input are rounded to 2^-17: the dealer mode measures
8e-5 and this mode 5e-5 on the output probabilities (2026-11-30). The bound 2e-3 is 1/4 (the
sigmoid's largest slope) of an 8e-3 logit error, about 500 ulp: far above both, far below any
wrong comparison (a sign flip of a ReLU input above 2^-16 moves a logit by its full value).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

from .conftest import export_gated_vit

pytest.importorskip("tenseal", reason="tenseal not installed: pip install 'privmed[twoparty]'")

DEMO = Path(__file__).resolve().parents[2] / "src/privmed/assets/models/chest_smallcnn.onnx"


def test_demo_model_two_processes_no_dealer_matches_onnxruntime(tmp_path: Path) -> None:
    x = np.random.default_rng(0).standard_normal((1, 1, 64, 64)).astype(np.float32)
    np.save(tmp_path / "x.npy", x)
    cmd = [sys.executable, "-m", "privmed.cli.main", "infer", "--parties", "2", "--model", str(DEMO), "--input",
           str(tmp_path / "x.npy"), "--output", str(tmp_path / "y.npy"), "--stats", str(tmp_path / "stats.json"), "--timeout", "60"]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, f"{proc.stdout}\n{proc.stderr}"

    sess = ort.InferenceSession(str(DEMO), providers=["CPUExecutionProvider"])
    want = sess.run(None, {sess.get_inputs()[0].name: x})[0]
    got = np.load(tmp_path / "y.npy")
    np.testing.assert_allclose(got, want, rtol=0, atol=2e-3)
    stats = json.loads((tmp_path / "stats.json").read_text())
    assert set(stats["bytes_sent"]) == {"data-owner", "model-owner"}  # nobody else took part
    assert stats["offline_bytes"] > 0 and stats["offline_s"] > 0 and stats["rounds"] > 0
    assert "offline" in proc.stdout and "plan " in proc.stdout


def test_two_party_session_file_with_a_dealer_is_refused(tmp_path: Path) -> None:
    from privmed.errors import ConfigError
    from privmed.runtime.twoparty_launch import load_config_2p

    text = ('[session]\nca = "ca.pem"\n[data-owner]\ncert = "d.pem"\nkey = "d.key"\n'
            '[model-owner]\nhost = "127.0.0.1"\nport = 7100\ncert = "m.pem"\nkey = "m.key"\n')  # fmt: skip
    (tmp_path / "ok.toml").write_text(text)
    cfg = load_config_2p(tmp_path / "ok.toml")
    assert set(cfg.identities) == {"data-owner", "model-owner"} and cfg.endpoints["model-owner"].port == 7100
    (tmp_path / "three.toml").write_text(text + '[dealer]\nhost = "h"\nport = 1\ncert = "x"\nkey = "y"\n')
    with pytest.raises(ConfigError, match=r"has no \[dealer\] table"):
        load_config_2p(tmp_path / "three.toml")


@pytest.mark.slow
def test_validate_two_parties_stores_results_without_a_dealer(tmp_path: Path) -> None:
    """`privmed validate --parties 2` on 2 images of the shipped demo study: stored outputs
    within 1e-3 of plaintext (the dealer mode's validation bound, test_validate_engine), costs
    recorded for the two roles only."""
    from privmed.cli.main import main
    from privmed.data.datasets import demo_study_path
    from privmed.evaluate.store import ResultStore

    out = tmp_path / "results"
    rc = main(["validate", "--parties", "2", "--model", str(DEMO), "--data", str(demo_study_path()), "--out", str(out),
               "--limit", "2", "--no-report"])  # fmt: skip
    assert rc == 0
    with ResultStore.open(out, create=False) as store:
        rows = list(store.rows())
    assert len(rows) == 2
    for r in rows:
        assert set(r.bytes_by_role) == {"data-owner", "model-owner"} and r.rounds and r.rounds > 0
        np.testing.assert_allclose(r.secure_output, r.plain_output, atol=1e-3)


@pytest.mark.slow
def test_gated_vit_two_parties_matches_onnxruntime(tmp_path: Path) -> None:
    """The gated ViT of ``test_infer_transformer`` (LayerNorm, GELU, softmax inside, Q K^T and
    P V, a Sigmoid gate) through `privmed infer --parties 2`: the wide ring, Beaver products and
    matrix triples from OT. Tolerance as there, 2e-3 (measured 2.9e-4, 2026-11-30)."""
    pytest.importorskip("einops")
    path = export_gated_vit(tmp_path / "gated_vit.onnx")
    x = np.random.default_rng(0).standard_normal((1, 1, 32, 32)).astype(np.float32)
    np.save(tmp_path / "x.npy", x)
    cmd = [sys.executable, "-m", "privmed.cli.main", "infer", "--parties", "2", "--model", str(path), "--input",
           str(tmp_path / "x.npy"), "--output", str(tmp_path / "y.npy"), "--stats", str(tmp_path / "s.json")]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"{proc.stdout}\n{proc.stderr}"
    ref = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"image": x})[0]
    np.testing.assert_allclose(np.load(tmp_path / "y.npy"), ref, rtol=0, atol=2e-3)
    ops = {layer["op"] for layer in json.loads((tmp_path / "s.json").read_text())["layers"]}
    assert {"approx", "softmax", "einsum", "mul", "instnorm"} <= ops
