"""Analysis and report from a hand-built results store (no inference): numbers vs oracles."""

from __future__ import annotations

import base64
import json
import sqlite3

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from privmed.evaluate.analysis import format_p, json_ready, sentence, summarize_study
from privmed.evaluate.report import build_report
from privmed.evaluate.store import DB_NAME, ImageResult, ResultStore

FINDINGS = ["opacity", "effusion"]


def insecure_test_perturbation(
    plain: np.ndarray, rng: np.random.Generator, scale: float
) -> np.ndarray:
    """TEST ONLY: stands in for secure outputs by adding noise to plaintext outputs."""
    return (plain + rng.normal(scale=scale, size=plain.shape)).astype(np.float32)


def _fill(tmp_path, n_per_site: int = 60, scale: float = 2e-4, bias: float = 0.0) -> dict:
    rng = np.random.default_rng(0)
    truth = {"labels": [], "plain": [], "secure": [], "sites": []}
    with ResultStore.open(tmp_path) as store:
        store.set_meta({"findings": FINDINGS, "output_kind": "probability", "model_path": "/m/chest.onnx",
                        "model_sha256": "0" * 64, "data_dir": "/d", "n_images_study": 2 * n_per_site + 1,
                        "workers": 2, "margin": 0.01, "threshold": 0.5})  # fmt: skip
        for site in ("north", "south"):
            for i in range(n_per_site):
                y = (rng.random(2) < 0.4).astype(np.float32)
                if i == 0:
                    y[1] = np.nan  # an unknown label
                plain = (1 / (1 + np.exp(-(2 * np.nan_to_num(y) + rng.normal(size=2)))))[
                    None
                ].astype(np.float32)
                secure = insecure_test_perturbation(plain, rng, scale) + np.float32(bias)
                store.put(ImageResult(site=site, image_id=f"{i}", status="ok", labels=y,
                                      plain_output=plain, secure_output=secure, plain_s=0.002,
                                      secure_s=1.0 + i / n_per_site, bytes_by_role={"data-owner": 1000 + i, "dealer": 5000},
                                      rounds=15, peak_rss_mb={"data-owner": 90.0, "dealer": 80.0},
                                      offline_s=0.5 + i / n_per_site, offline_bytes=5000, online_bytes=1000 + i,
                                      started_at=1000.0 + i, finished_at=1001.0 + i, run_id=site))  # fmt: skip
                truth["labels"].append(y)
                truth["plain"].append(plain[0])
                truth["secure"].append(secure[0])
                truth["sites"].append(site)
        store.put(ImageResult(site="south", image_id="broken", status="error",
                              error="preprocess: InputError: broken.png: truncated"))  # fmt: skip
    return {k: np.array(v) for k, v in truth.items()}


def test_summary_numbers_match_oracles(tmp_path) -> None:
    # Prepare
    truth = _fill(tmp_path)
    # Execute
    html_path, json_path, _ = build_report(tmp_path)
    summary = json.loads(json_path.read_text())
    # Assert: pooled and per-site AUROCs are sklearn's on the known labels
    for j, name in enumerate(FINDINGS):
        f = next(x for x in summary["findings"] if x["finding"] == name)
        known = ~np.isnan(truth["labels"][:, j])
        ref = roc_auc_score(truth["labels"][known, j], truth["secure"][known, j])
        assert f["pooled"]["auroc_secure"]["auc"] == pytest.approx(ref, abs=1e-9)
        south = known & (truth["sites"] == "south")
        ref_s = roc_auc_score(truth["labels"][south, j], truth["plain"][south, j])
        assert f["sites"]["south"]["auroc_plain"]["auc"] == pytest.approx(ref_s, abs=1e-9)
        d = truth["secure"][:, j].astype(np.float64) - truth["plain"][:, j]
        assert f["pooled"]["abs_diff"]["max_abs"] == pytest.approx(np.abs(d).max(), rel=1e-6)
        assert f["pooled"]["tost"]["equivalent"] is True
        assert f["pooled"]["n"] == 120 and f["pooled"]["n_labelled"] == int(known.sum())
    assert summary["study"]["n_ok"] == 120 and summary["study"]["n_error"] == 1
    assert summary["errors"][0]["image_id"] == "broken"
    c = summary["costs"]
    assert c["secure_s"]["median"] == pytest.approx(np.median(1.0 + np.arange(60) / 60))
    assert c["bytes_by_role"]["dealer"]["max"] == 5000
    # two runs of 60 images, each spanning 60 s: one image per second, 121 images
    assert c["projected_study_s"] == pytest.approx(121.0)
    # offline and online per image beside the totals, in the JSON and on the page
    assert c["offline_s"]["median"] == pytest.approx(np.median(0.5 + np.arange(60) / 60))
    assert c["offline_bytes"]["median"] == 5000 and c["offline_bytes"]["n"] == 120
    assert c["online_bytes"]["median"] == pytest.approx(np.median(1000 + np.arange(60)))
    assert c["online_bytes"]["median"] + c["offline_bytes"]["median"] == c["bytes_total"]["median"]
    page = html_path.read_text()
    assert _cost_row(page, "of which offline phase") == ["5.00 kB", "5.00 kB – 5.00 kB", "5.00 kB", "120"]
    assert _cost_row(page, "of which online phase")[0] == "1.03 kB"  # median 1029.5 bytes
    assert _cost_row(page, "of which offline phase (input-independent)")[0] == "991.7 ms"  # 0.5 + 29.5/60 s
    # the page shows the sentences and embeds three decodable PNGs
    html = html_path.read_text()
    for f in summary["findings"]:
        assert f["sentence"].replace("−", "&minus;")[:40].split("(")[0] in html
    pngs = [chunk.split("'")[0] for chunk in html.split("data:image/png;base64,")[1:]]
    assert len(pngs) == 3 and all(base64.b64decode(p)[:8] == b"\x89PNG\r\n\x1a\n" for p in pngs)
    assert "NaN" not in json_path.read_text()


def _cost_row(page: str, label: str) -> list[str]:
    """The cells after ``label`` in the cost table (median, IQR, max, n); [] if no such row."""
    start = page.find(f"<td class=l>{label}</td>")
    if start < 0:
        return []
    row = page[start : page.index("</tr>", start)]
    return [cell.split("</td>")[0] for cell in row.split("<td>")[1:]]


def _summary(tmp_path, **kw: float) -> dict:
    with ResultStore.open(tmp_path, create=False) as store:
        return json_ready(summarize_study(list(store.rows()), store.meta(), **kw)[0])


def test_biased_outputs_are_reported_not_equivalent(tmp_path) -> None:
    _fill(tmp_path, bias=0.05)
    summary = _summary(tmp_path)
    pooled = summary["findings"][0]["pooled"]
    assert pooled["tost"]["equivalent"] is False
    assert "equivalence within ±0.01 not shown" in summary["findings"][0]["sentence"]
    assert pooled["agreement"]["rate"] < 1.0


def test_report_overrides_margin(tmp_path) -> None:
    _fill(tmp_path, bias=0.005)
    tight = _summary(tmp_path, margin=0.001)
    loose = _summary(tmp_path)
    assert (
        tight["study"]["margin"] == 0.001
        and not tight["findings"][0]["pooled"]["tost"]["equivalent"]
    )
    assert loose["findings"][0]["pooled"]["tost"]["equivalent"]


def test_sentences_and_p_format() -> None:
    assert format_p(0.8312) == "p = 0.83" and format_p(0.0042) == "p = 0.004"
    assert format_p(1e-9) == "p < 0.001" and format_p(float("nan")) == "p = n/a"
    stats = {"n_pos": 0, "n_neg": 5, "auroc_plain": {"auc": float("nan")}, "auroc_secure": {"auc": float("nan")},
             "delong": {"p": float("nan")}}  # fmt: skip
    assert "AUROC not computable (0 positive, 5 negative" in sentence("x", stats, 0.01)
    stats = {"n_pos": 40, "n_neg": 60, "auroc_plain": {"auc": 0.9}, "auroc_secure": {"auc": 0.7},
             "delong": {"p": 1e-5}}  # fmt: skip
    assert (
        "AUROC differs significantly (0.900 plaintext vs 0.700 secure, DeLong p < 0.001)"
        in sentence("x", stats, 0.01)
    )


def test_report_of_a_study_where_every_image_failed(tmp_path) -> None:
    with ResultStore.open(tmp_path) as store:
        store.set_meta({"findings": FINDINGS, "n_images_study": 1})
        store.put(
            ImageResult(
                site="a", image_id="1", status="error", error="secure inference: PeerError: x"
            )
        )
    html_path, _, summary = build_report(tmp_path)
    assert summary["study"]["n_ok"] == 0 and summary["costs"]["projected_study_s"] is None
    assert summary["findings"][0]["sentence"].startswith("opacity: AUROC not computable")
    assert "PeerError: x" in html_path.read_text() and "data:image/png" not in html_path.read_text()


def test_database_from_before_the_offline_online_split_still_reports(tmp_path) -> None:
    # Prepare: a study stored before the split (the three columns dropped again)
    _fill(tmp_path)
    db = sqlite3.connect(tmp_path / DB_NAME)
    for column in ("offline_s", "offline_bytes", "online_bytes"):
        db.execute(f"ALTER TABLE results DROP COLUMN {column}")
    db.commit()
    db.close()
    # Execute
    html_path, json_path, summary = build_report(tmp_path)
    # Assert: every other number as before; the phases unmeasured and not shown as zero
    c = json.loads(json_path.read_text())["costs"]
    assert summary["study"]["n_ok"] == 120 and c["bytes_total"]["n"] == 120
    assert c["offline_bytes"] == {"n": 0, "median": None, "q1": None, "q3": None, "iqr": None, "mean": None,
                                  "max": None}  # fmt: skip
    assert c["offline_s"]["n"] == 0 and c["online_bytes"]["n"] == 0
    page = html_path.read_text()
    assert _cost_row(page, "bytes sent per image, all roles") and not _cost_row(page, "of which offline phase")
    assert "Two parties: the offline phase" not in page
    # the reopened database now has the columns (NULL in the old rows), so a resumed study adds to it
    columns = {row[1] for row in sqlite3.connect(tmp_path / DB_NAME).execute("PRAGMA table_info(results)")}
    assert {"offline_s", "offline_bytes", "online_bytes"} <= columns
