"""Kill a validation run with SIGKILL at arbitrary moments; the restarted run loses nothing.

Each round starts ``run_validation`` in a fresh Python process, waits until it has stored
more images, and kills it without warning (no cleanup handlers run). After every kill the
database must open, pass SQLite's integrity check and still hold every row stored before,
byte for byte. A final run must then process exactly the images that are missing.

With several images per secure session the results of a group are stored one row per
transaction after its session, so a kill can land between two rows of one group: the rows
already stored stay, the rest of the group is run again, and nothing is stored twice.
"""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

from privmed.evaluate.runner import ValidateOptions, run_validation
from privmed.evaluate.store import DB_NAME

from .test_validate_support import InsecureTestPerturbation, make_study_and_model

CHILD = textwrap.dedent(
    """
    import sys
    sys.path.insert(0, sys.argv[1])
    from e2e.test_validate_support import InsecureTestPerturbation
    from privmed.evaluate.runner import ValidateOptions, run_validation

    slow = InsecureTestPerturbation(sleep_s=0.15, seed=int(sys.argv[5]))
    opts = ValidateOptions(workers=2, images_per_session=int(sys.argv[6]))
    run_validation(sys.argv[2], sys.argv[3], sys.argv[4], opts, secure_infer=slow)
    """
)


def _snapshot(out: Path) -> dict[tuple[str, str], tuple]:
    """Every stored row, as the next run would see it (the writer is dead by now).

    Read-write, not ``mode=ro``: a kill inside a commit leaves a hot rollback journal, and
    opening the database rolls the half-written row back, which a read-only connection
    cannot do ("attempt to write a readonly database"). The next run does the same.
    """
    db = sqlite3.connect(str(out / DB_NAME), timeout=30)
    try:
        assert db.execute("PRAGMA integrity_check").fetchone() == ("ok",)
        rows = db.execute(
            "SELECT site, image_id, status, secure_output, finished_at, run_id FROM results"
        )
        return {(r[0], r[1]): tuple(r[2:]) for r in rows}
    finally:
        db.close()


def _count(out: Path) -> int:
    try:
        db = sqlite3.connect(f"file:{out / DB_NAME}?mode=ro", uri=True, timeout=30)
    except sqlite3.OperationalError:
        return 0  # not created yet
    try:
        return int(db.execute("SELECT COUNT(*) FROM results").fetchone()[0])
    except sqlite3.OperationalError:
        return 0  # schema not written yet
    finally:
        db.close()


# (images per session, images in the study): a round stores at least 2 rows (two groups of 3
# finish together with per-session 3), so 3 rounds leave images for the final run
@pytest.mark.parametrize(("per_session", "n_images"), [(1, 12), (3, 24)])
@pytest.mark.timeout(120)
def test_sigkill_mid_run_then_resume_loses_and_duplicates_nothing(
    tmp_path: Path, per_session: int, n_images: int
) -> None:
    # Prepare
    study_dir, model = make_study_and_model(tmp_path, sites=3, n_per_site=n_images // 3)
    out = tmp_path / "results"
    script = tmp_path / "child.py"
    script.write_text(CHILD)
    tests_dir = Path(__file__).resolve().parents[1]
    rng = np.random.default_rng(0)
    kept: dict[tuple[str, str], tuple] = {}
    # Execute: three rounds of start, wait for progress, kill at a random instant
    for round_ in range(3):
        before = _count(out)
        child = subprocess.Popen([sys.executable, str(script), str(tests_dir), str(model), str(study_dir),
                                  str(out), str(round_), str(per_session)])  # fmt: skip
        deadline = time.monotonic() + 60
        while _count(out) < before + 2 and child.poll() is None and time.monotonic() < deadline:
            time.sleep(0.02)
        time.sleep(float(rng.uniform(0.0, 0.15)))  # land anywhere: mid-session or mid-commit
        os.kill(child.pid, signal.SIGKILL)
        child.wait()
        assert child.returncode == -signal.SIGKILL, "the child finished before it could be killed"
        snap = _snapshot(out)
        # Assert after each kill: nothing stored before was lost or changed
        assert all(snap[k] == v for k, v in kept.items())
        assert len(snap) >= before + 2
        kept = snap
    assert len(kept) < n_images, "every image finished before the last kill; nothing to resume"
    final = InsecureTestPerturbation(seed=99)
    run = run_validation(model, study_dir, out, ValidateOptions(workers=2), secure_infer=final)
    # Assert: exactly the missing images were run, each image is stored once, old rows intact
    snap = _snapshot(out)
    assert run.already_done == len(kept) and final.images == run.processed == n_images - len(kept)
    assert len(snap) == n_images and all(v[0] == "ok" for v in snap.values())
    assert all(snap[k] == v for k, v in kept.items())
    assert len({v[3] for v in snap.values()}) == 4  # three killed runs and the final one wrote rows
