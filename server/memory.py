"""Keep the server's resident memory close to what it holds.

The server allocates and frees many multi-megabyte numpy arrays per round (decoded updates, leave-one-out rows,
encoded payloads), from the event loop and from worker threads. glibc serves allocations above its mmap threshold
with mmap and returns them to the OS on free, but it raises that threshold (up to 32 MB) every time such a block
is freed, after which arrays come from per-thread heap arenas that fragment and never shrink: measured on the
ingest benchmark, server RSS grew to ~11x the update bytes it held. Pinning the threshold keeps every large array
mmapped, so freed payloads leave RSS at once.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import logging

log = logging.getLogger(__name__)

M_MMAP_THRESHOLD = -3  # mallopt parameter numbers from glibc's malloc.h
MMAP_THRESHOLD_BYTES = 1 << 20


def pin_mmap_threshold(threshold: int = MMAP_THRESHOLD_BYTES) -> bool:
    """Serve allocations ≥ ``threshold`` with mmap for the life of the process (glibc only; elsewhere a no-op)."""
    name = ctypes.util.find_library("c")
    if name is None:
        return False
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # musl, macOS: no mallopt, and no dynamic threshold to pin
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    ok = bool(mallopt(M_MMAP_THRESHOLD, threshold))
    log.debug("glibc mmap threshold pinned at %d bytes: %s", threshold, ok)
    return ok


def trim() -> None:
    """Return free heap pages to the OS (glibc ``malloc_trim``); a no-op elsewhere."""
    name = ctypes.util.find_library("c")
    if name is None:
        return
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(name).malloc_trim(0)
