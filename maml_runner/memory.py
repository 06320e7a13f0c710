"""Keep freed host memory in the process, so a CPU meta-step does not page-fault its activations.

glibc serves a large ``malloc`` (above 128 KiB, rising to at most 32 MiB as it adapts) with a
fresh ``mmap`` and unmaps it on ``free``, and it trims freed memory at the top of its heap; the
next meta-step's tensors of the same sizes are then faulted in again, page by page, and zeroed
by the kernel. For Omniglot 5-way 1-shot on CPU that was ~370,000 page faults (1.4 GB) per
meta-step, a third of its time. ``keep_freed_memory`` turns off glibc's use of ``mmap`` for
allocations and raises its trim threshold to 1 GiB, so every meta-step reuses the heap the
previous one freed. The price is that a process keeps up to its peak in use.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import sys

M_TRIM_THRESHOLD = -1  # from glibc's malloc.h
M_MMAP_MAX = -4
TRIM_THRESHOLD = 2**30


def keep_freed_memory() -> bool:
    """Tune glibc's allocator as above; False where that is not possible (not Linux/glibc)."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # musl and others have no mallopt
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return bool(mallopt(M_MMAP_MAX, 0)) and bool(mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD))
