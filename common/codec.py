"""Tensor payloads: a manifest (in the message header) plus one body of raw bytes.

Encodings, selectable per transfer with :class:`EncodingSpec`:

* ``fp32`` / ``fp16`` / ``bf16``: dense floats, little-endian.
* ``int8``: symmetric INT8 with float32 scales, per tensor, per row/column, or per block of the flattened
  tensor. ``auto`` puts one scale on each index of a 2-D tensor's *smaller* axis: for LoRA that is one
  scale per rank (A is r x in, B is out x r). Per-row scales on the tall B would cost 4/r of the
  payload (25% at r=16).
* ``topk``: the k largest magnitudes, their positions as a bitmap or delta-coded (whichever is smaller)
  and their values as fp32, fp16 or INT8.

The body (all tensors, back to back) is optionally LZ4-compressed as one block; it is stored as-is when
LZ4 does not make it smaller. Decoding validates the whole manifest against :class:`WireLimits` and
against itself before it allocates or decompresses anything, and decompresses with the declared size as
a hard cap. The byte-level layout is in docs/protocol.md.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from enum import Enum
from typing import Literal

import lz4.block
import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from .errors import CodecError, ErrorCode
from .limits import DEFAULT_LIMITS, WireLimits
from .quant import (
    dequantize_int8,
    from_bf16,
    n_scales,
    quantize_int8_axis,
    quantize_int8_blocks,
    quantize_int8_tensor,
    scales_valid,
    to_bf16,
)
from .sparse import IndexFormat, decode_indices, encode_indices, index_nbytes, select_topk, topk_count


class Encoding(str, Enum):
    FP32 = "fp32"
    FP16 = "fp16"
    BF16 = "bf16"
    INT8 = "int8"
    TOPK = "topk"


class Granularity(str, Enum):
    AUTO = "auto"  # 2-D: one scale per index of the smaller axis (per rank for LoRA); else per tensor
    TENSOR = "tensor"
    ROW = "row"  # 2-D: one scale per row
    COLUMN = "column"  # 2-D: one scale per column
    BLOCK = "block"  # one scale per block_size consecutive values


class Compression(str, Enum):
    NONE = "none"
    LZ4 = "lz4"


ValueEncoding = Literal["fp32", "fp16", "int8"]


class EncodingSpec(BaseModel):
    """How a sender encodes one transfer."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    encoding: Encoding = Encoding.INT8
    granularity: Granularity = Granularity.AUTO
    block_size: int = Field(default=256, ge=8, le=1 << 20)
    topk_ratio: float | None = Field(default=0.1, gt=0, le=1)
    topk_k: int | None = Field(default=None, ge=1)
    topk_values: ValueEncoding = "int8"
    compression: Compression = Compression.LZ4
    lz4_level: int = Field(default=0, ge=0, le=12)  # 0: fast mode; 1-12: LZ4-HC level

    @model_validator(mode="before")
    @classmethod
    def _short_form(cls, data: object) -> object:
        # Config files and environment variables may give the short form ("int8", "topk10+nolz4").
        return cls.parse(data).model_dump() if isinstance(data, str) else data

    @model_validator(mode="after")
    def _topk_size(self) -> EncodingSpec:
        if self.encoding is Encoding.TOPK and self.topk_ratio is None and self.topk_k is None:
            raise ValueError("topk needs topk_ratio or topk_k")
        return self

    @classmethod
    def parse(cls, text: str) -> EncodingSpec:
        """Parse a short form: ``fp32``, ``fp16``, ``bf16``, ``int8``, ``int8-row``, ``int8-block256``,
        ``topk10`` (10%), ``topk1``, ``topk0.5``, ``topk10-fp16``; ``+nolz4`` disables compression."""
        text = text.strip().lower()
        compression = Compression.LZ4
        if text.endswith("+nolz4"):
            text, compression = text[: -len("+nolz4")], Compression.NONE
        head, _, tail = text.partition("-")
        try:
            if head in ("fp32", "fp16", "bf16"):
                return cls(encoding=Encoding(head), compression=compression)
            if head == "int8":
                if tail.startswith("block"):
                    return cls(
                        granularity=Granularity.BLOCK,
                        block_size=int(tail[5:] or 256),
                        compression=compression,
                    )
                return cls(granularity=Granularity(tail or "auto"), compression=compression)
            if head.startswith("topk"):
                return cls(
                    encoding=Encoding.TOPK,
                    topk_ratio=float(head[4:]) / 100,
                    topk_values=tail or "int8",
                    compression=compression,
                )  # type: ignore[arg-type]
        except ValidationError as exc:
            err = exc.errors()[0]
            raise ValueError(f"bad encoding {text!r}: {err['loc'][0] if err['loc'] else ''} {err['msg']}") from None
        except ValueError as exc:
            raise ValueError(f"bad encoding {text!r}: {exc}") from None
        raise ValueError(
            f"unknown encoding {text!r} (fp32, fp16, bf16, int8[-row|-column|-tensor|-blockN], "
            "topkP[-fp32|-fp16|-int8], each optionally +nolz4)"
        )


class TensorRecord(BaseModel):
    """One entry of a payload manifest."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str = Field(min_length=1, max_length=512)
    shape: tuple[int, ...] = Field(max_length=32)
    encoding: Encoding
    offset: int = Field(ge=0)
    nbytes: int = Field(ge=0)
    # int8 (dense, or topk values): the axis carrying one scale per index, or the block size; neither: per tensor
    scale_axis: int | None = Field(default=None, ge=0, le=1)
    block_size: int | None = Field(default=None, ge=1, le=1 << 30)
    # topk only
    k: int | None = Field(default=None, ge=0)
    index_format: IndexFormat | None = None
    values: ValueEncoding | None = None


class Manifest(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    tensors: tuple[TensorRecord, ...] = Field(max_length=1 << 20)
    compression: Compression = Compression.NONE
    raw_size: int = Field(ge=0)  # body size after decompression

    @property
    def numel(self) -> int:
        return sum(math.prod(t.shape) for t in self.tensors)


def fp32_nbytes(manifest: Manifest) -> int:
    """What the same tensors would cost as raw float32: the baseline of every wire ratio."""
    return 4 * manifest.numel


# -- encoding ------------------------------------------------------------------------------------------


def _int8_params(shape: tuple[int, ...], spec: EncodingSpec) -> tuple[int | None, int | None]:
    """(scale_axis, block_size) for a dense INT8 tensor."""
    g = spec.granularity
    if g is Granularity.BLOCK:
        return None, spec.block_size
    if len(shape) != 2 or g is Granularity.TENSOR:
        return None, None
    if g is Granularity.ROW:
        return 0, None
    if g is Granularity.COLUMN:
        return 1, None
    return (0 if shape[0] <= shape[1] else 1), None


def _int8_bytes(x: np.ndarray, axis: int | None, block: int | None) -> list[bytes]:
    if block is not None:
        scales, q = quantize_int8_blocks(x, block)
    elif axis is not None:
        scales, q = quantize_int8_axis(x, axis)
    else:
        scales, q = quantize_int8_tensor(x)
    return [scales.tobytes(), q.tobytes()]


def _encode_one(name: str, x: np.ndarray, spec: EncodingSpec, offset: int) -> tuple[TensorRecord, list[bytes]]:
    shape = tuple(int(d) for d in x.shape)
    enc = spec.encoding
    extra: dict[str, object] = {}
    if enc is Encoding.FP32:
        parts = [x.tobytes()]
    elif enc is Encoding.FP16:
        parts = [x.astype(np.float16).tobytes()]
    elif enc is Encoding.BF16:
        parts = [to_bf16(x).tobytes()]
    elif enc is Encoding.INT8:
        axis, block = _int8_params(shape, spec)
        with np.errstate(invalid="ignore", over="ignore"):  # non-finite input is refused just below
            parts = _int8_bytes(x, axis, block)
        # NaN and inf propagate into the max-abs scales: checking them replaces a pass over x
        if not np.isfinite(np.frombuffer(parts[0], dtype=np.float32)).all():
            raise CodecError(f"{name}: refusing to encode non-finite values", code=ErrorCode.NON_FINITE)
        extra = {"scale_axis": axis, "block_size": block}
    else:
        flat = x.reshape(-1)
        k = topk_count(flat.size, ratio=spec.topk_ratio if spec.topk_k is None else None, k=spec.topk_k)
        idx = select_topk(flat, k)
        fmt, idx_bytes = encode_indices(idx, flat.size)
        vals = flat[idx]
        if spec.topk_values == "fp32":
            parts = [idx_bytes, vals.tobytes()]
        elif spec.topk_values == "fp16":
            parts = [idx_bytes, vals.astype(np.float16).tobytes()]
        else:
            parts = [idx_bytes, *_int8_bytes(vals, None, None)]
        extra = {"k": k, "index_format": fmt, "values": spec.topk_values}
    nbytes = sum(len(p) for p in parts)
    rec = TensorRecord(name=name, shape=shape, encoding=enc, offset=offset, nbytes=nbytes, **extra)  # type: ignore[arg-type]
    return rec, parts


def encode_tensors(state: Mapping[str, np.ndarray], spec: EncodingSpec | None = None) -> tuple[Manifest, bytes]:
    """Encode named float tensors (written in sorted name order) into (manifest, body)."""
    spec = spec or EncodingSpec()
    records: list[TensorRecord] = []
    parts: list[bytes] = []
    offset = 0
    for name in sorted(state):
        x = np.ascontiguousarray(state[name], dtype=np.float32)
        if spec.encoding is not Encoding.INT8 and not np.isfinite(x).all():  # INT8: checked on its scales
            raise CodecError(f"{name}: refusing to encode non-finite values", code=ErrorCode.NON_FINITE)
        rec, chunk = _encode_one(name, x, spec, offset)
        records.append(rec)
        parts.extend(chunk)
        offset += rec.nbytes
    raw = b"".join(parts)
    body, used = raw, Compression.NONE
    if spec.compression is Compression.LZ4 and raw:
        if spec.lz4_level:
            packed = lz4.block.compress(raw, mode="high_compression", compression=spec.lz4_level, store_size=False)
        else:
            packed = lz4.block.compress(raw, store_size=False)
        if len(packed) < len(raw):  # stored uncompressed when LZ4 does not shrink it
            body, used = packed, Compression.LZ4
    return Manifest(tensors=tuple(records), compression=used, raw_size=len(raw)), body


# -- validation ----------------------------------------------------------------------------------------


_VALUE_BYTES = {"fp32": 4, "fp16": 2}


def expected_nbytes(rec: TensorRecord) -> int:
    """The byte size a record must have given its shape and encoding; inconsistent records raise."""
    n = math.prod(rec.shape)
    enc = rec.encoding
    topk_fields = (rec.k, rec.index_format, rec.values)
    if enc is not Encoding.TOPK and any(f is not None for f in topk_fields):
        raise CodecError(f"{rec.name}: top-k fields on a {enc.value} tensor")
    if enc is not Encoding.INT8 and enc is not Encoding.TOPK and (rec.scale_axis, rec.block_size) != (None, None):
        raise CodecError(f"{rec.name}: scale fields on a {enc.value} tensor")
    if enc is Encoding.FP32:
        return 4 * n
    if enc in (Encoding.FP16, Encoding.BF16):
        return 2 * n
    if enc is Encoding.INT8:
        if rec.scale_axis is not None and (rec.block_size is not None or len(rec.shape) != 2):
            raise CodecError(f"{rec.name}: a scale axis needs a 2-D tensor and no block size")
        return 4 * n_scales(rec.shape, axis=rec.scale_axis, block=rec.block_size) + n
    if rec.k is None or rec.index_format is None or rec.values is None:
        raise CodecError(f"{rec.name}: a top-k record needs k, index_format and values")
    if rec.k > n or (rec.scale_axis, rec.block_size) != (None, None):
        raise CodecError(f"{rec.name}: k={rec.k} for {n} values, or per-axis scales on top-k values")
    values = 4 + rec.k if rec.values == "int8" else _VALUE_BYTES[rec.values] * rec.k
    return index_nbytes(rec.index_format, n, rec.k) + values


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
    if manifest.compression is Compression.LZ4 and body_len > manifest.raw_size + manifest.raw_size // 255 + 16:
        raise CodecError("compressed body is larger than LZ4 allows for its declared size")
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
        if rec.nbytes != expected_nbytes(rec):
            raise CodecError(f"{rec.name}: {rec.nbytes} bytes does not match its shape and encoding")
        if rec.offset < end or rec.offset + rec.nbytes > manifest.raw_size:
            raise CodecError(f"{rec.name}: byte range overlaps another or lies outside the body")
        end = rec.offset + rec.nbytes


# -- decoding ------------------------------------------------------------------------------------------


def _decode_int8(chunk: memoryview, shape: tuple[int, ...], axis: int | None, block: int | None) -> np.ndarray:
    ns = n_scales(shape, axis=axis, block=block)
    n = math.prod(shape)
    scales = np.frombuffer(chunk, dtype=np.float32, count=ns)
    if not scales_valid(scales):  # which also makes every dequantized value finite
        raise CodecError("INT8 scales must be in [0, FLT_MAX/128]", code=ErrorCode.NON_FINITE)
    q = np.frombuffer(chunk, dtype=np.int8, count=n, offset=4 * ns).reshape(shape)
    return dequantize_int8(scales, q, axis=axis, block=block)


def _decode_one(rec: TensorRecord, chunk: memoryview) -> np.ndarray:
    n = math.prod(rec.shape)
    enc = rec.encoding
    if enc is Encoding.FP32:
        return np.frombuffer(chunk, dtype=np.float32, count=n).reshape(rec.shape).copy()
    if enc is Encoding.FP16:
        return np.frombuffer(chunk, dtype=np.float16, count=n).astype(np.float32).reshape(rec.shape)
    if enc is Encoding.BF16:
        return from_bf16(np.frombuffer(chunk, dtype=np.uint16, count=n)).reshape(rec.shape)
    if enc is Encoding.INT8:
        return _decode_int8(chunk, rec.shape, rec.scale_axis, rec.block_size)
    assert rec.k is not None and rec.index_format is not None and rec.values is not None
    ib = index_nbytes(rec.index_format, n, rec.k)
    idx = decode_indices(rec.index_format, chunk[:ib], n, rec.k)
    vchunk = chunk[ib:]
    if rec.values == "fp32":
        vals = np.frombuffer(vchunk, dtype=np.float32, count=rec.k)
    elif rec.values == "fp16":
        vals = np.frombuffer(vchunk, dtype=np.float16, count=rec.k).astype(np.float32)
    else:
        vals = _decode_int8(vchunk, (rec.k,), None, None)
    out = np.zeros(n, dtype=np.float32)
    out[idx] = vals
    return out.reshape(rec.shape)


def decode_tensors(
    manifest: Manifest, body: bytes | bytearray | memoryview, limits: WireLimits = DEFAULT_LIMITS
) -> dict[str, np.ndarray]:
    """Decode a payload into float32 arrays; a hostile or inconsistent payload raises :class:`CodecError`."""
    check_manifest(manifest, len(body), limits)
    if manifest.compression is Compression.LZ4:
        try:
            # The declared size is a hard cap: lz4.block never writes past it.
            raw = lz4.block.decompress(body, uncompressed_size=manifest.raw_size)
        except (lz4.block.LZ4BlockError, ValueError, MemoryError) as exc:
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
        with np.errstate(over="ignore", invalid="ignore"):  # hostile values overflow; refused just below
            arr = _decode_one(rec, buf[rec.offset : rec.offset + rec.nbytes])
        # INT8 output (dense, or top-k values) is finite by construction: _decode_int8 bounds the scales
        if rec.encoding is not Encoding.INT8 and rec.values != "int8" and not np.isfinite(arr).all():
            raise CodecError(f"{rec.name}: non-finite values", code=ErrorCode.NON_FINITE)
        out[rec.name] = arr
    return out


@dataclass(frozen=True)
class Payload:
    """An encoded transfer and what the receiver will decode from it."""

    manifest: Manifest
    body: bytes
    decoded: dict[str, np.ndarray]


def encode_payload(state: Mapping[str, np.ndarray], spec: EncodingSpec | None = None) -> Payload:
    """Encode, and decode our own bytes so the sender knows exactly what the receiver reconstructs."""
    manifest, body = encode_tensors(state, spec)
    return Payload(manifest, body, decode_tensors(manifest, body))
