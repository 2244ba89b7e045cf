"""Render a self-contained HTML report in a real headless Chromium and check what was drawn."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

CHROMIUM = shutil.which("chromium") or ("/usr/bin/chromium" if Path("/usr/bin/chromium").exists() else None)
MATPLOTLIB_BLUE = np.array([31, 119, 180])  # #1f77b4, matplotlib's first colour


def screenshot(page: Path, work: Path, size: tuple[int, int] = (1280, 2000)) -> np.ndarray:
    """Screenshot of ``page`` at ``size`` (width, height) as an RGB int array; skips without Chromium."""
    if CHROMIUM is None:
        pytest.skip("chromium not installed (apt-get install chromium)")
    from PIL import Image

    shot = work / "page.png"
    cmd = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
           "--disable-background-networking", "--disable-component-update", "--disable-sync",
           f"--user-data-dir={work / 'profile'}", f"--screenshot={shot}", f"--window-size={size[0]},{size[1]}",
           page.resolve().as_uri()]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, timeout=90)
    assert proc.returncode == 0 and shot.is_file(), proc.stderr.decode(errors="replace")[-2000:]
    return np.asarray(Image.open(shot).convert("RGB")).astype(int)


def assert_text_and_plots(img: np.ndarray) -> None:
    """Text drawn (dark pixels) and embedded matplotlib figures decoded (their first colour
    occurs only inside the base64 PNGs, never in the pages' own CSS)."""
    assert np.all(img < 80, axis=-1).mean() > 0.002, "no text rendered"
    blue = np.all(np.abs(img - MATPLOTLIB_BLUE) < 40, axis=-1).sum()
    assert blue > 100, "embedded plots not rendered"
