"""One site's images and labels, in clear, on that site: loading, split and checks.

A study (``privmed.data.datasets.load_study``) lists images with a ``site`` column; in
simulation each site is one Flower client, in deployment each hospital loads only its own
site. The train/test split is a pure function of the image id (SHA-256, see ``is_test``)
so simulation, baselines and deployment all hold out exactly the same images, without a
shared random state.

Bad input raises InputError with one line: a site with no images, a site without known
labels for a finding that the run trains on (label sets that do not match across sites),
images that do not load.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from privmed.errors import InputError

__all__ = [
    "SiteData",
    "StudySummary",
    "check_site",
    "dataset_fingerprint",
    "is_test",
    "load_site",
    "preprocess_for",
    "summarize_study",
]

MIN_TRAIN_IMAGES = 2


@dataclass(frozen=True)
class SiteData:
    """Model-ready arrays of one site: x float32 (N, 1, S, S), y float32 (N, K), nan = unknown.

    ``fingerprint`` identifies the site's data set (``dataset_fingerprint``): the key of the
    site's cumulative privacy ledger.
    """

    site: str
    labels: tuple[str, ...]
    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    fingerprint: str = ""

    @property
    def n_train(self) -> int:
        return int(self.x_train.shape[0])

    @property
    def n_test(self) -> int:
        return int(self.x_test.shape[0])


@dataclass(frozen=True)
class StudySummary:
    """Labels and sites of a study, after the cross-site checks."""

    root: Path
    labels: tuple[str, ...]
    sites: tuple[str, ...]
    counts: dict[str, int]
    train_counts: dict[str, int]


def is_test(image_id: str, fraction: float) -> bool:
    """True for the held-out share: first 8 bytes of SHA-256(image id) / 2^64 < fraction."""
    digest = hashlib.sha256(image_id.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") / 2.0**64 < fraction


def dataset_fingerprint(site: str, image_ids: Sequence[str]) -> str:
    """SHA-256 (hex) of the site name and its sorted image ids, train and test alike.

    Nothing the server sends enters it (not the run name, the split fraction or the image
    size), so a server cannot move a site to a fresh privacy ledger. Ids are length-prefixed,
    so no two id lists share an encoding.
    """
    digest = hashlib.sha256(b"privmed-site-dataset-v1\0")
    for text in (site, *sorted(image_ids)):
        raw = text.encode("utf-8")
        digest.update(len(raw).to_bytes(8, "big") + raw)
    return digest.hexdigest()


def preprocess_for(image_size: int) -> Any:
    """The ``Preprocess`` used for training and stored next to the exported ONNX model
    (the same description as ``privmed train`` uses, so ``privmed infer`` treats both alike)."""
    from privmed.data.preprocess import Preprocess

    return Preprocess(size=(image_size, image_size), channels=1, normalize="zscore", window="file")


def _load_study(root: str | Path) -> Any:
    from privmed.data.datasets import load_study

    return load_study(root)


def _records_of(study: Any, site: str) -> list[Any]:
    records = [r for r in study.records if r.site == site]
    if not records and len({r.site for r in study.records}) == 1:
        records = list(study.records)  # a hospital's own study without a site column
    return records


def summarize_study(root: str | Path, test_fraction: float = 0.2) -> StudySummary:
    """Labels and sites of the study at ``root`` with every cross-site check applied.

    Raises InputError if there are fewer than two sites, a site has too few images, or a
    finding has known labels at some sites but none at another (mismatched label sets).
    """
    study = _load_study(root)
    labels = tuple(str(f) for f in study.findings)
    if not labels:
        raise InputError(f"{root}: study has no findings to train on")
    by_site: dict[str, list[Any]] = {}
    for record in study.records:
        by_site.setdefault(str(record.site), []).append(record)
    if len(by_site) < 2:
        raise InputError(f"{root}: expected at least 2 sites, got {sorted(by_site)}")
    for site, records in sorted(by_site.items()):
        _check_site_records(root, site, records, labels)
        _check_split(root, site, records, test_fraction)
    return StudySummary(
        root=Path(root),
        labels=labels,
        sites=tuple(sorted(by_site)),
        counts={s: len(r) for s, r in sorted(by_site.items())},
        train_counts={
            s: sum(not is_test(str(x.image_id), test_fraction) for x in r)
            for s, r in sorted(by_site.items())
        },
    )


def _check_site_records(root: str | Path, site: str, records: Sequence[Any], labels: Sequence[str]) -> None:
    if len(records) < MIN_TRAIN_IMAGES + 1:
        raise InputError(
            f"{root}: site {site!r} has {len(records)} images; expected at least"
            f" {MIN_TRAIN_IMAGES + 1} (a site with no data cannot train)"
        )
    y = np.stack([np.asarray(r.labels, dtype=np.float32) for r in records])
    if y.shape[1] != len(labels):
        raise InputError(
            f"{root}: site {site!r} has {y.shape[1]} label columns, expected {len(labels)}"
        )
    missing = [f for j, f in enumerate(labels) if np.all(np.isnan(y[:, j]))]
    if missing:
        raise InputError(
            f"{root}: site {site!r} has no known labels for {missing}; label sets must match"
            " across sites"
        )


def check_site(root: str | Path, site: str, test_fraction: float = 0.2) -> int:
    """A hospital's pre-flight check of its own study: the site has usable images and labels.

    Returns the number of training images; raises InputError with one line otherwise.
    """
    study = _load_study(root)
    records = _records_of(study, site)
    if not records:
        raise InputError(f"{root}: site {site!r} has no images (sites here: {sorted({r.site for r in study.records})})")
    labels = tuple(str(f) for f in study.findings)
    _check_site_records(root, site, records, labels)
    return _check_split(root, site, records, test_fraction)


def _check_split(root: str | Path, site: str, records: Sequence[Any], test_fraction: float) -> int:
    n_test = sum(is_test(str(r.image_id), test_fraction) for r in records)
    n_train = len(records) - n_test
    if n_train < MIN_TRAIN_IMAGES or n_test < 1:
        raise InputError(
            f"{root}: site {site!r} splits into {n_train} training and {n_test} test images;"
            f" expected >= {MIN_TRAIN_IMAGES} and >= 1"
        )
    return n_train


def load_site(
    root: str | Path,
    site: str,
    *,
    labels: Sequence[str],
    image_size: int,
    test_fraction: float,
) -> SiteData:
    """Load and preprocess one site's images, split by ``is_test``.

    ``labels`` is the run's label list: the site's study must have exactly these findings in
    this order (InputError otherwise, naming both lists).
    """
    from privmed.models.arrays import model_input

    study = _load_study(root)
    own = tuple(str(f) for f in study.findings)
    if own != tuple(labels):
        raise InputError(
            f"{root}: site {site!r} has labels {list(own)}, the run trains on {list(labels)}"
        )
    records = _records_of(study, site)
    if not records:
        raise InputError(f"{root}: site {site!r} has no images (0 records)")
    _check_site_records(root, site, records, labels)
    pre = preprocess_for(image_size)
    xs: dict[bool, list[np.ndarray]] = {False: [], True: []}
    ys: dict[bool, list[np.ndarray]] = {False: [], True: []}
    for record in records:
        held_out = is_test(str(record.image_id), test_fraction)
        xs[held_out].append(model_input(study, record, pre))
        ys[held_out].append(np.asarray(record.labels, dtype=np.float32))
    if len(xs[False]) < MIN_TRAIN_IMAGES or not xs[True]:
        raise InputError(
            f"{root}: site {site!r} splits into {len(xs[False])} training and {len(xs[True])}"
            f" test images; expected >= {MIN_TRAIN_IMAGES} and >= 1"
        )
    k = len(labels)
    return SiteData(
        site=site,
        labels=tuple(labels),
        x_train=np.stack(xs[False]).astype(np.float32),
        y_train=np.stack(ys[False]).reshape(-1, k),
        x_test=np.stack(xs[True]).astype(np.float32),
        y_test=np.stack(ys[True]).reshape(-1, k),
        fingerprint=dataset_fingerprint(site, [str(r.image_id) for r in records]),
    )
