"""Tensor payloads: a manifest (in the message header) plus one body of raw bytes.

Encodings, selectable per transfer with :class:`EncodingSpec`:

* ``fp32`` / ``fp16`` / ``bf16``: dense floats, little-endian.
* ``int8``: symmetric INT8 with float32 scales, per tensor, per row/column, or per block of the flattened
  tensor. ``auto`` puts one scale on each index of a 2-D tensor's *smaller* axis: for LoRA that is one
  scale per rank (A is r x in, B is out x r). Per-row scales on the tall B would cost 4/r of the
  payload (25% at r=16).
* ``topk``: the k largest magnitudes, their positions as a bitmap, delta-coded or Elias–Fano coded
  (whichever is smallest) and their values as fp32, fp16 or INT8.

The body (all tensors, back to back) is optionally LZ4-compressed as one block; it is stored as-is when
LZ4 does not make it smaller. Between peers that share an adapter schema the manifest travels in its
compact form (:class:`CompactManifest`: no names, shapes, offsets or sizes; :func:`to_compact`,
:func:`expand`). Decoding validates the whole manifest against :class:`WireLimits` and
against itself before it allocates or decompresses anything, and decompresses with the declared size as
a hard cap. The byte-level layout is in docs/protocol.md.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from enum import Enum
from typing import TYPE_CHECKING, Annotated, Literal

import lz4.block
import numpy as np
from pydantic import BaseModel, ConfigDict, Discriminator, Field, Tag, ValidationError, model_validator

from .errors import CodecError, ErrorCode, SchemaMismatchError
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

if TYPE_CHECKING:  # adapter.py imports this module; expand() and to_compact() only call the schema's methods
    from .adapter import AdapterSchema, TensorSpec


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

    def short(self) -> str:
        """The short form :meth:`parse` reads back (``int8``, ``int8-block64``, ``topk10-fp16+nolz4``); a top-k
        by count (``topk_k``) has none and is written as its ratio-free fields."""
        if self.encoding is Encoding.INT8:
            g = self.granularity
            text = (
                "int8"
                if g is Granularity.AUTO
                else f"int8-block{self.block_size}"
                if g is Granularity.BLOCK
                else f"int8-{g.value}"
            )
        elif self.encoding is Encoding.TOPK:
            if self.topk_ratio is None:
                return f"topk(k={self.topk_k}, values={self.topk_values})"
            text = f"topk{self.topk_ratio * 100:g}" + ("" if self.topk_values == "int8" else f"-{self.topk_values}")
        else:
            text = self.encoding.value
        return text + ("+nolz4" if self.compression is Compression.NONE else "")

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


def _int8_params(shape: tuple[int, ...], g: Granularity, block_size: int) -> tuple[int | None, int | None]:
    """(scale_axis, block_size) for a dense INT8 tensor; a compact manifest's receiver re-derives them here."""
    if g is Granularity.BLOCK:
        return None, block_size
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
        axis, block = _int8_params(shape, spec.granularity, spec.block_size)
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
    if spec.compression is Compression.LZ4 and raw and _lz4_pays(raw):
        if spec.lz4_level:
            packed = lz4.block.compress(raw, mode="high_compression", compression=spec.lz4_level, store_size=False)
        else:
            packed = lz4.block.compress(raw, store_size=False)
        if len(packed) < len(raw):  # stored uncompressed when LZ4 does not shrink it
            body, used = packed, Compression.LZ4
    return Manifest(tensors=tuple(records), compression=used, raw_size=len(raw)), body


_LZ4_PROBE = 1 << 16
_LZ4_PROBE_GAIN = 0.9


def _lz4_pays(raw: bytes) -> bool:
    """Whether LZ4 is worth a full pass over ``raw``: three 64 KiB samples (start, middle, end) are compressed
    first. Dense floats and INT8 codes hardly shrink, so their full pass (and the receiver's) is skipped; zeros and
    sparse index/value streams shrink at once. A payload whose samples do not shrink but whose rest would is sent
    uncompressed: still correct, only larger."""
    if len(raw) <= 4 * _LZ4_PROBE:
        return True
    mid = len(raw) // 2
    sample = raw[:_LZ4_PROBE] + raw[mid : mid + _LZ4_PROBE] + raw[-_LZ4_PROBE:]
    return len(lz4.block.compress(sample, store_size=False)) < _LZ4_PROBE_GAIN * len(sample)


# -- validation ----------------------------------------------------------------------------------------


_VALUE_BYTES = {"fp32": 4, "fp16": 2}


def max_body_nbytes(shapes: list[tuple[int, ...]], spec: EncodingSpec) -> int:
    """The largest body that tensors of these shapes can take in ``spec``: a receiver's cap before any byte.

    Exact per tensor for the dense encodings; for top-k, k follows the spec and the index coding may be any of
    the formats (a sender need not pick the smallest). LZ4 is used only where it shrinks the body, so it never
    adds to the bound.
    """
    total = 0
    for shape in shapes:
        n = math.prod(shape)
        enc = spec.encoding
        if enc is Encoding.FP32:
            total += 4 * n
        elif enc in (Encoding.FP16, Encoding.BF16):
            total += 2 * n
        elif enc is Encoding.INT8:
            axis, block = _int8_params(shape, spec.granularity, spec.block_size)
            total += 4 * n_scales(shape, axis=axis, block=block) + n
        else:
            k = topk_count(n, ratio=spec.topk_ratio if spec.topk_k is None else None, k=spec.topk_k)
            values = 4 + k if spec.topk_values == "int8" else _VALUE_BYTES[spec.topk_values] * k
            total += max(index_nbytes(fmt, n, k) for fmt in IndexFormat) + values
    return total


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


# -- compact manifests ---------------------------------------------------------------------------------

# One character per tensor for its index format in a compact manifest ("b" bitmap, "1"/"2"/"4" delta with
# that many bytes per gap, "e" Elias–Fano): 56 tensors cost 56 bytes instead of ~1 KB of JSON strings.
INDEX_CODES: dict[IndexFormat, str] = {
    IndexFormat.BITMAP: "b",
    IndexFormat.DELTA8: "1",
    IndexFormat.DELTA16: "2",
    IndexFormat.DELTA32: "4",
    IndexFormat.ELIAS_FANO: "e",
}
_INDEX_FROM_CODE = {c: f for f, c in INDEX_CODES.items()}
_MAX_COMPACT_TENSORS = 1 << 20  # the same static bound as Manifest.tensors; WireLimits apply in expand()


class CompactManifest(BaseModel):
    """A manifest that leaves out everything the adapter schema agreed at JOIN already says.

    Tensors are implied: the schema's, in sorted name order (the order :func:`encode_tensors` writes), back to
    back from offset 0, each of the size :func:`expected_nbytes` gives. Only what the schema cannot say is
    sent; field names are short because this is every UPDATE's and AGGREGATE's header (docs/protocol.md 5.2):

    * ``fp``: the schema's :meth:`AdapterSchema.fingerprint`; ``enc``: one encoding for every tensor;
      ``comp``/``raw``: body compression and size after decompression, as in :class:`Manifest`;
    * int8: ``gran`` (a :class:`Granularity`) and, for ``block``, ``bs``, the block size: each tensor's scale
      axis is re-derived from its shape exactly as the sender's encoder chose it;
    * topk: ``vals`` (value encoding), ``k`` (kept values per tensor) and ``ix`` (one :data:`INDEX_CODES`
      character per tensor);
    * ``sel``: absent when every schema tensor is present; else which are (a routed UPDATE, common/routing.py),
      a bitmap over the schema's tensors in sorted order, most significant bit first, as hex with every bit
      past the last tensor zero. ``k`` and ``ix`` then have one entry per present tensor.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    fp: str = Field(min_length=1, max_length=128, pattern=r"^[0-9a-f]+$")
    enc: Encoding
    comp: Compression = Compression.NONE
    raw: int = Field(ge=0)
    gran: Granularity | None = None
    bs: int | None = Field(default=None, ge=1, le=1 << 30)
    vals: ValueEncoding | None = None
    k: tuple[Annotated[int, Field(ge=0, le=1 << 40)], ...] | None = Field(default=None, max_length=_MAX_COMPACT_TENSORS)
    ix: str | None = Field(default=None, max_length=_MAX_COMPACT_TENSORS, pattern=r"^[b124e]*$")
    sel: str | None = Field(
        default=None, min_length=2, max_length=_MAX_COMPACT_TENSORS // 4, pattern=r"^([0-9a-f]{2})+$"
    )

    @model_validator(mode="after")
    def _fields_fit_the_encoding(self) -> CompactManifest:
        # Structural checks only (refused as BAD_HEADER when parsed); what needs the schema is in expand().
        if (self.gran is not None) != (self.enc is Encoding.INT8):
            raise ValueError("gran is required for int8 and refused otherwise")
        if (self.bs is not None) != (self.gran is Granularity.BLOCK):
            raise ValueError("bs is required for int8 blocks and refused otherwise")
        topk = (self.vals, self.k, self.ix)
        if self.enc is Encoding.TOPK and any(f is None for f in topk):
            raise ValueError("topk needs vals, k and ix")
        if self.enc is not Encoding.TOPK and any(f is not None for f in topk):
            raise ValueError("vals, k and ix are for topk only")
        return self


def _manifest_form(value: object) -> str:
    # The two forms share no required field: a full manifest always has "tensors", a compact one never does.
    if isinstance(value, dict):
        return "full" if "tensors" in value else "compact"
    return "compact" if isinstance(value, CompactManifest) else "full"


# What UPDATE and AGGREGATE carry: either form, told apart by the presence of "tensors".
AnyManifest = Annotated[
    Annotated[Manifest, Tag("full")] | Annotated[CompactManifest, Tag("compact")],
    Discriminator(_manifest_form),
]


def _sorted_specs(schema: AdapterSchema) -> list[TensorSpec]:
    # Sorted by name (Python's str order: code points, the same as UTF-8 bytes), whatever order JOIN listed.
    return sorted(schema.tensors, key=lambda t: t.name)


def _infer_int8(recs: tuple[TensorRecord, ...]) -> tuple[Granularity, int | None] | None:
    """A granularity (and block size) that re-derives every record's scale fields, or None."""
    first = recs[0].block_size
    if first is not None:
        candidates = [(Granularity.BLOCK, first)]
    else:
        candidates = [(g, None) for g in (Granularity.AUTO, Granularity.ROW, Granularity.COLUMN, Granularity.TENSOR)]
    for g, bs in candidates:
        if all(_int8_params(r.shape, g, bs or 0) == (r.scale_axis, r.block_size) for r in recs):
            return g, bs
    return None


def to_compact(manifest: Manifest, schema: AdapterSchema) -> CompactManifest | None:
    """The compact form of ``manifest`` for a peer that shares ``schema``; None when it cannot express it
    (tensors not exactly the schema's in sorted order and back to back, or not sharing one encoding)."""
    recs = manifest.tensors
    every = _sorted_specs(schema)
    present = {r.name for r in recs}
    specs = [s for s in every if s.name in present]  # the schema's order: a subset (routing) keeps it
    if not recs or len(recs) != len(specs):
        return None
    sel = None if len(specs) == len(every) else _selection_hex([s.name in present for s in every])
    enc = recs[0].encoding
    offset = 0
    for rec, spec in zip(recs, specs, strict=True):
        if (rec.name, rec.shape, rec.encoding, rec.offset) != (spec.name, spec.shape, enc, offset):
            return None
        try:
            consistent = rec.nbytes == expected_nbytes(rec)
        except CodecError:
            consistent = False
        if not consistent:  # the full form carries it as it is; its receiver refuses it as usual
            return None
        offset += rec.nbytes
    if offset != manifest.raw_size:
        return None
    gran: Granularity | None = None
    bs: int | None = None
    vals: ValueEncoding | None = None
    ks: tuple[int, ...] | None = None
    ix: str | None = None
    if enc is Encoding.INT8:
        params = _infer_int8(recs)
        if params is None:
            return None
        gran, bs = params
    elif enc is Encoding.TOPK:
        vals = recs[0].values
        if any(r.values != vals for r in recs):
            return None
        # expected_nbytes() above made sure every top-k record has its k and index format
        ks = tuple(r.k or 0 for r in recs)
        ix = "".join(INDEX_CODES[r.index_format or IndexFormat.BITMAP] for r in recs)
    return CompactManifest(
        fp=schema.fingerprint(),
        enc=enc,
        comp=manifest.compression,
        raw=manifest.raw_size,
        gran=gran,
        bs=bs,
        vals=vals,
        k=ks,
        ix=ix,
        sel=sel,
    )


def _selection_hex(present: list[bool]) -> str:
    return np.packbits(np.asarray(present, dtype=bool)).tobytes().hex()


def _selected(specs: list[TensorSpec], sel: str | None) -> list[TensorSpec]:
    """The schema tensors a compact manifest's ``sel`` names (all of them without one)."""
    if sel is None:
        return specs
    if len(sel) != 2 * ((len(specs) + 7) // 8):
        raise CodecError(f"a selection of {len(sel) * 4} bits for {len(specs)} tensors")
    bits = np.unpackbits(np.frombuffer(bytes.fromhex(sel), dtype=np.uint8))
    if bits[len(specs) :].any():
        raise CodecError("the selection names tensors past the schema's last")
    chosen = [s for s, b in zip(specs, bits[: len(specs)], strict=True) if b]
    if not chosen:
        raise CodecError("an empty selection: a payload carries at least one tensor")
    return chosen


def expand(
    manifest: Manifest | CompactManifest, schema: AdapterSchema, limits: WireLimits = DEFAULT_LIMITS
) -> Manifest:
    """The full manifest a compact one stands for (a full one is returned as it is).

    Raises :class:`SchemaMismatchError` when it was written for another schema and :class:`CodecError` when it
    does not fit this one; every length read from the network is bounded by ``limits`` before it is used.
    :func:`check_manifest` and :func:`decode_tensors` then run on the result as on any manifest.
    """
    if isinstance(manifest, Manifest):
        return manifest
    m = manifest
    if m.fp != schema.fingerprint():
        raise SchemaMismatchError(f"payload written for adapter schema {m.fp}, this job's is {schema.fingerprint()}")
    specs = _sorted_specs(schema)
    if len(specs) > limits.max_tensors:
        raise CodecError(f"{len(specs)} tensors exceeds the limit {limits.max_tensors}", code=ErrorCode.LIMIT_EXCEEDED)
    specs = _selected(specs, m.sel)
    if m.raw > limits.max_body_bytes:
        raise CodecError(
            f"declared size {m.raw} exceeds the limit {limits.max_body_bytes}", code=ErrorCode.LIMIT_EXCEEDED
        )
    if m.k is not None and m.ix is not None:
        longest = max(len(m.k), len(m.ix))
        if longest > limits.max_tensors:
            raise CodecError(
                f"{longest} per-tensor entries exceeds the limit {limits.max_tensors}", code=ErrorCode.LIMIT_EXCEEDED
            )
        if len(m.k) != len(specs) or len(m.ix) != len(specs):
            raise CodecError(f"{len(m.k)} k and {len(m.ix)} index entries for {len(specs)} tensors")
    records: list[TensorRecord] = []
    offset = 0
    for i, spec in enumerate(specs):
        axis: int | None = None
        block: int | None = None
        k: int | None = None
        fmt: IndexFormat | None = None
        if m.enc is Encoding.INT8:
            assert m.gran is not None  # the model validator guarantees it
            axis, block = _int8_params(spec.shape, m.gran, m.bs or 0)
        elif m.enc is Encoding.TOPK:
            assert m.k is not None and m.ix is not None
            k, fmt = m.k[i], _INDEX_FROM_CODE[m.ix[i]]
            if k > spec.numel:
                raise CodecError(f"{spec.name}: k={k} for {spec.numel} values")
        rec = TensorRecord(
            name=spec.name,
            shape=spec.shape,
            encoding=m.enc,
            offset=offset,
            nbytes=0,  # set just below, from the record itself
            scale_axis=axis,
            block_size=block,
            k=k,
            index_format=fmt,
            values=m.vals,
        )
        rec = rec.model_copy(update={"nbytes": expected_nbytes(rec)})
        records.append(rec)
        offset += rec.nbytes
    if offset != m.raw:
        raise CodecError(f"the schema's tensors take {offset} bytes, the manifest declares {m.raw}")
    return Manifest(tensors=tuple(records), compression=m.comp, raw_size=m.raw)


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
    """Encode, and decode our own bytes so the sender knows exactly what the receiver reconstructs. fp32 is
    lossless: what the receiver decodes is the input itself, so it is not decoded again (the arrays may be the
    caller's own; nothing here or in its users writes to them)."""
    spec = spec or EncodingSpec()
    manifest, body = encode_tensors(state, spec)
    if spec.encoding is Encoding.FP32:
        return Payload(manifest, body, {k: np.ascontiguousarray(v, dtype=np.float32) for k, v in state.items()})
    return Payload(manifest, body, decode_tensors(manifest, body))
