"""Real-looking DICOM studies from arrays: a CT series writer and the InVesalius head CT.

- ``write_ct_series``: a HU volume ``(slices, rows, cols)`` -> one single-frame CT Image
  Storage file per slice, with the patient, study, series, frame-of-reference and image-plane
  modules a PACS and highdicom require (int16 stored values, rescale intercept -1024).
- ``read_invesalius``: the volume inside an InVesalius project (``.inv3``: a tar of plists
  and a raw int16 matrix), e.g. the real head CT of Debian's ``invesalius-examples``
  (``/usr/share/doc/invesalius-examples/examples/Cranium.inv3``, 108 x 256 x 256, HU).

Both run on the data owner's side (tests, benchmarks, the demo); nothing is downloaded.
"""

from __future__ import annotations

import plistlib
import tarfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from privmed.errors import InputError

__all__ = ["Identity", "write_ct_series", "read_invesalius", "INVESALIUS_CRANIUM"]

CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"
INVESALIUS_CRANIUM = Path("/usr/share/doc/invesalius-examples/examples/Cranium.inv3")


@dataclass(frozen=True)
class Identity:
    """Patient and study identity written into every file (what a PACS indexes on)."""

    patient_name: str = "ANONYMOUS^PHANTOM"
    patient_id: str = "PHANTOM0001"
    birth_date: str = ""
    accession: str = ""
    study_uid: str = ""
    series_uid: str = ""
    study_description: str = "CT"
    series_description: str = "CT volume"


def write_ct_series(
    folder: str | Path,
    hu: np.ndarray,
    spacing: tuple[float, float, float],
    identity: Identity | None = None,
    origin: tuple[float, float, float] = (0.0, 0.0, 0.0),
) -> list[Path]:
    """Write ``hu`` (slices, rows, cols) as a CT series, slice k at z = origin_z + k * spacing[0].

    Returns the files in slice order. UIDs not given in ``identity`` are generated (random).
    """
    from pydicom.dataset import FileDataset, FileMetaDataset
    from pydicom.uid import UID, ExplicitVRLittleEndian, generate_uid

    vol = np.asarray(hu)
    if vol.ndim != 3:
        raise InputError(f"{folder}: expected a volume (slices, rows, cols), got shape {vol.shape}")
    ident = identity or Identity()
    out = Path(folder)
    out.mkdir(parents=True, exist_ok=True)
    study_uid = ident.study_uid or generate_uid()
    series_uid = ident.series_uid or generate_uid()
    frame_uid = generate_uid()
    stored = np.clip(np.rint(vol) + 1024, -32768, 32767).astype("<i2")
    files = []
    for k in range(vol.shape[0]):
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = UID(CT_IMAGE_STORAGE)
        meta.MediaStorageSOPInstanceUID = generate_uid()
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        path = out / f"CT{k + 1:04d}.dcm"
        ds = FileDataset(str(path), {}, file_meta=meta, preamble=b"\0" * 128)
        ds.SOPClassUID, ds.SOPInstanceUID = CT_IMAGE_STORAGE, meta.MediaStorageSOPInstanceUID
        ds.PatientName, ds.PatientID, ds.PatientBirthDate, ds.PatientSex = (
            ident.patient_name, ident.patient_id, ident.birth_date, "O")
        ds.StudyInstanceUID, ds.StudyID, ds.AccessionNumber = study_uid, "1", ident.accession
        ds.StudyDate, ds.StudyTime, ds.ReferringPhysicianName = "20260101", "120000", ""
        ds.StudyDescription, ds.SeriesDescription = ident.study_description, ident.series_description
        ds.SeriesInstanceUID, ds.SeriesNumber, ds.Modality = series_uid, 1, "CT"
        ds.FrameOfReferenceUID, ds.PositionReferenceIndicator = frame_uid, ""
        ds.Manufacturer, ds.ImageType = "privmed", ["ORIGINAL", "PRIMARY", "AXIAL"]
        ds.InstanceNumber = k + 1
        ds.Rows, ds.Columns = vol.shape[1], vol.shape[2]
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
        ds.RescaleSlope, ds.RescaleIntercept, ds.RescaleType = "1", "-1024", "HU"
        ds.WindowCenter, ds.WindowWidth = "40", "400"
        ds.PixelSpacing = [f"{spacing[1]:.6g}", f"{spacing[2]:.6g}"]
        ds.SliceThickness = f"{spacing[0]:.6g}"
        ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        z = origin[2] + k * spacing[0]
        ds.ImagePositionPatient = [f"{origin[0]:.6g}", f"{origin[1]:.6g}", f"{z:.6g}"]
        ds.SliceLocation = f"{z:.6g}"
        ds.KVP, ds.ContentDate, ds.ContentTime = "120", "20260101", "120000"
        ds.PixelData = stored[k].tobytes()
        ds.save_as(str(path), enforce_file_format=True)
        files.append(path)
    return files


def read_invesalius(path: str | Path = INVESALIUS_CRANIUM) -> tuple[np.ndarray, tuple[float, float, float]]:
    """The HU volume ``(slices, rows, cols)`` int16 and its spacing (slice, row, col) in mm."""
    p = Path(path)
    if not p.is_file():
        raise InputError(f"{p}: no such InVesalius project (Debian package invesalius-examples)")
    try:
        with tarfile.open(p) as tar:
            members = {Path(m.name).name: m for m in tar.getmembers() if m.isfile()}
            main = plistlib.loads(_member(tar, members, "main.plist", p))
            matrix = main["matrix"]
            raw = _member(tar, members, str(matrix["filename"]), p)
    except (tarfile.TarError, plistlib.InvalidFileException, KeyError, OSError) as exc:
        raise InputError(f"{p}: not a readable InVesalius project ({exc.__class__.__name__}: {exc})") from None
    shape = tuple(int(v) for v in matrix["shape"])
    dtype = np.dtype(str(matrix["dtype"])).newbyteorder("<")
    count = int(np.prod(shape))
    if len(raw) < count * dtype.itemsize:
        raise InputError(f"{p}: matrix holds {len(raw)} bytes, expected {count * dtype.itemsize} for {shape}")
    vol = np.frombuffer(raw[: count * dtype.itemsize], dtype=dtype).reshape(shape)
    sx, sy, sz = (float(v) for v in main["spacing"])
    return np.ascontiguousarray(vol), (sz, sy, sx)


def _member(tar: tarfile.TarFile, members: dict[str, tarfile.TarInfo], name: str, p: Path) -> bytes:
    if name not in members:
        raise InputError(f"{p}: {name} missing from the project")
    fh = tar.extractfile(members[name])
    if fh is None:
        raise InputError(f"{p}: {name} is not a regular file")
    return fh.read()
