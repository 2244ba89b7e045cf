"""Per-image cost: shares of a multi-image session, summaries (median, IQR), study-time projection."""

from __future__ import annotations

import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from privmed.runtime.stats import SessionStats


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


@dataclass(frozen=True)
class ImageCost:
    """One image's share of a secure session that ran several images (see split_session_costs).

    ``offline_s`` / ``offline_bytes`` / ``online_bytes`` are NaN / None when the engine does
    not report the phases apart (the dealer mode: its correlated randomness is sent during the
    session, so ``online_s`` is its only phase figure).
    """

    secure_s: float
    online_s: float
    bytes_by_role: dict[str, int]
    rounds: int | None
    cpu_s: dict[str, float]
    peak_rss_mb: dict[str, float]
    offline_s: float = float("nan")
    offline_bytes: int | None = None
    online_bytes: int | None = None


def apportion(total: int, weights: list[float]) -> list[int]:
    """Split the integer ``total`` in proportion to ``weights``; the parts sum to ``total``.

    Largest-remainder rounding (Hamilton's method): floor every quota, then give the units
    left over to the largest fractional parts (ties to the earlier entry). Equal weights
    for ``total`` = 0 or all-zero weights give equal (or zero) parts.
    """
    w = np.asarray(weights, dtype=np.float64)
    if w.size == 0:
        return []
    if not np.all(np.isfinite(w)) or w.sum() <= 0:
        w = np.ones_like(w)
    quota = total * w / w.sum()
    parts = np.floor(quota).astype(np.int64)
    left = int(total - parts.sum())
    order = np.argsort(-(quota - parts), kind="stable")
    parts[order[:left]] += 1
    return [int(p) for p in parts]


def _steady(first: float, later: Sequence[float]) -> float:
    """The first batch's cost without its one-off extra: at most the median of later batches."""
    return min(first, float(np.median(later))) if later else first


def split_session_costs(stats: SessionStats, n_images: int, wall_s: float) -> list[ImageCost]:
    """Each image's cost in a secure session that streamed ``n_images`` inputs one per batch.

    Image i is charged its own batch's time, bytes and rounds (``stats.batches[i]``) plus
    an even share (1/n) of the session's one-off part, so the n shares add up to the
    session's totals:

    - one-off = session total - sum of the per-image batch costs. Time: ``wall_s`` (measured
      by the caller around the whole session: three process starts, ephemeral CA, model
      compilation, TLS handshakes) for ``secure_s``, the engine's ``online_s`` for ``online_s``.
    - The engine sends the masked weights during the first batch (they are cached for the
      rest of the session), so batch 0 is larger than the others: 1,676,096 vs 1,537,624
      bytes for the shipped 17,404-parameter model. Its excess over the median later batch
      is moved to the one-off part, so the weights, too, are shared out over the session
      instead of being charged to whichever image came first. This relies on every batch
      running the same plan on one input, which holds for ``chunk=1``. (In the two-party
      mode batch 0 likewise carries the session's set-up: the HE key and base OTs.)

    ``bytes_by_role``: the engine reports per-batch bytes summed over roles only, so each
    image's bytes are split over roles in proportion to the roles' session totals.
    ``cpu_s`` (per role, per session only) is divided evenly; ``peak_rss_mb`` is the session's
    peak, which does not divide. Without ``stats.batches`` (an engine that does not report
    them, or a batch count that differs from ``n_images``) every total is divided evenly.
    Integer quantities (bytes, rounds) are split with :func:`apportion`, so they sum exactly.

    Offline and online phases (two parties: the engine reports ``online_bytes``): see
    :func:`_phase_split`; otherwise they stay unmeasured (NaN / None).
    """
    n = int(n_images)
    if n < 1:
        return []
    role_bytes = dict(stats.bytes_sent)
    total_bytes = stats.bytes_total
    total_rounds: int | None = stats.rounds
    online: float | None = stats.online_s
    batches = list(stats.batches)
    if len(batches) != n:
        batches = []
    if batches:
        own_bytes = [b.bytes for b in batches]
        own_rounds = [b.rounds for b in batches]
        own_time = [b.time_s for b in batches]
        own_bytes[0] = int(_steady(own_bytes[0], own_bytes[1:]))
        own_rounds[0] = int(_steady(own_rounds[0], own_rounds[1:]))
        own_time[0] = _steady(own_time[0], own_time[1:])
    else:
        own_bytes, own_rounds, own_time = [0] * n, [0] * n, [0.0] * n
    even = [1.0] * n
    bytes_i = [b + s for b, s in
               zip(own_bytes, apportion(max(0, total_bytes - sum(own_bytes)), even), strict=True)]  # fmt: skip
    rounds_i: list[int | None] = [None] * n
    if total_rounds is not None:
        extra = apportion(max(0, int(total_rounds) - sum(own_rounds)), even)
        rounds_i = [r + s for r, s in zip(own_rounds, extra, strict=True)]
    t_own = sum(own_time)
    secure_extra = max(0.0, float(wall_s) - t_own) / n
    online_extra = max(0.0, float(online) - t_own) / n if online is not None else float("nan")
    online_i = [t + online_extra for t in own_time]
    offline_i: list[float] = [float("nan")] * n
    offline_bytes_i: list[int | None] = [None] * n
    online_bytes_i: list[int | None] = [None] * n
    if stats.online_bytes > 0:  # the engine reports its phases apart (two parties)
        times = [b.time_s for b in batches]
        offline_i, online_i, off_b, on_b = _phase_split(stats, bytes_i, own_time, times)
        offline_bytes_i, online_bytes_i = list(off_b), list(on_b)
    roles = list(role_bytes)
    cpu = {k: v / n for k, v in stats.cpu_s.items()}
    peak = dict(stats.peak_rss_mb)
    costs = []
    for i in range(n):
        by_role = dict(
            zip(roles, apportion(bytes_i[i], [role_bytes[r] for r in roles]), strict=True)
        )
        costs.append(ImageCost(
            secure_s=own_time[i] + secure_extra, online_s=online_i[i],
            bytes_by_role=by_role, rounds=rounds_i[i], cpu_s=dict(cpu), peak_rss_mb=dict(peak),
            offline_s=offline_i[i], offline_bytes=offline_bytes_i[i], online_bytes=online_bytes_i[i],
        ))  # fmt: skip
    return costs


def _phase_split(stats: SessionStats, bytes_i: list[int], own_time: list[float],
                 batch_time: list[float]) -> tuple[list[float], list[float], list[int], list[int]]:  # fmt: skip
    """(offline_s, online_s, offline_bytes, online_bytes) per image of a two-party session.

    The engine reports the online phase per session only (``online_s``: the data owner's
    online walks; ``online_bytes``: both roles'), and every image's online walk runs the same
    plan on one input, so each image gets an even share: exact for bytes (the message sizes
    follow from the plan's shapes; 1,663,376 bytes per image of the shipped model, every
    batch), an average for time. Offline is everything else:

    - bytes: ``offline_bytes = bytes_i - online_bytes``, i.e. its own batch's offline phase
      (inline, or only the offer of a stored set) plus its share of the session's one-off
      part (the plan, control frames, and the set-up: HE key, base OTs), so offline + online
      = the image's total exactly. The set-up is inside the first batch that computes its
      offline phase inline: shared out evenly when that is batch 0 (see above), charged to
      that image when a session starts on stored sets. The engine's own ``offline_bytes`` is
      not used: it leaves out the plan and the control frames.
    - time: its own batch's time (the data owner's offline and online phase, batch 0 without
      the set-up) less its online share, at least 0 (an image on a stored set: a few ms,
      within the online phase's spread), plus its share of batch 0's set-up. Process starts,
      compilation and TLS are in neither phase, only in ``secure_s``.

    Without per-batch costs the engine's ``offline_s`` is divided evenly.
    """
    n = len(bytes_i)
    online_s = [stats.online_s / n] * n
    shares = apportion(stats.online_bytes, [1.0] * n)
    online_bytes = [min(b, o) for b, o in zip(bytes_i, shares, strict=True)]
    offline_bytes = [b - o for b, o in zip(bytes_i, online_bytes, strict=True)]
    if batch_time:
        setup = max(0.0, sum(batch_time) - sum(own_time)) / n
        offline_s = [max(0.0, t - o) + setup for t, o in zip(own_time, online_s, strict=True)]
    else:
        offline_s = [stats.offline_s / n] * n
    return offline_s, online_s, offline_bytes, online_bytes


@dataclass
class PhaseTotals:
    """The two-party sessions of one validation run, summed (``add`` is called from the worker
    threads): offline (input-independent: inline, or the load of sets precomputed into a
    ``--store``) and online time and bytes sent by both parties, the batches (images) run and
    how many of them consumed a stored set; ``store`` as in ``SessionStats.store`` over the run
    (sets used, sets left after the last session, the distinct fallback reasons)."""

    sessions: int = 0
    batches: int = 0
    offline_s: float = 0.0
    offline_bytes: int = 0
    online_s: float = 0.0
    online_bytes: int = 0
    precomputed_batches: int = 0
    store: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    def add(self, stats: SessionStats) -> None:
        """Count one finished session (a no-op for sessions without an offline phase: three parties)."""
        if not (stats.offline_bytes or stats.precomputed_batches or stats.store):
            return
        with self._lock:
            self.sessions += 1
            self.batches += len(stats.batches)
            self.offline_s += stats.offline_s
            self.offline_bytes += stats.offline_bytes
            self.online_s += stats.online_s
            self.online_bytes += stats.online_bytes
            self.precomputed_batches += stats.precomputed_batches
            if stats.store:
                used = self.store.get("used", []) + list(stats.store.get("used", []))
                self.store = {**stats.store, "used": used}
                note = str(stats.store.get("note", ""))
                if note and note not in self.notes:
                    self.notes.append(note)
