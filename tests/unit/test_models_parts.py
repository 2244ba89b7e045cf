"""Pieces of training against oracles: splits, mask resizing, Dice, masked BCE, early stopping."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from privmed.errors import InputError
from privmed.models.arrays import resize_labels, split_rows
from privmed.models.loop import fit
from privmed.models.objectives import (
    auroc_per_finding,
    dice_per_class,
    intensity_augment,
    masked_bce,
)


def test_split_keeps_volumes_whole_and_holds_out_the_site() -> None:
    sites = ["a"] * 40 + ["b"] * 20 + ["c"] * 20
    groups = [f"vol{i // 4}" for i in range(80)]  # 4 slices per volume

    train, tune, test = split_rows(sites, groups, "c", np.random.default_rng(0))

    assert sorted(test.tolist()) == list(range(60, 80))
    assert sorted(np.concatenate([train, tune, test]).tolist()) == list(range(80))
    train_groups = {groups[i] for i in train}
    tune_groups = {groups[i] for i in tune}
    assert not train_groups & tune_groups
    assert len(tune_groups) == round(0.15 * 15)


def test_split_errors() -> None:
    with pytest.raises(InputError, match="'z'.*a, b"):
        split_rows(["a", "b"], ["1", "2"], "z", np.random.default_rng(0))
    with pytest.raises(InputError, match="at least 2"):
        split_rows(["a", "b"], ["1", "2"], "b", np.random.default_rng(0))


@pytest.mark.parametrize(("shape_in", "shape_out"), [((7, 9), (5, 13)), ((10, 6, 9), (6, 10, 5))])
def test_resize_labels_matches_skimage_nearest(shape_in: tuple, shape_out: tuple) -> None:
    from skimage.transform import resize

    mask = np.random.default_rng(0).integers(0, 4, size=shape_in)

    got = resize_labels(mask, shape_out)

    # skimage order=0 samples the same pixel centres; these ratios avoid exact ties
    want = resize(mask, shape_out, order=0, preserve_range=True, anti_aliasing=False)
    np.testing.assert_array_equal(got, want.astype(mask.dtype))


def test_dice_matches_monai_per_volume() -> None:
    from monai.metrics import compute_dice

    rng = np.random.default_rng(1)
    pred = rng.integers(0, 3, size=(6, 8, 8))
    truth = rng.integers(0, 3, size=(6, 8, 8))
    groups = ["v1"] * 3 + ["v2"] * 3  # two volumes of three slices

    got = dice_per_class(pred, truth, groups, ["lung", "lesion"])

    def onehot(a: np.ndarray) -> torch.Tensor:
        t = torch.nn.functional.one_hot(torch.from_numpy(a), 3).movedim(-1, 1)
        return t.reshape(2, 3, 3, 8, 8).transpose(1, 2).float()  # (volume, class, D, H, W)

    want = compute_dice(onehot(pred), onehot(truth), include_background=False).mean(0)
    assert got["lung"] == pytest.approx(float(want[0]), abs=1e-6)
    assert got["lesion"] == pytest.approx(float(want[1]), abs=1e-6)


def test_dice_absent_class_is_nan() -> None:
    zeros = np.zeros((2, 4, 4), dtype=np.int64)
    assert math.isnan(dice_per_class(zeros, zeros, ["v", "v"], ["lung"])["lung"])


def test_masked_bce_ignores_unknown_labels() -> None:
    logits = torch.tensor([[0.3, -1.0], [2.0, 0.5]])
    target = torch.tensor([[1.0, float("nan")], [0.0, 1.0]])
    known = ~torch.isnan(target)

    got = masked_bce(logits, target)

    want = torch.nn.functional.binary_cross_entropy_with_logits(logits[known], target[known])
    assert float(got) == pytest.approx(float(want), rel=1e-6)


def test_auroc_undefined_finding_is_nan() -> None:
    scores = np.array([[0.1, 0.2], [0.9, 0.3], [0.4, 0.8]])
    labels = np.array([[0.0, 1.0], [1.0, 1.0], [np.nan, 1.0]])

    got = auroc_per_finding(scores, labels, ["x", "y"])

    assert got["x"] == 1.0 and math.isnan(got["y"])


def test_intensity_augment_keeps_each_image_mean_and_std() -> None:
    x = torch.randn(4, 1, 16, 16, generator=torch.Generator().manual_seed(0)) * 2 + 1

    y, _ = intensity_augment(x, torch.zeros(4), torch.Generator().manual_seed(1))

    assert not torch.allclose(x, y)
    torch.testing.assert_close(y.mean(dim=(1, 2, 3)), x.mean(dim=(1, 2, 3)), atol=1e-5, rtol=0)
    torch.testing.assert_close(y.std(dim=(1, 2, 3)), x.std(dim=(1, 2, 3)), atol=1e-5, rtol=1e-5)


def test_fit_stops_early_and_restores_the_best_weights() -> None:
    model = torch.nn.Linear(2, 1)
    x, y = torch.randn(8, 2), torch.randn(8, 1)
    scores = iter([0.5, 0.9, 0.7, 0.6, 0.8, 0.95])  # best at epoch 2, then 3 without gain
    snapshots: list[torch.Tensor] = []

    def validate(m: torch.nn.Module) -> tuple[float, dict[str, float], float]:
        snapshots.append(m.weight.detach().clone())
        return 0.0, {}, next(scores)

    result = fit(model, torch.nn.functional.mse_loss, x, y, validate, epochs=10, batch_size=4,
                 lr=0.1, generator=torch.Generator().manual_seed(0), patience=3)  # fmt: skip

    assert result.best_epoch == 2 and result.stopped_early
    assert len(result.history) == 5
    torch.testing.assert_close(model.weight, snapshots[1])
