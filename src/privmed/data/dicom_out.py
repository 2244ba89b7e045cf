"""Results as DICOM objects a PACS and every viewer understand (highdicom).

- ``write_seg``: a label map over a DICOM series -> one DICOM Segmentation (binary, one
  segment per foreground class) that references every source slice and shares its frame of
  reference, so viewers overlay it on the series.
- ``write_sr``: per-finding probabilities of one image -> a DICOM Comprehensive 3D SR with a
  TID 1500 Measurement Report: one measurement group (TID 1501) per finding, holding a
  qualitative evaluation (present/absent at ``threshold``) and the probability (DCM 122157
  "Probability", unit UCUM "1"), the source image referenced in every group.
- ``read_seg_labels`` / ``read_sr_findings``: read them back (the tests' oracle and what a
  hospital script would do), through highdicom's parsers.

Both objects carry the algorithm identification (model name, version, the plan fingerprint
and "secure multi-party inference") and copy the patient and study modules of the source
images, as DICOM requires for an object stored into the same study. Nothing here leaves the
data owner's machine except through the user's own PACS.

Errors are ``InputError`` naming the file and the problem.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from privmed.errors import InputError

__all__ = ["AlgorithmInfo", "write_seg", "write_sr", "read_seg_labels", "read_sr_findings"]

log = logging.getLogger(__name__)

MANUFACTURER = "privmed"
LOCAL_SCHEME = "99PRIVMED"  # private coding scheme ("99" prefix, PS3.16 8.2) for our own labels
COMPUTATION = "secure multi-party inference (data owner, model owner, dealer; mutual TLS)"


@dataclass(frozen=True)
class AlgorithmInfo:
    """What produced a result: written into the SEG's and the SR's algorithm identification."""

    name: str
    version: str
    plan_sha256: str
    computation: str = COMPUTATION

    def parameters(self) -> dict[str, str]:
        return {"plan_sha256": self.plan_sha256, "computation": self.computation}


def _software_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return f"privmed {version('privmed')}"
    except PackageNotFoundError:
        return "privmed"


def _class_codes(name: str) -> tuple[Any, Any]:
    """(segmented property category, type) for a class name: SNOMED CT where we know one."""
    import highdicom as hd
    from pydicom.sr.codedict import codes

    key = name.strip().lower()
    if key in ("lung", "lungs"):
        return codes.SCT.AnatomicalStructure, codes.SCT.Lung
    if key in ("lesion", "lesions", "tumour", "tumor", "infection", "opacity"):
        return codes.SCT.MorphologicallyAbnormalStructure, codes.SCT.Lesion
    local = hd.sr.CodedConcept(value=key[:16] or "class", scheme_designator=LOCAL_SCHEME, meaning=name[:64] or "class")
    return codes.SCT.Tissue, local


def write_seg(
    path: str | Path,
    sources: Sequence[Any],
    labels: np.ndarray,
    classes: Sequence[str],
    algorithm: AlgorithmInfo,
) -> Path:
    """Write ``labels`` (slices, rows, cols), index k = ``sources[k]``, as a binary DICOM SEG.

    Pre: ``sources`` are the series' pydicom datasets in the order of the label map's first
    axis (``read_dicom_series``'s order), or one enhanced multi-frame image with the label
    slices in its frame order; ``classes[0]`` is the background. Classes that occur
    nowhere still get a segment (an empty result is a result); slices without any foreground
    are omitted as frames, as highdicom does by default.
    """
    import highdicom as hd
    from pydicom.sr.codedict import codes

    p = Path(path)
    arr = np.asarray(labels)
    n_frames = sum(int(ds.get("NumberOfFrames", 1) or 1) for ds in sources)
    if arr.ndim != 3 or arr.shape[0] != n_frames:
        raise InputError(f"{p}: SEG needs one label slice per source frame: labels {arr.shape}, {n_frames} frames")
    rows_cols = {(int(ds.Rows), int(ds.Columns)) for ds in sources}
    if rows_cols != {arr.shape[1:]}:
        raise InputError(f"{p}: SEG label slices {arr.shape[1:]} differ from the images' rows x columns {sorted(rows_cols)}")
    if len(classes) < 2:
        raise InputError(f"{p}: SEG needs at least one foreground class, got classes {list(classes)}")
    algo = hd.AlgorithmIdentificationSequence(
        name=algorithm.name[:64], family=codes.cid7162.ArtificialIntelligence, version=algorithm.version[:64],
        source=MANUFACTURER, parameters=algorithm.parameters(),
    )  # fmt: skip
    segments = []
    for number, name in enumerate(classes[1:], start=1):
        category, kind = _class_codes(name)
        segments.append(hd.seg.SegmentDescription(
            segment_number=number, segment_label=name[:64], segmented_property_category=category,
            segmented_property_type=kind, algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
            algorithm_identification=algo,
        ))  # fmt: skip
    first = sources[0]
    try:
        seg = hd.seg.Segmentation(
            source_images=list(sources), pixel_array=arr.astype(np.uint8),
            segmentation_type=hd.seg.SegmentationTypeValues.BINARY, segment_descriptions=segments,
            series_instance_uid=hd.UID(), series_number=int(first.get("SeriesNumber", 0) or 0) + 900,
            sop_instance_uid=hd.UID(), instance_number=1, manufacturer=MANUFACTURER,
            manufacturer_model_name=algorithm.name[:64], software_versions=_software_version(),
            device_serial_number="none", content_description=f"{algorithm.name} ({algorithm.computation})"[:64],
            content_label="PRIVMED_SEG", omit_empty_frames=True,
        )  # fmt: skip
    except (ValueError, TypeError, AttributeError, KeyError) as exc:
        raise InputError(f"{p}: cannot build a DICOM SEG from these images ({exc})") from None
    seg.SeriesDescription = f"privmed SEG {algorithm.name}"[:64]
    p.parent.mkdir(parents=True, exist_ok=True)
    seg.save_as(str(p))
    return p


def write_sr(
    path: str | Path,
    source: Any,
    probabilities: Sequence[float],
    findings: Sequence[str],
    algorithm: AlgorithmInfo,
    threshold: float = 0.5,
) -> Path:
    """Write one image's per-finding probabilities as a TID 1500 measurement report."""
    import highdicom as hd
    from pydicom.sr.codedict import codes

    p = Path(path)
    probs = [float(v) for v in probabilities]
    if len(probs) != len(findings):
        raise InputError(f"{p}: SR needs one probability per finding: {len(probs)} values, {len(findings)} findings")
    if not all(0.0 <= v <= 1.0 for v in probs):
        raise InputError(f"{p}: SR probabilities must lie in [0, 1], got {probs}")
    algo = hd.sr.AlgorithmIdentification(name=algorithm.name[:64], version=algorithm.version[:64],
                                         parameters=[f"{k}={v}" for k, v in algorithm.parameters().items()])  # fmt: skip
    device = hd.sr.DeviceObserverIdentifyingAttributes(uid=hd.UID(), name=algorithm.name[:64],
                                                       manufacturer_name=MANUFACTURER, model_name=algorithm.name[:64])  # fmt: skip
    context = hd.sr.ObservationContext(observer_device_context=hd.sr.ObserverContext(
        observer_type=codes.DCM.Device, observer_identifying_attributes=device))  # fmt: skip
    source_ref = hd.sr.SourceImageForMeasurementGroup.from_source_image(source)
    groups = []
    for name, prob in zip(findings, probs, strict=True):
        finding = hd.sr.CodedConcept(value=name.strip().lower()[:16] or "finding", scheme_designator=LOCAL_SCHEME, meaning=name[:64])
        groups.append(hd.sr.MeasurementsAndQualitativeEvaluations(
            tracking_identifier=hd.sr.TrackingIdentifier(uid=hd.UID(), identifier=f"{name} ({algorithm.name})"[:64]),
            finding_type=finding, algorithm_id=algo, source_images=[source_ref],
            qualitative_evaluations=[hd.sr.QualitativeEvaluation(
                name=finding, value=codes.SCT.Present if prob >= threshold else codes.SCT.Absent)],
            measurements=[hd.sr.Measurement(name=codes.DCM.Probability, value=prob, unit=codes.UCUM.NoUnits,
                                            algorithm_id=algo)],
        ))  # fmt: skip
    report = hd.sr.MeasurementReport(
        observation_context=context,
        procedure_reported=hd.sr.CodedConcept(value="18748-4", scheme_designator="LN", meaning="Diagnostic imaging study"),
        imaging_measurements=groups,
    )  # fmt: skip
    try:
        sr = hd.sr.Comprehensive3DSR(
            evidence=[source], content=report, series_instance_uid=hd.UID(),
            series_number=int(source.get("SeriesNumber", 0) or 0) + 901, sop_instance_uid=hd.UID(),
            instance_number=1, manufacturer=MANUFACTURER, is_complete=True,
        )  # fmt: skip
    except (ValueError, TypeError, AttributeError, KeyError) as exc:
        raise InputError(f"{p}: cannot build a DICOM SR for this image ({exc})") from None
    sr.SeriesDescription = f"privmed SR {algorithm.name}"[:64]
    p.parent.mkdir(parents=True, exist_ok=True)
    sr.save_as(str(p))
    return p


def read_seg_labels(path: str | Path, sources: Sequence[Any]) -> tuple[np.ndarray, list[str]]:
    """A SEG back as a label map on ``sources`` (slices in that order; for one enhanced
    multi-frame source, its frames in file order) and its segment labels."""
    import highdicom as hd

    p = Path(path)
    try:
        seg = hd.seg.segread(str(p))
    except Exception as exc:  # highdicom/pydicom raise many types on a non-SEG file
        raise InputError(f"{p}: not a readable DICOM SEG ({exc.__class__.__name__}: {exc})") from None
    names = [str(d.SegmentLabel) for d in seg.SegmentSequence]
    if len(sources) == 1 and int(sources[0].get("NumberOfFrames", 1) or 1) > 1:  # enhanced: by frame
        frames = list(range(1, int(sources[0].NumberOfFrames) + 1))
        stack = seg.get_pixels_by_source_frame(source_sop_instance_uid=str(sources[0].SOPInstanceUID),
                                               source_frame_numbers=frames, combine_segments=True,
                                               skip_overlap_checks=True, ignore_spatial_locations=True)  # fmt: skip
        return np.asarray(stack), names
    uids = [str(ds.SOPInstanceUID) for ds in sources]
    stack = seg.get_pixels_by_source_instance(source_sop_instance_uids=uids, combine_segments=True,
                                              skip_overlap_checks=True, ignore_spatial_locations=True)  # fmt: skip
    return np.asarray(stack), names


def read_sr_findings(path: str | Path) -> dict[str, dict[str, Any]]:
    """``{finding: {"probability": p, "present": bool, "source_sop": uid, "algorithm": name}}``."""
    import highdicom as hd
    from pydicom.sr.codedict import codes

    p = Path(path)
    try:
        sr = hd.sr.srread(str(p))
    except Exception as exc:  # as above
        raise InputError(f"{p}: not a readable DICOM SR ({exc.__class__.__name__}: {exc})") from None
    out: dict[str, dict[str, Any]] = {}
    content: Any = sr.content  # a MeasurementReport for TID 1500 documents
    for group in content.get_image_measurement_groups():
        name = str(group.finding_type.meaning)
        prob = [m for m in group.get_measurements() if m.name == codes.DCM.Probability]
        evaluation = group.get_qualitative_evaluations()
        refs = group.source_images
        out[name] = {
            "probability": float(prob[0].value) if prob else float("nan"),
            "present": bool(evaluation and evaluation[0].value == codes.SCT.Present),
            "source_sop": str(refs[0].referenced_sop_instance_uid) if refs else "",
            "algorithm": _text_item(group, "111001"),  # DCM 111001 "Algorithm Name"
        }
    return out


def _text_item(items: Any, code_value: str) -> str:
    """The TextValue of the first content item in ``items`` or below with that concept name code."""
    for item in items:
        names = item.get("ConceptNameCodeSequence")
        if names and str(names[0].CodeValue) == code_value and "TextValue" in item:
            return str(item.TextValue)
        found = _text_item(item.get("ContentSequence", []), code_value)
        if found:
            return found
    return ""
