"""`privmed demo` end to end: the shipped model on the shipped study, secure == plaintext."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from pathlib import Path


def test_demo_runs_and_secure_matches_plaintext(tmp_path: Path) -> None:
    start = time.monotonic()
    proc = subprocess.run(
        [sys.executable, "-m", "privmed.cli.main", "demo", "--stats", str(tmp_path / "s.json")],
        capture_output=True, text=True, timeout=300,
    )
    elapsed = time.monotonic() - start
    assert proc.returncode == 0, proc.stdout + proc.stderr
    diff = float(re.search(r"max \|secure - plaintext\| = ([0-9.e+-]+)", proc.stdout).group(1))  # type: ignore[union-attr]
    assert diff < 1e-3
    rows = [ln for ln in proc.stdout.splitlines() if re.match(r"\d{8}_\d{3}\.png", ln)]
    assert len(rows) == 12  # 3 sites x 4 images, every one printed
    stats = json.loads((tmp_path / "s.json").read_text())
    assert len(stats["batches"]) == 12 and all(b["bytes"] > 0 and b["rounds"] > 0 for b in stats["batches"])
    assert elapsed < 120  # the issue asks for under a minute on 2 idle cores; CI machines vary
