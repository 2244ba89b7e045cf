"""Equivalence statistics against scipy's tests and direct numpy computations."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import stats as sps

from privmed.errors import InputError
from privmed.evaluate.equivalence import (
    abs_difference,
    bland_altman,
    ks_two_sample,
    label_agreement,
    tost_paired,
)


def _pair(seed: int, bias: float, noise: float, n: int = 150) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    plain = rng.random(n)
    return plain + bias + rng.normal(scale=noise, size=n), plain


def test_ks_matches_scipy() -> None:
    s, p = _pair(0, 0.05, 0.1)
    res = ks_two_sample(s, p)
    ref = sps.ks_2samp(s, p)
    assert res.statistic == pytest.approx(ref.statistic) and res.p == pytest.approx(ref.pvalue)


@pytest.mark.parametrize(
    ("bias", "noise", "expect_equiv"), [(0.0, 1e-3, True), (0.02, 1e-3, False), (0.0, 0.2, False)]
)
def test_tost_matches_two_scipy_one_sided_t_tests(
    bias: float, noise: float, expect_equiv: bool
) -> None:
    # Prepare
    s, p = _pair(1, bias, noise)
    d = s - p
    margin = 0.01
    # Execute
    res = tost_paired(s, p, margin=margin)
    # Assert: each one-sided test is scipy's one-sample t-test against the margin
    lower = sps.ttest_1samp(d, -margin, alternative="greater")
    upper = sps.ttest_1samp(d, margin, alternative="less")
    assert res.t_lower == pytest.approx(lower.statistic, rel=1e-9)
    assert res.p_lower == pytest.approx(lower.pvalue, rel=1e-9, abs=1e-300)
    assert res.t_upper == pytest.approx(upper.statistic, rel=1e-9)
    assert res.p_upper == pytest.approx(upper.pvalue, rel=1e-9, abs=1e-300)
    assert res.p == max(res.p_lower, res.p_upper)
    assert res.equivalent is expect_equiv
    # the 90% CI inside the margin is the same decision (alpha = 0.05)
    assert bool(-margin < res.lo and res.hi < margin) is expect_equiv
    ci = sps.ttest_rel(s, p).confidence_interval(confidence_level=0.90)
    assert (res.lo, res.hi) == pytest.approx((ci.low, ci.high), rel=1e-9)


def test_tost_zero_variance() -> None:
    p = np.full(20, 0.5)  # every difference is then exactly the same float
    assert tost_paired(p + 0.001, p).equivalent and tost_paired(p + 0.001, p).p == 0.0
    assert not tost_paired(p + 0.02, p).equivalent
    with pytest.raises(InputError, match="margin"):
        tost_paired(p, p, margin=0.0)


def test_abs_difference_and_agreement() -> None:
    s = np.array([0.1, 0.49, 0.51, 0.9])
    p = np.array([0.1, 0.51, 0.51, 0.8])
    diff = abs_difference(s, p)
    assert diff.max_abs == pytest.approx(0.1) and diff.mean_abs == pytest.approx(0.03)
    agree = label_agreement(s, p, threshold=0.5)
    assert agree.n_disagree == 1 and agree.rate == pytest.approx(0.75)


def test_bland_altman_limits() -> None:
    s, p = _pair(2, 0.003, 0.01)
    d = s - p
    bias, lo, hi = bland_altman(s, p)
    assert bias == pytest.approx(d.mean())
    assert hi - lo == pytest.approx(2 * 1.96 * d.std(ddof=1))


def test_mismatched_lengths_rejected() -> None:
    with pytest.raises(InputError, match="equal lengths"):
        abs_difference(np.zeros(3), np.zeros(4))
