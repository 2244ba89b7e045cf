"""AUROC per finding, and pooled AUROC across sites from score histograms.

Per-site AUROC is exact (scikit-learn on the site's own test images). The global, pooled
AUROC must not need any site's per-image scores at the server, so each site sends, per
finding, counts of positive and negative test images in ``BINS`` equal-width bins of the
predicted probability; the server sums the histograms and computes the Mann-Whitney
statistic with ties inside a bin counted as one half. The only difference from the exact
pooled AUROC is pairs whose scores fall in the same bin (width 1/BINS).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

__all__ = ["BINS", "auroc_from_histograms", "auroc_per_label", "macro_mean", "score_histograms"]

BINS = 1000


def auroc_per_label(y_true: np.ndarray, scores: np.ndarray) -> list[float]:
    """AUROC per column; nan where the column lacks known positives or negatives."""
    from sklearn.metrics import roc_auc_score

    out = []
    for j in range(y_true.shape[1]):
        known = ~np.isnan(y_true[:, j])
        y = y_true[known, j]
        if y.size == 0 or y.min() == y.max():
            out.append(math.nan)
            continue
        out.append(float(roc_auc_score(y, scores[known, j])))
    return out


def macro_mean(values: Sequence[float]) -> float:
    """Mean over the finite values; nan if there are none."""
    finite = [v for v in values if math.isfinite(v)]
    return float(np.mean(finite)) if finite else math.nan


def score_histograms(y_true: np.ndarray, probs: np.ndarray, bins: int = BINS) -> np.ndarray:
    """int64 counts of shape (K, 2, bins): [k, 0] negatives, [k, 1] positives per score bin.

    ``probs`` are probabilities in [0, 1]; bin b holds [b/bins, (b+1)/bins), 1.0 goes to the last.
    """
    k = y_true.shape[1]
    idx = np.clip((np.asarray(probs, np.float64) * bins).astype(np.int64), 0, bins - 1)
    hist = np.zeros((k, 2, bins), dtype=np.int64)
    for j in range(k):
        known = ~np.isnan(y_true[:, j])
        for cls in (0, 1):
            sel = known & (y_true[:, j] == cls)
            hist[j, cls] = np.bincount(idx[sel, j], minlength=bins)
    return hist


def auroc_from_histograms(hist: np.ndarray) -> list[float]:
    """Mann-Whitney AUROC per finding from (K, 2, bins) counts; nan if a class is absent."""
    out = []
    for j in range(hist.shape[0]):
        neg = hist[j, 0].astype(np.float64)
        pos = hist[j, 1].astype(np.float64)
        n_neg, n_pos = neg.sum(), pos.sum()
        if n_neg == 0 or n_pos == 0:
            out.append(math.nan)
            continue
        below = np.concatenate([[0.0], np.cumsum(neg)[:-1]])  # negatives in lower bins
        wins = float(np.sum(pos * (below + 0.5 * neg)))
        out.append(wins / (n_neg * n_pos))
    return out
