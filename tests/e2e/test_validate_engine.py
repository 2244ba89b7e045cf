"""`privmed validate` / `privmed report` end to end with the real three-party engine, and the
report rendered by a real headless browser (Debian's chromium; skipped only if absent)."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

from privmed.cli.main import main
from privmed.evaluate.store import ResultStore

from .test_validate_support import FINDINGS, make_study_and_model

CHROMIUM = shutil.which("chromium") or (
    Path("/usr/bin/chromium") if Path("/usr/bin/chromium").exists() else None
)


@pytest.fixture(scope="module")
def validated(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("engine")
    study_dir, model = make_study_and_model(root, sites=2, n_per_site=3)
    out = root / "results"
    rc = main(["validate", "--model", str(model), "--data", str(study_dir), "--out", str(out),
               "--workers", "2", "--limit", "5"])  # fmt: skip
    assert rc == 0
    return out


def test_secure_outputs_match_plaintext_and_costs_are_recorded(validated: Path) -> None:
    summary = json.loads((validated / "summary.json").read_text())
    assert summary["study"]["n_ok"] == 5 and summary["study"]["n_error"] == 0
    assert [f["finding"] for f in summary["findings"]] == FINDINGS
    for f in summary["findings"]:
        # Fixed point with 16 fractional bits and exact truncation: each of the four linear
        # layers adds at most a few 2^-16 ~ 1.5e-5 of error; 1e-3 leaves a wide margin while
        # still failing on any wrong share, sign or scale (those give errors of order 0.1 and more).
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


def test_report_renders_in_headless_chromium(validated: Path, tmp_path: Path) -> None:
    if CHROMIUM is None:
        pytest.skip("chromium not installed (apt-get install chromium)")
    from PIL import Image

    shot = tmp_path / "report.png"
    cmd = [str(CHROMIUM), "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
           "--disable-background-networking", "--disable-component-update", "--disable-sync",
           f"--user-data-dir={tmp_path / 'profile'}", f"--screenshot={shot}", "--window-size=1280,2000",
           (validated / "report.html").resolve().as_uri()]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, timeout=90)
    assert proc.returncode == 0 and shot.is_file(), proc.stderr.decode(errors="replace")[-2000:]
    img = np.asarray(Image.open(shot).convert("RGB")).astype(int)
    assert img.shape == (2000, 1280, 3)
    # Text drawn: dark pixels. Plots decoded and drawn: matplotlib's first colour (#1f77b4)
    # appears only in the embedded PNGs (ROC curves, scatter), never in the page's own CSS.
    dark = np.all(img < 80, axis=-1).mean()
    blue = np.all(np.abs(img - np.array([31, 119, 180])) < 40, axis=-1).sum()
    assert dark > 0.002, "no text rendered"
    assert blue > 100, "embedded plots not rendered"
