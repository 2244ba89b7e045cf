"""Slice stacks, sliding windows and blending (``privmed.segment.views``) against brute-force oracles."""

from __future__ import annotations

import numpy as np
import pytest

from privmed.errors import InputError
from privmed.segment import views


@pytest.mark.parametrize(("length", "patch", "overlap"), [(32, 16, 0.25), (24, 16, 0.25), (16, 16, 0.5), (37, 8, 0.0), (100, 64, 0.25)])
def test_windows_cover_every_voxel_stay_inside_and_respect_the_stride(length: int, patch: int, overlap: float) -> None:
    starts = views.window_starts(length, patch, overlap)

    covered = np.zeros(length, int)
    for s in starts:
        covered[s : s + patch] += 1
    stride = max(1, int(np.floor(patch * (1 - overlap))))
    assert covered.min() >= 1, starts
    assert starts[0] == 0 and starts[-1] == length - patch
    assert all(0 <= s <= length - patch for s in starts)
    if len(starts) > 1:  # regular stride, the last window moved back flush with the end
        steps = np.diff(starts)
        assert np.all(steps[:-1] == stride) and 0 < steps[-1] <= stride, starts


def test_window_count_matches_the_closed_form() -> None:
    # ceil((L - P) / s) + 1 windows; 128 with 64-patches at 25 % overlap: s = 48 -> 3 per axis
    assert len(views.window_starts(128, 64, 0.25)) == 3
    assert len(views.patch_boxes((128, 128, 128), (64, 64, 64), 0.25)) == 27
    assert len(views.patch_boxes((24, 32, 32), (16, 16, 16), 0.25)) == 2 * 3 * 3


@pytest.mark.parametrize("overlap", [-0.1, 1.0, 1.5])
def test_bad_overlap_is_refused(overlap: float) -> None:
    with pytest.raises(InputError, match="overlap"):
        views.window_starts(32, 16, overlap)


def test_gaussian_weights_peak_at_the_centre_and_are_separable() -> None:
    w = views.blend_weights((16, 16, 16), "gaussian")

    x = np.arange(16) - 7.5
    g = np.exp(-(x**2) / (2 * 2.0**2))  # sigma = 16 / 8
    expected = np.maximum(np.einsum("i,j,k->ijk", g, g, g) / g.max() ** 3, 1e-3)
    np.testing.assert_allclose(w, expected, rtol=1e-12)
    assert w.max() == pytest.approx(1.0) and w.min() == pytest.approx(1e-3)
    assert np.all(views.blend_weights((4, 6), "constant") == 1.0)
    with pytest.raises(InputError, match="blend"):
        views.blend_weights((4,), "linear")


@pytest.mark.parametrize("kind", ["gaussian", "constant"])
def test_blend_equals_a_voxel_by_voxel_weighted_mean(kind: str) -> None:
    # Prepare: random per-patch predictions on a (10, 12, 9) grid with 6^3 patches
    rng = np.random.default_rng(0)
    shape, patch = (10, 12, 9), (6, 6, 6)
    boxes = views.patch_boxes(shape, patch, 0.5)
    preds = rng.random((len(boxes), 2, *patch))
    weight = views.blend_weights(patch, kind)

    got = views.blend(preds, boxes, shape, weight)

    # Oracle: for every voxel, loop over the patches that contain it
    expected = np.zeros((2, *shape))
    for z, y, x in np.ndindex(*shape):
        num, den = np.zeros(2), 0.0
        for pred, box in zip(preds, boxes, strict=True):
            if all(b.start <= c < b.stop for b, c in zip(box, (z, y, x), strict=True)):
                local = (z - box[0].start, y - box[1].start, x - box[2].start)
                num += weight[local] * pred[(slice(None), *local)]
                den += weight[local]
        expected[:, z, y, x] = num / den
    np.testing.assert_allclose(got, expected, rtol=1e-12)


def test_stacks_are_the_three_orthogonal_slicings_and_put_back_in_place() -> None:
    vol = np.arange(3 * 4 * 5, dtype=float).reshape(3, 4, 5)

    assert np.array_equal(views.stack(vol, "axial")[1], vol[1])
    assert np.array_equal(views.stack(vol, "coronal")[2], vol[:, 2, :])
    assert np.array_equal(views.stack(vol, "sagittal")[4], vol[:, :, 4])
    for view in views.AXES:
        target = np.zeros((2, 3, 4, 5))
        per_class = np.stack([views.stack(vol, view), -views.stack(vol, view)])
        views.put_stack(target, per_class, view)
        assert np.array_equal(target[0], vol) and np.array_equal(target[1], -vol), view


def test_pad_to_replicates_edges_and_crop_undoes_it() -> None:
    vol = np.random.default_rng(1).random((1, 5, 20, 7))

    padded, crop = views.pad_to(vol, (8, 16, 8))

    assert padded.shape == (1, 8, 20, 8)
    assert np.array_equal(padded[crop], vol)
    assert np.array_equal(padded[0, 7, :, :7], vol[0, 4]) and np.array_equal(padded[0, :5, :, 7], vol[0, :, :, 6])
    same, _ = views.pad_to(vol, (5, 20, 7))
    assert same is vol
