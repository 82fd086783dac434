"""Keep freed memory in the process instead of handing it back to the OS (glibc's malloc, Linux).

A training step or a scoring batch allocates and frees the same few-MB tensors every time (1,024 x 50 x 32
floats is 6.5 MB). glibc's malloc serves blocks that large with mmap, or trims them off its heap when they are
freed, so every step touches fresh pages: about 12,000 page faults, 16 ms of kernel time, in a 200 ms MSIT step
measured on this project's 2-core VM (docs/benchmarks.md). Raising the mmap and trim thresholds keeps those
pages in the process between steps, as PyTorch's CPU tuning guide gets by preloading jemalloc or tcmalloc.

The cost is memory: up to `TRIM_THRESHOLD` of freed heap stays with each process. Set any of glibc's own
MALLOC_*_ variables, or MSIT_KEEP_FREED_MEMORY=0, to leave malloc as it is.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os

M_TRIM_THRESHOLD, M_TOP_PAD, M_MMAP_THRESHOLD = -1, -2, -3  # mallopt's parameters (malloc.h)
MMAP_THRESHOLD = 32 << 20  # blocks under 32 MB come from the heap (glibc's largest allowed threshold)
TRIM_THRESHOLD = 1 << 30  # the heap is trimmed only when 1 GB of it is free
TOP_PAD = 256 << 20  # and grows by 256 MB at a time
GLIBC_VARIABLES = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_TOP_PAD_")


def keep_freed_memory() -> bool:
    """Tune glibc's malloc for a process that reallocates the same large tensors (a training or serving
    process). Returns whether it did: False off glibc, or where the environment already says otherwise."""
    if os.environ.get("MSIT_KEEP_FREED_MEMORY", "1") == "0" or any(name in os.environ for name in GLIBC_VARIABLES):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc (macOS, musl without mallopt)
        return False
    settings = ((M_MMAP_THRESHOLD, MMAP_THRESHOLD), (M_TRIM_THRESHOLD, TRIM_THRESHOLD), (M_TOP_PAD, TOP_PAD))
    return all(mallopt(parameter, value) == 1 for parameter, value in settings)
