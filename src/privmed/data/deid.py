"""De-identify a folder of DICOM files for sharing (PS3.15 Annex E, basic profile), with dicognito.

Why dicognito: it is maintained (0.19, 2025), works on pydicom datasets in memory, and does the
part that is hard to get right by hand consistently across a whole folder: every UID is
replaced by a new one (the same input UID gives the same output UID, so series, studies and
references between objects stay intact), every person name, patient ID, accession number,
institution and station is replaced, and dates and times are shifted by one offset per
patient (PS3.15's "Retain Longitudinal Temporal Information with Modified Dates" option), so
intervals between studies survive. Seeded from the data owner's key, a second run over more
files of the same patients maps them the same way. (pydicom's ``deid`` works from recipes and
needs one written for this; dicognito's default actions are what the basic profile asks.)

What dicognito leaves and the basic profile removes, this module removes afterwards: every
private attribute (no "retain safe private" option) and free-text attributes that often hold
names (comments, histories, descriptions of the request and of derivation). Files whose
BurnedInAnnotation is YES are refused, not copied: their pixels may show the patient's name,
which no header edit removes. Each output file says what was done: PatientIdentityRemoved YES,
DeidentificationMethod and DeidentificationMethodCodeSequence (DCM 113100 basic profile,
113107 modified dates).
"""

from __future__ import annotations

import hashlib
import hmac
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from privmed.errors import InputError

__all__ = ["DeidSummary", "deidentify_folder", "REMOVED_FREE_TEXT"]

log = logging.getLogger(__name__)

# basic-profile "X" (remove) attributes that are free text, beyond what dicognito replaces
REMOVED_FREE_TEXT = (
    "AdditionalPatientHistory", "PatientComments", "ImageComments", "StudyComments",
    "RequestedProcedureComments", "ImagingServiceRequestComments", "InterpretationText",
    "DerivationDescription", "MedicalAlerts", "Allergies", "PatientState", "ReasonForStudy",
    "ReasonForTheRequestedProcedure", "RequestAttributesSequence", "PerformedProcedureStepDescription",
    "AdmittingDiagnosesDescription", "OtherPatientNames", "PatientMotherBirthName", "EthnicGroup",
    "PatientSize", "PatientWeight", "PatientAge", "ProtocolName", "OperatorsName", "CountryOfResidence",
    "PatientBirthTime", "PatientBirthName", "ContentCreatorName", "DeviceSerialNumber",
)  # fmt: skip
METHOD_CODES = (("113100", "Basic Application Confidentiality Profile"),
                ("113107", "Retain Longitudinal Temporal Information Modified Dates Option"))  # fmt: skip


@dataclass
class DeidSummary:
    written: list[Path] = field(default_factory=list)
    refused: list[tuple[Path, str]] = field(default_factory=list)  # (file, why)
    not_dicom: int = 0


def _mark(ds: Any) -> None:
    from pydicom.dataset import Dataset

    ds.PatientIdentityRemoved = "YES"
    method = "privmed data deid: dicognito + PS3.15 basic profile removals"
    ds.DeidentificationMethod = method
    codes = []
    for value, meaning in METHOD_CODES:
        item = Dataset()
        item.CodeValue, item.CodingSchemeDesignator, item.CodeMeaning = value, "DCM", meaning
        codes.append(item)
    ds.DeidentificationMethodCodeSequence = codes


def deidentify_folder(src: Path, dst: Path, key: bytes) -> DeidSummary:
    """Write a de-identified copy of every DICOM file below ``src`` into ``dst``.

    Output files are named by their new SOPInstanceUID (``dst/<new UID>.dcm``): an input
    file name may contain the patient's name. Non-DICOM files are skipped (counted).
    """
    import pydicom
    from dicognito.anonymizer import Anonymizer
    from pydicom.errors import InvalidDicomError

    from privmed.data.readers import image_kind

    src, dst = Path(src), Path(dst)
    if not src.is_dir():
        raise InputError(f"{src}: not a folder")
    if dst.resolve() == src.resolve() or src.resolve() in dst.resolve().parents:
        raise InputError(f"{dst}: the de-identified copy must go outside {src}")
    seed = hmac.new(key, b"privmed deid dicognito seed", hashlib.sha256).hexdigest()
    anonymizer = Anonymizer(seed=seed)  # one instance: consistent UIDs and dates over the folder
    summary = DeidSummary()
    for f in sorted(p for p in src.rglob("*") if p.is_file()):
        if image_kind(f) != "dicom":
            summary.not_dicom += 1
            continue
        try:
            ds = pydicom.dcmread(str(f))
        except (InvalidDicomError, OSError, EOFError, ValueError) as exc:
            summary.refused.append((f, f"unreadable DICOM ({exc.__class__.__name__})"))
            continue
        if str(ds.get("BurnedInAnnotation", "")).upper() == "YES":
            summary.refused.append((f, "BurnedInAnnotation YES: the pixels may show identifying text"))
            continue
        ds.remove_private_tags()
        for keyword in REMOVED_FREE_TEXT:
            if keyword in ds:
                delattr(ds, keyword)
        anonymizer.anonymize(ds)
        _mark(ds)
        dst.mkdir(parents=True, exist_ok=True)
        out = dst / f"{ds.SOPInstanceUID}.dcm"
        ds.save_as(str(out), enforce_file_format=True)
        summary.written.append(out)
    if not summary.written and not summary.refused:
        raise InputError(f"{src}: no DICOM files found")
    return summary
