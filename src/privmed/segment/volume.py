"""Volumes in and masks out, with their geometry (on the data owner's machine, in clear).

``read_volume`` takes a NIfTI file or a folder holding one DICOM series and returns the
array in the data layer's order (first axis = axial slice for NIfTI written by privmed and
for DICOM series) with a 4x4 ``affine`` (array index -> RAS mm). ``write_mask`` writes a
label map with exactly that affine, so the mask overlays the input in any viewer; for a
DICOM series the affine comes from ImagePositionPatient / ImageOrientationPatient of the
sorted slices (``privmed.data.readers.read_dicom_series``).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from privmed.errors import InputError

log = logging.getLogger(__name__)

MASK_SUFFIXES = (".nii", ".nii.gz", ".dcm")  # .dcm: a DICOM SEG (privmed.data.dicom_out)


@dataclass(frozen=True)
class Volume:
    """A 3-D image and where it lies in the patient.

    Attributes
    ----------
    array : float32 ``(D, H, W)`` in modality units (HU for CT).
    affine : float64 4x4, array index -> RAS millimetres.
    source : the file or folder it came from.
    kind : "nifti", "dicom-series" or "dicom-enhanced" (one multi-frame file).
    files : for a DICOM series, its slice files in array order (what a SEG references).
    """

    array: np.ndarray
    affine: np.ndarray
    source: Path
    kind: str
    files: tuple[str, ...] = ()

    @property
    def voxel_ml(self) -> float:
        """Volume of one voxel in millilitres: |det(affine[:3, :3])| mm^3 / 1000."""
        return voxel_ml(self.affine)


def voxel_ml(affine: np.ndarray) -> float:
    """Millilitres per voxel of a 4x4 voxel-to-mm ``affine`` (1 ml = 1000 mm^3)."""
    return float(abs(np.linalg.det(np.asarray(affine, dtype=np.float64)[:3, :3]))) / 1000.0


def _as_volume(array: np.ndarray, source: Path) -> np.ndarray:
    arr = np.asarray(array)
    while arr.ndim > 3 and arr.shape[-1] == 1:  # NIfTI (X, Y, Z, 1)
        arr = arr[..., 0]
    if arr.ndim != 3:
        raise InputError(f"{source}: not a volume: expected a 3D image (D, H, W), got shape {arr.shape}")
    if min(arr.shape) < 2:
        raise InputError(f"{source}: not a volume: expected at least 2 voxels per axis, got shape {arr.shape}")
    if not np.all(np.isfinite(arr)):
        raise InputError(f"{source}: the volume contains NaN or infinite values")
    return np.ascontiguousarray(arr, dtype=np.float32)


def read_volume(path: str | Path, series_uid: str | None = None) -> Volume:
    """Read a NIfTI volume or a DICOM series folder (``series_uid`` picks one of several)."""
    from privmed.data.readers import image_kind, read_dicom_series, read_image

    p = Path(path)
    if not p.exists():
        raise InputError(f"{p}: no such file or folder")
    if p.is_dir():
        array, meta = read_dicom_series(p, series_uid)
        kind = "dicom-series"
    else:
        file_kind = image_kind(p)
        if file_kind != "nifti":
            want = "not a volume: expected a NIfTI file (.nii, .nii.gz) or a DICOM series folder"
            if file_kind is None:
                raise InputError(f"{p}: {want}, got a file of unknown format")
            if file_kind == "dicom":
                return _enhanced_volume(p, want)
            label = {"pil": "2-D image", "npy": ".npy array"}.get(file_kind, file_kind)
            try:  # say what the file is: its shape, when it reads
                array, meta = read_image(p)
            except InputError as exc:
                reason = str(exc).removeprefix(f"{p}: ")
                raise InputError(f"{p}: {want}, got a {label} file ({reason})") from None
            raise InputError(f"{p}: {want}, got a {meta.get('format', label)} image of shape {tuple(array.shape)}")
        array, meta = read_image(p)
        kind = "nifti"
    affine = meta.get("affine")
    if affine is None:
        log.warning("%s: no geometry in the file; the mask gets an identity affine (1 mm voxels)", p)
        affine = np.eye(4)
    files = tuple(meta.get("files", ()))
    return Volume(_as_volume(array, p), np.asarray(affine, dtype=np.float64), p, kind, files)


def _enhanced_volume(p: Path, want: str) -> Volume:
    """One enhanced multi-frame CT/MR file as a volume; other single DICOM files are refused."""
    from privmed.data.dicom_enhanced import is_enhanced, read_enhanced_volume
    from privmed.data.readers import _dcmread

    ds = _dcmread(p)
    if not is_enhanced(ds):
        raise InputError(f"{p}: {want}, got one DICOM file (give the folder of its series)")
    array, meta = read_enhanced_volume(p, ds)
    return Volume(_as_volume(array, p), np.asarray(meta["affine"], dtype=np.float64), p, "dicom-enhanced", (str(p),))


def check_mask_path(path: str | Path) -> Path:
    """Refuse an output name that is not NIfTI or DICOM (SEG) before any work is done."""
    p = Path(path)
    if not p.name.lower().endswith(MASK_SUFFIXES):
        raise InputError(f"{p}: expected a .nii, .nii.gz or .dcm (DICOM SEG) output file name for the mask")
    if p.exists() and p.is_dir():
        raise InputError(f"{p}: is a folder, expected a file name for the mask")
    return p


def write_mask(path: str | Path, labels: np.ndarray, affine: np.ndarray) -> Path:
    """Write integer ``labels`` (same index order as the input volume) with ``affine``."""
    from privmed.data.writers import write_nifti

    p = check_mask_path(path)
    if p.suffix.lower() == ".dcm":
        raise InputError(f"{p}: write_mask writes NIfTI; a DICOM SEG is written by privmed.data.dicom_out.write_seg")
    p.parent.mkdir(parents=True, exist_ok=True)
    return write_nifti(p, np.asarray(labels).astype(np.uint8), affine)
