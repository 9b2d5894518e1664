"""Dense numeric encodings: INT8 symmetric quantization (per tensor, per axis, blockwise) and bf16.

All functions are pure numpy over float32 and work in float32 throughout: no float64 temporaries.
"""

from __future__ import annotations

import math

import numpy as np

_INV127 = np.float32(1.0 / 127.0)
_TINY = np.finfo(np.float32).tiny


def _scales(amax: np.ndarray | np.floating) -> np.ndarray:
    """max|x|/127 per slice; slices below 127·FLT_MIN are flushed to 0 (all-zero) because 1/scale of a
    subnormal scale overflows. What that drops is under 1.5e-36 per value (and error feedback keeps it)."""
    scales = np.atleast_1d(np.asarray(amax, dtype=np.float32) * _INV127).astype(np.float32)
    scales[scales < _TINY] = 0.0
    return scales


def _safe_inverse(scales: np.ndarray) -> np.ndarray:
    """1/scale, with 0 where the scale is 0 (an all-zero slice quantizes to zeros)."""
    inv = np.zeros_like(scales)
    np.divide(np.float32(1.0), scales, out=inv, where=scales > 0)
    return inv


def _to_int8(x: np.ndarray, inv: np.ndarray) -> np.ndarray:
    y = np.multiply(x, inv, dtype=np.float32)
    np.rint(y, out=y)
    np.clip(y, -127, 127, out=y)  # |x|·(127/amax) ≤ 127 up to rounding; clip guards the last ulp
    return y.astype(np.int8)


def quantize_int8_tensor(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """One scale for the whole tensor. Returns (scales[1], int8 values in x's shape)."""
    amax = np.float32(np.abs(x).max(initial=0.0))
    scales = _scales(amax)
    return scales, _to_int8(x, _safe_inverse(scales)[0])


_ROW = 4096  # inner-loop length to aim for when working per column


def _column_tile(m: int, r: int) -> int:
    """g such that a C-contiguous (m, r) array reads as (m // g, g * r): rows of g whole r-groups.

    Per-column work on a tall, narrow tensor (LoRA B: out x r) then runs numpy's inner loops over
    g * r values instead of r (16): the reduction and the broadcast multiply are 3-5x faster.
    """
    return math.gcd(m, max(1, _ROW // r))


def _amax_columns(x: np.ndarray) -> np.ndarray:
    m, r = x.shape
    g = _column_tile(m, r)
    return np.abs(x.reshape(m // g, g * r)).max(axis=0).reshape(g, r).max(axis=0)


def quantize_int8_axis(x: np.ndarray, axis: int) -> tuple[np.ndarray, np.ndarray]:
    """One scale per index along ``axis`` of a 2-D tensor (axis 0: per row, 1: per column)."""
    if axis == 0:
        scales = _scales(np.abs(x).max(axis=1))
        return scales, _to_int8(x, _safe_inverse(scales)[:, None])
    m, r = x.shape
    scales = _scales(_amax_columns(x))
    g = _column_tile(m, r)
    q = _to_int8(x.reshape(m // g, g * r), np.tile(_safe_inverse(scales), g))
    return scales, q.reshape(m, r)


def quantize_int8_blocks(x: np.ndarray, block: int) -> tuple[np.ndarray, np.ndarray]:
    """One scale per run of ``block`` consecutive values of the flattened tensor."""
    flat = x.reshape(-1)
    n = flat.size
    nb = math.ceil(n / block) if n else 0
    if nb * block != n:
        padded = np.zeros(nb * block, dtype=np.float32)
        padded[:n] = flat
        flat = padded
    blocks = flat.reshape(nb, block)
    scales = _scales(np.abs(blocks).max(axis=1, initial=0.0))
    q = _to_int8(blocks, _safe_inverse(scales)[:, None]).reshape(-1)[:n]
    return scales, q.reshape(x.shape)


def dequantize_int8(
    scales: np.ndarray,
    q: np.ndarray,
    *,
    axis: int | None = None,
    block: int | None = None,
    out: np.ndarray | None = None,
) -> np.ndarray:
    if block is not None:
        n = q.size
        nb = scales.size
        res = out if out is not None else np.empty(q.shape, dtype=np.float32)
        flat = res.reshape(-1)
        full = (n // block) * block
        np.multiply(
            q.reshape(-1)[:full].reshape(-1, block),
            scales[: full // block, None],
            out=flat[:full].reshape(-1, block),
            dtype=np.float32,
        )
        if full < n:
            np.multiply(q.reshape(-1)[full:], scales[nb - 1], out=flat[full:], dtype=np.float32)
        return res
    if axis is None:
        return np.multiply(q, scales[0], out=out, dtype=np.float32)
    if axis == 0:
        return np.multiply(q, scales[:, None], out=out, dtype=np.float32)
    m, r = q.shape
    g = _column_tile(m, r)
    res = out if out is not None else np.empty(q.shape, dtype=np.float32)
    np.multiply(q.reshape(m // g, g * r), np.tile(scales, g), out=res.reshape(m // g, g * r), dtype=np.float32)
    return res


# |q| <= 128 for any int8, so q * s is finite for every q when 0 <= s <= FLT_MAX / 128 (128 is a power of 2)
MAX_SCALE = np.float32(np.finfo(np.float32).max / 128)


def scales_valid(scales: np.ndarray) -> bool:
    """0 <= s <= FLT_MAX/128 for every scale (NaN fails): then every dequantized value is finite."""
    return bool(((scales >= 0) & (scales <= MAX_SCALE)).all())


def n_scales(shape: tuple[int, ...], *, axis: int | None, block: int | None) -> int:
    if block is not None:
        return math.ceil(math.prod(shape) / block)
    if axis is not None:
        return shape[axis]
    return 1


def to_bf16(x: np.ndarray) -> np.ndarray:
    """float32 -> bfloat16 bits (uint16), rounding to nearest even. Inputs are finite."""
    u = x.view(np.uint32)
    rounded = u + (np.uint32(0x7FFF) + ((u >> np.uint32(16)) & np.uint32(1)))
    return (rounded >> np.uint32(16)).astype(np.uint16)


def from_bf16(b: np.ndarray) -> np.ndarray:
    return (b.astype(np.uint32) << np.uint32(16)).view(np.float32)
