"""`privmed federate simulate` end to end (Flower simulation engine), and one-line errors."""

from __future__ import annotations

import csv
import json
import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

PRIVMED = [sys.executable, "-m", "privmed.cli.main"]
ENV = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
TINY = ["--model", "small-cnn", "--recipe", "end-to-end", "--features", "8,16,16", "--image-size", "32",
        "--batch-size", "8"]


@pytest.fixture(scope="module")
def study(tmp_path_factory) -> Path:
    from privmed.data.synth import synth_chest_study

    return synth_chest_study(tmp_path_factory.mktemp("fed") / "study", sites=3, n_per_site=24, size=32, seed=3)


def test_simulate_3_sites_2_rounds_secagg_dp(study, tmp_path):
    out = tmp_path / "run"
    cmd = [*PRIVMED, "federate", "simulate", "--data", str(study), *TINY, "--rounds", "2", "--secagg",
           "--dp-epsilon", "8", "--dp-delta", "1e-3", "--max-grad-norm", "1.0", "--cpus", "1", "--out", str(out)]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, env=ENV, timeout=420)
    assert proc.returncode == 0, proc.stderr[-3000:]

    # every round line carries the six DP numbers of every site
    round_lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("round ")]
    assert [ln.split(":")[0] for ln in round_lines] == ["round 1", "round 2"]
    dp_fields = r"epsilon=[\d.]+ delta=0\.001 noise_multiplier=[\d.]+ clipping_norm=1 sample_rate=[\d.]+ steps=\d+"
    for line in round_lines:
        assert len(re.findall(dp_fields, line)) == 3, line

    report = json.loads((out / "report.json").read_text())
    sites = ["site_a", "site_b", "site_c"]
    assert report["status"]["state"] == "complete"
    assert [r["round"] for r in report["rounds"]] == [1, 2]
    for r in report["rounds"]:
        assert sorted(r["sites"]) == sites and 0 <= r["pooled_auroc_macro"] <= 1
        assert sorted(r["privacy"]) == sites
    for p in report["privacy"].values():
        assert 0 < p["epsilon"] <= 8.0 and p["noise_multiplier"] >= 0.3 and p["steps"] > 0
    assert set(report["baselines"]) == {"central", "local_only"}
    assert sorted(report["baselines"]["local_only"]["sites"]) == sites
    assert (out / "report.md").read_text().startswith("# Federated run")
    assert "<table>" in (out / "report.html").read_text()
    # the self-contained page (tables + embedded AUROC/epsilon curves) as a browser draws it
    from .browser import assert_text_and_plots, screenshot

    assert (out / "curves.png").is_file()
    assert_text_and_plots(screenshot(out / "report.html", tmp_path))

    # the exported model = the last checkpoint + sigmoid (oracle: torch on the same weights)
    import onnxruntime as ort
    import torch

    from privmed.data.preprocess import Preprocess, load_for_model
    from privmed.federated.arrays import set_arrays
    from privmed.federated.checkpoint import RunDir

    run = RunDir(out)
    cfg = run.stored_config()
    _, weights, _ = run.load_round(2)
    model = cfg.build_model()
    set_arrays(model, weights)
    model.eval()
    image = next((study / "images").iterdir())
    x = load_for_model(image, Preprocess.load(out / "model.preprocess.json"))
    with torch.no_grad():
        expected = torch.sigmoid(model(torch.from_numpy(x))).numpy()
    session = ort.InferenceSession(str(out / "model.onnx"))
    got = session.run(None, {"input": x.astype(np.float32)})[0]
    np.testing.assert_allclose(got, expected, atol=1e-5)
    props = {p.key: p.value for p in __import__("onnx").load(str(out / "model.onnx")).metadata_props}
    assert json.loads(props["privmed.labels"]) == report["labels"]

    # the hospital can run the federated (GroupNorm, DP) model securely as it is exported
    secure = tmp_path / "secure.npy"
    proc = subprocess.run([*PRIVMED, "infer", "--model", str(out / "model.onnx"), "--input", str(image),
                           "--output", str(secure)], capture_output=True, text=True, env=ENV, timeout=120)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    # Logit error of the secure GroupNorm (Newton rsqrt in fixed point) measured <= 2e-4 on
    # these small CNNs; the sigmoid's slope is <= 1/4, so outputs differ by <= 5e-5 (measured
    # 3.2e-5 on the 64x64 benchmark model). 5e-4 leaves a 10x margin for other seeds.
    np.testing.assert_allclose(np.load(secure), got, atol=5e-4)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _error_line(capsys, argv: list[str]) -> str:
    from privmed.cli.main import main

    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("privmed: error: "), err
    return err[0]


def test_bad_inputs_are_one_line_errors(study, tmp_path, capsys):
    # a study in which one site has a single image
    lopsided = tmp_path / "lopsided"
    (lopsided / "images").mkdir(parents=True)
    with open(study / "labels.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    rows.append({**rows[0], "Image Index": "99999999_000.png", "site": "site_d"})
    for row in rows:
        (lopsided / "images" / row["Image Index"]).write_bytes((study / "images" / rows[0]["Image Index"]).read_bytes())
    with open(lopsided / "labels.csv", "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    base = ["federate", "simulate", *TINY, "--rounds", "1", "--out", str(tmp_path / "r")]
    assert "site 'site_d' has 1 images" in _error_line(capsys, [*base, "--data", str(lopsided)])
    assert "epsilon" in _error_line(capsys, [*base, "--data", str(study), "--dp-epsilon", "1000"])
    assert "clipping norm" in _error_line(capsys, [*base, "--data", str(study), "--dp-epsilon", "4",
                                                   "--max-grad-norm", "0"])  # fmt: skip
    assert not (tmp_path / "r" / "report.json").exists()

    from privmed.federated.deploy import generate_certificates

    ca = generate_certificates(tmp_path / "certs")["ca"]
    closed = f"127.0.0.1:{_free_port()}"
    site = ["federate", "site", "--ca", str(ca), "--data", str(study), "--state", str(tmp_path / "st"), "--wait", "1"]
    assert "has no images" in _error_line(capsys, [*site, "--superlink", closed, "--site", "nowhere"])
    line = _error_line(capsys, [*site, "--superlink", closed, "--site", "site_a"])
    assert f"SuperLink at {closed}: unreachable" in line
    run = ["federate", "run", "--superlink", closed, "--ca", str(ca), "--sites", "a,b,c", "--labels", "x",
           *TINY, "--rounds", "1", "--wait", "1", "--out", str(tmp_path / "d")]  # fmt: skip
    assert "unreachable" in _error_line(capsys, run)
