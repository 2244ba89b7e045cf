"""Study -> in-memory training arrays, preprocessed exactly as inference will preprocess.

Every image goes through ``privmed.data.preprocess.load_for_model`` (or ``Preprocess.apply``
for arrays inside a MedMNIST ``.npz``), the same code the plaintext and secure inference
paths call, so a model never sees training inputs that differ from what it will be served.
Masks are resized with nearest-neighbour sampling at pixel centres (labels must not blend).
Files that fail to load are skipped and listed, never fatal.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from privmed.errors import InputError

if TYPE_CHECKING:
    from privmed.data.datasets import Record, Study
    from privmed.data.preprocess import Preprocess

log = logging.getLogger(__name__)


@dataclass
class ArraySet:
    """Model inputs and targets with one site and image id per row.

    ``x`` is float32 ``(N, C, *spatial)``. ``y`` is float32 ``(N, F)`` (nan = unknown) for
    classification, or int64 ``(N, *spatial)`` class indices for segmentation.
    ``group`` names the source volume of each row (a 2D slice's volume), for per-volume Dice.
    """

    x: np.ndarray
    y: np.ndarray
    sites: list[str]
    image_ids: list[str]
    group: list[str] = field(default_factory=list)
    skipped: list[tuple[Path, str]] = field(default_factory=list)

    def __len__(self) -> int:
        return int(self.x.shape[0])

    def take(self, index: np.ndarray) -> ArraySet:
        """Rows ``index`` (an integer array) as a new ArraySet."""
        idx = [int(i) for i in index]
        return ArraySet(
            self.x[idx],
            self.y[idx],
            [self.sites[i] for i in idx],
            [self.image_ids[i] for i in idx],
            [self.group[i] for i in idx] if self.group else [],
        )


def model_input(study: Study, record: Record, pre: Preprocess) -> np.ndarray:
    """One record as the model sees it: float32 ``(C, *spatial)``."""
    from privmed.data.preprocess import load_for_model

    if record.array_key is None:
        return load_for_model(record.path, pre)[0]
    image, _ = study.read(record)
    return pre.apply(image)


def classification_arrays(study: Study, pre: Preprocess) -> ArraySet:
    """Inputs and multi-label targets for every record of ``study`` that loads."""
    xs, ys, sites, ids, skipped = [], [], [], [], list(study.skipped)
    for record in study.records:
        try:
            xs.append(model_input(study, record, pre))
        except InputError as exc:
            log.warning("skipping %s: %s", record.path, exc)
            skipped.append((record.path, str(exc)))
            continue
        ys.append(np.asarray(record.labels, dtype=np.float32))
        sites.append(record.site)
        ids.append(record.image_id)
    if not xs:
        raise InputError(f"{study.root}: no image could be loaded for training")
    return ArraySet(np.stack(xs), np.stack(ys), sites, ids, list(ids), skipped)


def resize_labels(mask: np.ndarray, shape: Sequence[int]) -> np.ndarray:
    """Nearest-neighbour resize of an integer mask, sampling at pixel centres.

    Output index i reads input index floor((i + 0.5) * n_in / n_out) on each axis, which is
    the nearest input pixel centre under the same alignment as ``Preprocess``'s resize.
    """
    out = np.asarray(mask)
    if out.ndim != len(shape):
        raise InputError(f"mask: expected {len(shape)} dimensions, got shape {out.shape}")
    for axis, n_out in enumerate(shape):
        n_in = out.shape[axis]
        if n_in == n_out:
            continue
        src = np.minimum(((np.arange(n_out) + 0.5) * n_in / n_out).astype(np.int64), n_in - 1)
        out = np.take(out, src, axis=axis)
    return out


def segmentation_arrays(
    study: Study, pre: Preprocess, *, slices: bool, num_classes: int
) -> ArraySet:
    """Inputs and class-index masks for every NIfTI pair of ``study``.

    Parameters
    ----------
    pre : preprocessing of one model input; with ``slices=True`` it is 2D and is applied to
        each axial slice (first array axis) of a volume, which is what 2D inference does.
    slices : True for a 2D network (one row per axial slice), False for a 3D network.
    num_classes : mask values must lie in ``[0, num_classes)``; other volumes are skipped.
    """
    xs, ys, sites, ids, groups = [], [], [], [], []
    skipped = list(study.skipped)
    for record in study.records:
        try:
            volume, _ = study.read(record)
            mask, _ = study.read_mask(record)
            if mask.shape != volume.shape:
                raise InputError(f"mask shape {mask.shape} differs from image {volume.shape}")
            if int(mask.max()) >= num_classes:
                raise InputError(f"mask value {int(mask.max())}, expected < {num_classes}")
            if slices:
                for d in range(volume.shape[0]):
                    x = pre.apply(volume[d])
                    xs.append(x)
                    ys.append(resize_labels(mask[d], x.shape[1:]))
                    sites.append(record.site)
                    ids.append(f"{record.image_id}#{d}")
                    groups.append(record.image_id)
            else:
                x = pre.apply(volume)
                xs.append(x)
                ys.append(resize_labels(mask, x.shape[1:]))
                sites.append(record.site)
                ids.append(record.image_id)
                groups.append(record.image_id)
        except InputError as exc:
            log.warning("skipping %s: %s", record.path, exc)
            skipped.append((record.path, str(exc)))
    if not xs:
        raise InputError(f"{study.root}: no image/mask pair could be loaded for training")
    return ArraySet(np.stack(xs), np.stack(ys).astype(np.int64), sites, ids, groups, skipped)


def split_rows(
    sites: Sequence[str],
    groups: Sequence[str],
    val_site: str | None,
    rng: np.random.Generator,
    tune_fraction: float = 0.15,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Row indices ``(train, tune, test)``.

    ``test`` is every row of ``val_site`` (empty when None): a held-out institution, used
    only for the final report. ``tune`` (early stopping, model selection) is a random
    ``tune_fraction`` of the remaining *groups* (volumes stay whole, so slices of one
    volume never sit on both sides) and is never from ``val_site``.
    """
    site_arr = np.asarray(sites)
    if val_site is not None and val_site not in set(sites):
        known = ", ".join(dict.fromkeys(sites))
        raise InputError(f"--val-site {val_site!r}: no such site (sites: {known})")
    test = np.flatnonzero(site_arr == val_site) if val_site is not None else np.array([], int)
    pool = np.flatnonzero(site_arr != val_site) if val_site is not None else np.arange(len(sites))
    pool_groups = list(dict.fromkeys(groups[int(i)] for i in pool))
    if len(pool_groups) < 2:
        raise InputError(
            f"training needs at least 2 images outside the held-out site, got {len(pool_groups)}"
        )
    n_tune = min(len(pool_groups) - 1, max(1, round(tune_fraction * len(pool_groups))))
    tune_groups = {pool_groups[i] for i in rng.permutation(len(pool_groups))[:n_tune]}
    is_tune = np.array([groups[int(i)] in tune_groups for i in pool], dtype=np.bool_)
    return pool[~is_tune], pool[is_tune], test
