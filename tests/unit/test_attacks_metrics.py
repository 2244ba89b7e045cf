"""Attack scoring: PSNR and SSIM against scikit-image, Hungarian matching, leakage score."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from skimage.metrics import peak_signal_noise_ratio, structural_similarity

from privmed.attacks.metrics import (
    leakage_score,
    match_reconstructions,
    psnr,
    residual_correlation,
    score_batch,
    ssim,
    ssim_matrix,
)
from privmed.errors import InputError


def _pair(shape: tuple[int, ...], seed: int, data_range: float) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    truth = rng.random(shape) * data_range
    noisy = np.clip(truth + 0.15 * data_range * rng.standard_normal(shape), 0, data_range)
    return truth, noisy


@pytest.mark.parametrize("shape", [(3, 1, 16, 16), (2, 2, 23, 40), (2, 1, 64, 64)])
@pytest.mark.parametrize("data_range", [1.0, 255.0])
def test_psnr_and_ssim_match_scikit_image(shape, data_range):
    # Prepare
    truth, noisy = _pair(shape, seed=sum(shape), data_range=data_range)
    # Execute
    ours_psnr = psnr(noisy, truth, data_range)
    ours_ssim = ssim(noisy, truth, data_range)
    # Assert: same formula and filters, so only float64 rounding separates them.
    for i in range(shape[0]):
        ref_psnr = peak_signal_noise_ratio(truth[i], noisy[i], data_range=data_range)
        ref_ssim = structural_similarity(
            noisy[i], truth[i], data_range=data_range, channel_axis=0,
            gaussian_weights=True, sigma=1.5, use_sample_covariance=False,
        )
        assert ours_psnr[i] == pytest.approx(ref_psnr, abs=1e-9)
        assert ours_ssim[i] == pytest.approx(ref_ssim, abs=1e-9)


def test_ssim_matrix_entries_are_pairwise_ssim_and_identity_is_one():
    truth, noisy = _pair((4, 1, 20, 20), seed=3, data_range=1.0)
    matrix = ssim_matrix(noisy, truth)
    for i, j in itertools.product(range(4), range(4)):
        ref = structural_similarity(
            noisy[i, 0], truth[j, 0], data_range=1.0, gaussian_weights=True, sigma=1.5,
            use_sample_covariance=False,
        )
        assert matrix[i, j] == pytest.approx(ref, abs=1e-9)
    assert np.allclose(np.diag(ssim_matrix(truth, truth)), 1.0)
    assert np.isinf(psnr(truth, truth)).all()


def test_hungarian_matching_equals_brute_force_over_permutations():
    # Prepare: a shuffled, noisy copy of a batch of 5 images.
    truth, noisy = _pair((5, 1, 16, 16), seed=11, data_range=1.0)
    shuffle = np.array([3, 0, 4, 1, 2])
    reconstructions = noisy[shuffle]
    # Execute
    order = match_reconstructions(reconstructions, truth)
    # Assert: the assignment maximises total SSIM (oracle: all 120 permutations) ...
    sim = ssim_matrix(reconstructions, truth)
    best = max(itertools.permutations(range(5)), key=lambda p: sum(sim[p[j], j] for j in range(5)))
    assert tuple(order) == best
    # ... and here undoes the shuffle.
    assert np.array_equal(reconstructions[order], noisy)


def test_leakage_score_is_relative_to_the_prior():
    assert leakage_score(np.array([0.6, 0.3, 0.9]), np.array([0.3, 0.3, 0.6])).tolist() == pytest.approx(
        [1.0, 0.0, 0.5]
    )
    assert np.isnan(leakage_score(np.array([0.5]), np.array([0.0]))[0])
    assert np.isnan(leakage_score(np.array([0.5]), np.array([-0.1]))[0])


def test_residual_correlation_against_numpy_corrcoef():
    truth, noisy = _pair((3, 1, 16, 16), seed=8, data_range=1.0)
    prior = truth.mean(axis=0)
    ours = residual_correlation(noisy, truth, prior)
    for i in range(3):
        ref = np.corrcoef((noisy[i] - prior).ravel(), (truth[i] - prior).ravel())[0, 1]
        assert ours[i] == pytest.approx(ref, abs=1e-12)
    assert residual_correlation(truth, truth, prior) == pytest.approx(np.ones(3))
    assert np.isnan(residual_correlation(prior[None], truth[:1], prior)[0])


def test_score_batch_prior_itself_scores_zero_leakage():
    truth, _ = _pair((3, 1, 16, 16), seed=5, data_range=1.0)
    prior = truth.mean(axis=0)
    order, scores = score_batch(np.broadcast_to(prior, truth.shape).copy(), truth, prior)
    assert sorted(order.tolist()) == [0, 1, 2]
    assert np.allclose(scores.leakage, 0.0)
    assert scores.summary()["leakage"] == pytest.approx(0.0)


def test_bad_shapes_are_input_errors():
    with pytest.raises(InputError, match="at least 11x11"):
        ssim_matrix(np.zeros((1, 1, 8, 8)), np.zeros((1, 1, 8, 8)))
    with pytest.raises(InputError, match="shapes differ"):
        psnr(np.zeros((1, 1, 16, 16)), np.zeros((1, 1, 16, 17)))
    with pytest.raises(InputError, match="as many reconstructions"):
        match_reconstructions(np.zeros((2, 1, 16, 16)), np.zeros((3, 1, 16, 16)))
