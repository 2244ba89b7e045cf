"""The launcher's watchdog stops a session that makes no progress, never one that does."""

from __future__ import annotations

import subprocess
import sys
import time

import pytest

from privmed.errors import PeerError
from privmed.runtime.launch import _follow

TICKER = "import time\nfor i in range({n}):\n    print('{{\"layer\": %d}}' % i, flush=True)\n    time.sleep({every})\n"


def _roles(data_owner: str, others_s: float) -> dict[str, subprocess.Popen]:
    sleeper = [sys.executable, "-c", f"import time; time.sleep({others_s})"]
    return {
        "dealer": subprocess.Popen(sleeper),
        "model-owner": subprocess.Popen(sleeper),
        "data-owner": subprocess.Popen([sys.executable, "-c", data_owner], stdout=subprocess.PIPE),
    }


def _stop(procs: dict[str, subprocess.Popen]) -> None:
    for p in procs.values():
        if p.poll() is None:
            p.kill()
        p.wait()


def test_a_session_longer_than_the_stall_limit_completes_while_it_progresses():
    # 12 progress lines 0.25 s apart: 3 s in all, three times the 1 s stall limit
    procs = _roles(TICKER.format(n=12, every=0.25), others_s=3.0)
    seen: list[dict] = []
    try:
        started = time.monotonic()
        _follow(procs, seen.append, stall_s=1.0)
        assert time.monotonic() - started > 2.5
    finally:
        _stop(procs)
    assert [line["layer"] for line in seen] == list(range(12))


def test_a_silent_session_is_stopped_after_the_stall_limit():
    procs = _roles(TICKER.format(n=1, every=30), others_s=30.0)
    try:
        started = time.monotonic()
        with pytest.raises(PeerError, match="no progress for 1 s"):
            _follow(procs, None, stall_s=1.0)
        assert time.monotonic() - started < 5
    finally:
        _stop(procs)
