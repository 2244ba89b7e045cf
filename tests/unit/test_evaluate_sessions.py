"""Images per secure session: how a study is split into groups (runner.group_sizes) and how a
multi-image session's cost is shared out over its images (costs.split_session_costs).

The stats below are a real 4-image session of the shipped model (run_local_session with
chunk=1, 2026-11-22), so the expectations are computed by hand from numbers the engine
actually reports: batch 0 carries the masked weights (138,472 bytes more than the others).
REAL_2P is a real 3-image two-party session (run_local_session_2p, chunk=1, 2026-11-30).
"""

from __future__ import annotations

import math

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


# Per batch, from the two roles' own records (not in SessionStats): offline phase of the data
# owner 3.2926, 2.0508, 2.9455 s; online 1,663,376 bytes (both roles) every batch; batch 0
# also holds the set-up (HE key, base OTs: 541,416 bytes). The engine's offline totals count
# that set-up a second time (8.6111 s, 77,410,170 bytes).
REAL_2P = {
    "wall_s": 9.679, "online_s": 0.3619, "rounds": 126, "bytes_total": 81862180,
    "bytes_sent": {"model-owner": 66312938, "data-owner": 15549242},
    "cpu_s": {"model-owner": 4.213, "data-owner": 1.903}, "peak_rss_mb": {"model-owner": 116.2, "data-owner": 122.4},
    "batches": [
        {"index": 0, "n": 1, "time_s": 3.3799, "rounds": 42, "bytes": 27647238},
        {"index": 1, "n": 1, "time_s": 2.1834, "rounds": 42, "bytes": 27105822},
        {"index": 2, "n": 1, "time_s": 3.0875, "rounds": 42, "bytes": 27105822},
    ],
    "offline_s": 8.6111, "offline_bytes": 77410170, "online_bytes": 4990128,
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
    # the dealer mode does not report its phases apart: left unmeasured, not zero
    assert all(c.offline_bytes is None and c.online_bytes is None and math.isnan(c.offline_s) for c in costs)


def test_two_party_session_splits_each_image_into_offline_and_online() -> None:
    # Execute
    costs = split_session_costs(S(REAL_2P), 3, wall_s=9.7)
    # Assert: bytes. Online: the same walk for every image, 1,663,376 each (the roles'
    # records); offline: the rest of the image's bytes, so the two add up to its total
    totals = [sum(c.bytes_by_role.values()) for c in costs]
    assert [c.online_bytes for c in costs] == [1663376] * 3
    assert [c.offline_bytes + c.online_bytes for c in costs] == totals and sum(totals) == 81862180
    # offline per image = its batch's offline phase (batch 0 without the set-up: 25,442,446 like
    # the others) + a third of the set-up and of the 3,298 bytes outside any batch (plan, control)
    assert [c.offline_bytes for c in costs] == pytest.approx([25442446 + (541416 + 3298) / 3] * 3, abs=1)
    # time: online an even share of the data owner's online phases; offline its batch less
    # that share, plus a third of batch 0's set-up, summing to the data owner's offline phases
    assert all(c.online_s == pytest.approx(0.3619 / 3) for c in costs)
    assert sum(c.offline_s for c in costs) == pytest.approx(3.2926 + 2.0508 + 2.9455, abs=1e-3)
    assert costs[1].offline_s == pytest.approx(2.1834 - 0.3619 / 3 + (3.3799 - (2.1834 + 3.0875) / 2) / 3)
    assert all(c.secure_s > c.offline_s + c.online_s for c in costs)  # + process start, TLS, plan


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
