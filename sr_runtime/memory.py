"""Handing a large image's freed memory back to the operating system.

glibc keeps freed blocks in its heaps (one per thread that allocated) for
reuse, so a long-lived process that upscaled one large image, such as an
`sr-serve` replica, would otherwise keep much of that image's peak resident.
`malloc_trim` returns the free pages. Other C libraries (musl, macOS, Windows)
have no such call; there nothing is done.
"""

from __future__ import annotations

import ctypes
import sys

#: Output pixels from which an image counts as large: after one, memory is handed back (smaller ones leave little).
LARGE_OUTPUT_PIXELS = 4_000_000


def release_free_memory() -> bool:
    """Give the C heap's free pages back to the OS (glibc's `malloc_trim(0)`); False where there is no such call."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None)  # the process's own C library, whichever it is
    except OSError:
        return False
    trim = getattr(libc, "malloc_trim", None)  # glibc only
    if trim is None:
        return False
    trim.argtypes = [ctypes.c_size_t]
    trim.restype = ctypes.c_int
    trim(0)
    return True
