"""AUROC with DeLong confidence intervals and the paired DeLong test.

All functions are pure: arrays in, numbers out. The variance estimate is DeLong, DeLong &
Clarke-Pearson (1988); the O((m + n) log(m + n)) computation through midranks is Sun & Xu,
"Fast implementation of DeLong's algorithm for comparing the areas under correlated receiver
operating characteristic curves", IEEE Signal Processing Letters 21(11), 2014.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import stats as sps

from privmed.errors import InputError


@dataclass(frozen=True)
class Auroc:
    """AUROC of one score with its DeLong standard error and two-sided CI.

    ``lo``/``hi`` are NaN when the variance cannot be estimated (fewer than two positive or
    two negative cases); ``auc`` is NaN when there is no positive or no negative case.
    """

    auc: float
    se: float
    lo: float
    hi: float
    n_pos: int
    n_neg: int


@dataclass(frozen=True)
class PairedDelong:
    """Paired DeLong test of H0: AUROC(a) == AUROC(b) on the same cases.

    ``diff`` is ``auc_b - auc_a``; ``lo``/``hi`` its two-sided CI. When both scores rank every
    positive/negative pair the same way the difference and its variance are exactly zero;
    then ``z`` is 0 and ``p`` is 1 (there is no evidence of a difference at all).
    """

    auc_a: float
    auc_b: float
    diff: float
    se: float
    z: float
    p: float
    lo: float
    hi: float
    n_pos: int
    n_neg: int


def midranks(x: np.ndarray) -> np.ndarray:
    """Ranks 1..n of ``x`` with ties given the mean of the ranks they span (Sun & Xu, Alg. 1).

    Pre: ``x`` is 1-D and finite. Post: result has the shape of ``x``, float64, and sums to
    n(n+1)/2.
    """
    _, inverse, counts = np.unique(x, return_inverse=True, return_counts=True)
    # a tie group occupying sorted positions start+1 .. start+count gets their mean rank
    starts = np.cumsum(counts) - counts
    group_rank = starts + (counts + 1) / 2.0
    return group_rank[inverse.ravel()].astype(np.float64)


def delong_covariance(
    pos_scores: np.ndarray, neg_scores: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """AUROCs of k correlated scores and their k x k DeLong covariance (Sun & Xu 2014).

    Parameters
    ----------
    pos_scores : (k, m) scores of the m positive cases under each of k scorers.
    neg_scores : (k, n) scores of the n negative cases, same scorers.

    Returns
    -------
    auc : (k,) Mann-Whitney AUROC of each scorer (ties count one half).
    cov : (k, k) covariance S10/m + S01/n of the AUROC estimates; NaN if m < 2 or n < 2.

    Steps (per scorer r): 1. midranks Tx of positives alone, Ty of negatives alone, Tz of
    both pooled; 2. AUC = (sum Tz[:m] - m(m+1)/2) / (m n); 3. structural components
    V10 = (Tz[:m] - Tx) / n and V01 = 1 - (Tz[m:] - Ty) / m; 4. S10, S01 = sample covariance
    of V10, V01 across scorers.
    """
    k, m = pos_scores.shape
    n = neg_scores.shape[1]
    tx = np.stack([midranks(pos_scores[r]) for r in range(k)])
    ty = np.stack([midranks(neg_scores[r]) for r in range(k)])
    tz = np.stack([midranks(np.concatenate([pos_scores[r], neg_scores[r]])) for r in range(k)])
    auc = (tz[:, :m].sum(axis=1) - m * (m + 1) / 2.0) / (m * n)
    if m < 2 or n < 2:
        return auc, np.full((k, k), np.nan)
    v10 = (tz[:, :m] - tx) / n
    v01 = 1.0 - (tz[:, m:] - ty) / m
    s10 = np.atleast_2d(np.cov(v10))
    s01 = np.atleast_2d(np.cov(v01))
    return auc, s10 / m + s01 / n


def _split(labels: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Drop unknown (NaN) labels and return (k, m) positive and (k, n) negative scores."""
    labels = np.asarray(labels, dtype=np.float64).ravel()
    scores = np.atleast_2d(np.asarray(scores, dtype=np.float64))
    if scores.shape[1] != labels.shape[0]:
        raise InputError(
            f"scores: expected {labels.shape[0]} cases per scorer, got {scores.shape[1]}"
        )
    known = ~np.isnan(labels)
    if not np.all(np.isin(labels[known], (0.0, 1.0))):
        raise InputError("labels: expected 0, 1 or NaN (unknown)")
    if not np.all(np.isfinite(scores[:, known])):
        raise InputError("scores: expected finite values for every labelled case")
    pos = known & (labels == 1.0)
    neg = known & (labels == 0.0)
    return scores[:, pos], scores[:, neg]


def auroc(labels: np.ndarray, scores: np.ndarray, alpha: float = 0.05) -> Auroc:
    """AUROC of ``scores`` for binary ``labels`` (NaN = unknown, dropped) with DeLong CI.

    The CI is the Wald interval auc +- z_{1-alpha/2} * se, clipped to [0, 1], as in pROC's
    ``ci.auc(method="delong")``.
    """
    pos, neg = _split(labels, scores)
    m, n = pos.shape[1], neg.shape[1]
    if m == 0 or n == 0:
        return Auroc(float("nan"), float("nan"), float("nan"), float("nan"), m, n)
    auc, cov = delong_covariance(pos, neg)
    se = float(np.sqrt(max(cov[0, 0], 0.0))) if np.isfinite(cov[0, 0]) else float("nan")
    zq = float(sps.norm.ppf(1.0 - alpha / 2.0))
    lo = max(0.0, auc[0] - zq * se) if np.isfinite(se) else float("nan")
    hi = min(1.0, auc[0] + zq * se) if np.isfinite(se) else float("nan")
    return Auroc(float(auc[0]), se, float(lo), float(hi), m, n)


def delong_paired(
    labels: np.ndarray, scores_a: np.ndarray, scores_b: np.ndarray, alpha: float = 0.05
) -> PairedDelong:
    """Paired DeLong test that two scorers on the same cases have equal AUROC.

    z = (auc_b - auc_a) / sqrt(var_a + var_b - 2 cov_ab), two-sided p from N(0, 1)
    (DeLong et al. 1988, eq. for the contrast L = (-1, 1)).
    """
    both = np.stack(
        [np.asarray(scores_a, dtype=np.float64), np.asarray(scores_b, dtype=np.float64)]
    )
    pos, neg = _split(labels, both)
    m, n = pos.shape[1], neg.shape[1]
    nan = float("nan")
    if m == 0 or n == 0:
        return PairedDelong(nan, nan, nan, nan, nan, nan, nan, nan, m, n)
    auc, cov = delong_covariance(pos, neg)
    diff = float(auc[1] - auc[0])
    var = float(cov[0, 0] + cov[1, 1] - 2.0 * cov[0, 1])
    if not np.isfinite(var):
        return PairedDelong(float(auc[0]), float(auc[1]), diff, nan, nan, nan, nan, nan, m, n)
    # Rounding can leave a tiny negative variance when the two scorers rank identically.
    se = float(np.sqrt(max(var, 0.0)))
    zq = float(sps.norm.ppf(1.0 - alpha / 2.0))
    if se <= 1e-15:
        z, p = (0.0, 1.0) if abs(diff) <= 1e-15 else (float(np.sign(diff) * np.inf), 0.0)
    else:
        z = diff / se
        p = float(2.0 * sps.norm.sf(abs(z)))
    return PairedDelong(
        float(auc[0]), float(auc[1]), diff, se, float(z), p, diff - zq * se, diff + zq * se, m, n
    )


def roc_points(labels: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """False- and true-positive rates at every distinct threshold, from (0, 0) to (1, 1).

    Unknown (NaN) labels are dropped; returns empty arrays when a class is missing.
    """
    pos, neg = _split(labels, scores)
    p, q = pos[0], neg[0]
    if len(p) == 0 or len(q) == 0:
        return np.zeros(0), np.zeros(0)
    thresholds = np.unique(np.concatenate([p, q]))[::-1]
    # scores >= t counted positive; searchsorted on the sorted arrays counts them in O(log n).
    ps, qs = np.sort(p), np.sort(q)
    tpr = (len(ps) - np.searchsorted(ps, thresholds, side="left")) / len(ps)
    fpr = (len(qs) - np.searchsorted(qs, thresholds, side="left")) / len(qs)
    return np.concatenate([[0.0], fpr]), np.concatenate([[0.0], tpr])
