"""Keep freed memory in the process, so that a step's big tensors cost no page faults.

A training step of K instances allocates and frees tensors of K (B + 1) m floats every step (6.5 MB
at K = 16, B = 2048, m = 50). glibc's malloc hands blocks above M_MMAP_THRESHOLD back to the system
and trims a free heap top above M_TRIM_THRESHOLD, so every step faults its pages in again: at K = 16
on the 2-core test machine that made the step much slower (`benchmarks/bench.py` measures both).
`keep_freed_memory` raises both thresholds, as MALLOC_MMAP_THRESHOLD_ and MALLOC_TRIM_THRESHOLD_ would.
The price is resident memory: the process keeps what it has used (after the first validation of a default
run about 600 MB instead of 400 MB; README, Performance). The `cis` command calls it;
CIS_KEEP_FREED_MEMORY=0 in the environment turns it off.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os

_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # mallopt parameters (malloc.h)
_MMAP_THRESHOLD_MAX = 32 * 2**20  # glibc's largest allowed value on 64-bit systems
_ENVIRONMENT = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_")


def keep_freed_memory() -> bool:
    """Raise glibc's mmap and trim thresholds for this process; False where that is not possible.

    Does nothing if the user set either threshold in the environment or CIS_KEEP_FREED_MEMORY=0, or
    without glibc (macOS, musl).
    """
    if any(name in os.environ for name in _ENVIRONMENT) or os.environ.get("CIS_KEEP_FREED_MEMORY") == "0":
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    return bool(mallopt(_M_MMAP_THRESHOLD, _MMAP_THRESHOLD_MAX)) and bool(mallopt(_M_TRIM_THRESHOLD, 2**31 - 1))
