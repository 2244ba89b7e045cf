"""Per-image results of a validation study in one SQLite file, written as each image finishes.

Layout of ``RESULTS_DIR/results.sqlite``:

- ``meta(key, value)``: JSON values describing the study (model path and SHA-256, data
  directory, findings, output kind, margin, threshold). Fixed by the first run; a rerun
  with another model or data directory is refused instead of mixing two studies.
- ``results``: one row per image, primary key ``(site, image_id)``. Labels are JSON (null =
  unknown); outputs, and for segmentation studies the ground-truth label map resized to the
  output grid, are ``.npy`` bytes (dtype and shape included); costs are numbers or JSON
  maps keyed by role. ``status`` is ``ok`` or ``error`` (then ``error`` says why).
  ``session_images`` is how many images shared the image's secure session: its costs are
  its own batch plus an even share of that session's one-off part (NULL in databases
  written before sessions were shared, where every image had its own session).

Crash safety: every row is written in its own transaction by a single writer, so a process
killed at any instant leaves either the whole row or nothing (SQLite's rollback journal).
A finished ``ok`` row is never overwritten, so resuming can count nothing twice.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import sqlite3
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from privmed.errors import InputError

log = logging.getLogger(__name__)

DB_NAME = "results.sqlite"
SCHEMA_VERSION = 1

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS results (
    site TEXT NOT NULL,
    image_id TEXT NOT NULL,
    path TEXT,
    labels TEXT,
    status TEXT NOT NULL CHECK (status IN ('ok', 'error')),
    error TEXT,
    plain_output BLOB,
    secure_output BLOB,
    truth_mask BLOB,
    plain_s REAL,
    secure_s REAL,
    online_s REAL,
    bytes_total INTEGER,
    bytes_by_role TEXT,
    rounds INTEGER,
    peak_rss_mb TEXT,
    cpu_s TEXT,
    started_at REAL,
    finished_at REAL,
    run_id TEXT,
    session_images INTEGER,
    offline_s REAL,
    offline_bytes INTEGER,
    online_bytes INTEGER,
    PRIMARY KEY (site, image_id)
);
"""


@dataclass
class ImageResult:
    """Everything measured for one image (one row of ``results``)."""

    site: str
    image_id: str
    status: str
    path: str = ""
    labels: np.ndarray | None = None
    error: str = ""
    plain_output: np.ndarray | None = None
    secure_output: np.ndarray | None = None
    truth_mask: np.ndarray | None = None
    plain_s: float = float("nan")
    secure_s: float = float("nan")
    online_s: float = float("nan")
    bytes_by_role: dict[str, int] = field(default_factory=dict)
    rounds: int | None = None
    peak_rss_mb: dict[str, float] = field(default_factory=dict)
    cpu_s: dict[str, float] = field(default_factory=dict)
    started_at: float = float("nan")
    finished_at: float = float("nan")
    run_id: str = ""
    # images that shared this image's secure session (its costs are shares of that session's)
    session_images: int | None = None
    # the input-independent and online phases (two parties); offline + online bytes = total
    offline_s: float = float("nan")
    offline_bytes: int | None = None
    online_bytes: int | None = None


def _to_npy(a: np.ndarray | None) -> bytes | None:
    if a is None:
        return None
    buf = io.BytesIO()
    np.save(buf, np.asarray(a), allow_pickle=False)
    return buf.getvalue()


def _from_npy(b: bytes | None) -> np.ndarray | None:
    if b is None:
        return None
    return np.load(io.BytesIO(b), allow_pickle=False)


def _labels_json(labels: np.ndarray | None) -> str | None:
    if labels is None:
        return None
    return json.dumps([None if np.isnan(v) else float(v) for v in np.asarray(labels, np.float64)])


def _labels_array(text: str | None) -> np.ndarray | None:
    if text is None:
        return None
    return np.array([np.nan if v is None else v for v in json.loads(text)], dtype=np.float32)


def _map_json(values: Mapping[str, float]) -> str | None:
    return json.dumps(dict(values)) if values else None


def _nan_if_none(x: float | None) -> float:
    return float("nan") if x is None else float(x)


def _real(x: float) -> float | None:
    return None if x is None or not np.isfinite(x) else float(x)


# columns added after the first release, in the order they were added: read as NULL where absent
_NEWER_COLUMNS = ("session_images", "offline_s", "offline_bytes", "online_bytes")


def _add_missing_columns(conn: sqlite3.Connection) -> None:
    """Add columns introduced after a database was created (all nullable; old rows get NULL).

    A database that cannot be written to (a study archived read-only) is left as it is:
    :meth:`ResultStore.rows` reads the missing columns as NULL.
    """
    have = {row[1] for row in conn.execute("PRAGMA table_info(results)")}
    table = _SCHEMA[_SCHEMA.index("CREATE TABLE IF NOT EXISTS results") :]
    for line in table.splitlines()[1:]:
        parts = line.strip().rstrip(",").split()
        if (
            len(parts) == 2
            and parts[0] not in have
            and parts[1] in ("TEXT", "BLOB", "REAL", "INTEGER")
        ):
            try:
                conn.execute(f"ALTER TABLE results ADD COLUMN {parts[0]} {parts[1]}")
            except sqlite3.OperationalError as exc:
                if "readonly" not in str(exc):
                    raise
                log.info("read-only results database without column %s: read as NULL", parts[0])


class ResultStore:
    """The results database of one study (open with :meth:`open`, close with :meth:`close`).

    One connection, used from the thread that opened it; the validation runner funnels
    every worker's result through that thread.
    """

    def __init__(self, path: Path, conn: sqlite3.Connection) -> None:
        self.path = path
        self._conn = conn

    @classmethod
    def open(cls, results_dir: str | Path, *, create: bool = True) -> ResultStore:
        """Open (and with ``create`` make) ``results_dir/results.sqlite``."""
        results_dir = Path(results_dir)
        path = results_dir / DB_NAME
        if not create and not path.is_file():
            raise InputError(
                f"{path}: no results database (run `privmed validate --out {results_dir}` first)"
            )
        results_dir.mkdir(parents=True, exist_ok=True)
        try:
            conn = sqlite3.connect(str(path), timeout=30.0, isolation_level=None)
            conn.execute("PRAGMA synchronous=FULL")
            conn.executescript(_SCHEMA)
            _add_missing_columns(conn)
        except sqlite3.DatabaseError as exc:
            raise InputError(f"{path}: not a privmed results database ({exc})") from exc
        store = cls(path, conn)
        version = store.meta().get("schema_version")
        if version is None:
            store.set_meta({"schema_version": SCHEMA_VERSION})
        elif version != SCHEMA_VERSION:
            raise InputError(f"{path}: expected schema version {SCHEMA_VERSION}, got {version}")
        return store

    def close(self) -> None:
        self._conn.close()

    def __enter__(self) -> ResultStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- meta ---------------------------------------------------------------------------

    def meta(self) -> dict[str, Any]:
        """All meta entries, JSON-decoded."""
        rows = self._conn.execute("SELECT key, value FROM meta").fetchall()
        return {k: json.loads(v) for k, v in rows}

    def set_meta(self, entries: Mapping[str, Any]) -> None:
        """Insert or replace meta entries in one transaction."""
        with self._transaction():
            for key, value in entries.items():
                self._conn.execute(
                    "INSERT INTO meta(key, value) VALUES (?, ?) "
                    "ON CONFLICT(key) DO UPDATE SET value = excluded.value",
                    (key, json.dumps(value)),
                )

    def check_or_set_meta(self, fixed: Mapping[str, Any]) -> None:
        """Record ``fixed`` on the first run; on later runs require the same values.

        Raises InputError naming the first key whose value differs, so results of two
        different models or datasets never end up in one study.
        """
        current = self.meta()
        for key, value in fixed.items():
            if key in current and current[key] != json.loads(json.dumps(value)):
                raise InputError(
                    f"{self.path}: study was started with {key} = {current[key]!r}, got {value!r}; "
                    "use a new --out directory for a different study"
                )
        self.set_meta({k: v for k, v in fixed.items() if k not in current})

    # -- rows ---------------------------------------------------------------------------

    @contextlib.contextmanager
    def _transaction(self) -> Iterator[None]:
        """BEGIN IMMEDIATE ... COMMIT, or ROLLBACK if the body raises."""
        self._conn.execute("BEGIN IMMEDIATE")
        try:
            yield
        except BaseException:
            self._conn.execute("ROLLBACK")
            raise
        self._conn.execute("COMMIT")

    def finished_keys(self, *, include_errors: bool = True) -> set[tuple[str, str]]:
        """``(site, image_id)`` of every stored row (only ``ok`` rows if not include_errors)."""
        sql = "SELECT site, image_id FROM results"
        if not include_errors:
            sql += " WHERE status = 'ok'"
        return {(s, i) for s, i in self._conn.execute(sql)}

    def put(self, r: ImageResult) -> bool:
        """Store one image's result in its own transaction; returns False if already ``ok``.

        An ``error`` row may be replaced (retrying a failed image); an ``ok`` row never is.
        """
        values = {
            "site": r.site, "image_id": r.image_id, "path": r.path, "labels": _labels_json(r.labels),
            "status": r.status, "error": r.error or None,
            "plain_output": _to_npy(r.plain_output), "secure_output": _to_npy(r.secure_output),
            "truth_mask": _to_npy(r.truth_mask), "plain_s": _real(r.plain_s), "secure_s": _real(r.secure_s),
            "online_s": _real(r.online_s),
            "bytes_total": int(sum(r.bytes_by_role.values())) if r.bytes_by_role else None,
            "bytes_by_role": _map_json(r.bytes_by_role), "rounds": r.rounds,
            "peak_rss_mb": _map_json(r.peak_rss_mb), "cpu_s": _map_json(r.cpu_s),
            "started_at": _real(r.started_at), "finished_at": _real(r.finished_at), "run_id": r.run_id,
            "session_images": r.session_images, "offline_s": _real(r.offline_s),
            "offline_bytes": r.offline_bytes, "online_bytes": r.online_bytes,
        }  # fmt: skip
        columns = ", ".join(values)
        updates = ", ".join(f"{c} = excluded.{c}" for c in values if c not in ("site", "image_id"))
        with self._transaction():
            cur = self._conn.execute(
                f"INSERT INTO results({columns}) VALUES ({', '.join('?' * len(values))}) "
                f"ON CONFLICT(site, image_id) DO UPDATE SET {updates} WHERE results.status = 'error'",
                tuple(values.values()),
            )
            written = cur.rowcount == 1
        if not written:
            log.warning("result for %s/%s already stored; kept the first", r.site, r.image_id)
        return written

    def rows(self) -> Iterator[ImageResult]:
        """Every stored row, in insertion order."""
        self._conn.row_factory = sqlite3.Row
        try:
            cur = self._conn.execute("SELECT * FROM results ORDER BY rowid")
            for row in cur:
                new = {c: row[c] for c in _NEWER_COLUMNS if c in row.keys()}  # absent: read-only old file
                yield ImageResult(
                    site=row["site"],
                    image_id=row["image_id"],
                    status=row["status"],
                    path=row["path"] or "",
                    labels=_labels_array(row["labels"]),
                    error=row["error"] or "",
                    plain_output=_from_npy(row["plain_output"]),
                    secure_output=_from_npy(row["secure_output"]),
                    truth_mask=_from_npy(row["truth_mask"]),
                    plain_s=_nan_if_none(row["plain_s"]),
                    secure_s=_nan_if_none(row["secure_s"]),
                    online_s=_nan_if_none(row["online_s"]),
                    bytes_by_role=json.loads(row["bytes_by_role"] or "{}"),
                    rounds=row["rounds"],
                    peak_rss_mb=json.loads(row["peak_rss_mb"] or "{}"),
                    cpu_s=json.loads(row["cpu_s"] or "{}"),
                    started_at=_nan_if_none(row["started_at"]),
                    finished_at=_nan_if_none(row["finished_at"]),
                    run_id=row["run_id"] or "",
                    session_images=new.get("session_images"),
                    offline_s=_nan_if_none(new.get("offline_s")),
                    offline_bytes=new.get("offline_bytes"),
                    online_bytes=new.get("online_bytes"),
                )
        finally:
            self._conn.row_factory = None

    def count(self) -> dict[str, int]:
        """Number of rows per status."""
        return dict(
            self._conn.execute("SELECT status, COUNT(*) FROM results GROUP BY status").fetchall()
        )
