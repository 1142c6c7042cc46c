"""Allocator tuning for the processes that decode images.

Every image allocates a few fresh buffers of 0.2-1 MB (decoded pixels, the resized crop, the
float32 copy) and the batch is tens of MB. With glibc's defaults, freed memory at the top of
the heap, and every block above the (dynamic) mmap threshold, goes back to the OS, so the next
image page-faults and the kernel zeroes fresh pages again: about a quarter of the CPU time per
224 px image on the benchmark machine (experiments/data_throughput). Keeping freed memory in
the allocator removes that cost, at the price of a resident set that stays at its high-water
mark -- the usual trade for input pipelines (TF and PyTorch users reach for tcmalloc / jemalloc
for the same reason).
"""

from __future__ import annotations

import ctypes
import ctypes.util

_M_TRIM_THRESHOLD, _M_TOP_PAD, _M_MMAP_THRESHOLD = -1, -2, -3


def keep_freed_memory(trim_threshold: int = 1 << 30, top_pad: int = 64 << 20,
                      mmap_threshold: int = 32 << 20) -> bool:
    """glibc `mallopt`: keep up to `trim_threshold` bytes of freed heap, grow the heap by
    `top_pad` extra, serve blocks below `mmap_threshold` (at most 32 MB) from the heap.

    Returns False (and changes nothing) where the C library is not glibc.
    """
    name = ctypes.util.find_library("c")
    try:
        mallopt = ctypes.CDLL(name).mallopt
    except (OSError, AttributeError, TypeError):
        return False
    return all(mallopt(param, value) == 1 for param, value in (
        (_M_MMAP_THRESHOLD, mmap_threshold), (_M_TRIM_THRESHOLD, trim_threshold),
        (_M_TOP_PAD, top_pad)))


def worker_init(worker_index: int, worker_count: int, tune_allocator: bool = True) -> None:
    """`mp_prefetch` worker start-up hook (picklable)."""
    del worker_index, worker_count
    if tune_allocator:
        keep_freed_memory()
