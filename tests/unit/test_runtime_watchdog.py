"""The launcher's watchdog stops a session that makes no progress, never one that does."""

from __future__ import annotations

import time

from privmed.runtime.launch import Watchdog


def test_a_session_longer_than_the_stall_limit_completes_while_it_progresses():
    stalls: list[float] = []
    dog = Watchdog(0.5, lambda: stalls.append(time.monotonic()))
    try:
        for _ in range(12):  # 12 layers 0.15 s apart: 1.8 s in all, over three stall limits
            time.sleep(0.15)
            dog.tick()
    finally:
        dog.stop()
    assert stalls == [] and not dog.stalled


def test_a_silent_session_is_stopped_after_the_stall_limit():
    stalls: list[float] = []
    started = time.monotonic()
    dog = Watchdog(0.5, lambda: stalls.append(time.monotonic()))
    try:
        time.sleep(1.5)
    finally:
        dog.stop()
    assert dog.stalled and len(stalls) == 1
    assert 0.5 <= stalls[0] - started < 1.2
