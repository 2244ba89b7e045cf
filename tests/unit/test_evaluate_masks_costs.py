"""Dice / HD95 against brute-force pairwise distances; cost summaries against numpy."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from privmed.evaluate.costs import observed_study_seconds, projected_study_seconds, summarize
from privmed.evaluate.masks import dice, hd95


def brute_surface(mask: np.ndarray) -> list[tuple[int, ...]]:
    """Foreground voxels with a face-neighbour that is background or outside the array."""
    out = []
    for idx in itertools.product(*(range(s) for s in mask.shape)):
        if not mask[idx]:
            continue
        for axis, step in itertools.product(range(mask.ndim), (-1, 1)):
            nb = list(idx)
            nb[axis] += step
            if not (0 <= nb[axis] < mask.shape[axis]) or not mask[tuple(nb)]:
                out.append(idx)
                break
    return out


def brute_hd95(a: np.ndarray, b: np.ndarray, spacing: tuple[float, ...]) -> float:
    sa = np.array(brute_surface(a), dtype=float) * spacing
    sb = np.array(brute_surface(b), dtype=float) * spacing
    pair = np.sqrt(((sa[:, None, :] - sb[None, :, :]) ** 2).sum(-1))
    return float(np.percentile(np.concatenate([pair.min(1), pair.min(0)]), 95))


@pytest.mark.parametrize("shape", [(9, 11), (5, 6, 7)])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_hd95_matches_brute_force(shape: tuple[int, ...], seed: int) -> None:
    rng = np.random.default_rng(seed)
    a = rng.random(shape) < 0.4
    b = rng.random(shape) < 0.4
    spacing = tuple(float(x) for x in rng.uniform(0.5, 2.0, size=len(shape)))
    assert hd95(a, b, spacing) == pytest.approx(brute_hd95(a, b, spacing), rel=1e-9)


def test_hd95_simple_shift_and_empty() -> None:
    a = np.zeros((20, 20), bool)
    a[5:10, 5:10] = True
    b = np.roll(a, 3, axis=1)
    assert hd95(a, a) == 0.0
    assert hd95(a, b, spacing=(1.0, 0.5)) == pytest.approx(brute_hd95(a, b, (1.0, 0.5)))
    assert hd95(np.zeros_like(a), np.zeros_like(a)) == 0.0
    assert hd95(a, np.zeros_like(a)) == float("inf")


def test_dice() -> None:
    a = np.zeros((4, 4), bool)
    b = np.zeros((4, 4), bool)
    a[:2] = True  # 8 voxels
    b[1:3] = True  # 8 voxels, 4 shared
    assert dice(a, b) == pytest.approx(0.5)
    assert dice(a, a) == 1.0 and dice(~a & a, ~a & a) == 1.0


def test_summarize_matches_numpy() -> None:
    v = np.array([3.0, 1.0, np.nan, 10.0, 4.0, 2.0])
    s = summarize(v)
    finite = v[~np.isnan(v)]
    assert s.n == 5 and s.median == np.median(finite) and s.max == 10.0
    assert s.iqr == pytest.approx(np.percentile(finite, 75) - np.percentile(finite, 25))
    assert summarize(np.array([])).n == 0


def test_projections() -> None:
    assert projected_study_seconds(np.array([2.0, 4.0]), 100, workers=2) == pytest.approx(150.0)
    assert observed_study_seconds(np.array([0.0, 1.0]), np.array([3.0, 4.0]), 10) == pytest.approx(
        20.0
    )


def test_nearest_resize_keeps_labels() -> None:
    from privmed.evaluate.masks import nearest_resize

    labels = np.arange(12).reshape(3, 4)
    up = nearest_resize(labels, (6, 8))
    np.testing.assert_array_equal(up, np.repeat(np.repeat(labels, 2, axis=0), 2, axis=1))
    down = nearest_resize(np.arange(16).reshape(4, 4), (2, 2))
    np.testing.assert_array_equal(down, [[5, 7], [13, 15]])  # centre of each 2x2 block, rounded up
    assert nearest_resize(labels, (3, 4)).tolist() == labels.tolist()
