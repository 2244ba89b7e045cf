"""Overlap and boundary distance between two binary masks (2-D or 3-D).

Used to compare a secure segmentation with the plaintext one and with ground truth.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from scipy import ndimage

from privmed.errors import InputError


def _check(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    a = np.asarray(a).astype(bool)
    b = np.asarray(b).astype(bool)
    if a.shape != b.shape:
        raise InputError(f"masks: expected equal shapes, got {a.shape} and {b.shape}")
    return a, b


def nearest_resize(labels: np.ndarray, shape: Sequence[int]) -> np.ndarray:
    """Resize an integer label map to ``shape`` by nearest neighbour (pixel centres aligned).

    Output index i reads input index floor((i + 0.5) * in / out), the sampling grid of
    ``privmed.data.preprocess.resize`` without interpolation, so labels stay labels.
    """
    labels = np.asarray(labels)
    shape = tuple(int(n) for n in shape)
    if len(shape) != labels.ndim:
        raise InputError(f"mask: expected {len(shape)} dimensions, got shape {labels.shape}")
    index = [
        np.minimum(((np.arange(o) + 0.5) * (i / o)).astype(np.int64), i - 1)
        for i, o in zip(labels.shape, shape, strict=True)
    ]
    return labels[np.ix_(*index)]


def dice(a: np.ndarray, b: np.ndarray) -> float:
    """Dice coefficient 2|A & B| / (|A| + |B|); 1.0 when both masks are empty."""
    a, b = _check(a, b)
    total = int(a.sum()) + int(b.sum())
    if total == 0:
        return 1.0
    return 2.0 * int(np.logical_and(a, b).sum()) / total


def surface(mask: np.ndarray) -> np.ndarray:
    """Foreground voxels with at least one face-neighbour in background or outside the image."""
    mask = np.asarray(mask, dtype=bool)
    structure = ndimage.generate_binary_structure(mask.ndim, 1)
    # border_value=0: voxels on the image edge count as boundary, as in medpy and MONAI.
    return mask & ~ndimage.binary_erosion(mask, structure=structure, border_value=0)


def surface_distances(a: np.ndarray, b: np.ndarray, spacing: Sequence[float]) -> np.ndarray:
    """Distance (in spacing units) from every surface voxel of ``a`` to the surface of ``b``."""
    sa, sb = surface(a), surface(b)
    # Euclidean distance transform of "not surface of b" = distance to the nearest b-surface voxel.
    dist_to_b = ndimage.distance_transform_edt(~sb, sampling=tuple(float(s) for s in spacing))
    return np.asarray(dist_to_b[sa], dtype=np.float64)


def hd95(a: np.ndarray, b: np.ndarray, spacing: Sequence[float] | None = None) -> float:
    """95th percentile symmetric Hausdorff distance between mask boundaries.

    Pools the directed surface distances A->B and B->A and takes their 95th percentile
    (linear interpolation), as medpy's ``hd95``. ``spacing`` is the voxel size per axis
    (default 1). Returns 0.0 when both masks are empty and inf when exactly one is.
    """
    a, b = _check(a, b)
    spacing = tuple(spacing) if spacing is not None else (1.0,) * a.ndim
    if len(spacing) != a.ndim:
        raise InputError(f"spacing: expected {a.ndim} values, got {len(spacing)}")
    has_a, has_b = bool(a.any()), bool(b.any())
    if not has_a and not has_b:
        return 0.0
    if has_a != has_b:
        return float("inf")
    d = np.concatenate([surface_distances(a, b, spacing), surface_distances(b, a, spacing)])
    return float(np.percentile(d, 95))
