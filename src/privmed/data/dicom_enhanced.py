"""Enhanced multi-frame CT/MR (one file holding a whole volume): values and geometry per frame.

An enhanced image (Enhanced CT/MR Image Storage, PS3.3 C.7.6.16) keeps what single-frame
files store at the top level in functional groups: the rescale in
PixelValueTransformationSequence, the spacing in PixelMeasuresSequence, the orientation in
PlaneOrientationSequence (usually shared by all frames) and each frame's ImagePositionPatient
in PlanePositionSequence (per frame). pydicom's modality LUT does not look there, so this
module does.

``read_enhanced_volume`` returns frames sorted along the slice normal (like
``read_dicom_series`` for single-frame series) with ``meta["frame_order"]``: the file's frame
index of each array slice, which a DICOM SEG written back needs (its frames follow the file).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from privmed.errors import InputError

__all__ = ["is_enhanced", "frame_order", "modality_values", "read_enhanced_volume"]


def is_enhanced(ds: Any) -> bool:
    """A multi-frame image whose geometry lives in per-frame functional groups."""
    return int(ds.get("NumberOfFrames", 1) or 1) > 1 and "PerFrameFunctionalGroupsSequence" in ds


def _group(ds: Any, frame: int, name: str) -> Any:
    """The ``name`` functional group item of ``frame``: per-frame first, then shared; or None."""
    per_frame = ds.PerFrameFunctionalGroupsSequence[frame]
    if name in per_frame:
        return per_frame[name].value[0]
    shared = ds.get("SharedFunctionalGroupsSequence")
    if shared and name in shared[0]:
        return shared[0][name].value[0]
    return None


def _geometry(ds: Any, p: Path) -> tuple[np.ndarray, np.ndarray, tuple[float, float]]:
    """(orientation 6-vector, positions (frames, 3), (row, col) spacing) or InputError."""
    n = int(ds.NumberOfFrames)
    orient = _group(ds, 0, "PlaneOrientationSequence")
    measures = _group(ds, 0, "PixelMeasuresSequence")
    positions = [_group(ds, k, "PlanePositionSequence") for k in range(n)]
    if orient is None or measures is None or any(pos is None for pos in positions):
        raise InputError(f"{p}: enhanced multi-frame image without plane orientation/position/pixel measures")
    spacing = (float(measures.PixelSpacing[0]), float(measures.PixelSpacing[1]))
    pos = np.array([[float(v) for v in item.ImagePositionPatient] for item in positions])
    return np.array([float(v) for v in orient.ImageOrientationPatient]), pos, spacing


def frame_order(ds: Any, p: Path | str = "") -> list[int]:
    """File frame indices sorted along the slice normal (ties keep file order)."""
    orient, pos, _ = _geometry(ds, Path(p))
    normal = np.cross(orient[:3], orient[3:])
    return [int(k) for k in np.argsort(pos @ normal, kind="stable")]


def modality_values(ds: Any, stored: np.ndarray) -> np.ndarray:
    """Stored frames ``(frames, rows, cols)`` -> modality values with each frame's rescale."""
    values = np.empty(stored.shape, dtype=np.float64)
    for k in range(stored.shape[0]):
        rescale = _group(ds, k, "PixelValueTransformationSequence")
        slope = float(getattr(rescale, "RescaleSlope", 1) or 1) if rescale is not None else 1.0
        intercept = float(getattr(rescale, "RescaleIntercept", 0) or 0) if rescale is not None else 0.0
        values[k] = stored[k] * slope + intercept
    return values


def read_enhanced_volume(p: Path, ds: Any) -> tuple[np.ndarray, dict[str, Any]]:
    """``(slices, rows, cols)`` float32 modality values (HU for CT) and geometry of one file."""
    from privmed.data.readers import _affine_lps_to_ras  # the same LPS -> RAS convention

    try:
        stored = np.asarray(ds.pixel_array, dtype=np.float64)
    except Exception as exc:  # pydicom raises many types for broken/unsupported pixel data
        raise InputError(f"{p}: cannot decode DICOM pixel data ({exc.__class__.__name__}: {exc})") from None
    n = int(ds.NumberOfFrames)
    if stored.shape[0] != n or stored.ndim != 3:
        raise InputError(f"{p}: expected {n} grayscale frames, got pixel data of shape {stored.shape}")
    values = modality_values(ds, stored)
    orient, pos, spacing = _geometry(ds, p)
    order = frame_order(ds, p)
    volume = values[order].astype(np.float32)
    pos = pos[order]
    normal = np.cross(orient[:3], orient[3:])
    if n > 1:
        step = (pos[-1] - pos[0]) / (n - 1)
    else:
        step = normal * 1.0
    meta: dict[str, Any] = {
        "format": "dicom-enhanced",
        "modality": str(ds.get("Modality", "")) or None,
        "n_slices": n,
        "files": [str(p)],
        "frame_order": order,
        "series_uid": str(ds.get("SeriesInstanceUID", "") or ""),
        "shape": tuple(volume.shape),
        "affine": _affine_lps_to_ras(orient, pos[0], spacing, step),
        "spacing": (float(np.linalg.norm(step)), *spacing),
    }
    return volume, meta
