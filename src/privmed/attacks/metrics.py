"""Image-similarity metrics and the matching of reconstructions to ground truth.

All functions take float arrays of shape ``(N, C, H, W)`` (a batch of images) or
``(C, H, W)`` with values in ``[0, data_range]`` and are pure NumPy/SciPy.

SSIM follows Wang et al. 2004 ("Image quality assessment: from error visibility to
structural similarity") with the settings of that paper and of scikit-image's
``structural_similarity(gaussian_weights=True, sigma=1.5, use_sample_covariance=False)``:
an 11-tap Gaussian window (sigma 1.5, truncated at 3.5 sigma), K1 = 0.01, K2 = 0.03,
population covariances, reflect padding, and the mean taken over the pixels at least half a
window from the border. Multichannel images average the per-channel SSIM, as scikit-image
does with ``channel_axis``. ``tests/unit/test_attacks_metrics.py`` checks both PSNR and
SSIM against scikit-image. We keep our own implementation because scoring needs the full
reconstruction-by-ground-truth SSIM matrix of a batch, computed with shared filtering.

The prior-relative leakage score is ``(SSIM(rec, img) - SSIM(prior, img)) / SSIM(prior, img)``
where ``prior`` is what an attacker has without any update (we use the mean image of data
the attack never targets): 0 means the update taught the attacker nothing beyond the prior,
negative means worse than the prior, 1 means the structural similarity doubled.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.ndimage import gaussian_filter
from scipy.optimize import linear_sum_assignment

from privmed.errors import InputError

SSIM_SIGMA = 1.5
SSIM_TRUNCATE = 3.5
SSIM_K1 = 0.01
SSIM_K2 = 0.03
# Window side implied by sigma and truncate, as in scipy/scikit-image: 2*int(3.5*1.5+0.5)+1.
SSIM_WIN = 2 * int(SSIM_TRUNCATE * SSIM_SIGMA + 0.5) + 1


def _as_batch(images: np.ndarray, name: str) -> np.ndarray:
    array = np.asarray(images, dtype=np.float64)
    if array.ndim == 3:
        array = array[None]
    if array.ndim != 4:
        raise InputError(f"{name}: expected shape (N, C, H, W) or (C, H, W), got {array.shape}")
    return array


def mse(reconstruction: np.ndarray, image: np.ndarray) -> np.ndarray:
    """Mean squared error per image of two same-shape batches; shape ``(N,)``."""
    rec, img = _as_batch(reconstruction, "reconstruction"), _as_batch(image, "image")
    if rec.shape != img.shape:
        raise InputError(f"mse: shapes differ, {rec.shape} vs {img.shape}")
    return np.mean((rec - img) ** 2, axis=(1, 2, 3))


def psnr(reconstruction: np.ndarray, image: np.ndarray, data_range: float = 1.0) -> np.ndarray:
    """Peak signal-to-noise ratio in dB per image: ``10 log10(data_range^2 / MSE)``.

    Identical images give ``inf``. Shape ``(N,)``.
    """
    error = mse(reconstruction, image)
    with np.errstate(divide="ignore"):
        return 10.0 * np.log10(data_range**2 / error)


def _blur(images: np.ndarray) -> np.ndarray:
    # Filter only the two spatial axes of (..., H, W).
    spatial = (images.ndim - 2, images.ndim - 1)
    return gaussian_filter(
        images, sigma=SSIM_SIGMA, truncate=SSIM_TRUNCATE, mode="reflect", axes=spatial
    )


def ssim_matrix(
    reconstructions: np.ndarray, images: np.ndarray, data_range: float = 1.0
) -> np.ndarray:
    """SSIM of every reconstruction against every image; shape ``(N_rec, N_img)``.

    Preconditions: same ``(C, H, W)``, both sides at least ``SSIM_WIN`` (11) pixels.
    Entry ``[i, j]`` equals ``skimage.metrics.structural_similarity(rec[i], img[j],
    gaussian_weights=True, sigma=1.5, use_sample_covariance=False, data_range=data_range,
    channel_axis=0)`` up to float rounding.
    """
    rec, img = _as_batch(reconstructions, "reconstructions"), _as_batch(images, "images")
    if rec.shape[1:] != img.shape[1:]:
        raise InputError(f"ssim: image shapes differ, {rec.shape[1:]} vs {img.shape[1:]}")
    if min(rec.shape[2:]) < SSIM_WIN:
        raise InputError(f"ssim: images must be at least {SSIM_WIN}x{SSIM_WIN}, got {rec.shape[2:]}")
    c1, c2 = (SSIM_K1 * data_range) ** 2, (SSIM_K2 * data_range) ** 2
    mu_r, mu_i = _blur(rec), _blur(img)
    var_r = _blur(rec * rec) - mu_r**2
    var_i = _blur(img * img) - mu_i**2
    # Cross terms for every pair: (N_rec, N_img, C, H, W).
    cross = _blur(rec[:, None] * img[None, :])
    mu_ri = mu_r[:, None] * mu_i[None, :]
    cov = cross - mu_ri
    ssim_map = ((2 * mu_ri + c1) * (2 * cov + c2)) / (
        (mu_r[:, None] ** 2 + mu_i[None, :] ** 2 + c1) * (var_r[:, None] + var_i[None, :] + c2)
    )
    pad = (SSIM_WIN - 1) // 2
    cropped = ssim_map[..., pad : ssim_map.shape[-2] - pad, pad : ssim_map.shape[-1] - pad]
    return cropped.mean(axis=(3, 4)).mean(axis=2)


def ssim(reconstruction: np.ndarray, image: np.ndarray, data_range: float = 1.0) -> np.ndarray:
    """SSIM of each reconstruction with the image at the same index; shape ``(N,)``."""
    rec, img = _as_batch(reconstruction, "reconstruction"), _as_batch(image, "image")
    if rec.shape != img.shape:
        raise InputError(f"ssim: shapes differ, {rec.shape} vs {img.shape}")
    return np.array([ssim_matrix(r[None], i[None], data_range)[0, 0] for r, i in zip(rec, img, strict=True)])


def leakage_score(ssim_reconstruction: np.ndarray, ssim_prior: np.ndarray) -> np.ndarray:
    """Prior-relative leakage ``(SSIM(rec, img) - SSIM(prior, img)) / SSIM(prior, img)``.

    Undefined (NaN) where ``SSIM(prior, img) <= 0``: a prior with no positive structural
    similarity gives no scale to compare against; callers report the raw SSIMs instead.
    """
    rec = np.asarray(ssim_reconstruction, dtype=np.float64)
    prior = np.asarray(ssim_prior, dtype=np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(prior > 0, (rec - prior) / prior, np.nan)


def residual_correlation(
    reconstruction: np.ndarray, image: np.ndarray, prior: np.ndarray
) -> np.ndarray:
    """Pearson correlation of ``reconstruction - prior`` with ``image - prior``, per image.

    The patient-specific part of an image is what differs from the population mean
    (findings, individual anatomy). This measures how much of *that* the attack recovered:
    0 for the prior itself or for noise, 1 for a perfect reconstruction. It complements
    the SSIM leakage score, whose baseline SSIM(prior, image) is high when images share
    most of their structure (as chest radiographs do). NaN where either residual is flat.
    """
    rec, img = _as_batch(reconstruction, "reconstruction"), _as_batch(image, "image")
    base = _as_batch(prior, "prior")[0]
    a = (rec - base).reshape(rec.shape[0], -1)
    b = (img - base).reshape(img.shape[0], -1)
    a = a - a.mean(axis=1, keepdims=True)
    b = b - b.mean(axis=1, keepdims=True)
    denominator = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(denominator > 0, (a * b).sum(axis=1) / denominator, np.nan)


def match_reconstructions(
    reconstructions: np.ndarray, images: np.ndarray, data_range: float = 1.0
) -> np.ndarray:
    """Order of reconstructions that best matches the images (Hungarian assignment).

    Gradient inversion recovers a batch as an unordered set, so each reconstruction is
    paired with one ground-truth image so that the summed SSIM is maximal (one-to-one,
    ``scipy.optimize.linear_sum_assignment``, Kuhn 1955). Returns ``order`` such that
    ``reconstructions[order[j]]`` is matched to ``images[j]``. Requires equal counts.
    """
    similarity = ssim_matrix(reconstructions, images, data_range)
    if similarity.shape[0] != similarity.shape[1]:
        raise InputError(
            f"match: expected as many reconstructions as images, got {similarity.shape}"
        )
    rec_index, img_index = linear_sum_assignment(similarity, maximize=True)
    order = np.empty(len(img_index), dtype=np.int64)
    order[img_index] = rec_index
    return order


def nan_mean(values: np.ndarray) -> float:
    """Mean over the finite entries; NaN when there are none."""
    return float(np.nanmean(values)) if np.any(np.isfinite(values)) else float("nan")


@dataclass(frozen=True)
class Scores:
    """Per-image scores of a matched reconstruction batch (arrays of shape ``(N,)``)."""

    mse: np.ndarray
    psnr: np.ndarray
    ssim: np.ndarray
    ssim_prior: np.ndarray
    leakage: np.ndarray
    residual_correlation: np.ndarray

    def summary(self) -> dict[str, float]:
        """Means over the batch (NaN-aware for the ratios; PSNR capped at 100 dB for inf)."""
        return {
            "mse": float(np.mean(self.mse)),
            "psnr": float(np.mean(np.minimum(self.psnr, 100.0))),
            "ssim": float(np.mean(self.ssim)),
            "ssim_prior": float(np.mean(self.ssim_prior)),
            "leakage": nan_mean(self.leakage),
            "ssim_max": float(np.max(self.ssim)),
            "residual_correlation": nan_mean(self.residual_correlation),
        }


def score_batch(
    reconstructions: np.ndarray, images: np.ndarray, prior: np.ndarray, data_range: float = 1.0
) -> tuple[np.ndarray, Scores]:
    """Match reconstructions to images, then score each pair against the prior image.

    Parameters
    ----------
    reconstructions, images : ``(N, C, H, W)`` in ``[0, data_range]``.
    prior : ``(C, H, W)``, the attacker's guess without any update (e.g. the mean image).

    Returns
    -------
    ``(order, scores)``: ``reconstructions[order]`` is aligned with ``images``.
    """
    rec, img = _as_batch(reconstructions, "reconstructions"), _as_batch(images, "images")
    order = match_reconstructions(rec, img, data_range)
    matched = rec[order]
    prior_batch = np.broadcast_to(_as_batch(prior, "prior")[0], img.shape)
    ssim_rec = ssim(matched, img, data_range)
    ssim_prior = ssim(prior_batch, img, data_range)
    scores = Scores(
        mse=mse(matched, img),
        psnr=psnr(matched, img, data_range),
        ssim=ssim_rec,
        ssim_prior=ssim_prior,
        leakage=leakage_score(ssim_rec, ssim_prior),
        residual_correlation=residual_correlation(matched, img, prior_batch[0]),
    )
    return order, scores
