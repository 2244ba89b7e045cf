"""Attack report: AUROC cost from privmed federate reports, curves, Markdown and HTML."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest

from privmed.attacks.grid import pair_grid, write_pair_grid
from privmed.attacks.report import THREATS, auroc_costs, read_federate_report, write_report
from privmed.errors import InputError


def _federate_report(path, *, dp: bool, auroc: float, sigma: float | None = None, central: float = 0.92):
    privacy = {s: {"epsilon": 7.9, "noise_multiplier": sigma} for s in ("site_a", "site_b")} if dp else None
    body = {
        "format": "privmed-federated-report", "version": 1,
        "config": {"model": "small-cnn", "secagg": True, "dp": dp},
        "final": {"round": 10, "pooled_auroc_macro": auroc},
        "privacy": privacy,
        "baselines": {"central": {"pooled_auroc_macro": central}},
    }
    path.write_text(json.dumps(body))
    return path


def _record(b: int, sigma: float, sites: int, leakage: float, grid: str) -> dict:
    summary = {"mse": 0.01, "psnr": 20.0, "ssim": 0.5, "ssim_prior": 0.6, "leakage": leakage, "ssim_max": 0.6,
               "residual_correlation": 0.25}
    return {
        "id": f"b{b}-sigma{sigma:g}-sites{sites}", "batch_size": b, "dp_sigma": sigma, "secagg_sites": sites,
        "n_images": b * sites, "epsilon_round": None if sigma == 0 else 10.7, "labels": "recovered",
        "label_count_accuracy": 1.0, "summary": summary, "images": [], "grid": grid, "seconds": 1.0,
    }


def test_auroc_cost_is_against_the_run_without_dp(tmp_path):
    plain = read_federate_report(_federate_report(tmp_path / "a.json", dp=False, auroc=0.890))
    private = read_federate_report(_federate_report(tmp_path / "b.json", dp=True, auroc=0.688, sigma=1.03))
    costs = {r["path"]: r for r in auroc_costs([plain, private])}
    assert costs[str(tmp_path / "b.json")]["auroc_cost"] == pytest.approx(0.202)
    assert costs[str(tmp_path / "b.json")]["noise_multiplier"] == pytest.approx(1.03)
    # Without a DP-free run, the cost is measured against the central baseline.
    alone = auroc_costs([private])[0]
    assert alone["reference"] == "central baseline" and alone["auroc_cost"] == pytest.approx(0.92 - 0.688)


def test_wrong_federate_report_is_an_input_error(tmp_path):
    bad = tmp_path / "x.json"
    bad.write_text(json.dumps({"format": "something-else"}))
    with pytest.raises(InputError, match="privmed-federated-report"):
        read_federate_report(bad)
    with pytest.raises(InputError, match="cannot read"):
        read_federate_report(tmp_path / "missing.json")


def test_report_files_tables_and_self_contained_html(tmp_path):
    # Prepare: an attack folder with two configurations and their grids.
    truth = np.random.default_rng(0).random((2, 1, 16, 16))
    records = []
    for b, sigma, leak in [(1, 0.0, 0.2), (1, 1.0, -0.8)]:
        grid = write_pair_grid(tmp_path / "grids" / f"g{sigma:g}.png", truth, truth[::-1])
        records.append(_record(b, sigma, 1, leak, str(grid.relative_to(tmp_path))))
    body = {
        "format": "privmed-attack-report", "version": 1, "configurations": records,
        "plan": {"model": "small-cnn", "norm": "group", "image_size": 16, "local_steps": 1, "lr": 0.05,
                 "clip_norm": 1.0, "known_labels": False,
                 "inversion": {"iterations": 10, "restarts": 1, "tv_weight": 0.1, "scales": [1]}},
        "prior": {"n_images": 5},
    }
    (tmp_path / "attack.json").write_text(json.dumps(body))
    federate = [_federate_report(tmp_path / "p.json", dp=False, auroc=0.89),
                _federate_report(tmp_path / "d.json", dp=True, auroc=0.69, sigma=1.0)]
    # Execute
    paths = write_report(tmp_path, federate)
    # Assert
    md = paths["md"].read_text()
    assert "| 1 | 1 | 10.7 | 1 | 20.0 | 0.500 | 0.600 | -0.800 | 0.250 | n/a | 1.00 | n/a | 1 |" in md
    assert THREATS in md and "AUROC cost" in md and "0.200" in md
    html = paths["html"].read_text()
    assert "<img" in html and not re.search(r'src="(?!data:image/png;base64,)', html)
    assert json.loads(paths["json"].read_text())["federate"][1]["auroc_cost"] == pytest.approx(0.2)
    assert paths["curves"].stat().st_size > 10_000


def test_pair_grid_layout_and_pixels():
    truth = np.zeros((5, 1, 12, 12))
    rec = np.ones((5, 1, 12, 12))
    canvas = pair_grid(truth, rec, columns=2, min_side=24)
    # 3 rows of 24-px images, 2 pairs per row, margins 6, gap 2.
    assert canvas.shape == (3 * 24 + 4 * 6, 2 * (2 * 24 + 2) + 3 * 6)
    assert canvas[6, 6] == 0 and canvas[6, 6 + 24 + 2] == 255
    with pytest.raises(InputError, match="one shape"):
        pair_grid(truth, rec[:4])
