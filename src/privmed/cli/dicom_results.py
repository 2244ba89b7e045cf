"""DICOM results for `privmed infer` (SR per image) and `privmed segment` (SEG per series).

Helpers shared by the two commands: the algorithm identification written into the objects
(model name and version from the ONNX file, the plan's SHA-256 as the data owner received
it), and where each SR goes (one ``.dcm`` file, or a folder with one SR per image).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from privmed.runtime.stats import SessionStats

import hashlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from privmed.errors import InputError


def algorithm_info(model: Path, stats: SessionStats | None, secure: bool = True) -> Any:
    """``AlgorithmInfo`` for ``model``: name = file stem, version = ONNX model_version.

    The plan fingerprint is the session's ``stats.plan.fingerprint`` (the SHA-256 of
    the plan the data owner accepted) when the runtime reports it;
    otherwise the SHA-256 of the model file, marked as such (the data owner of a local run
    has the file).
    """
    import onnx

    from privmed.data.dicom_out import AlgorithmInfo

    proto = onnx.load(str(model), load_external_data=False)
    version = str(proto.model_version) if proto.model_version else "1"
    plan = stats.plan.fingerprint if stats is not None and stats.plan is not None else None
    if not plan:
        plan = "model-file:" + hashlib.sha256(model.read_bytes()).hexdigest()
    info = AlgorithmInfo(name=model.stem, version=version, plan_sha256=str(plan))
    if not secure:
        info = AlgorithmInfo(info.name, info.version, info.plan_sha256, "plaintext onnxruntime on the data owner's machine (not secure)")
    return info


def dicom_output_wanted(output: Path) -> bool:
    """``--output`` names a DICOM result: a ``.dcm`` file or a folder (no suffix)."""
    return output.suffix.lower() == ".dcm" or output.suffix == "" or output.is_dir()


def check_report_inputs(output: Path, rows: Sequence[Path]) -> None:
    """Refuse, before anything runs, SR output for inputs that are not DICOM files."""
    from privmed.data.readers import image_kind

    not_dicom = sorted({str(f) for f in rows if image_kind(f) != "dicom"})
    if not_dicom:
        raise InputError(f"{output}: a DICOM SR needs DICOM inputs; not DICOM: {', '.join(not_dicom[:3])}")
    if output.suffix.lower() == ".dcm" and len(set(rows)) != 1:
        raise InputError(f"{output}: {len(set(rows))} images give {len(set(rows))} reports; give a folder as --output")


def write_reports(
    output: Path, outputs: np.ndarray, rows: Sequence[Path], model: Path, stats: SessionStats | None, threshold: float
) -> list[Path]:
    """One TID 1500 SR per input image: ``output`` itself for one image, else ``output/SR_<SOP UID>.dcm``."""
    import pydicom

    from privmed.data.dicom_out import write_sr
    from privmed.evaluate.study import model_labels

    check_report_inputs(output, rows)
    if outputs.ndim != 2 or len(set(rows)) != outputs.shape[0]:
        raise InputError(f"{output}: a DICOM SR needs one row of probabilities per image file, got outputs {tuple(outputs.shape)}")
    if not np.all((outputs >= 0) & (outputs <= 1)):
        raise InputError(f"{output}: the model's outputs are not probabilities in [0, 1]; write .npy or .csv instead")
    labels = model_labels(model) or [f"output_{k}" for k in range(outputs.shape[1])]
    if len(labels) != outputs.shape[1]:
        raise InputError(f"{model}: privmed.labels names {len(labels)} findings, the model outputs {outputs.shape[1]}")
    one_file = output.suffix.lower() == ".dcm"
    algo = algorithm_info(model, stats)
    written = []
    for f, probs in zip(rows, outputs, strict=True):
        source = pydicom.dcmread(str(f), stop_before_pixels=True)
        target = output if one_file else output / f"SR_{source.SOPInstanceUID}.dcm"
        written.append(write_sr(target, source, probs.tolist(), labels, algo, threshold))
    return written


def write_segmentation(
    output: Path, files: Sequence[str], labels: np.ndarray, classes: Sequence[str], model: Path, stats: SessionStats | None, secure: bool
) -> Path:
    """The label map over the series ``files`` (array order) as one DICOM SEG."""
    import pydicom

    from privmed.data.dicom_out import write_seg

    sources = [pydicom.dcmread(f) for f in files]
    if len(sources) == 1 and int(sources[0].get("NumberOfFrames", 1) or 1) > 1:
        from privmed.data.dicom_enhanced import frame_order

        in_file_order = np.empty_like(labels)  # the SEG's frames follow the source file's frames
        in_file_order[frame_order(sources[0], files[0])] = labels
        labels = in_file_order
    return write_seg(output, sources, labels, classes, algorithm_info(model, stats, secure))
