"""Writers for the formats the readers understand: PNG, CR DICOM and NIfTI.

Used by the synthetic generators and to write masks back next to the images they belong to.
Output bytes depend only on the arguments (no timestamps, UIDs derived from given entropy),
so a seeded study is byte-identical across runs.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from privmed.errors import InputError

if TYPE_CHECKING:
    from privmed.data.synth import SiteStyle

CR_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.1"  # SOP class: Computed Radiography Image Storage
# a chest image in [0, 1] is stored as round(value * DETECTOR_RANGE) in 12 bits
DETECTOR_RANGE = 4000
BITS_STORED = 12


def write_png(path: str | Path, image01: np.ndarray, bits: int = 8) -> Path:
    """Write a grayscale image in [0, 1] as an 8- or 16-bit PNG."""
    from PIL import Image

    arr = np.asarray(image01, dtype=np.float64)
    if arr.ndim != 2:
        raise InputError(f"{path}: expected a 2D image, got shape {arr.shape}")
    if bits == 8:
        pil = Image.fromarray(np.rint(np.clip(arr, 0, 1) * 255).astype(np.uint8), mode="L")
    elif bits == 16:
        pil = Image.fromarray(np.rint(np.clip(arr, 0, 1) * 65535).astype(np.uint16))
    else:
        raise InputError(f"{path}: expected bits 8 or 16, got {bits}")
    pil.save(path, format="PNG")
    return Path(path)


def stored_chest_values(image01: np.ndarray, monochrome1: bool) -> np.ndarray:
    """Stored pixel values for a [0, 1] image: MONOCHROME1 stores max - value (white = low)."""
    raw = np.rint(np.clip(image01, 0, 1) * DETECTOR_RANGE).astype(np.uint16)
    return (2**BITS_STORED - 1 - raw).astype(np.uint16) if monochrome1 else raw


def write_chest_dicom(
    path: str | Path,
    image01: np.ndarray,
    site: SiteStyle,
    *,
    patient_id: str,
    uid_entropy: Sequence[str],
) -> Path:
    """Write a [0, 1] chest image as a CR DICOM in the site's storage conventions.

    Stored values s = round(v * 4000) (MONOCHROME2) or 4095 - round(v * 4000) (MONOCHROME1);
    modality values are slope * s + intercept. The window (centre, width) in modality units
    covers exactly the stored range of v in [0, 1], so windowing with the file's values and
    then applying the photometric inversion returns v (to 1/4000).
    """
    from pydicom.dataset import FileDataset, FileMetaDataset
    from pydicom.uid import UID, ExplicitVRLittleEndian, generate_uid

    arr = np.asarray(image01)
    if arr.ndim != 2:
        raise InputError(f"{path}: expected a 2D image, got shape {arr.shape}")
    slope, intercept = site.rescale
    stored = stored_chest_values(arr, site.monochrome1)
    entropy = ["privmed-synth-chest", *uid_entropy]
    study_uid = generate_uid(entropy_srcs=[*entropy, "study"])
    sop_uid = generate_uid(entropy_srcs=[*entropy, "sop"])

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = UID(CR_IMAGE_STORAGE)
    meta.MediaStorageSOPInstanceUID = sop_uid
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = FileDataset(str(path), {}, file_meta=meta, preamble=b"\0" * 128)
    ds.SOPClassUID = CR_IMAGE_STORAGE
    ds.SOPInstanceUID = sop_uid
    ds.StudyInstanceUID = study_uid
    ds.SeriesInstanceUID = generate_uid(entropy_srcs=[*entropy, "series"])
    ds.Modality = "CR"
    ds.PatientID = patient_id
    ds.PatientName = "SYNTHETIC^PHANTOM"
    ds.InstitutionName = site.name
    ds.BodyPartExamined = "CHEST"
    ds.ViewPosition = "PA"
    ds.Rows, ds.Columns = arr.shape
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME1" if site.monochrome1 else "MONOCHROME2"
    ds.BitsAllocated = 16
    ds.BitsStored = BITS_STORED
    ds.HighBit = BITS_STORED - 1
    ds.PixelRepresentation = 0
    ds.ImagerPixelSpacing = [f"{site.pixel_spacing:.4g}", f"{site.pixel_spacing:.4g}"]
    ds.PixelSpacing = ds.ImagerPixelSpacing
    ds.RescaleSlope = f"{slope:g}"
    ds.RescaleIntercept = f"{intercept:g}"
    ds.RescaleType = "US"
    lo_stored = 2**BITS_STORED - 1 - DETECTOR_RANGE if site.monochrome1 else 0
    centre_stored = lo_stored + DETECTOR_RANGE / 2
    ds.WindowCenter = f"{slope * centre_stored + intercept:g}"
    ds.WindowWidth = f"{slope * DETECTOR_RANGE:g}"
    ds.PixelData = stored.astype("<u2").tobytes()
    ds.save_as(str(path), enforce_file_format=True)
    return Path(path)


def write_nifti(path: str | Path, array: np.ndarray, affine: np.ndarray | None = None) -> Path:
    """Write ``array`` as NIfTI-1 (``.nii`` or ``.nii.gz``) with a 4x4 voxel-to-RAS ``affine``.

    The affine maps the array's own index order to millimetres, so any axis order is valid.
    Both the qform and sform are set (code 1, scanner); the header's zooms follow from the
    affine. Integer masks are stored as uint8 when they fit.
    """
    import nibabel as nib

    arr = np.asarray(array)
    aff = np.eye(4) if affine is None else np.asarray(affine, dtype=np.float64)
    if aff.shape != (4, 4):
        raise InputError(f"{path}: expected a 4x4 affine, got shape {aff.shape}")
    if arr.ndim not in (2, 3, 4):
        raise InputError(f"{path}: expected a 2D, 3D or 4D array, got shape {arr.shape}")
    if arr.dtype == np.bool_ or (
        np.issubdtype(arr.dtype, np.integer) and arr.size and arr.min() >= 0 and arr.max() <= 255
    ):
        arr = arr.astype(np.uint8)
    img = nib.Nifti1Image(arr, aff)
    img.set_qform(aff, code=1)
    img.set_sform(aff, code=1)
    name = str(path)
    if not (name.endswith(".nii") or name.endswith(".nii.gz")):
        raise InputError(f"{path}: expected a .nii or .nii.gz file name")
    nib.save(img, name)
    return Path(path)
