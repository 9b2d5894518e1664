"""Keep the server's resident memory close to what it holds.

The server allocates and frees many multi-megabyte numpy arrays per round (decoded updates, leave-one-out rows,
encoded payloads), from the event loop and from worker threads. glibc serves allocations above its mmap threshold
with mmap and returns them to the OS on free, but it raises that threshold (up to 32 MB) every time such a block
is freed, after which arrays come from per-thread heap arenas that fragment and never shrink: measured on the
ingest benchmark, server RSS grew to ~11x the update bytes it held. Pinning the threshold keeps every large array
mmapped, so freed payloads leave RSS at once.
"""

from __future__ import annotations

from ..common.heap import pin_mmap_threshold as _pin
from ..common.heap import trim

MMAP_THRESHOLD_BYTES = 1 << 20


def pin_mmap_threshold(threshold: int = MMAP_THRESHOLD_BYTES) -> bool:
    """Serve allocations >= ``threshold`` with mmap for the life of the process (glibc only; elsewhere a no-op)."""
    return _pin(threshold)


__all__ = ["MMAP_THRESHOLD_BYTES", "pin_mmap_threshold", "trim"]
