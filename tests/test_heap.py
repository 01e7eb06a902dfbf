"""job.heap: the free pages XLA's compile leaves, and large freed blocks, handed
back to the kernel."""

from __future__ import annotations

import ctypes
import ctypes.util
import subprocess
import sys
from pathlib import Path

import pytest

from job import heap
from tests.conftest import ROOT


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


# In a fresh interpreter (the setting is the process's): after a 24 MB block
# has been freed once, how much of a second one stays resident once freed.
KEPT_AFTER_FREE = """
import ctypes, ctypes.util, sys
from job import heap
if sys.argv[1] == "fixed":
    heap.return_large_blocks_when_freed()
libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
libc.malloc.restype = ctypes.c_void_p
libc.free.argtypes = [ctypes.c_void_p]
def anonymous_mb():
    for line in open("/proc/self/status"):
        if line.startswith("RssAnon:"):
            return int(line.split()[1]) / 1024
size = 24 << 20
for _ in range(2):
    block = libc.malloc(size)
    ctypes.memset(block, 1, size)
    held = anonymous_mb()
    libc.free(block)
print(round(held - anonymous_mb()))
"""


@pytest.mark.skipif(heap._MALLOPT is None, reason="the C library has no mallopt")
def test_large_blocks_go_back_to_the_kernel_when_freed():
    def returned_mb(mode: str) -> int:
        done = subprocess.run(
            [sys.executable, "-c", KEPT_AFTER_FREE, mode],
            capture_output=True,
            text=True,
            cwd=ROOT,
            check=True,
        )
        return int(done.stdout)

    assert returned_mb("fixed") >= 23
    # Why: glibc's own threshold rises past the first freed block's size, and
    # the second block of that size stays in the heap when freed.
    assert returned_mb("glibc's default") <= 1
