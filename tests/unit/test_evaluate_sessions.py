"""Images per secure session: how a study is split into groups (runner.group_sizes) and how a
multi-image session's cost is shared out over its images (costs.split_session_costs).

The stats below are a real 4-image session of the shipped model (run_local_session with
chunk=1, 2026-11-22), so the expectations are computed by hand from numbers the engine
actually reports: batch 0 carries the masked weights (138,472 bytes more than the others).
"""

from __future__ import annotations

import numpy as np
import pytest

from privmed.evaluate.costs import apportion, split_session_costs
from privmed.evaluate.runner import group_sizes
from privmed.runtime.stats import SessionStats

S = SessionStats.from_dict

REAL_4 = {
    "wall_s": 1.554, "online_s": 0.253, "rounds": 104, "bytes_total": 6296233,
    "bytes_sent": {"data-owner": 1208048, "model-owner": 742889, "dealer": 4345296},
    "cpu_s": {"data-owner": 0.399, "model-owner": 0.482, "dealer": 0.481},
    "peak_rss_mb": {"data-owner": 49.5, "model-owner": 62.4, "dealer": 48.9},
    "batches": [
        {"index": 0, "n": 1, "time_s": 0.076, "rounds": 26, "bytes": 1676096},
        {"index": 1, "n": 1, "time_s": 0.0503, "rounds": 26, "bytes": 1537624},
        {"index": 2, "n": 1, "time_s": 0.0542, "rounds": 26, "bytes": 1537624},
        {"index": 3, "n": 1, "time_s": 0.0507, "rounds": 26, "bytes": 1537624},
    ],
}  # fmt: skip


def test_apportion_sums_exactly_and_is_proportional() -> None:
    rng = np.random.default_rng(0)
    for _ in range(200):
        total = int(rng.integers(0, 10**7))
        weights = rng.uniform(0, 5, size=int(rng.integers(1, 6))).tolist()
        parts = apportion(total, weights)
        quota = total * np.array(weights) / sum(weights)
        assert sum(parts) == total and np.all(np.abs(np.array(parts) - quota) < 1.0)
    assert apportion(7, [1, 1, 1]) == [3, 2, 2] and apportion(5, [0, 0]) == [3, 2]


def test_real_session_weights_and_setup_are_shared_evenly() -> None:
    # Execute
    costs = split_session_costs(S(REAL_4), 4, wall_s=1.6)
    # Assert: one-off = total - (3 steady batches + batch 0 without the weights), split evenly
    steady = 1537624
    one_off = 6296233 - 4 * steady  # 145,737: weights (138,472) + outside any batch (7,265)
    totals = [sum(c.bytes_by_role.values()) for c in costs]
    assert sum(totals) == 6296233 and max(totals) - min(totals) <= 1
    assert totals[0] == pytest.approx(steady + one_off / 4, abs=1)
    # per role: proportional to the session's per-role bytes, summing to the image's bytes
    for role, total in REAL_4["bytes_sent"].items():
        assert costs[1].bytes_by_role[role] == pytest.approx(totals[1] * total / 6296233, abs=1)
    # rounds: 26 per image, nothing outside the batches
    assert [c.rounds for c in costs] == [26, 26, 26, 26]
    # time: batch 0 counted at the median later batch (0.0507); the rest of the session's wall
    # time / online time is shared
    own = [0.0507, 0.0503, 0.0542, 0.0507]
    for c, t in zip(costs, own, strict=True):
        assert c.secure_s == pytest.approx(t + (1.6 - sum(own)) / 4)
        assert c.online_s == pytest.approx(t + (0.253 - sum(own)) / 4)
    assert sum(c.secure_s for c in costs) == pytest.approx(1.6)
    assert costs[2].cpu_s["dealer"] == pytest.approx(0.481 / 4)
    assert costs[3].peak_rss_mb == REAL_4["peak_rss_mb"]  # a session's peak does not divide


def test_one_image_session_is_charged_the_whole_session() -> None:
    one = {**REAL_4, "rounds": 26, "bytes_total": 1683361, "online_s": 0.1102,
           "bytes_sent": {"data-owner": 302456, "model-owner": 294353, "dealer": 1086552},
           "batches": [{"index": 0, "n": 1, "time_s": 0.109, "rounds": 26, "bytes": 1676096}]}  # fmt: skip
    (c,) = split_session_costs(S(one), 1, wall_s=1.746)
    assert c.bytes_by_role == one["bytes_sent"] and c.rounds == 26
    assert c.secure_s == pytest.approx(1.746) and c.online_s == pytest.approx(0.1102)
    assert c.cpu_s == one["cpu_s"]


def test_without_batches_totals_are_divided_evenly() -> None:
    stats = {"online_s": 0.3, "rounds": 45, "bytes_sent": {"a": 301, "b": 600}, "cpu_s": {"a": 1.5}}
    costs = split_session_costs(S(stats), 3, wall_s=0.9)
    assert [c.rounds for c in costs] == [15, 15, 15]
    assert [c.bytes_by_role for c in costs] == [{"a": 101, "b": 200}, {"a": 100, "b": 200},
                                                {"a": 100, "b": 200}]  # fmt: skip
    assert all(c.secure_s == pytest.approx(0.3) and c.online_s == pytest.approx(0.1) for c in costs)
    assert all(c.cpu_s == {"a": pytest.approx(0.5)} for c in costs)
    # batches that do not match the images (another chunking) are ignored the same way
    wrong = {**stats, "batches": [{"index": 0, "n": 3, "time_s": 0.2, "rounds": 45, "bytes": 900}]}
    assert [c.rounds for c in split_session_costs(S(wrong), 3, wall_s=0.9)] == [15, 15, 15]


def test_an_engine_that_measures_nothing_is_charged_only_the_callers_wall_time() -> None:
    (c,) = split_session_costs(SessionStats(wall_s=0.0, online_s=0.0), 1, wall_s=2.0)
    assert c.rounds == 0 and c.bytes_by_role == {} and c.cpu_s == {}
    assert c.secure_s == 2.0 and c.online_s == 0.0
    assert split_session_costs(SessionStats(wall_s=0.0, online_s=0.0), 0, wall_s=1.0) == []


@pytest.mark.parametrize(
    ("n", "per_session", "workers", "expected"),
    [
        (300, 16, 2, [16] * 15 + [15] * 4),
        (8, 16, 2, [4, 4]),
        (5, 16, 2, [3, 2]),
        (3, 1, 2, [1, 1, 1]),
        (1, 16, 4, [1]),
        (24, 3, 2, [3] * 8),
        (0, 16, 2, []),
    ],
)
def test_group_sizes(n: int, per_session: int, workers: int, expected: list[int]) -> None:
    sizes = group_sizes(n, per_session, workers)
    assert sizes == expected
    # oracle for the rule: every image once, none above the cap, as few groups as the cap
    # and the workers allow, sizes within one of each other
    assert sum(sizes) == n and all(0 < s <= per_session for s in sizes)
    assert len(sizes) == max(-(-n // per_session), min(workers, n))
    assert not sizes or max(sizes) - min(sizes) <= 1
