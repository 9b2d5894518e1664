"""Tensor codecs: dense fp32 / fp16 / INT8 encodings and LZ4 over the encoded body.

A payload is a *manifest* (in the message header, JSON) plus a *body* (raw bytes). The manifest lists
each tensor's name, shape, encoding and its byte range in the decompressed body; decoding checks every
declared size against :class:`~fedquic.common.limits.WireLimits` before it allocates or decompresses.

INT8 is symmetric with one float32 scale per slice along the tensor's *smaller* axis. For LoRA that is
one scale per rank: A (r x in) gets r row scales and B (out x r) gets r column scales. Per-row scales
on the tall B would cost 4/r of the payload (25% at r=16) for no accuracy a rank-wise scale lacks.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from enum import Enum

import lz4.block
import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from .errors import CodecError, ErrorCode
from .limits import DEFAULT_LIMITS, WireLimits


class Encoding(str, Enum):
    FP32 = "fp32"
    FP16 = "fp16"
    INT8 = "int8"


class Compression(str, Enum):
    NONE = "none"
    LZ4 = "lz4"


class TensorRecord(BaseModel):
    """One entry of a payload manifest."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str = Field(min_length=1, max_length=512)
    shape: tuple[int, ...] = Field(max_length=32)
    encoding: Encoding
    offset: int = Field(ge=0)
    nbytes: int = Field(ge=0)
    # INT8 only: the axis that carries one scale per index (None = one scale for the tensor).
    scale_axis: int | None = Field(default=None, ge=0, le=31)


class Manifest(BaseModel):
    """Describes a tensor payload body."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    tensors: tuple[TensorRecord, ...]
    compression: Compression = Compression.NONE
    raw_size: int = Field(ge=0)  # body size after decompression

    @property
    def numel(self) -> int:
        return sum(math.prod(t.shape) for t in self.tensors)


def _scale_axis(shape: tuple[int, ...]) -> int | None:
    if len(shape) != 2:
        return None
    return 0 if shape[0] <= shape[1] else 1


def _int8_nbytes(shape: tuple[int, ...], axis: int | None) -> int:
    n_scales = 1 if axis is None else shape[axis]
    return 4 * n_scales + math.prod(shape)


def _expected_nbytes(rec: TensorRecord) -> int:
    n = math.prod(rec.shape)
    if rec.encoding is Encoding.FP32:
        return 4 * n
    if rec.encoding is Encoding.FP16:
        return 2 * n
    if rec.scale_axis is not None and rec.scale_axis >= len(rec.shape):
        raise CodecError(f"{rec.name}: scale axis {rec.scale_axis} out of range for shape {rec.shape}")
    return _int8_nbytes(rec.shape, rec.scale_axis)


def _quantize_int8(x: np.ndarray, axis: int | None) -> tuple[np.ndarray, np.ndarray]:
    if axis is None:
        amax = np.abs(x).max(initial=0.0, keepdims=True).reshape(1)
    else:
        other = 1 - axis
        amax = np.abs(x).max(axis=other)
    scales = (amax / 127.0).astype(np.float32)
    safe = np.where(scales > 0, scales, np.float32(1.0))
    div = safe if axis is None else np.expand_dims(safe, 1 - axis)
    q = np.clip(np.rint(x / div), -127, 127).astype(np.int8)
    return scales, q


def _dequantize_int8(scales: np.ndarray, q: np.ndarray, axis: int | None) -> np.ndarray:
    mul = scales if axis is None else np.expand_dims(scales, 1 - axis)
    return q.astype(np.float32) * mul


def encode_tensors(
    state: Mapping[str, np.ndarray],
    encoding: Encoding = Encoding.INT8,
    compression: Compression = Compression.LZ4,
) -> tuple[Manifest, bytes]:
    """Encode named float tensors into (manifest, body). Names are written in sorted order."""
    records: list[TensorRecord] = []
    parts: list[bytes] = []
    offset = 0
    for name in sorted(state):
        x = np.ascontiguousarray(state[name], dtype=np.float32)
        if not np.isfinite(x).all():
            raise CodecError(f"{name}: refusing to encode non-finite values", code=ErrorCode.NON_FINITE)
        shape = tuple(int(d) for d in x.shape)
        axis: int | None = None
        if encoding is Encoding.FP32:
            chunk = x.tobytes()
        elif encoding is Encoding.FP16:
            chunk = x.astype(np.float16).tobytes()
        else:
            axis = _scale_axis(shape)
            scales, q = _quantize_int8(x, axis)
            chunk = scales.tobytes() + q.tobytes()
        records.append(
            TensorRecord(
                name=name, shape=shape, encoding=encoding, offset=offset, nbytes=len(chunk), scale_axis=axis
            )
        )
        parts.append(chunk)
        offset += len(chunk)
    raw = b"".join(parts)
    body, used = raw, Compression.NONE
    if compression is Compression.LZ4 and raw:
        packed = lz4.block.compress(raw, store_size=False)
        if len(packed) < len(raw):  # stored uncompressed when LZ4 does not shrink it
            body, used = packed, Compression.LZ4
    return Manifest(tensors=tuple(records), compression=used, raw_size=len(raw)), body


def check_manifest(manifest: Manifest, body_len: int, limits: WireLimits = DEFAULT_LIMITS) -> None:
    """Validate every declared count, shape and size against the limits and against each other."""
    if len(manifest.tensors) > limits.max_tensors:
        raise CodecError(
            f"{len(manifest.tensors)} tensors exceeds the limit {limits.max_tensors}",
            code=ErrorCode.LIMIT_EXCEEDED,
        )
    if manifest.raw_size > limits.max_body_bytes:
        raise CodecError(
            f"declared size {manifest.raw_size} exceeds the limit {limits.max_body_bytes}",
            code=ErrorCode.LIMIT_EXCEEDED,
        )
    if manifest.compression is Compression.NONE and body_len != manifest.raw_size:
        raise CodecError(f"body is {body_len} bytes, manifest declares {manifest.raw_size}")
    total = 0
    names: set[str] = set()
    end = 0
    for rec in sorted(manifest.tensors, key=lambda r: r.offset):
        if rec.name in names:
            raise CodecError(f"duplicate tensor {rec.name!r}")
        names.add(rec.name)
        if len(rec.shape) > limits.max_dims or any(d < 0 for d in rec.shape):
            raise CodecError(f"{rec.name}: bad shape {rec.shape}", code=ErrorCode.LIMIT_EXCEEDED)
        n = math.prod(rec.shape)
        if n > limits.max_tensor_elements:
            raise CodecError(f"{rec.name}: {n} elements exceeds the limit", code=ErrorCode.LIMIT_EXCEEDED)
        total += n
        if total > limits.max_total_elements:
            raise CodecError("payload element count exceeds the limit", code=ErrorCode.LIMIT_EXCEEDED)
        if rec.nbytes != _expected_nbytes(rec):
            raise CodecError(f"{rec.name}: {rec.nbytes} bytes does not match shape and encoding")
        if rec.offset < end or rec.offset + rec.nbytes > manifest.raw_size:
            raise CodecError(f"{rec.name}: byte range overlaps or lies outside the body")
        end = rec.offset + rec.nbytes


def decode_tensors(
    manifest: Manifest, body: bytes | memoryview, limits: WireLimits = DEFAULT_LIMITS
) -> dict[str, np.ndarray]:
    """Decode a payload into float32 arrays; hostile manifests raise :class:`CodecError`."""
    check_manifest(manifest, len(body), limits)
    if manifest.compression is Compression.LZ4:
        try:
            # The declared size is a hard cap: lz4.block refuses to write past it.
            raw = lz4.block.decompress(body, uncompressed_size=manifest.raw_size)
        except (lz4.block.LZ4BlockError, ValueError) as exc:
            raise CodecError(
                f"LZ4 body does not decompress to its declared size: {exc}", code=ErrorCode.DECOMPRESSION
            ) from exc
        if len(raw) != manifest.raw_size:
            raise CodecError("LZ4 body decompressed to the wrong size", code=ErrorCode.DECOMPRESSION)
    else:
        raw = body
    buf = memoryview(raw)
    out: dict[str, np.ndarray] = {}
    for rec in manifest.tensors:
        chunk = buf[rec.offset : rec.offset + rec.nbytes]
        n = math.prod(rec.shape)
        if rec.encoding is Encoding.FP32:
            arr = np.frombuffer(chunk, dtype=np.float32, count=n).reshape(rec.shape).copy()
        elif rec.encoding is Encoding.FP16:
            arr = np.frombuffer(chunk, dtype=np.float16, count=n).astype(np.float32).reshape(rec.shape)
        else:
            n_scales = 1 if rec.scale_axis is None else rec.shape[rec.scale_axis]
            scales = np.frombuffer(chunk, dtype=np.float32, count=n_scales)
            q = np.frombuffer(chunk, dtype=np.int8, count=n, offset=4 * n_scales).reshape(rec.shape)
            arr = _dequantize_int8(scales, q, rec.scale_axis)
        if not np.isfinite(arr).all():
            raise CodecError(f"{rec.name}: non-finite values", code=ErrorCode.NON_FINITE)
        out[rec.name] = arr
    return out


def fp32_nbytes(manifest: Manifest) -> int:
    """What the same tensors would cost as raw float32: the baseline for wire ratios."""
    return 4 * manifest.numel
