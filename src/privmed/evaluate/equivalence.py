"""Is the secure output the same as the plaintext output? Paired and distributional checks.

Pure functions on two equally long vectors of outputs for the same cases: ``secure`` (what
the data owner learned from the MPC run) and ``plain`` (onnxruntime on the same input).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np
from scipy import stats as sps

from privmed.errors import InputError


@dataclass(frozen=True)
class KsResult:
    """Two-sample Kolmogorov-Smirnov test: sup |F_secure - F_plain| and its two-sided p."""

    statistic: float
    p: float


@dataclass(frozen=True)
class TostResult:
    """Paired two one-sided t-tests (Schuirmann 1987) on d = secure - plain.

    H0: |mean(d)| >= margin, H1: |mean(d)| < margin. ``p`` = max(p_lower, p_upper);
    equivalence is shown at level alpha iff p < alpha, which is the same as the
    (1 - 2 alpha) CI ``[lo, hi]`` lying inside (-margin, margin).
    """

    mean_diff: float
    sd_diff: float
    n: int
    margin: float
    t_lower: float
    p_lower: float
    t_upper: float
    p_upper: float
    p: float
    lo: float
    hi: float
    equivalent: bool


@dataclass(frozen=True)
class DiffSummary:
    """Max and mean of |secure - plain| over all cases."""

    max_abs: float
    mean_abs: float
    n: int


@dataclass(frozen=True)
class Agreement:
    """Share of cases where secure and plain fall on the same side of ``threshold``."""

    threshold: float
    rate: float
    n_disagree: int
    n: int


def _paired(secure: np.ndarray, plain: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    s = np.asarray(secure, dtype=np.float64).ravel()
    p = np.asarray(plain, dtype=np.float64).ravel()
    if s.shape != p.shape:
        raise InputError(
            f"paired outputs: expected equal lengths, got {s.size} secure and {p.size} plaintext"
        )
    if s.size == 0:
        raise InputError("paired outputs: expected at least one case, got none")
    if not (np.all(np.isfinite(s)) and np.all(np.isfinite(p))):
        raise InputError("paired outputs: expected finite values, got NaN or inf")
    return s, p


def ks_two_sample(secure: np.ndarray, plain: np.ndarray) -> KsResult:
    """Two-sample KS test of the two output distributions (scipy's exact/asymptotic choice).

    It ignores the pairing, so it answers a weaker question than :func:`tost_paired`: would
    anyone looking only at the distribution of outputs tell the two apart?
    """
    s, p = _paired(secure, plain)
    with warnings.catch_warnings():
        # scipy warns when it falls back from the exact to the asymptotic p-value; expected
        # for n in the hundreds with ties, and the asymptotic value is the documented answer.
        warnings.simplefilter("ignore", RuntimeWarning)
        res = sps.ks_2samp(s, p)
    return KsResult(float(res.statistic), float(res.pvalue))


def tost_paired(
    secure: np.ndarray, plain: np.ndarray, margin: float = 0.01, alpha: float = 0.05
) -> TostResult:
    """Paired TOST of mean(secure - plain) within (-margin, margin).

    Lower test: H0 mean(d) <= -margin, t = (mean + margin) / (sd / sqrt(n)), p = P(T > t).
    Upper test: H0 mean(d) >= +margin, t = (mean - margin) / (sd / sqrt(n)), p = P(T < t).
    T has n - 1 degrees of freedom. When every difference is identical (sd = 0) the tests
    degenerate: p = 0 if that difference lies strictly inside the margin, otherwise 1.
    """
    if not margin > 0:
        raise InputError(f"TOST margin: expected > 0, got {margin}")
    s, p = _paired(secure, plain)
    d = s - p
    n = d.size
    mean = float(d.mean())
    sd = float(d.std(ddof=1)) if n > 1 else 0.0
    se = sd / np.sqrt(n)
    if n < 2:
        nan = float("nan")
        return TostResult(mean, nan, n, margin, nan, nan, nan, nan, nan, nan, nan, False)
    if se == 0.0:
        inside = -margin < mean < margin
        t_lo = np.inf if mean > -margin else -np.inf
        t_hi = -np.inf if mean < margin else np.inf
        p_lo = 0.0 if mean > -margin else 1.0
        p_hi = 0.0 if mean < margin else 1.0
        return TostResult(
            mean,
            sd,
            n,
            margin,
            float(t_lo),
            p_lo,
            float(t_hi),
            p_hi,
            max(p_lo, p_hi),
            mean,
            mean,
            inside,
        )
    df = n - 1
    t_lo = (mean + margin) / se
    t_hi = (mean - margin) / se
    p_lo = float(sps.t.sf(t_lo, df))
    p_hi = float(sps.t.cdf(t_hi, df))
    tq = float(sps.t.ppf(1.0 - alpha, df))
    p_tost = max(p_lo, p_hi)
    return TostResult(
        mean,
        sd,
        n,
        margin,
        float(t_lo),
        p_lo,
        float(t_hi),
        p_hi,
        p_tost,
        mean - tq * se,
        mean + tq * se,
        p_tost < alpha,
    )


def abs_difference(secure: np.ndarray, plain: np.ndarray) -> DiffSummary:
    """Max and mean absolute difference between paired outputs."""
    s, p = _paired(secure, plain)
    d = np.abs(s - p)
    return DiffSummary(float(d.max()), float(d.mean()), int(d.size))


def label_agreement(secure: np.ndarray, plain: np.ndarray, threshold: float = 0.5) -> Agreement:
    """Fraction of cases given the same label (output >= threshold) by secure and plain."""
    s, p = _paired(secure, plain)
    differ = (s >= threshold) != (p >= threshold)
    n_dis = int(differ.sum())
    return Agreement(float(threshold), 1.0 - n_dis / s.size, n_dis, int(s.size))


def bland_altman(secure: np.ndarray, plain: np.ndarray) -> tuple[float, float, float]:
    """Bias and 95% limits of agreement (Bland & Altman 1986): mean(d), mean(d) -+ 1.96 sd(d)."""
    s, p = _paired(secure, plain)
    d = s - p
    bias = float(d.mean())
    sd = float(d.std(ddof=1)) if d.size > 1 else 0.0
    return bias, bias - 1.96 * sd, bias + 1.96 * sd
