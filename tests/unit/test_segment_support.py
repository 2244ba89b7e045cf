"""Oracles for the segmentation tests: a threshold "U-Net" with a known answer, a CT DICOM series writer.

``threshold_model`` is a per-voxel network (a 1x1(x1) Conv then Softmax / Sigmoid / nothing)
that labels a voxel foreground exactly when its preprocessed intensity exceeds a threshold.
Whatever the mode, slicing, patching, padding, blending or fusion, the right answer is then
``threshold_labels(volume)`` voxel by voxel, so any slice or patch put back in the wrong
place shows up. The threshold sits half a HU between integers (HU volumes are integers), so
no voxel is within 1e-3 of it in normalised units: float32 and 16-bit fixed point agree.

The tests in this file check the oracles themselves against onnxruntime and pydicom.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

WINDOW = (-400.0, 1600.0)  # the CT lung window of privmed's trainers
THRESHOLD_HU = -500.5
STEEPNESS = 4.0


def normalised(hu: np.ndarray) -> np.ndarray:
    """The CT preprocessing in float64: window to [0, 1], then (x - 0.5) / 0.25."""
    lo = WINDOW[0] - WINDOW[1] / 2
    return (np.clip((hu - lo) / WINDOW[1], 0.0, 1.0) - 0.5) / 0.25


def threshold_labels(hu: np.ndarray) -> np.ndarray:
    return (normalised(hu) > normalised(np.array(THRESHOLD_HU))).astype(np.uint8)


def threshold_model(path: Path, dims: int, side: int, final: str = "Softmax", labels: list[str] | None = None) -> Path:
    """Write ``path`` (ONNX, input (1, 1, side^dims)) and its preprocess json; see the module docstring."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    t = float(normalised(np.array(THRESHOLD_HU)))
    k = 1 if final == "Sigmoid" else 2
    w = np.zeros((k, 1) + (1,) * dims, np.float32)
    w[-1] = STEEPNESS
    b = np.array([-STEEPNESS * t] if k == 1 else [0.0, -STEEPNESS * t], np.float32)
    spatial = [side] * dims
    nodes = [helper.make_node("Conv", ["input", "w", "b"], ["logits" if final != "none" else "output"], kernel_shape=[1] * dims)]
    if final != "none":
        attrs = {"axis": 1} if final == "Softmax" else {}
        nodes.append(helper.make_node(final, ["logits"], ["output"], **attrs))
    graph = helper.make_graph(
        nodes, "threshold",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, [1, 1, *spatial])],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, [1, k, *spatial])],
        [numpy_helper.from_array(w, "w"), numpy_helper.from_array(b, "b")],
    )  # fmt: skip
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    helper.set_model_props(model, {"privmed.labels": json.dumps(labels or ["background", "tissue"])})
    onnx.checker.check_model(model)
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(path))
    pre = {
        "format": "privmed-preprocess", "version": 1, "size": spatial, "channels": 1,
        "normalize": "fixed", "mean": 0.5, "std": 0.25, "window": list(WINDOW),
        "spatial_dims": dims, "modalities": None,
    }  # fmt: skip
    path.with_name(path.stem + ".preprocess.json").write_text(json.dumps(pre))
    return path


def write_ct_series(folder: Path, hu: np.ndarray, spacing: tuple[float, float, float], origin: tuple[float, float, float]) -> Path:
    """One single-frame CT DICOM file per axial slice of ``hu`` (D, H, W), written in scrambled order."""
    from pydicom.dataset import FileDataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian

    folder.mkdir(parents=True, exist_ok=True)
    d, h, w = hu.shape
    order = np.random.default_rng(0).permutation(d)
    for i, k in enumerate(order):
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.2"
        meta.MediaStorageSOPInstanceUID = f"1.2.826.0.1.3680043.99.{k + 1}"
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = FileDataset(str(folder / f"im{i:03d}.dcm"), {}, file_meta=meta, preamble=b"\0" * 128)
        ds.SOPClassUID = meta.MediaStorageSOPClassUID
        ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
        ds.SeriesInstanceUID = "1.2.826.0.1.3680043.99"
        ds.Modality = "CT"
        ds.Rows, ds.Columns = h, w
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
        ds.RescaleSlope, ds.RescaleIntercept = "1", "-1024"
        ds.PixelSpacing = [f"{spacing[1]}", f"{spacing[2]}"]
        ds.SliceThickness = f"{spacing[0]}"
        ds.ImageOrientationPatient = ["1", "0", "0", "0", "1", "0"]
        ds.ImagePositionPatient = [f"{origin[0]}", f"{origin[1]}", f"{origin[2] + k * spacing[0]}"]
        ds.InstanceNumber = 1
        ds.PixelData = (np.rint(hu[k]) + 1024).astype("<i2").tobytes()
        ds.save_as(str(folder / f"im{i:03d}.dcm"), enforce_file_format=True)
    return folder


def test_threshold_model_in_onnxruntime_is_the_numpy_threshold(tmp_path: Path) -> None:
    import onnxruntime as ort

    hu = np.rint(np.random.default_rng(0).uniform(-1100, 300, (1, 1, 8, 8)))
    x = normalised(hu).astype(np.float32)
    for final in ("Softmax", "Sigmoid", "none"):
        path = threshold_model(tmp_path / f"{final}.onnx", 2, 8, final)
        out = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"input": x})[0]
        fg = out[:, -1] > (0.5 if final != "none" else out[:, 0])
        assert np.array_equal(fg, threshold_labels(hu)[:, 0].astype(bool)), final


def test_ct_series_reads_back_in_slice_order_with_its_geometry(tmp_path: Path) -> None:
    from privmed.data.readers import read_dicom_series

    hu = np.rint(np.random.default_rng(1).uniform(-1000, 400, (5, 6, 7)))

    volume, meta = read_dicom_series(write_ct_series(tmp_path / "s", hu, (2.5, 0.5, 0.75), (-10.0, -20.0, 30.0)))

    np.testing.assert_array_equal(volume, hu)
    # (k, r, c) -> LPS (-10 + 0.75 c, -20 + 0.5 r, 30 + 2.5 k) -> RAS flips x and y
    np.testing.assert_allclose(meta["affine"] @ [4, 3, 2, 1], [10 - 1.5, 20 - 1.5, 40.0, 1])
