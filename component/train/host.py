"""The training process's own housekeeping on the host: what it costs every step and is no training work.

glibc's malloc hands each freed activation of a few MiB back to the kernel (mmap'd chunks, heap trimming), so the
next step's tensor of the same size faults its pages in again, zeroed by the kernel: on a CPU run that was ~40% of
the time of the element-wise ops. `keep_freed_memory` makes glibc reuse them instead (its documented `mallopt`
settings; the peak is unchanged: the same tensors live at once).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import sys

logger = logging.getLogger(__name__)

# glibc's malloc.h
M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD_MAX = 32 * 2**20  # glibc's ceiling on 64-bit (DEFAULT_MMAP_THRESHOLD_MAX)
TRIM_THRESHOLD = 2**30  # keep up to 1 GiB of freed heap for the next step


def keep_freed_memory() -> bool:
    """Ask glibc to keep freed blocks below 32 MiB in the heap for reuse; True when it took the settings (Linux with
    glibc), False elsewhere (other platforms' allocators, musl), where nothing changes."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_MAX) and mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD))


def training_host() -> None:
    """Before a `Trainer.train()`: glibc keeps freed blocks for reuse (from then on, for the process)."""
    if keep_freed_memory():
        logger.debug("glibc malloc keeps freed blocks below %d MiB for reuse", MMAP_THRESHOLD_MAX // 2**20)
