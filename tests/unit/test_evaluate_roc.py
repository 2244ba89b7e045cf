"""AUROC / DeLong against a slow O(m n) reference written from DeLong et al. (1988) and sklearn."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import stats as sps
from sklearn.metrics import roc_auc_score, roc_curve

from privmed.errors import InputError
from privmed.evaluate.roc import auroc, delong_covariance, delong_paired, midranks, roc_points


def slow_delong(labels: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Reference: AUCs and covariance from the psi kernel over all m*n pairs (DeLong 1988)."""
    pos = scores[:, labels == 1]
    neg = scores[:, labels == 0]
    k, m = pos.shape
    n = neg.shape[1]
    v10 = np.zeros((k, m))
    v01 = np.zeros((k, n))
    for r in range(k):
        for i in range(m):
            for j in range(n):
                psi = 1.0 if pos[r, i] > neg[r, j] else (0.5 if pos[r, i] == neg[r, j] else 0.0)
                v10[r, i] += psi / n
                v01[r, j] += psi / m
    auc = v10.mean(axis=1)
    s10 = np.zeros((k, k))
    s01 = np.zeros((k, k))
    for r in range(k):
        for s in range(k):
            s10[r, s] = ((v10[r] - auc[r]) * (v10[s] - auc[s])).sum() / (m - 1)
            s01[r, s] = ((v01[r] - auc[r]) * (v01[s] - auc[s])).sum() / (n - 1)
    return auc, s10 / m + s01 / n


def _case(seed: int, n: int = 60, ties: bool = False) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    y = (rng.random(n) < 0.4).astype(np.float64)
    y[:2], y[2:4] = 1.0, 0.0
    a = y * 0.8 + rng.normal(size=n)
    b = a + rng.normal(scale=0.5, size=n)
    if ties:  # coarse quantisation creates many ties within and across classes
        a, b = np.round(a), np.round(b * 2) / 2
    return y, a, b


def test_midranks_matches_scipy_rankdata() -> None:
    x = np.array([3.0, 1.0, 2.0, 2.0, 5.0, 1.0, 2.0])
    np.testing.assert_array_equal(midranks(x), sps.rankdata(x, method="average"))


@pytest.mark.parametrize("ties", [False, True])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_fast_delong_equals_slow_reference(seed: int, ties: bool) -> None:
    # Prepare
    y, a, b = _case(seed, ties=ties)
    scores = np.stack([a, b])
    # Execute
    auc_fast, cov_fast = delong_covariance(scores[:, y == 1], scores[:, y == 0])
    auc_slow, cov_slow = slow_delong(y, scores)
    # Assert: same arithmetic reorganised, so agreement to float64 rounding
    np.testing.assert_allclose(auc_fast, auc_slow, rtol=0, atol=1e-12)
    np.testing.assert_allclose(cov_fast, cov_slow, rtol=1e-9, atol=1e-15)


@pytest.mark.parametrize("ties", [False, True])
def test_auroc_matches_sklearn_and_ci_contains_it(ties: bool) -> None:
    y, a, _ = _case(5, n=200, ties=ties)
    res = auroc(y, a)
    assert res.auc == pytest.approx(roc_auc_score(y, a), abs=1e-12)
    _, cov = slow_delong(y, a[None, :])
    assert res.se == pytest.approx(np.sqrt(cov[0, 0]), rel=1e-9)
    z = sps.norm.ppf(0.975)
    assert res.lo == pytest.approx(max(0.0, res.auc - z * res.se), abs=1e-12)
    assert res.hi == pytest.approx(min(1.0, res.auc + z * res.se), abs=1e-12)
    assert (res.n_pos, res.n_neg) == (int(y.sum()), int((1 - y).sum()))


def test_auroc_drops_unknown_labels() -> None:
    y, a, _ = _case(3)
    y_nan = y.copy()
    y_nan[10:20] = np.nan
    keep = ~np.isnan(y_nan)
    assert auroc(y_nan, a).auc == pytest.approx(roc_auc_score(y[keep], a[keep]), abs=1e-12)


def test_paired_delong_statistic_matches_reference() -> None:
    y, a, b = _case(7, n=80)
    res = delong_paired(y, a, b)
    auc, cov = slow_delong(y, np.stack([a, b]))
    z = (auc[1] - auc[0]) / np.sqrt(cov[0, 0] + cov[1, 1] - 2 * cov[0, 1])
    assert res.diff == pytest.approx(auc[1] - auc[0], abs=1e-12)
    assert res.z == pytest.approx(z, rel=1e-9)
    assert res.p == pytest.approx(2 * sps.norm.sf(abs(z)), rel=1e-9)
    assert res.lo < res.diff < res.hi


def test_paired_delong_detects_a_real_difference() -> None:
    # A good scorer versus pure noise on 300 cases: the test must reject.
    rng = np.random.default_rng(11)
    y = (rng.random(300) < 0.5).astype(np.float64)
    good = y * 2.0 + rng.normal(size=300)
    noise = rng.normal(size=300)
    res = delong_paired(y, good, noise)
    assert res.auc_a > 0.8 and res.auc_b < 0.65
    assert res.p < 1e-6


def test_paired_delong_identical_ranking_gives_p_one() -> None:
    # A monotone transform (what exact secure inference would give) changes no pair order.
    y, a, _ = _case(4)
    res = delong_paired(y, a, 1.0 / (1.0 + np.exp(-a)))
    assert res.diff == 0.0 and res.p == 1.0 and res.z == 0.0


def test_degenerate_classes() -> None:
    y = np.array([1.0, 0.0, 0.0, 0.0])
    s = np.array([0.9, 0.1, 0.2, 0.3])
    one_pos = auroc(y, s)
    assert one_pos.auc == 1.0 and np.isnan(one_pos.se) and np.isnan(one_pos.lo)
    no_pos = auroc(np.zeros(4), s)
    assert np.isnan(no_pos.auc) and no_pos.n_pos == 0


def test_bad_labels_rejected() -> None:
    with pytest.raises(InputError, match="labels"):
        auroc(np.array([0.0, 2.0, 1.0]), np.array([0.1, 0.2, 0.3]))
    with pytest.raises(InputError, match="expected 3"):
        auroc(np.array([0.0, 1.0, 1.0]), np.array([0.1, 0.2]))


def test_roc_points_match_sklearn() -> None:
    y, a, _ = _case(9, ties=True)
    fpr, tpr = roc_points(y, a)
    fpr_ref, tpr_ref, _ = roc_curve(y, a, drop_intermediate=False)
    np.testing.assert_allclose(fpr, fpr_ref, atol=1e-12)
    np.testing.assert_allclose(tpr, tpr_ref, atol=1e-12)
