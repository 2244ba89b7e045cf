"""`privmed attack invert` / `report` as a user runs them, on a tiny synthetic study."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

PRIVMED = [sys.executable, "-m", "privmed.cli.main"]
ENV_THREADS = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def _run(*args: str, timeout: float = 240) -> subprocess.CompletedProcess[str]:
    import os

    env = {**os.environ, **ENV_THREADS}
    return subprocess.run([*PRIVMED, *args], capture_output=True, text=True, timeout=timeout, env=env)


@pytest.fixture(scope="module")
def study(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from privmed.data.synth import synth_chest_study

    return synth_chest_study(tmp_path_factory.mktemp("attack") / "study", sites=3, n_per_site=12, size=16, seed=0)


def test_invert_grid_writes_scores_grids_and_report(study: Path, tmp_path: Path):
    # Prepare: a federate report without DP and one with, for the AUROC cost column.
    runs = []
    for name, dp, auroc in [("plain", False, 0.89), ("dp", True, 0.69)]:
        path = tmp_path / f"{name}.json"
        path.write_text(json.dumps({
            "format": "privmed-federated-report", "version": 1,
            "config": {"model": "small-cnn", "secagg": True, "dp": dp},
            "final": {"pooled_auroc_macro": auroc},
            "privacy": {"site_a": {"noise_multiplier": 0.5, "epsilon": 8.0}} if dp else None,
            "baselines": None,
        }))
        runs += ["--federate-report", str(path)]
    out = tmp_path / "attack"
    # Execute
    result = _run(
        "attack", "invert", "--model", "small-cnn", "--features", "8,16", "--image-size", "16",
        "--data", str(study), "--batch-size", "1,2", "--dp-sigma", "0,0.5", "--secagg-sites", "1,3",
        "--iterations", "20", "--restarts", "1", "--scales", "2,1", "--out", str(out), *runs,
    )
    # Assert
    assert result.returncode == 0, result.stderr
    assert "[8/8] batch 2 sigma 0.5" in result.stderr and "done: 8 configurations" in result.stderr
    body = json.loads((out / "attack.json").read_text())
    assert body["complete"] and len(body["configurations"]) == 8
    ids = {c["id"] for c in body["configurations"]}
    assert ids == {f"b{b}-sigma{s}-sites{k}" for b in (1, 2) for s in ("0", "0.5") for k in (1, 3)}
    for config in body["configurations"]:
        assert config["n_images"] == config["batch_size"] * config["secagg_sites"] == len(config["images"])
        assert (config["epsilon_round"] is None) == (config["dp_sigma"] == 0)
        assert 0.0 <= config["label_count_accuracy"] <= 1.0
        assert set(config["summary"]) >= {"mse", "psnr", "ssim", "ssim_prior", "leakage", "residual_correlation_site_mean"}
        # one image per site and no DP: its head input is read exactly off the update
        if config["batch_size"] == 1 and config["secagg_sites"] == 1 and config["dp_sigma"] == 0:
            assert config["head_input_error"] < 1e-4
        assert (out / config["grid"]).is_file()
        # three sites -> images from three different sites
        assert len({image["site"] for image in config["images"]}) == config["secagg_sites"]
    assert body["federate"][1]["auroc_cost"] == pytest.approx(0.2)
    for name in ("report.md", "report.html", "curves.png"):
        assert (out / name).is_file()
    # Rebuilding the report without federate runs works from attack.json alone.
    again = _run("attack", "report", str(out))
    assert again.returncode == 0, again.stderr


def test_bad_requests_fail_with_one_line(study: Path, tmp_path: Path):
    too_many = _run("attack", "invert", "--model", "small-cnn", "--features", "8,16", "--image-size", "16",
                    "--data", str(study), "--batch-size", "1", "--dp-sigma", "0", "--secagg-sites", "4",
                    "--iterations", "2", "--out", str(tmp_path / "a"))
    assert too_many.returncode == 2
    assert too_many.stderr.strip().splitlines()[-1] == "privmed: error: secagg sites: the study has 3 sites, asked for 4"
    weak = _run("attack", "invert", "--model", "small-cnn", "--data", str(study), "--dp-sigma", "0.1",
                "--out", str(tmp_path / "b"))
    assert weak.returncode == 2 and "refuses noise multipliers in (0, 0.3)" in weak.stderr
    missing = _run("attack", "invert", "--model", "small-cnn", "--data", str(tmp_path / "nothing"),
                   "--out", str(tmp_path / "c"))
    last = missing.stderr.strip().splitlines()[-1]
    assert missing.returncode == 2 and last.startswith("privmed: error:") and "nothing" in last


def test_report_renders_in_headless_chromium(study: Path, tmp_path: Path):
    from .browser import assert_text_and_plots, screenshot

    out = tmp_path / "attack"
    result = _run(
        "attack", "invert", "--model", "small-cnn", "--features", "8,16", "--image-size", "16",
        "--data", str(study), "--batch-size", "1", "--dp-sigma", "0,1", "--iterations", "20",
        "--restarts", "1", "--scales", "1", "--out", str(out),
    )
    assert result.returncode == 0, result.stderr
    img = screenshot(out / "report.html", tmp_path, size=(1280, 2400))
    assert img.shape == (2400, 1280, 3)
    assert_text_and_plots(img)
