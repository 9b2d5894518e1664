"""Top-k sparsification and the two index codings: a bitmap or delta-coded positions.

Positions are coded whichever way is smaller for the tensor at hand: a bitmap costs n/8 bytes, delta
coding k·w bytes with w the narrowest unsigned width (1, 2 or 4 bytes) that holds every gap. At 10%
density the bitmap usually wins, at 1% the deltas do.
"""

from __future__ import annotations

import math
from enum import Enum

import numpy as np

from .errors import CodecError


class IndexFormat(str, Enum):
    BITMAP = "bitmap"
    DELTA8 = "delta8"
    DELTA16 = "delta16"
    DELTA32 = "delta32"


_DELTA_DTYPES = {IndexFormat.DELTA8: np.uint8, IndexFormat.DELTA16: np.uint16, IndexFormat.DELTA32: np.uint32}


def topk_count(n: int, *, ratio: float | None, k: int | None) -> int:
    if n == 0:
        return 0
    want = k if k is not None else math.ceil((ratio if ratio is not None else 1.0) * n)
    return max(1, min(n, want))


def select_topk(flat: np.ndarray, k: int) -> np.ndarray:
    """Sorted positions of the k largest magnitudes (ties broken arbitrarily but deterministically)."""
    n = flat.size
    if k >= n:
        return np.arange(n, dtype=np.int64)
    part = np.argpartition(np.abs(flat), n - k)[n - k :]
    part.sort()
    return part.astype(np.int64, copy=False)


def index_nbytes(fmt: IndexFormat, n: int, k: int) -> int:
    if fmt is IndexFormat.BITMAP:
        return (n + 7) // 8
    return k * np.dtype(_DELTA_DTYPES[fmt]).itemsize


def encode_indices(idx: np.ndarray, n: int) -> tuple[IndexFormat, bytes]:
    k = idx.size
    # gaps[0] = idx[0] + 1 and gaps[i] = idx[i] - idx[i-1]: every gap is >= 1 (positions strictly increase)
    gaps = np.diff(idx, prepend=-1)
    widest = int(gaps.max()) if k else 1
    fmt = IndexFormat.DELTA8 if widest < 1 << 8 else IndexFormat.DELTA16 if widest < 1 << 16 else IndexFormat.DELTA32
    if index_nbytes(IndexFormat.BITMAP, n, k) <= index_nbytes(fmt, n, k):
        bits = np.zeros(n, dtype=np.uint8)
        bits[idx] = 1
        return IndexFormat.BITMAP, np.packbits(bits).tobytes()
    return fmt, gaps.astype(_DELTA_DTYPES[fmt]).tobytes()


def decode_indices(fmt: IndexFormat, data: memoryview | bytes, n: int, k: int) -> np.ndarray:
    """Positions from their coding; anything inconsistent with (n, k) raises :class:`CodecError`."""
    if fmt is IndexFormat.BITMAP:
        bits = np.unpackbits(np.frombuffer(data, dtype=np.uint8), count=n)
        idx = np.flatnonzero(bits)
        if idx.size != k:
            raise CodecError(f"bitmap marks {idx.size} positions, the record declares {k}")
        return idx
    gaps = np.frombuffer(data, dtype=_DELTA_DTYPES[fmt], count=k)
    if k and int(gaps.min()) < 1:
        raise CodecError("delta-coded positions must strictly increase")
    idx = np.cumsum(gaps, dtype=np.int64) - 1
    if k and idx[-1] >= n:
        raise CodecError(f"position {int(idx[-1])} outside a tensor of {n} values")
    return idx
