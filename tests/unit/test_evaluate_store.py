"""Results store: round trip, never overwriting a finished image, refusing to mix studies."""

from __future__ import annotations

import sqlite3

import numpy as np
import pytest

from privmed.errors import InputError
from privmed.evaluate.store import DB_NAME, ImageResult, ResultStore, _add_missing_columns


def _ok(image_id: str, value: float) -> ImageResult:
    return ImageResult(
        site="a", image_id=image_id, status="ok", path=f"/x/{image_id}.png",
        labels=np.array([1.0, np.nan, 0.0], np.float32),
        plain_output=np.array([[0.25, 0.5, value]], np.float32),
        secure_output=np.array([[0.25, 0.5, value + 1e-4]], np.float32),
        plain_s=0.01, secure_s=2.5, bytes_by_role={"data-owner": 10, "dealer": 30}, rounds=7,
        peak_rss_mb={"data-owner": 90.5}, cpu_s={"dealer": 0.25}, started_at=100.0, finished_at=102.5, run_id="r1",
        session_images=16, offline_s=2.0, offline_bytes=28, online_bytes=12,
    )  # fmt: skip


def test_round_trip(tmp_path) -> None:
    with ResultStore.open(tmp_path) as store:
        assert store.put(_ok("img1", 0.75))
    with ResultStore.open(tmp_path, create=False) as store:
        (row,) = list(store.rows())
    assert row.image_id == "img1" and row.status == "ok" and row.rounds == 7
    np.testing.assert_array_equal(row.labels, np.array([1.0, np.nan, 0.0], np.float32))
    np.testing.assert_array_equal(
        row.secure_output, np.array([[0.25, 0.5, 0.75 + 1e-4]], np.float32)
    )
    assert row.secure_output.dtype == np.float32 and row.secure_output.shape == (1, 3)
    assert row.cpu_s == {"dealer": 0.25} and row.session_images == 16
    assert row.bytes_by_role == {"data-owner": 10, "dealer": 30} and row.peak_rss_mb == {
        "data-owner": 90.5
    }
    assert (row.offline_s, row.offline_bytes, row.online_bytes) == (2.0, 28, 12)
    # the total is stored for SQL queries, beside its offline and online parts
    total = sqlite3.connect(tmp_path / DB_NAME).execute(
        "SELECT bytes_total, offline_bytes + online_bytes FROM results"
    ).fetchone()
    assert total == (40, 40)


def test_ok_row_is_never_overwritten_but_error_row_is(tmp_path) -> None:
    with ResultStore.open(tmp_path) as store:
        assert store.put(_ok("img1", 0.75))
        assert not store.put(_ok("img1", 0.1))  # a second result for a finished image is dropped
        assert store.put(ImageResult(site="a", image_id="img2", status="error", error="boom"))
        assert store.put(_ok("img2", 0.3))  # retrying a failed image replaces the error
        rows = {r.image_id: r for r in store.rows()}
        assert store.count() == {"ok": 2}
        assert store.finished_keys() == {("a", "img1"), ("a", "img2")}
    assert rows["img1"].plain_output[0, 2] == np.float32(0.75)
    assert rows["img2"].status == "ok" and rows["img2"].error == ""


def test_same_image_id_at_two_sites_are_two_rows(tmp_path) -> None:
    with ResultStore.open(tmp_path) as store:
        first = _ok("img1", 0.5)
        second = _ok("img1", 0.5)
        second.site = "b"
        assert store.put(first) and store.put(second)
        assert len(list(store.rows())) == 2


def test_meta_refuses_a_different_model(tmp_path) -> None:
    with ResultStore.open(tmp_path) as store:
        store.check_or_set_meta({"model_sha256": "aa", "findings": ["x"]})
        store.check_or_set_meta({"model_sha256": "aa", "findings": ["x"]})
        with pytest.raises(InputError, match="model_sha256"):
            store.check_or_set_meta({"model_sha256": "bb", "findings": ["x"]})


def test_open_missing_and_corrupt(tmp_path) -> None:
    with pytest.raises(InputError, match="no results database"):
        ResultStore.open(tmp_path / "none", create=False)
    (tmp_path / DB_NAME).write_bytes(b"not sqlite at all" * 100)
    with pytest.raises(InputError, match="not a privmed results database"):
        ResultStore.open(tmp_path)


def test_database_from_before_a_new_column_still_opens(tmp_path) -> None:
    # a results table as first released, without the later truth_mask, cpu_s and
    # session_images columns
    db = sqlite3.connect(tmp_path / DB_NAME)
    db.execute(
        "CREATE TABLE results (site TEXT NOT NULL, image_id TEXT NOT NULL, path TEXT, labels TEXT, "
        "status TEXT NOT NULL, error TEXT, plain_output BLOB, secure_output BLOB, plain_s REAL, "
        "secure_s REAL, bytes_total INTEGER, bytes_by_role TEXT, rounds INTEGER, peak_rss_mb TEXT, "
        "started_at REAL, finished_at REAL, run_id TEXT, PRIMARY KEY (site, image_id))"
    )
    db.execute("INSERT INTO results(site, image_id, status) VALUES ('a', 'old', 'ok')")
    db.commit()
    db.close()
    with ResultStore.open(tmp_path) as store:
        assert store.put(_ok("new", 0.5))
        rows = {r.image_id: r for r in store.rows()}
    assert rows["old"].cpu_s == {} and rows["old"].truth_mask is None
    assert rows["old"].session_images is None
    assert rows["old"].offline_bytes is None and rows["old"].online_bytes is None and np.isnan(rows["old"].offline_s)
    assert rows["new"].cpu_s == {"dealer": 0.25} and rows["new"].session_images == 16
    assert rows["new"].offline_bytes == 28


def test_read_only_database_from_before_the_phase_columns_still_reads(tmp_path) -> None:
    # Prepare: a database written before the offline/online split, opened read-only (an
    # archived study): the columns cannot be added
    with ResultStore.open(tmp_path) as store:
        store.put(_ok("img1", 0.5))
    db = sqlite3.connect(tmp_path / DB_NAME)
    for column in ("offline_s", "offline_bytes", "online_bytes"):
        db.execute(f"ALTER TABLE results DROP COLUMN {column}")
    db.commit()
    db.close()
    ro = sqlite3.connect(f"{(tmp_path / DB_NAME).as_uri()}?mode=ro", uri=True, isolation_level=None)
    # Execute
    _add_missing_columns(ro)
    (row,) = list(ResultStore(tmp_path / DB_NAME, ro).rows())
    ro.close()
    # Assert: the rest of the row as stored, the phases unmeasured
    assert row.bytes_by_role == {"data-owner": 10, "dealer": 30} and row.session_images == 16
    assert row.offline_bytes is None and row.online_bytes is None and np.isnan(row.offline_s)
