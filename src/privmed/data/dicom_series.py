"""Which DICOM files in a folder form the series to read: grouping, filtering, choosing.

A folder retrieved from a PACS or copied from a CD rarely holds exactly one image series:
there are DICOMDIR indexes, SEG and SR objects (privmed's own results among them), scouts
and other series of the same study. ``choose_series`` keeps the image objects, groups them
by SeriesInstanceUID and returns the one asked for; when several remain and none was asked
for it refuses, naming each series (UID, modality, description, number of images) so the
user can pick one with ``--series UID``.

Pure functions on already-read pydicom datasets (no file access).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from privmed.errors import InputError

__all__ = ["NON_IMAGE_SOP_CLASSES", "is_image", "is_non_image_file", "view_position", "choose_series", "describe_series"]

# storage classes that are not images to segment or classify (results, reports, indexes)
NON_IMAGE_SOP_CLASSES = {
    "1.2.840.10008.5.1.4.1.1.66.4": "SEG",
    "1.2.840.10008.5.1.4.1.1.88.11": "SR",
    "1.2.840.10008.5.1.4.1.1.88.22": "SR",
    "1.2.840.10008.5.1.4.1.1.88.33": "SR",
    "1.2.840.10008.5.1.4.1.1.88.34": "SR",
    "1.2.840.10008.5.1.4.1.1.11.1": "PR",
    "1.2.840.10008.1.3.10": "DICOMDIR",
}


def is_image(ds: Any) -> bool:
    """True for a dataset with pixel data that is not a SEG/SR/presentation state/DICOMDIR."""
    sop = str(ds.get("SOPClassUID", "") or getattr(getattr(ds, "file_meta", None), "MediaStorageSOPClassUID", ""))
    return sop not in NON_IMAGE_SOP_CLASSES and "PixelData" in ds


def is_non_image_file(path: Path) -> bool:
    """True for a DICOM file holding a SEG, SR, presentation state or DICOMDIR (header only)."""
    import pydicom
    from pydicom.errors import InvalidDicomError

    try:
        ds = pydicom.dcmread(str(path), stop_before_pixels=True, specific_tags=["SOPClassUID"])
    except (InvalidDicomError, OSError, EOFError, ValueError):
        return False  # the reader will name the problem
    sop = str(ds.get("SOPClassUID", "") or getattr(getattr(ds, "file_meta", None), "MediaStorageSOPClassUID", ""))
    return sop in NON_IMAGE_SOP_CLASSES


def view_position(path: Path) -> str:
    """ViewPosition of a DICOM radiograph (``PA``, ``AP``, ``LL``...), upper case; "" if none."""
    import pydicom
    from pydicom.errors import InvalidDicomError

    try:
        ds = pydicom.dcmread(str(path), stop_before_pixels=True, specific_tags=["ViewPosition"])
    except (InvalidDicomError, OSError, EOFError, ValueError):
        return ""
    return str(ds.get("ViewPosition", "") or "").strip().upper()


def describe_series(uid: str, items: Sequence[tuple[Path, Any]]) -> str:
    """``UID (CT, 'Head 1.5 mm', 108 images)``: how a series is named in errors and listings."""
    first = items[0][1]
    description = str(first.get("SeriesDescription", "") or "").strip()
    what = [str(first.get("Modality", "") or "?")]
    if description:
        what.append(repr(description))
    what.append(f"{len(items)} image{'s' if len(items) != 1 else ''}")
    return f"{uid} ({', '.join(what)})"


def choose_series(
    root: Path, items: Sequence[tuple[Path, Any]], series_uid: str | None = None
) -> list[tuple[Path, Any]]:
    """The image files of one series among ``items`` (path, dataset) read from ``root``.

    Non-image objects are dropped. With ``series_uid`` the files of that series are returned
    (``InputError`` naming the series present if it is not there); without, the folder must
    hold exactly one image series.
    """
    images = [(f, ds) for f, ds in items if is_image(ds)]
    if not images:
        kinds = sorted({NON_IMAGE_SOP_CLASSES.get(str(ds.get("SOPClassUID", "")), "no pixel data") for _, ds in items})
        raise InputError(f"{root}: no DICOM images to read (found only {', '.join(kinds)} objects)")
    groups: dict[str, list[tuple[Path, Any]]] = {}
    for f, ds in images:
        groups.setdefault(str(ds.get("SeriesInstanceUID", "") or ""), []).append((f, ds))
    if series_uid is not None:
        if series_uid not in groups:
            present = "; ".join(describe_series(u, g) for u, g in sorted(groups.items()))
            raise InputError(f"{root}: no series {series_uid} here; found {present}")
        return groups[series_uid]
    if len(groups) > 1:
        present = "; ".join(describe_series(u, g) for u, g in sorted(groups.items()))
        raise InputError(f"{root}: {len(groups)} series in this folder, choose one with --series UID: {present}")
    return next(iter(groups.values()))
