"""report.html rendered by a real headless browser (Debian's chromium; skipped only if absent).

The study is run with ``InsecureTestPerturbation`` so that this test checks the page, not
the engine (tests/e2e/test_validate_engine.py covers the engine).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from privmed.evaluate.report import build_report
from privmed.evaluate.runner import ValidateOptions, run_validation

from .browser import assert_text_and_plots, screenshot
from .test_validate_support import InsecureTestPerturbation, make_study_and_model


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
    img = screenshot(validated / "report.html", tmp_path, size=(1280, 2000))
    assert img.shape == (2000, 1280, 3)
    # text drawn; ROC curves and scatter decoded (matplotlib's first colour only in the PNGs)
    assert_text_and_plots(img)
