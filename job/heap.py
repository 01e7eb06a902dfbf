"""Handing the C heap's free pages back to the kernel."""

from __future__ import annotations

import ctypes
import ctypes.util


def _libc_malloc_trim():
    """glibc's malloc_trim, or None where the C library has none (musl, macOS)."""
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim
    except (OSError, AttributeError):
        return None


_MALLOC_TRIM = _libc_malloc_trim()


def release_free_memory() -> None:
    """Hand the C heap's free pages back to the kernel (glibc only; ~20 ms).

    XLA's compile of the training step allocates ~50 MB that it frees when
    done, but glibc keeps freed memory mapped for reuse, in the middle of the
    heap where its automatic trimming never reaches: without this the process
    carries it, resident, to its end.
    """
    if _MALLOC_TRIM is not None:
        _MALLOC_TRIM(0)
