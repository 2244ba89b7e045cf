"""Pre/post-processing of ``privmed segment`` in plaintext (onnxruntime), against exact oracles.

The threshold model (``test_segment_support``) labels each voxel on its own, so the correct
mask is known voxel by voxel in every mode; the anisotropic tri-axial case is checked against
an independent numpy computation of the 2.5D method.
"""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from privmed.data.preprocess import resize
from privmed.data.synth_ct import ct_affine, ct_phantom
from privmed.engines import PlaintextEngine
from privmed.errors import InputError, ModelError
from privmed.segment.engines import auto_chunk, to_probabilities
from privmed.segment.model import load_model
from privmed.segment.pipeline import segment_volume
from privmed.segment.summary import cost_summary, volume_summary
from privmed.segment.volume import read_volume, voxel_ml, write_mask

from .test_segment_support import (
    STEEPNESS,
    THRESHOLD_HU,
    normalised,
    threshold_labels,
    threshold_model,
)


def _hu(shape: tuple[int, int, int], seed: int = 3) -> np.ndarray:
    volume, _ = ct_phantom(np.random.default_rng(seed), tuple(max(16, s) for s in shape))  # type: ignore[arg-type]
    return np.rint(volume[: shape[0], : shape[1], : shape[2]]).astype(np.float32)


@pytest.mark.parametrize(
    ("mode", "final", "shape", "side"),
    [
        ("2d", "Softmax", (16, 16, 16), 16),
        ("tri-axial", "Sigmoid", (16, 16, 16), 16),
        ("tri-axial", "none", (16, 16, 16), 16),
        ("3d", "Softmax", (16, 20, 27), 8),  # overlapping windows, last ones moved flush
        ("3d", "Sigmoid", (6, 20, 11), 8),  # thinner than a patch: padded, then cropped
    ],
)
def test_each_slice_and_patch_goes_back_to_its_place(tmp_path: Path, mode: str, final: str, shape: tuple[int, int, int], side: int) -> None:
    # Prepare
    hu = _hu(shape)
    model = load_model(threshold_model(tmp_path / "t.onnx", 3 if mode == "3d" else 2, side, final))

    # Execute
    seg = segment_volume(hu, model, PlaintextEngine(), mode, overlap=0.25)

    # Assert: the per-voxel model's answer, exactly
    assert seg.labels.shape == shape and seg.labels.dtype == np.uint8
    np.testing.assert_array_equal(seg.labels, threshold_labels(hu))
    assert 0.05 < seg.labels.mean() < 0.95  # both classes present: the test can fail
    np.testing.assert_allclose(seg.probabilities.sum(axis=0), 1.0, atol=1e-5)
    expected_items = {"2d": shape[0], "tri-axial": sum(shape)}.get(mode)
    if expected_items:
        assert seg.n_items == expected_items


def _softmax_fg(x: np.ndarray) -> np.ndarray:
    t = normalised(np.array(THRESHOLD_HU))
    return 1.0 / (1.0 + np.exp(-STEEPNESS * (x - t)))


def test_tri_axial_on_an_anisotropic_volume_is_the_mean_of_three_resized_views(tmp_path: Path) -> None:
    # Prepare: 12 x 20 x 16 voxels through a 16 x 16 network -> every view resized both ways
    hu = _hu((12, 20, 16), seed=5)
    model = load_model(threshold_model(tmp_path / "t.onnx", 2, 16))

    # Execute
    seg = segment_volume(hu, model, PlaintextEngine(), "tri-axial")  # default: every slice

    # Assert against numpy: per view, resize each slice to 16 x 16, apply the model, resize back
    norm = normalised(hu.astype(np.float64))
    fused = np.zeros(hu.shape)
    for axis in range(3):
        slices = np.moveaxis(norm, axis, 0)
        fg = np.stack([resize(_softmax_fg(resize(s, (16, 16))), s.shape) for s in slices])
        fused += np.moveaxis(fg, 0, axis) / 3
    np.testing.assert_allclose(seg.probabilities[1], fused, atol=2e-5)  # float32 network vs float64
    decided = np.abs(fused - 0.5) > 1e-4
    np.testing.assert_array_equal(seg.labels[decided], (fused > 0.5)[decided])


def test_tri_axial_at_the_network_grid_resamples_long_views_along_their_slice_axis(tmp_path: Path) -> None:
    # Prepare: 40 x 20 x 12 voxels through a 16 x 16 network: the axial (40) and coronal (20)
    # stacks are longer than 16 and are resampled to 16 slices; the sagittal (12) is not
    hu = _hu((40, 20, 12), seed=9)
    model = load_model(threshold_model(tmp_path / "t.onnx", 2, 16))

    # Execute
    seg = segment_volume(hu, model, PlaintextEngine(), "tri-axial", view_slices="grid")
    every = segment_volume(hu, model, PlaintextEngine(), "tri-axial")

    # Assert against numpy with the general N-D resize: per view, the stack (in HU) resized to
    # min(n, 16) slices, each slice windowed, normalised and resized to 16 x 16, the model, and
    # the stack resized back
    assert seg.n_items == 16 + 16 + 12 and every.n_items == 40 + 20 + 12
    fused = np.zeros(hu.shape)
    for axis in range(3):
        stack = np.moveaxis(hu.astype(np.float64), axis, 0)
        taken = resize(stack, (min(len(stack), 16), *stack.shape[1:]))
        fg = np.stack([_softmax_fg(resize(normalised(s), (16, 16))) for s in taken])
        fused += np.moveaxis(resize(fg, stack.shape), 0, axis) / 3
    np.testing.assert_allclose(seg.probabilities[1], fused, atol=5e-5)  # float32 path vs float64
    decided = np.abs(fused - 0.5) > 1e-3
    np.testing.assert_array_equal(seg.labels[decided], (fused > 0.5)[decided])
    # the same decisions as every slice, up to the edges the coarser sampling blurs
    agree = (seg.labels == every.labels).mean()
    assert agree > 0.97, agree


@pytest.mark.parametrize(("n", "n_out"), [(37, 16), (16, 16), (9, 16), (300, 256)])
def test_resample_axis_is_resize_on_one_axis(n: int, n_out: int) -> None:
    from privmed.segment.views import resample_axis

    stack = np.random.default_rng(n).standard_normal((n, 5, 7)).astype(np.float32)
    got = resample_axis(stack, n_out)
    assert got.shape == (n_out, 5, 7) and got.dtype == np.float32
    np.testing.assert_allclose(got, resize(stack, (n_out, 5, 7)), atol=2e-6)


def test_3d_resample_runs_on_a_coarser_grid_and_comes_back(tmp_path: Path) -> None:
    hu = _hu((16, 32, 32), seed=7)
    model = load_model(threshold_model(tmp_path / "t.onnx", 3, 8))

    seg = segment_volume(hu, model, PlaintextEngine(), "3d", resample=(8, 16, 16))
    same = segment_volume(hu, model, PlaintextEngine(), "3d", resample=(16, 32, 32), blend="constant")

    assert seg.labels.shape == hu.shape and seg.n_items == 1 * 3 * 3
    truth = threshold_labels(hu).astype(bool)
    dice = 2 * (seg.labels.astype(bool) & truth).sum() / (seg.labels.sum() + truth.sum())
    assert dice > 0.9, dice  # half resolution loses edges only
    np.testing.assert_array_equal(same.labels, truth)  # resampling to the same grid is exact


def test_probabilities_from_each_final_activation() -> None:
    logits = np.array([[[0.0]], [[2.0]]])[None]  # (1, 2, 1, 1)
    p = to_probabilities(logits, "none")
    np.testing.assert_allclose(p[0, :, 0, 0], [1 / (1 + np.e**2), np.e**2 / (1 + np.e**2)], rtol=1e-6)
    np.testing.assert_allclose(to_probabilities(np.full((1, 1, 2), 0.8), "Sigmoid")[0, :, 0], [0.2, 0.8], rtol=1e-6)
    np.testing.assert_allclose(to_probabilities(np.zeros((1, 1, 2)), "none")[0, :, 0], [0.5, 0.5])


def test_volume_summary_matches_numpy() -> None:
    rng = np.random.default_rng(0)
    labels = rng.choice(3, size=(7, 9, 11), p=[0.7, 0.25, 0.05]).astype(np.uint8)
    affine = np.diag([-0.8, -0.8, 2.0, 1.0])

    got = volume_summary(labels, ("background", "lung", "lesion"), voxel_ml(affine))

    ml = 0.8 * 0.8 * 2.0 / 1000
    assert got["voxel_ml"] == pytest.approx(ml)
    assert got["classes"]["lung"]["voxels"] == int((labels == 1).sum())
    assert got["lesion_ml"] == pytest.approx((labels == 2).sum() * ml)
    assert got["lung_ml"] == pytest.approx((labels > 0).sum() * ml)
    assert got["infected_fraction"] == pytest.approx((labels == 2).sum() / (labels > 0).sum())
    assert "infected_fraction" not in volume_summary(labels, ("background", "a", "b"), ml)


def test_cost_summary_divides_batches_into_items() -> None:
    from privmed.runtime.stats import BatchCost, SessionStats

    stats = SessionStats(
        wall_s=9.0, online_s=8.0, bytes_sent={"data-owner": 1300 + 300 + 150 + 50}, rounds=30,
        batches=[BatchCost(0, 4, 2.0, 10, 1300), BatchCost(1, 4, 1.6, 10, 300), BatchCost(2, 2, 0.8, 10, 150)],
    )  # fmt: skip
    got = cost_summary(stats, 10, "slice")
    assert got["per_item"]["time_s"] == pytest.approx(4.4 / 10)
    assert got["per_item"]["bytes"] == pytest.approx(1750 / 10)
    assert got["rounds_per_batch"] == 10 and got["batches"] == 3 and got["batch_size"] == 4
    assert got["outside_batches_bytes"] == 50 and got["first_batch_extra_bytes"] == 1000


def test_auto_chunk_keeps_a_batch_near_one_gigabyte(tmp_path: Path) -> None:
    from privmed.segment.engines import BATCH_MEMORY_BYTES, BYTES_PER_WORK_ELEMENT

    model = load_model(threshold_model(tmp_path / "t.onnx", 3, 16))
    # the 1x1x1 conv with one input channel: work = output positions = 16^3; the softmax output 2 x 16^3
    assert model.work_elements == 2 * 16**3
    assert auto_chunk(model, 10**6) == BATCH_MEMORY_BYTES // (BYTES_PER_WORK_ELEMENT * 2 * 16**3)
    assert auto_chunk(model, 3) == 3


def test_work_elements_of_a_conv_stack(tmp_path: Path) -> None:
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    w1, w2 = np.zeros((4, 1, 3, 3), np.float32), np.zeros((2, 4, 3, 3), np.float32)
    graph = helper.make_graph(
        [helper.make_node("Conv", ["input", "w1"], ["h"], pads=[1, 1, 1, 1]),
         helper.make_node("Conv", ["h", "w2"], ["output"], pads=[1, 1, 1, 1])],
        "g", [helper.make_tensor_value_info("input", TensorProto.FLOAT, [1, 1, 10, 10])],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, [1, 2, 10, 10])],
        [numpy_helper.from_array(w1, "w1"), numpy_helper.from_array(w2, "w2")],
    )  # fmt: skip
    path = tmp_path / "c.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    (tmp_path / "c.preprocess.json").write_text(json.dumps({"format": "privmed-preprocess", "version": 1, "size": [10, 10]}))

    # second conv: 100 output positions x 4 input channels x 9 taps
    assert load_model(path).work_elements == 100 * 4 * 9


# -- errors a user can cause: one line, naming the file ---------------------------------------


def test_model_errors(tmp_path: Path) -> None:
    m2 = threshold_model(tmp_path / "m2.onnx", 2, 16)
    m3 = threshold_model(tmp_path / "m3.onnx", 3, 8)
    (tmp_path / "junk.onnx").write_bytes(b"not a protobuf at all" * 5)
    lonely = tmp_path / "lonely.onnx"
    lonely.write_bytes(m2.read_bytes())

    with pytest.raises(ModelError, match=r"m3\.onnx: --mode 2d needs a 2-D U-Net .* got a 3-D model"):
        load_model(m3).check_mode("2d")
    with pytest.raises(ModelError, match=r"m2\.onnx: --mode 3d needs a 3-D U-Net"):
        load_model(m2).check_mode("3d")
    with pytest.raises(ModelError, match=r"junk\.onnx: not a readable ONNX model"):
        load_model(tmp_path / "junk.onnx")
    with pytest.raises(ModelError, match=r"nowhere\.onnx: model file not found"):
        load_model(tmp_path / "nowhere.onnx")
    with pytest.raises(InputError, match=r"lonely\.preprocess\.json: preprocessing description not found"):
        load_model(lonely)
    with pytest.raises(InputError, match=r"--patch 16: m3\.onnx takes a fixed input of \(8, 8, 8\)"):
        load_model(m3, patch=16)


def test_a_classifier_is_not_a_segmentation_model(tmp_path: Path) -> None:
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    graph = helper.make_graph(
        [helper.make_node("Conv", ["input", "w"], ["h"]), helper.make_node("GlobalAveragePool", ["h"], ["g"]),
         helper.make_node("Flatten", ["g"], ["output"])],
        "cls", [helper.make_tensor_value_info("input", TensorProto.FLOAT, [1, 1, 16, 16])],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, [1, 3])],
        [numpy_helper.from_array(np.zeros((3, 1, 1, 1), np.float32), "w")],
    )  # fmt: skip
    path = tmp_path / "cls.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    (tmp_path / "cls.preprocess.json").write_text(json.dumps({"format": "privmed-preprocess", "version": 1, "size": [16, 16]}))

    with pytest.raises(ModelError, match=r"cls\.onnx: not a segmentation model: expected an output \(N, K, 16, 16\), got \(1, 3\)"):
        load_model(path)


def test_volume_errors(tmp_path: Path) -> None:
    from privmed.data.writers import write_nifti, write_png

    write_png(tmp_path / "xray.png", np.zeros((8, 8)))
    write_nifti(tmp_path / "flat.nii.gz", np.zeros((8, 8), np.float32), np.eye(4))
    (tmp_path / "empty").mkdir()
    (tmp_path / "notes.txt").write_text("hello")

    with pytest.raises(InputError, match=r"missing\.nii\.gz: no such file or folder"):
        read_volume(tmp_path / "missing.nii.gz")
    with pytest.raises(InputError, match=r"xray\.png: not a volume: expected a NIfTI file .* got a png image of shape \(8, 8\)"):
        read_volume(tmp_path / "xray.png")
    with pytest.raises(InputError, match=r"flat\.nii\.gz: not a volume: expected a 3D image \(D, H, W\), got shape \(8, 8\)"):
        read_volume(tmp_path / "flat.nii.gz")
    with pytest.raises(InputError, match=r"notes\.txt: not a volume: .* got a file of unknown format"):
        read_volume(tmp_path / "notes.txt")
    with pytest.raises(InputError, match=r"empty: no DICOM files found"):
        read_volume(tmp_path / "empty")
    with pytest.raises(InputError, match=r"mask\.npy: expected a \.nii, \.nii\.gz or \.dcm \(DICOM SEG\) output"):
        write_mask(tmp_path / "mask.npy", np.zeros((2, 2, 2), np.uint8), np.eye(4))


def test_mask_keeps_the_input_affine(tmp_path: Path) -> None:
    from privmed.data.writers import write_nifti

    hu = _hu((16, 16, 16))
    affine = ct_affine(hu.shape, (2.5, 0.7, 0.7))  # type: ignore[arg-type]
    write_nifti(tmp_path / "ct.nii.gz", hu.astype(np.int16), affine)
    volume = read_volume(tmp_path / "ct.nii.gz")
    seg = segment_volume(volume.array, load_model(threshold_model(tmp_path / "t.onnx", 2, 16)), PlaintextEngine(), "2d")

    out = write_mask(tmp_path / "out" / "mask.nii.gz", seg.labels, volume.affine)

    img = nib.load(str(out))
    np.testing.assert_allclose(img.affine, affine, atol=1e-6)
    np.testing.assert_array_equal(np.asarray(img.dataobj), threshold_labels(hu))
    assert volume.voxel_ml == pytest.approx(2.5 * 0.7 * 0.7 / 1000)
