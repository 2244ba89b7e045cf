"""``privmed.runtime.memory``: freed arrays stay in the process, so a session's next layer does
not fault its pages in again (glibc; measured on the build machine: 29-32 thousand faults
without, 0 with, for the allocation pattern below)."""

from __future__ import annotations

import subprocess
import sys

import pytest

LAYERS = """
import resource, sys
import numpy as np
if sys.argv[1] == "on":
    from privmed.runtime.memory import keep_freed_memory
    keep_freed_memory()
def layer(n):  # a few temporaries of one size, as a protocol layer makes
    a = np.ones(n, np.uint64); b = a + 1; c = a * b; d = c ^ a
    return int(d[0])
for n in (800_000, 200_000, 3_000_000):
    layer(n)
f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(5):
    for n in (800_000, 200_000, 3_000_000, 100_000, 1_500_000):
        layer(n)
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0)
"""


def _faults(mode: str) -> int:
    out = subprocess.run([sys.executable, "-c", LAYERS, mode], capture_output=True, text=True, check=True, timeout=60)
    return int(out.stdout.strip())


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc mallopt")
def test_layers_after_the_first_fault_no_pages_in_again() -> None:
    default, kept = _faults("off"), _faults("on")
    # 5 rounds x 5 layers x 4 arrays of 0.8-24 MB: thousands of 4 KiB pages each round by default
    assert default > 5_000
    assert kept < default / 20
