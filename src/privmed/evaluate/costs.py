"""Summaries of per-image cost (time, bytes, rounds, memory) and study-time projection."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class CostSummary:
    """Median, quartiles, IQR, mean and max of one per-image cost; NaN when ``n`` is 0."""

    n: int
    median: float
    q1: float
    q3: float
    iqr: float
    mean: float
    max: float


def summarize(values: np.ndarray) -> CostSummary:
    """Describe a per-image cost; NaN entries (not measured) are ignored."""
    v = np.asarray(values, dtype=np.float64).ravel()
    v = v[~np.isnan(v)]
    if v.size == 0:
        nan = float("nan")
        return CostSummary(0, nan, nan, nan, nan, nan, nan)
    q1, med, q3 = (float(x) for x in np.percentile(v, [25, 50, 75]))
    return CostSummary(int(v.size), med, q1, q3, q3 - q1, float(v.mean()), float(v.max()))


def projected_study_seconds(per_image_s: np.ndarray, n_images: int, workers: int = 1) -> float:
    """Time for ``n_images`` at the mean measured per-image time with ``workers`` in parallel.

    Assumes the sessions scale linearly with workers, which holds only while cores and
    bandwidth are not saturated; :func:`observed_study_seconds` is the honest number when a
    run has already been timed.
    """
    v = np.asarray(per_image_s, dtype=np.float64)
    v = v[~np.isnan(v)]
    if v.size == 0 or workers < 1:
        return float("nan")
    return float(v.mean()) * n_images / workers


def observed_study_seconds(started: np.ndarray, finished: np.ndarray, n_images: int) -> float:
    """Time for ``n_images`` at the throughput observed between first start and last finish.

    Resumed runs include the pause between runs in this span, so callers pass timestamps of
    one run (or accept the overestimate).
    """
    s = np.asarray(started, dtype=np.float64)
    f = np.asarray(finished, dtype=np.float64)
    if s.size == 0:
        return float("nan")
    span = float(f.max() - s.min())
    return span / s.size * n_images
