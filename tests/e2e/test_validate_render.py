"""report.html rendered by a real headless browser (Debian's chromium; skipped only if absent).

The study is run with ``InsecureTestPerturbation`` so that this test checks the page, not
the engine (tests/e2e/test_validate_engine.py covers the engine).
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

from privmed.evaluate.report import build_report
from privmed.evaluate.runner import ValidateOptions, run_validation

from .test_validate_support import InsecureTestPerturbation, make_study_and_model

CHROMIUM = shutil.which("chromium") or (
    "/usr/bin/chromium" if Path("/usr/bin/chromium").exists() else None
)


@pytest.fixture(scope="module")
def validated(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("render")
    study_dir, model = make_study_and_model(root, sites=3, n_per_site=10)
    out = root / "results"
    run_validation(
        model, study_dir, out, ValidateOptions(), secure_infer=InsecureTestPerturbation(noise=1e-3)
    )
    build_report(out)
    return out


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
