"""Image readers: one call, ``read_image(path) -> (array, metadata)``, for every format privmed takes.

Formats (chosen by suffix; a file without a known suffix is read as DICOM if it has the
``DICM`` marker at byte 128):

- DICOM (``.dcm``, ``.dicom``) via pydicom: stored values -> modality values with rescale
  slope/intercept (HU for CT), optional VOI window, MONOCHROME1 inversion, multi-frame.
- PNG / JPEG / TIFF / BMP via Pillow: scaled to [0, 1] by the bit depth (8 or 16 bit).
- ``.npy``: returned as float32 unchanged.
- NIfTI (``.nii``, ``.nii.gz``) via nibabel: scaled data in nibabel's array order; the
  affine is kept in the metadata so masks can be written back with ``write_nifti``.

Array conventions: grayscale 2D ``(H, W)``, colour ``(H, W, 3)``, DICOM multi-frame / series
``(frames, H, W)``; always float32. Metadata always has ``format``, ``shape`` and, where known,
``modality``, ``spacing`` (mm per array axis), ``affine`` (4x4, array index -> RAS mm),
``photometric``, ``window`` (centre, width) *in the units of the returned array*.

Errors are ``InputError`` with one line naming the file and the problem.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from privmed.data.dicom_enhanced import is_enhanced, read_enhanced_volume
from privmed.data.dicom_enhanced import modality_values as enhanced_modality_values
from privmed.data.dicom_series import choose_series
from privmed.data.writers import write_nifti
from privmed.errors import InputError

__all__ = ["read_image", "read_dicom_series", "write_nifti", "image_kind", "IMAGE_SUFFIXES"]

log = logging.getLogger(__name__)

PIL_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp")
DICOM_SUFFIXES = (".dcm", ".dicom")
NIFTI_SUFFIXES = (".nii", ".nii.gz")
IMAGE_SUFFIXES = PIL_SUFFIXES + DICOM_SUFFIXES + NIFTI_SUFFIXES + (".npy",)

Window = tuple[float, float]


def image_kind(path: str | Path) -> str | None:
    """``"dicom" | "pil" | "npy" | "nifti"`` from the suffix (or DICM marker), else None."""
    p = Path(path)
    name = p.name.lower()
    if name.endswith(NIFTI_SUFFIXES):
        return "nifti"
    suffix = p.suffix.lower()
    if suffix in DICOM_SUFFIXES:
        return "dicom"
    if suffix in PIL_SUFFIXES:
        return "pil"
    if suffix == ".npy":
        return "npy"
    if suffix == "" and p.is_file():
        try:
            with open(p, "rb") as fh:
                head = fh.read(132)
        except OSError:
            return None
        if head[128:132] == b"DICM":
            return "dicom"
    return None


def read_image(
    path: str | Path,
    *,
    window: Window | str | None = None,
    modalities: Sequence[str] | None = None,
) -> tuple[np.ndarray, dict[str, Any]]:
    """Read one image file.

    Parameters
    ----------
    path : str or Path
        DICOM, PNG/JPEG, ``.npy`` or NIfTI file.
    window : (centre, width), ``"file"`` or None
        Apply a VOI window: values map linearly from [centre - width/2, centre + width/2] to
        [0, 1] and are clipped. ``"file"`` uses the DICOM's first WindowCenter/WindowWidth.
        None (default) returns modality values (HU for CT, intensities in [0, 1] for PNG).
    modalities : sequence of str, optional
        Accepted DICOM modalities (e.g. ``("CR", "DX")``); any other raises ``InputError``.
        Files without a modality (PNG, ``.npy``) pass.

    Returns
    -------
    array : numpy.ndarray
        float32, brighter = denser (MONOCHROME1 is inverted).
    meta : dict
        See the module docstring.
    """
    p = Path(path)
    if not p.exists():
        raise InputError(f"{p}: no such file")
    if p.is_dir():
        raise InputError(
            f"{p}: is a folder, expected an image file (use read_dicom_series for a DICOM series)"
        )
    kind = image_kind(p)
    if kind is None:
        raise InputError(f"{p}: unknown image format (expected one of {', '.join(IMAGE_SUFFIXES)})")
    if kind == "dicom":
        array, meta = _read_dicom(p, window)
    else:
        if window == "file":
            raise InputError(f"{p}: window='file' needs a DICOM file with WindowCenter/WindowWidth")
        reader = {"pil": _read_pil, "npy": _read_npy, "nifti": _read_nifti}[kind]
        array, meta = reader(p)
        if window is not None:
            array = apply_window(array, _check_window(p, window))
            meta["window"] = None
    if modalities is not None and meta.get("modality") is not None:
        allowed = [m.upper() for m in modalities]
        if str(meta["modality"]).upper() not in allowed:
            raise InputError(
                f"{p}: expected modality {' or '.join(allowed)}, got {meta['modality']}"
            )
    meta["shape"] = tuple(array.shape)
    return array, meta


def apply_window(values: np.ndarray, window: Window) -> np.ndarray:
    """Linear VOI window to [0, 1]: (v - (c - w/2)) / w, clipped. Pre: w > 0."""
    centre, width = window
    return np.clip((values - (centre - width / 2.0)) / width, 0.0, 1.0).astype(np.float32)


def _check_window(p: Path, window: Any) -> Window:
    try:
        centre, width = (float(v) for v in window)
    except (TypeError, ValueError):
        raise InputError(f"{p}: window: expected (centre, width), got {window!r}") from None
    if not width > 0:
        raise InputError(f"{p}: window: expected width > 0, got {width}")
    return centre, width


def _read_pil(p: Path) -> tuple[np.ndarray, dict[str, Any]]:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(p) as im:
            im.load()
            mode = im.mode
            arr = np.asarray(im)
    except UnidentifiedImageError:
        raise InputError(f"{p}: not a readable image (unknown or corrupt image data)") from None
    except (OSError, SyntaxError, ValueError) as exc:
        raise InputError(f"{p}: not a readable image ({exc.__class__.__name__}: {exc})") from None
    if mode in ("L", "P") or mode.startswith("I;16") or mode in ("I", "F", "1"):
        if mode == "P":
            with Image.open(p) as im:
                arr = np.asarray(im.convert("L"))
        channels = 1
    elif mode == "RGB":
        channels = 3
    elif mode == "LA":
        channels = 2
    else:
        channels = len(mode)
    if channels not in (1, 3):
        raise InputError(
            f"{p}: expected a grayscale or RGB image, got {channels} channels ({mode})"
        )
    if arr.dtype == np.uint8 or mode == "1":
        scale = 255.0 if arr.dtype == np.uint8 else 1.0
    elif arr.dtype == np.uint16 or mode.startswith("I;16"):
        scale = 65535.0
    elif mode == "I":  # 32-bit PNG/TIFF: Pillow widens 16-bit PNGs to "I"
        scale = 65535.0 if arr.max(initial=0) <= 65535 else float(np.iinfo(np.int32).max)
    else:
        scale = 1.0
    array = arr.astype(np.float32) / np.float32(scale)
    return array, {
        "format": "png" if p.suffix.lower() == ".png" else "pil",
        "modality": None,
        "channels": channels,
        "bit_depth": 8 if scale == 255.0 else 16,
        "spacing": None,
    }


def _read_npy(p: Path) -> tuple[np.ndarray, dict[str, Any]]:
    try:
        arr = np.load(p, allow_pickle=False)
    except (ValueError, OSError, EOFError) as exc:
        raise InputError(f"{p}: not a readable .npy array ({exc})") from None
    if not (np.issubdtype(arr.dtype, np.number) or arr.dtype == np.bool_):
        raise InputError(f"{p}: expected a numeric array, got dtype {arr.dtype}")
    return arr.astype(np.float32), {"format": "npy", "modality": None, "spacing": None}


def _read_nifti(p: Path) -> tuple[np.ndarray, dict[str, Any]]:
    import nibabel as nib
    from nibabel.filebasedimages import ImageFileError

    try:
        img: Any = nib.load(str(p))  # a Nifti1Image / Nifti2Image for these suffixes
        arr = np.asarray(img.get_fdata(dtype=np.float32))
    except (ImageFileError, OSError, EOFError, ValueError) as exc:
        raise InputError(f"{p}: not a readable NIfTI file ({exc})") from None
    zooms = tuple(float(z) for z in img.header.get_zooms()[: arr.ndim])
    return arr, {
        "format": "nifti",
        "modality": None,
        "spacing": zooms,
        "affine": np.asarray(img.affine, dtype=np.float64),
    }


def _dcmread(p: Path, stop_before_pixels: bool = False) -> Any:
    import pydicom
    from pydicom.errors import InvalidDicomError

    try:
        return pydicom.dcmread(str(p), stop_before_pixels=stop_before_pixels)
    except InvalidDicomError:
        raise InputError(f"{p}: not a DICOM file (missing preamble)") from None
    except (OSError, EOFError, ValueError, KeyError, AttributeError) as exc:
        raise InputError(f"{p}: unreadable DICOM ({exc.__class__.__name__}: {exc})") from None


def _first(value: Any) -> float:
    """First value of a possibly multi-valued DICOM number (WindowCenter can be a list)."""
    if isinstance(value, (list, tuple)) or value.__class__.__name__ == "MultiValue":
        value = value[0]
    return float(value)


def _modality_values(ds: Any, p: Path) -> np.ndarray:
    """Stored pixels -> modality values (rescale slope/intercept or a modality LUT)."""
    from pydicom.pixels import apply_modality_lut

    if "PixelData" not in ds:
        raise InputError(f"{p}: DICOM has no pixel data (modality {ds.get('Modality', 'unknown')})")
    try:
        stored = ds.pixel_array
    except Exception as exc:  # pydicom raises many types for broken/unsupported pixel data
        raise InputError(
            f"{p}: cannot decode DICOM pixel data ({exc.__class__.__name__}: {exc})"
        ) from None
    if is_enhanced(ds) and np.ndim(stored) == 3:  # the rescale lives in functional groups
        return enhanced_modality_values(ds, np.asarray(stored))
    return np.asarray(apply_modality_lut(stored, ds), dtype=np.float64)


def _stored_range(ds: Any) -> tuple[float, float]:
    """Modality values of the smallest and largest storable pixel (for MONOCHROME1 inversion)."""
    bits = int(ds.get("BitsStored", ds.get("BitsAllocated", 16)))
    signed = int(ds.get("PixelRepresentation", 0)) == 1
    lo, hi = (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if signed else (0, 2**bits - 1)
    slope = float(ds.get("RescaleSlope", 1) or 1)
    intercept = float(ds.get("RescaleIntercept", 0) or 0)
    a, b = slope * lo + intercept, slope * hi + intercept
    return min(a, b), max(a, b)


def _dicom_geometry(ds: Any, n_frames: int | None) -> dict[str, Any]:
    spacing_tag = ds.get("PixelSpacing") or ds.get("ImagerPixelSpacing")
    if spacing_tag and not all(float(v) > 0 for v in spacing_tag[:2]):
        spacing_tag = None  # e.g. RG1_UNCR.dcm stores PixelSpacing [0, 0]: unknown, not zero
    row_sp, col_sp = (float(spacing_tag[0]), float(spacing_tag[1])) if spacing_tag else (1.0, 1.0)
    position = [float(v) for v in ds.ImagePositionPatient] if "ImagePositionPatient" in ds else None
    orient = (
        [float(v) for v in ds.ImageOrientationPatient] if "ImageOrientationPatient" in ds else None
    )
    geo: dict[str, Any] = {
        "spacing": (row_sp, col_sp) if spacing_tag else None,
        "position": position,
        "orientation": orient,
    }
    if orient is not None and position is not None and n_frames is None:
        geo["affine"] = _affine_lps_to_ras(np.array(orient), np.array(position), (row_sp, col_sp))
    return geo


def _affine_lps_to_ras(
    orient: np.ndarray,
    origin: np.ndarray,
    spacing: tuple[float, float],
    slice_step: np.ndarray | None = None,
) -> np.ndarray:
    """4x4 affine: array index -> RAS mm; index order (slice, row, col) or, for 2D, (row, col).

    DICOM: position(r, c) = IPP + c * colsp * X + r * rowsp * Y with X, Y the row and column
    direction cosines of ImageOrientationPatient (LPS); RAS = diag(-1, -1, 1) LPS. For a 2D
    image the third index runs along the slice normal with unit spacing.
    """
    x_dir, y_dir = orient[:3], orient[3:]
    row_col = [y_dir * spacing[0], x_dir * spacing[1]]
    if slice_step is None:
        cols = [*row_col, np.cross(x_dir, y_dir)]
    else:
        cols = [slice_step, *row_col]
    lps = np.eye(4)
    lps[:3, :3] = np.stack(cols, axis=1)
    lps[:3, 3] = origin
    return np.diag([-1.0, -1.0, 1.0, 1.0]) @ lps


def _read_dicom(p: Path, window: Window | str | None) -> tuple[np.ndarray, dict[str, Any]]:
    ds = _dcmread(p)
    values = _modality_values(ds, p)
    photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2"))
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    file_window = None
    if "WindowCenter" in ds and "WindowWidth" in ds:
        file_window = (_first(ds.WindowCenter), _first(ds.WindowWidth))
    meta: dict[str, Any] = {
        "format": "dicom",
        "modality": str(ds.get("Modality", "")) or None,
        "photometric": photometric,
        "rescale": (
            float(ds.get("RescaleSlope", 1) or 1),
            float(ds.get("RescaleIntercept", 0) or 0),
        ),
        "bits_stored": int(ds.get("BitsStored", 0) or 0),
        "sop_class": str(ds.get("SOPClassUID", "")),
        **_dicom_geometry(ds, frames if frames > 1 else None),
    }
    if photometric not in ("MONOCHROME1", "MONOCHROME2") and values.ndim == 2:
        raise InputError(f"{p}: unsupported photometric interpretation {photometric}")
    if window == "file":
        if file_window is None:
            raise InputError(f"{p}: window='file' but the DICOM has no WindowCenter/WindowWidth")
        window = file_window
    if window is not None:
        out = apply_window(values, _check_window(p, window))
        if photometric == "MONOCHROME1":
            out = 1.0 - out
        meta["window"] = None  # already applied
    else:
        out = values
        meta["window"] = file_window
        if photometric == "MONOCHROME1":
            lo, hi = _stored_range(ds)
            out = (lo + hi) - values  # maps the storable range onto itself, reversed
            if file_window is not None:
                meta["window"] = (lo + hi - file_window[0], file_window[1])
    return np.asarray(out, dtype=np.float32), meta


def read_dicom_series(folder: str | Path, series_uid: str | None = None) -> tuple[np.ndarray, dict[str, Any]]:
    """Read a folder (and its sub-folders) of single-frame DICOM slices of one series into ``(slices, H, W)``.

    Slices are sorted by their ImagePositionPatient projected on the slice normal (the cross
    product of the ImageOrientationPatient direction cosines); without positions, by
    InstanceNumber. Values are modality values (HU for CT). ``meta["affine"]`` maps
    (slice, row, column) to RAS mm, so ``write_nifti(path, mask, meta["affine"])`` writes a
    mask that overlays the series. Non-DICOM files and non-image objects (SEG, SR, DICOMDIR)
    in the folder are ignored; with several image series, ``series_uid`` picks one, else
    ``InputError`` names them (``dicom_series.choose_series``); differing slice shapes raise.
    ``meta["files"]`` lists the slices in array order, ``meta["series_uid"]`` the series.
    """
    root = Path(folder)
    if not root.is_dir():
        raise InputError(f"{root}: not a folder")
    slices = []
    for f in sorted(root.rglob("*")):  # sub-folders too: CD layouts, one folder per series
        if any(part.startswith(".") for part in f.relative_to(root).parts):
            continue
        if f.is_file() and (image_kind(f) == "dicom"):
            slices.append((f, _dcmread(f)))
        elif f.is_file():
            log.debug("%s: not DICOM, ignored in series", f)
    if not slices:
        raise InputError(f"{root}: no DICOM files found")
    slices = choose_series(root, slices, series_uid)
    if len(slices) == 1 and is_enhanced(slices[0][1]):  # one enhanced CT/MR file: the whole volume
        return read_enhanced_volume(*slices[0])
    first = slices[0][1]
    if all("ImagePositionPatient" in ds and "ImageOrientationPatient" in ds for _, ds in slices):
        orient = np.array([float(v) for v in first.ImageOrientationPatient])
        normal = np.cross(orient[:3], orient[3:])
        slices.sort(
            key=lambda item: float(
                normal @ np.array([float(v) for v in item[1].ImagePositionPatient])
            )
        )
    else:
        orient = None
        slices.sort(key=lambda item: int(item[1].get("InstanceNumber", 0) or 0))
    arrays = [_modality_values(ds, f) for f, ds in slices]
    shapes = {a.shape for a in arrays}
    if len(shapes) != 1:
        raise InputError(f"{root}: slices differ in shape: {sorted(shapes)}")
    volume = np.stack(arrays).astype(np.float32)
    geo = _dicom_geometry(first, None)
    row_sp, col_sp = geo["spacing"] or (1.0, 1.0)
    meta: dict[str, Any] = {
        "format": "dicom-series",
        "modality": str(first.get("Modality", "")) or None,
        "n_slices": len(slices),
        "files": [str(f) for f, _ in slices],
        "series_uid": str(first.get("SeriesInstanceUID", "") or ""),
        "shape": tuple(volume.shape),
    }
    if orient is not None:
        positions = np.array([[float(v) for v in ds.ImagePositionPatient] for _, ds in slices])
        step = (positions[-1] - positions[0]) / max(len(slices) - 1, 1)
        if len(slices) == 1:
            step = normal * float(first.get("SliceThickness", 1.0) or 1.0)
        meta["affine"] = _affine_lps_to_ras(orient, positions[0], (row_sp, col_sp), step)
        meta["spacing"] = (float(np.linalg.norm(step)), row_sp, col_sp)
    else:
        meta["spacing"] = (float(first.get("SliceThickness", 1.0) or 1.0), row_sp, col_sp)
    return volume, meta
