"""Hostile payloads: every generated manifest/body either decodes or raises our CodecError with a code,
and nothing allocates more than the declared limits allow (>= 10,000 generated cases with the framing tests)."""

from __future__ import annotations

import tracemalloc

import lz4.block
import numpy as np
import pytest
from fedquic.common.adapter import AdapterSchema
from fedquic.common.codec import Compression, Encoding, Manifest, TensorRecord, decode_tensors, encode_tensors
from fedquic.common.errors import CodecError, ErrorCode
from fedquic.common.limits import WireLimits
from fedquic.common.sparse import IndexFormat
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

LIMITS = WireLimits(max_body_bytes=1 << 16, max_tensor_elements=1 << 14, max_total_elements=1 << 15, max_tensors=16)

records = st.builds(
    TensorRecord,
    name=st.sampled_from(["a", "b", "c"]),
    shape=st.lists(st.integers(0, 70_000), max_size=4).map(tuple),
    encoding=st.sampled_from(list(Encoding)),
    offset=st.integers(0, 1 << 17),
    nbytes=st.integers(0, 1 << 17),
    scale_axis=st.one_of(st.none(), st.integers(0, 1)),
    block_size=st.one_of(st.none(), st.integers(1, 1 << 20)),
    k=st.one_of(st.none(), st.integers(0, 1 << 20)),
    index_format=st.one_of(st.none(), st.sampled_from(list(IndexFormat))),
    values=st.one_of(st.none(), st.sampled_from(["fp32", "fp16", "int8"])),
)
manifests = st.builds(
    Manifest,
    tensors=st.lists(records, max_size=4).map(tuple),
    compression=st.sampled_from(list(Compression)),
    raw_size=st.integers(0, 1 << 40),
)


def decode_or_our_error(m: Manifest, body: bytes) -> None:
    try:
        out = decode_tensors(m, body, LIMITS)
    except CodecError as exc:
        assert isinstance(exc.code, ErrorCode)
        return
    assert all(np.isfinite(v).all() for v in out.values())


@settings(max_examples=3000, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(manifests, st.binary(max_size=256))
def test_random_manifests_and_bodies(m: Manifest, body: bytes) -> None:
    decode_or_our_error(m, body)


def valid_payload(seed: int, enc: str) -> tuple[Manifest, bytes]:
    from fedquic.common.codec import EncodingSpec

    rng = np.random.default_rng(seed)
    state = {"a": rng.normal(size=(6, 40)).astype(np.float32), "b": rng.normal(size=(90,)).astype(np.float32)}
    return encode_tensors(state, EncodingSpec.parse(enc))


@settings(max_examples=3000, deadline=None)
@given(
    st.integers(0, 50),
    st.sampled_from(
        ["fp32", "fp16", "bf16", "int8", "int8-block8", "topk10", "topk1-fp32", "int8+nolz4", "topk10+nolz4"]
    ),
    st.integers(0, 4000),
    st.binary(min_size=1, max_size=8),
    st.booleans(),
)
def test_corrupted_valid_payloads(seed: int, enc: str, pos: int, noise: bytes, truncate: bool) -> None:
    m, body = valid_payload(seed, enc)
    b = bytearray(body)
    if truncate:
        b = b[: pos % (len(b) + 1)]
    elif b:
        p = pos % len(b)
        b[p : p + len(noise)] = noise
    decode_or_our_error(m, bytes(b))


@settings(max_examples=2000, deadline=None)
@given(st.integers(0, 20), st.sampled_from(["int8", "topk10", "topk1", "bf16"]), st.data())
def test_tampered_manifests(seed: int, enc: str, data: st.DataObject) -> None:
    m, body = valid_payload(seed, enc)
    i = data.draw(st.integers(0, len(m.tensors) - 1))
    rec = m.tensors[i]
    field = data.draw(st.sampled_from(["shape", "offset", "nbytes", "k", "scale_axis", "block_size", "raw_size"]))
    if field == "raw_size":
        m2 = m.model_copy(update={"raw_size": data.draw(st.integers(0, 1 << 40))})
    else:
        value = (
            data.draw(st.one_of(st.none(), st.integers(0, 1 << 20)))
            if field in ("k", "block_size")
            else (
                data.draw(st.lists(st.integers(0, 1 << 20), max_size=3).map(tuple))
                if field == "shape"
                else data.draw(st.integers(0, 1 << 20))
            )
        )
        if field == "scale_axis":
            value = data.draw(st.one_of(st.none(), st.integers(0, 1)))
        tensors = list(m.tensors)
        tensors[i] = rec.model_copy(update={field: value})
        m2 = m.model_copy(update={"tensors": tuple(tensors)})
    # A header is validated when it is parsed off the wire (pydantic bounds: our BAD_HEADER there)
    try:
        m2 = Manifest.model_validate(m2.model_dump())
    except ValidationError:
        return
    decode_or_our_error(m2, body)


@pytest.mark.parametrize("declared", [1 << 16, 1 << 30, 1 << 40])
def test_lz4_bomb_allocates_at_most_the_limit(declared: int) -> None:
    bomb = lz4.block.compress(bytes(1 << 22), store_size=False)  # 4 MiB of zeros in ~16 KiB
    n = declared // 4
    m = Manifest(
        tensors=(TensorRecord(name="x", shape=(n,), encoding=Encoding.FP32, offset=0, nbytes=4 * n),),
        compression=Compression.LZ4,
        raw_size=declared,
    )
    tracemalloc.start()
    try:
        with pytest.raises(CodecError) as ei:
            decode_tensors(m, bomb, WireLimits(max_body_bytes=1 << 20))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert ei.value.code in (ErrorCode.LIMIT_EXCEEDED, ErrorCode.DECOMPRESSION)
    assert peak < 4 << 20


def test_wrong_shapes_against_the_schema_are_refused_before_decoding() -> None:
    from fedquic.common.adapter import AdapterSchema, TensorSpec
    from fedquic.common.errors import SchemaMismatchError

    schema = AdapterSchema(tensors=(TensorSpec(name="a", shape=(6, 40)), TensorSpec(name="b", shape=(90,))))
    m, _ = valid_payload(0, "int8")
    schema.check_manifest(m)
    bad = m.model_copy(update={"tensors": (m.tensors[0].model_copy(update={"shape": (40, 6)}), m.tensors[1])})
    with pytest.raises(SchemaMismatchError):
        schema.check_manifest(bad)


COMPACT_SCHEMA_STATE = {"a": np.zeros((6, 40), np.float32), "b": np.zeros((90,), np.float32)}


def compact_schema() -> AdapterSchema:
    return AdapterSchema.from_state(COMPACT_SCHEMA_STATE)


@settings(max_examples=3000, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.sampled_from(list(Encoding)),
    st.sampled_from(list(Compression)),
    st.integers(0, 1 << 20),
    st.one_of(st.none(), st.sampled_from(["auto", "tensor", "row", "column", "block"])),
    st.one_of(st.none(), st.integers(1, 1 << 12)),
    st.one_of(st.none(), st.sampled_from(["fp32", "fp16", "int8"])),
    st.one_of(st.none(), st.lists(st.integers(0, 400), max_size=4).map(tuple)),
    st.one_of(st.none(), st.text("b124e", max_size=4)),
    st.booleans(),
    st.binary(max_size=512),
)
def test_random_compact_manifests_expand_and_decode_or_raise_our_errors(
    enc: Encoding,
    comp: Compression,
    raw: int,
    gran: str | None,
    bs: int | None,
    vals: str | None,
    k: tuple[int, ...] | None,
    ix: str | None,
    right_schema: bool,
    body: bytes,
) -> None:
    from fedquic.common.codec import CompactManifest, expand
    from fedquic.common.errors import SchemaMismatchError

    schema = compact_schema()
    try:
        m = CompactManifest(
            fp=schema.fingerprint() if right_schema else "0123456789abcdef",
            enc=enc,
            comp=comp,
            raw=raw,
            gran=gran,  # type: ignore[arg-type]
            bs=bs,
            vals=vals,  # type: ignore[arg-type]
            k=k,
            ix=ix,
        )
    except ValidationError:
        return  # refused as BAD_HEADER when parsed
    try:
        full = expand(m, schema, LIMITS)
    except SchemaMismatchError:
        assert not right_schema
        return
    except CodecError as exc:
        assert isinstance(exc.code, ErrorCode)
        return
    schema.check_manifest(full)
    decode_or_our_error(full, body[: full.raw_size] if comp is Compression.NONE else body)


@settings(max_examples=1000, deadline=None)
@given(
    st.integers(0, 20),
    st.sampled_from(["int8", "int8-block8", "topk10", "topk1", "topk40-fp16", "bf16"]),
    st.data(),
)
def test_tampered_compact_manifests(seed: int, enc: str, data: st.DataObject) -> None:
    from fedquic.common.codec import CompactManifest, expand, to_compact

    schema = compact_schema()
    m, body = valid_payload(seed, enc)
    compact = to_compact(m, schema)
    assert compact is not None and expand(compact, schema) == m
    fields = compact.model_dump()
    key = data.draw(st.sampled_from(["raw", "k", "ix", "bs", "gran", "vals", "comp"]))
    if key == "k" and compact.k is not None:
        i = data.draw(st.integers(0, len(compact.k) - 1))
        ks = list(compact.k)
        ks[i] = data.draw(st.integers(0, 1 << 20))
        fields["k"] = tuple(ks)
    elif key == "ix" and compact.ix is not None:
        fields["ix"] = data.draw(st.text("b124e", min_size=len(compact.ix), max_size=len(compact.ix)))
    elif key == "raw":
        fields["raw"] = data.draw(st.integers(0, 1 << 40))
    elif key == "bs":
        fields["bs"] = data.draw(st.one_of(st.none(), st.integers(1, 1 << 12)))
    elif key == "gran":
        fields["gran"] = data.draw(st.sampled_from(["auto", "tensor", "row", "column", "block"]))
    elif key == "vals":
        fields["vals"] = data.draw(st.sampled_from(["fp32", "fp16", "int8"]))
    else:
        fields["comp"] = data.draw(st.sampled_from(["none", "lz4"]))
    try:
        tampered = CompactManifest.model_validate(fields)
        full = expand(tampered, schema, LIMITS)
    except ValidationError:
        return
    except CodecError as exc:
        assert isinstance(exc.code, ErrorCode)
        return
    decode_or_our_error(full, body)
