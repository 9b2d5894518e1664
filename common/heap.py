"""glibc heap settings for processes that allocate and free many multi-megabyte buffers (no-ops elsewhere).

glibc serves allocations above its mmap threshold with mmap and returns them to the OS on free, but it raises
that threshold (up to 32 MB) every time such a block is freed; from then on big buffers come from heap arenas
that fragment and never shrink. Pinning the threshold keeps big buffers mmapped. Who does it and why:
the server (decoded updates, leave-one-out rows: server/memory.py) and a client loading a 4-bit model (every
use of a quantized layer dequantizes its weight into a fresh buffer: client/model.py).
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import logging
from typing import Any

log = logging.getLogger(__name__)

M_MMAP_THRESHOLD = -3  # mallopt parameter numbers from glibc's malloc.h
_libc: Any = None


def _glibc() -> Any:
    """The C library if it has glibc's mallopt and malloc_trim, else False (musl, macOS, Windows)."""
    global _libc
    if _libc is None:
        name = ctypes.util.find_library("c")
        try:
            lib = ctypes.CDLL(name) if name else None
            _libc = lib if lib is not None and hasattr(lib, "mallopt") and hasattr(lib, "malloc_trim") else False
        except OSError:
            _libc = False
    return _libc


def pin_mmap_threshold(threshold: int) -> bool:
    """Serve allocations >= ``threshold`` bytes with mmap for the life of the process; False where not glibc."""
    lib = _glibc()
    if not lib:
        return False
    lib.mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    lib.mallopt.restype = ctypes.c_int
    ok = bool(lib.mallopt(M_MMAP_THRESHOLD, int(threshold)))
    log.debug("glibc mmap threshold pinned at %d bytes: %s", threshold, ok)
    return ok


def trim() -> None:
    """Return free heap pages to the OS (glibc ``malloc_trim``)."""
    lib = _glibc()
    if lib:
        with contextlib.suppress(OSError):
            lib.malloc_trim(0)


__all__ = ["pin_mmap_threshold", "trim"]
