"""job.heap: the free pages XLA's compile leaves, handed back to the kernel."""

from __future__ import annotations

import ctypes
import ctypes.util
from pathlib import Path

import pytest

from job import heap


def anonymous_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("RssAnon:"):
            return int(line.split()[1]) / 1024
    pytest.skip("no RssAnon in /proc/self/status (not Linux)")


@pytest.mark.skipif(heap._MALLOC_TRIM is None, reason="the C library has no malloc_trim")
def test_release_free_memory_returns_freed_heap_pages_glibc_keeps():
    """What XLA's compile leaves: many small blocks freed below one still in
    use, which glibc's own trimming (top of the heap only) never returns."""
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    libc.malloc.restype = ctypes.c_void_p
    libc.free.argtypes = [ctypes.c_void_p]
    blocks = [libc.malloc(4096) for _ in range(25_000)]  # ~100 MB
    for block in blocks:
        ctypes.memset(block, 1, 4096)
    for block in blocks[:-1]:  # the last one pins the top of the heap
        libc.free(block)
    before = anonymous_mb()
    heap.release_free_memory()
    after = anonymous_mb()
    libc.free(blocks[-1])
    assert before - after > 50, (before, after)
