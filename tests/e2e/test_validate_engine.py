"""`privmed validate` / `privmed report` end to end with the real three-party engine."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from privmed.cli.main import main
from privmed.evaluate.store import ResultStore

from .test_validate_support import FINDINGS

SHIPPED_MODEL = (
    Path(__file__).resolve().parents[2]
    / "src"
    / "privmed"
    / "assets"
    / "models"
    / "chest_smallcnn.onnx"
)


@pytest.fixture(scope="module")
def validated(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The shipped model on 5 images of the shipped demo study, through the real engine."""
    from privmed.data.datasets import demo_study_path

    out = tmp_path_factory.mktemp("engine") / "results"
    rc = main(["validate", "--model", str(SHIPPED_MODEL), "--data", str(demo_study_path()), "--out", str(out),
               "--workers", "2", "--limit", "5"])  # fmt: skip
    assert rc == 0
    return out


def test_secure_outputs_match_plaintext_and_costs_are_recorded(validated: Path) -> None:
    summary = json.loads((validated / "summary.json").read_text())
    assert summary["study"]["n_ok"] == 5 and summary["study"]["n_error"] == 0
    assert [f["finding"] for f in summary["findings"]] == FINDINGS
    for f in summary["findings"]:
        # Fixed point with 16 fractional bits and exact truncation: each of the five linear
        # layers adds a few 2^-16 ~ 1.5e-5 of error (1.6e-4 was the largest of 1,200 outputs in
        # the 300-image benchmark); 1e-3 leaves room while still failing on any wrong share,
        # sign or scale (those give errors of order 0.1 and more).
        assert f["pooled"]["abs_diff"]["max_abs"] < 1e-3
        assert f["pooled"]["agreement"]["rate"] == 1.0
        assert f["pooled"]["tost"]["equivalent"] is True
    with ResultStore.open(validated, create=False) as store:
        rows = list(store.rows())
    for r in rows:
        assert set(r.bytes_by_role) == {"data-owner", "model-owner", "dealer"}
        assert min(r.bytes_by_role.values()) > 0 and r.rounds and r.rounds > 0
        assert set(r.peak_rss_mb) == {"data-owner", "model-owner", "dealer"}
        assert r.secure_s > r.online_s > 0 and r.secure_s > r.plain_s
        assert set(r.cpu_s) == {"data-owner", "model-owner", "dealer"}
        np.testing.assert_allclose(r.secure_output, r.plain_output, atol=1e-3)
    c = summary["costs"]
    assert c["bytes_total"]["median"] > 0 and c["projected_study_s"] > 0 and c["workers"] == 2


def test_report_command_rebuilds_with_new_margin(
    validated: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    before = (validated / "summary.json").read_text()
    assert main(["report", str(validated), "--margin", "1e-9"]) == 0
    after = json.loads((validated / "summary.json").read_text())
    assert after["study"]["margin"] == 1e-9 and json.loads(before)["study"]["margin"] == 0.01
    assert "report: " in capsys.readouterr().out
    assert not after["findings"][0]["pooled"]["tost"]["equivalent"]  # nothing is equal to 1e-9
    assert main(["report", str(validated)]) == 0  # back to the stored margin
