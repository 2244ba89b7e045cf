"""`privmed validate` / `privmed report` end to end with the real engines: three parties, and
two parties (no dealer; the model owner a child process over mutual TLS) on a store."""

from __future__ import annotations

import contextlib
import io
import json
import sqlite3
from pathlib import Path

import numpy as np
import pytest

from privmed.cli.main import main
from privmed.evaluate.report import _bytes
from privmed.evaluate.store import DB_NAME, ResultStore

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


@pytest.fixture(scope="module")
def validated_two_parties(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """`privmed validate --parties 2` on 3 images of the demo study in one session, on a store
    holding one precomputed set: image 1 runs online only, images 2 and 3 compute their offline
    phase inline. Returns the results folder and what the command printed."""
    pytest.importorskip("tenseal", reason="tenseal not installed: pip install 'privmed[twoparty]'")
    from privmed.data.datasets import demo_study_path

    root = tmp_path_factory.mktemp("two_parties")
    two = ["validate", "--parties", "2", "--model", str(SHIPPED_MODEL), "--store", str(root / "st")]
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        assert main([*two, "--precompute", "1"]) == 0
        assert main([*two, "--data", str(demo_study_path()), "--out", str(root / "results"), "--limit", "3"]) == 0
    return root / "results", printed.getvalue()


def test_two_parties_store_offline_and_online_per_image_and_report_them(
    validated_two_parties: tuple[Path, str],
) -> None:
    out, printed = validated_two_parties
    with ResultStore.open(out, create=False) as store:
        rows = list(store.rows())
    columns = sqlite3.connect(out / DB_NAME).execute(
        "SELECT bytes_total, offline_bytes, online_bytes FROM results ORDER BY rowid"
    ).fetchall()
    # every image: both phases measured, adding up to the total recorded for it
    assert len(rows) == 3 and all(r.status == "ok" for r in rows)
    for r, (total, offline, online) in zip(rows, columns, strict=True):
        assert offline > 0 and online > 0 and offline + online == total == sum(r.bytes_by_role.values())
        assert r.offline_s > 0 and r.online_s > 0 and r.secure_s > r.offline_s + r.online_s
        np.testing.assert_allclose(r.secure_output, r.plain_output, atol=1e-3)
    # the same online walk for every image; the stored set's image sent a small fraction of the
    # offline bytes of an image whose offline phase ran inline (HE products, OT material)
    assert max(r.online_bytes for r in rows) - min(r.online_bytes for r in rows) <= 1
    stored, inline = rows[0], rows[1:]
    assert all(stored.offline_bytes < 0.1 * r.offline_bytes for r in inline)
    assert "1 of 3 images ran on precomputed sets (online only)" in printed, printed
    assert "of which offline" in printed and "(medians per image)" in printed
    # summary.json and the page: median and IQR per phase beside the totals
    c = json.loads((out / "summary.json").read_text())["costs"]
    assert c["offline_bytes"]["n"] == c["online_bytes"]["n"] == c["offline_s"]["n"] == 3
    page = (out / "report.html").read_text()
    for label, key in (("of which offline phase", "offline_bytes"), ("of which online phase", "online_bytes")):
        s = c[key]
        want = f"<td class=l>{label}</td><td>{_bytes(s['median'])}</td><td>{_bytes(s['q1'])} – {_bytes(s['q3'])}</td>"
        assert want in page, label
    assert "of which offline phase (input-independent)" in page and "Two parties: the offline phase" in page
