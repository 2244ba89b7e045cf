"""Keep freed memory in the process instead of returning it to the kernel (glibc only).

A secure session allocates and frees the same few array sizes layer after layer (a ReLU layer
of DenseNet-121 at 224x224 makes a dozen temporaries of up to 6.4 MB). glibc's defaults hand
such blocks back to the kernel when freed (``mmap`` above a dynamic threshold, heap trimming
above another), so the next layer faults every page in again: 250-460 thousand page faults
per DenseNet-121 image over the three roles. With large blocks taken from the heap and the
heap never trimmed, the same session takes 115-160 thousand and 8-11 % less CPU (two A/B
sittings on the 2-core build machine; README, "Measured figures"). The resident peak is
unchanged (the blocks were in use at the peak anyway); the process keeps its peak until it
exits.

Each role's entry calls ``keep_freed_memory`` (``mallopt`` in the running process:
``runtime.party.run_role``, ``runtime.twoparty_launch.run_role_2p``); a local session also
gives its children ``MALLOC_ENV``, the same settings from their first allocation on (and for
processes they spawn, such as the model owner's HE helper). Elsewhere than glibc both do
nothing.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging

log = logging.getLogger(__name__)

_M_TRIM_THRESHOLD, _M_TOP_PAD, _M_MMAP_THRESHOLD = -1, -2, -3
TRIM_THRESHOLD = 1 << 30  # never give heap memory back below 1 GiB free at the top
TOP_PAD = 256 << 20  # grow the heap in steps of 256 MiB (address space; pages are touched on use)
MMAP_THRESHOLD = 32 << 20  # blocks up to 32 MiB (glibc's maximum) come from the heap
MALLOC_ENV = {"MALLOC_TRIM_THRESHOLD_": str(TRIM_THRESHOLD), "MALLOC_TOP_PAD_": str(TOP_PAD),
              "MALLOC_MMAP_THRESHOLD_": str(MMAP_THRESHOLD)}  # fmt: skip
_done = False


def keep_freed_memory() -> None:
    """Apply the settings above to this process once (glibc ``mallopt``; a no-op elsewhere)."""
    global _done
    if _done:
        return
    _done = True
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError) as exc:  # not glibc: keep the allocator's defaults
        log.debug("mallopt unavailable: %s", exc)
        return
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    for param, value in ((_M_MMAP_THRESHOLD, MMAP_THRESHOLD), (_M_TRIM_THRESHOLD, TRIM_THRESHOLD), (_M_TOP_PAD, TOP_PAD)):
        if mallopt(param, value) != 1:
            log.debug("mallopt(%d, %d) refused", param, value)
