"""Compact (schema-referenced) manifests: round trips for every encoding, and what expand() refuses."""

from __future__ import annotations

import numpy as np
import pytest
from fedquic.common.adapter import AdapterSchema, TensorSpec
from fedquic.common.codec import (
    CompactManifest,
    EncodingSpec,
    Manifest,
    decode_tensors,
    encode_tensors,
    expand,
    fp32_nbytes,
    to_compact,
)
from fedquic.common.errors import CodecError, ErrorCode, SchemaMismatchError
from fedquic.common.limits import WireLimits
from fedquic.common.messages import Aggregate, Update
from fedquic.transport.framing import frame_size, header_bytes, parse_header
from pydantic import ValidationError

# The learning benchmark's adapter: hidden 192, MLP 512, 4 layers, rank 8 on q, k, v, o, gate, up, down.
HIDDEN, MLP, LAYERS, RANK = 192, 512, 4, 8
PROJ = {
    "q_proj": ("self_attn", HIDDEN, HIDDEN),
    "k_proj": ("self_attn", HIDDEN, HIDDEN),
    "v_proj": ("self_attn", HIDDEN, HIDDEN),
    "o_proj": ("self_attn", HIDDEN, HIDDEN),
    "gate_proj": ("mlp", HIDDEN, MLP),
    "up_proj": ("mlp", HIDDEN, MLP),
    "down_proj": ("mlp", MLP, HIDDEN),
}


def lora_shapes(layers: int = LAYERS, rank: int = RANK) -> dict[str, tuple[int, ...]]:
    shapes: dict[str, tuple[int, ...]] = {}
    for i in range(layers):
        for proj, (module, d_in, d_out) in PROJ.items():
            base = f"base_model.model.model.layers.{i}.{module}.{proj}"
            shapes[f"{base}.lora_A.weight"] = (rank, d_in)  # A is r x in
            shapes[f"{base}.lora_B.weight"] = (d_out, rank)  # B is out x r
    return shapes


def delta(shapes: dict[str, tuple[int, ...]], seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {k: (rng.normal(size=s) * 1e-3).astype(np.float32) for k, s in shapes.items()}


SHAPES = lora_shapes()
STATE = delta(SHAPES)
SCHEMA = AdapterSchema.from_state(STATE)
SMALL_SHAPES = lora_shapes(layers=1, rank=4)
SMALL = AdapterSchema.from_state(delta(SMALL_SHAPES))

SPECS = [
    "fp32",
    "fp16",
    "bf16",
    "int8",
    "int8-row",
    "int8-column",
    "int8-tensor",
    "int8-block64",
    "int8-block100",
    "int8+nolz4",
    "topk10",
    "topk1",
    "topk50",
    "topk100",
    "topk10-fp16",
    "topk10-fp32",
    "topk10+nolz4",
]


def test_benchmark_schema_is_the_one_described() -> None:
    assert len(SCHEMA.tensors) == 56 and SCHEMA.numel == 116_736


def over_the_wire(compact: CompactManifest) -> CompactManifest:
    """As a receiver parses it out of an UPDATE frame's JSON header."""
    header = Update(round=1, client_id="c1", num_samples=1, base_hash="ab", manifest=compact)
    parsed = parse_header(int(header.msg_type), header_bytes(header))
    assert isinstance(parsed, Update) and isinstance(parsed.manifest, CompactManifest)
    return parsed.manifest


@pytest.mark.parametrize("spec", SPECS)
def test_compact_round_trip_reproduces_the_full_manifest(spec: str) -> None:
    manifest, body = encode_tensors(STATE, EncodingSpec.parse(spec))
    compact = to_compact(manifest, SCHEMA)
    assert compact is not None
    full = expand(over_the_wire(compact), SCHEMA)
    assert full == manifest
    out, ref = decode_tensors(full, body), decode_tensors(manifest, body)
    assert all(np.array_equal(out[k], ref[k]) for k in ref)
    assert fp32_nbytes(full) == 4 * SCHEMA.numel


@pytest.mark.parametrize("spec", ["int8", "int8-row", "int8-block8", "topk30", "bf16"])
def test_odd_shapes_round_trip(spec: str) -> None:
    # 1-D, 3-D, a single value and an empty tensor: auto/row granularity fall back as the encoder does
    state = {
        "a": np.arange(12, dtype=np.float32).reshape(2, 3, 2),
        "b": np.linspace(-1, 1, 17, dtype=np.float32),
        "c": np.ones((1,), np.float32),
        "d": np.zeros((0, 4), np.float32),
        "e": np.full((5, 2), 0.5, np.float32),
    }
    schema = AdapterSchema.from_state(state)
    manifest, _ = encode_tensors(state, EncodingSpec.parse(spec))
    compact = to_compact(manifest, schema)
    assert compact is not None and expand(over_the_wire(compact), schema) == manifest


def test_schema_order_does_not_matter() -> None:
    # JOIN may list tensors in any order (the fingerprint ignores it): expansion always uses sorted names
    manifest, _ = encode_tensors(STATE, EncodingSpec.parse("topk10"))
    shuffled = AdapterSchema(tensors=tuple(reversed(SCHEMA.tensors)))
    compact = to_compact(manifest, shuffled)
    assert compact is not None and expand(compact, SCHEMA) == manifest == expand(compact, shuffled)


def test_compact_topk10_manifest_is_under_1kb() -> None:
    manifest, body = encode_tensors(STATE, EncodingSpec.parse("topk10"))
    compact = to_compact(manifest, SCHEMA)
    assert compact is not None
    small = len(compact.model_dump_json(exclude_none=True))
    assert small < 1024, small
    assert len(manifest.model_dump_json(exclude_none=True)) > 8 * small
    # the whole UPDATE frame: about 23x smaller than fp32 (13.8x with the full manifest and no Elias–Fano)
    frame = frame_size(Update(round=1, client_id="c1", num_samples=1, base_hash="0" * 32, manifest=compact), len(body))
    assert 4 * SCHEMA.numel / frame > 22


def test_compact_form_uses_elias_fano_at_ten_percent() -> None:
    manifest, _ = encode_tensors(STATE, EncodingSpec.parse("topk10"))
    compact = to_compact(manifest, SCHEMA)
    assert compact is not None and compact.ix == "e" * 56


def test_expand_passes_a_full_manifest_through() -> None:
    manifest, _ = encode_tensors(STATE, EncodingSpec.parse("int8"))
    assert expand(manifest, SCHEMA) is manifest


def test_both_forms_parse_from_headers() -> None:
    manifest, _ = encode_tensors(STATE, EncodingSpec.parse("int8"))
    compact = to_compact(manifest, SCHEMA)
    for form in (manifest, compact):
        agg = Aggregate(round=1, contributors=2, manifest=form)  # type: ignore[arg-type]
        parsed = parse_header(int(agg.msg_type), header_bytes(agg))
        assert isinstance(parsed, Aggregate) and type(parsed.manifest) is type(form) and parsed == agg


def test_a_header_mixing_the_two_forms_is_refused() -> None:
    from fedquic.common.errors import ProtocolError

    manifest, _ = encode_tensors(delta(SMALL_SHAPES), EncodingSpec.parse("topk10"))
    compact = to_compact(manifest, SMALL)
    assert compact is not None
    header = Update(round=1, client_id="c1", num_samples=1, base_hash="ab", manifest=compact)
    raw = header_bytes(header).replace(b'"fp":', b'"tensors":[],"fp":')
    with pytest.raises(ProtocolError) as ei:
        parse_header(int(header.msg_type), raw)
    assert ei.value.code is ErrorCode.BAD_HEADER


# -- what to_compact leaves in the full form -------------------------------------------------------------


def test_a_payload_for_part_of_the_adapter_names_its_tensors_in_a_selection() -> None:
    names = sorted(STATE)
    part, _ = encode_tensors({k: STATE[k] for k in (names[0], names[2], names[-1])}, EncodingSpec.parse("topk10"))
    compact = to_compact(part, SCHEMA)
    assert compact is not None and compact.sel is not None and len(compact.k or ()) == 3
    assert expand(compact, SCHEMA) == part
    whole, _ = encode_tensors(STATE, EncodingSpec.parse("int8"))
    assert to_compact(whole, SCHEMA).sel is None  # type: ignore[union-attr]


@pytest.mark.parametrize(
    ("sel", "match"),
    [("00", "bits for"), ("ff" * 8, "bits for"), (None, None)],
)
def test_a_hostile_selection_is_refused(sel: str | None, match: str | None) -> None:
    names = sorted(STATE)
    part, _ = encode_tensors({names[1]: STATE[names[1]]}, EncodingSpec.parse("int8"))
    compact = to_compact(part, SCHEMA)
    assert compact is not None and compact.sel is not None
    if sel is None:  # the right length, nothing selected
        sel = "00" * (len(compact.sel) // 2)
        match = "empty selection"
    with pytest.raises(CodecError, match=match):
        expand(compact.model_copy(update={"sel": sel}), SCHEMA)


def test_a_selection_past_the_last_tensor_is_refused() -> None:
    small = {k: STATE[k] for k in sorted(STATE)[:3]}
    schema = AdapterSchema.from_state(small)
    part, _ = encode_tensors({sorted(small)[0]: small[sorted(small)[0]]}, EncodingSpec.parse("int8"))
    compact = to_compact(part, schema)
    assert compact is not None and compact.sel == "80"
    with pytest.raises(CodecError, match="past the schema"):
        expand(compact.model_copy(update={"sel": "81"}), schema)


def test_to_compact_declines_what_it_cannot_express() -> None:
    manifest, _ = encode_tensors(STATE, EncodingSpec.parse("topk10"))
    # another schema's shapes
    other = AdapterSchema(
        tensors=tuple(TensorSpec(name=t.name, shape=(t.shape[0] + 1, t.shape[1])) for t in SCHEMA.tensors)
    )
    assert to_compact(manifest, other) is None
    # mixed encodings or value encodings
    recs = list(manifest.tensors)
    recs[1] = recs[1].model_copy(update={"values": "fp16", "nbytes": recs[1].nbytes + recs[1].k})  # type: ignore[operator]
    assert to_compact(manifest.model_copy(update={"tensors": tuple(recs)}), SCHEMA) is None
    # an empty manifest (nothing to save)
    assert to_compact(Manifest(tensors=(), raw_size=0), AdapterSchema(tensors=())) is None


def test_to_compact_declines_int8_scales_no_granularity_explains() -> None:
    manifest, _ = encode_tensors(STATE, EncodingSpec.parse("int8"))
    # the opposite of auto (per column on A, per row on B): neither auto, row, column nor tensor
    axes = [1 if r.shape[0] < r.shape[1] else 0 for r in manifest.tensors]
    recs = [
        r.model_copy(update={"scale_axis": a, "nbytes": 4 * r.shape[a] + r.shape[0] * r.shape[1]})
        for r, a in zip(manifest.tensors, axes, strict=True)
    ]
    offsets = np.cumsum([0] + [r.nbytes for r in recs])
    recs = [r.model_copy(update={"offset": int(o)}) for r, o in zip(recs, offsets, strict=False)]
    mixed = Manifest(tensors=tuple(recs), compression=manifest.compression, raw_size=int(offsets[-1]))
    assert to_compact(mixed, SCHEMA) is None
    row, _ = encode_tensors(STATE, EncodingSpec.parse("int8-row"))
    assert to_compact(row, SCHEMA) is not None


# -- what expand refuses ---------------------------------------------------------------------------------


def compact_of(spec: str = "topk10", schema: AdapterSchema = SMALL) -> CompactManifest:
    state = delta({t.name: t.shape for t in schema.tensors})
    manifest, _ = encode_tensors(state, EncodingSpec.parse(spec))
    compact = to_compact(manifest, schema)
    assert compact is not None
    return compact


def tamper(compact: CompactManifest, **update: object) -> CompactManifest:
    """A compact manifest with some fields changed, validated as a receiver would parse it."""
    return CompactManifest.model_validate({**compact.model_dump(), **update})


def test_expand_refuses_another_schema() -> None:
    compact = compact_of()
    with pytest.raises(SchemaMismatchError):
        expand(compact, SCHEMA)
    with pytest.raises(SchemaMismatchError):
        expand(tamper(compact, fp="0" * 16), SMALL)


@pytest.mark.parametrize(
    "update",
    [
        {"k": "drop-one"},
        {"k": "add-one"},
        {"ix": "drop-one"},
        {"ix": "add-one"},
    ],
)
def test_expand_refuses_wrong_list_lengths(update: dict[str, str]) -> None:
    compact = compact_of()
    assert compact.k is not None and compact.ix is not None
    field, how = next(iter(update.items()))
    value = compact.k if field == "k" else compact.ix
    changed = value[:-1] if how == "drop-one" else value + value[:1]
    with pytest.raises(CodecError, match="tensors"):
        expand(tamper(compact, **{field: changed}), SMALL)


def test_expand_refuses_k_above_the_tensor_size() -> None:
    compact = compact_of()
    assert compact.k is not None
    numel = sorted(SMALL.tensors, key=lambda t: t.name)[0].numel
    with pytest.raises(CodecError, match="k="):
        expand(tamper(compact, k=(numel + 1, *compact.k[1:])), SMALL)


def test_expand_refuses_an_inconsistent_raw_size() -> None:
    compact = compact_of()
    for raw in (compact.raw - 1, compact.raw + 1, 0):
        with pytest.raises(CodecError, match="declares"):
            expand(tamper(compact, raw=raw), SMALL)


def test_expand_refuses_a_changed_k_or_index_format_through_the_sizes() -> None:
    # k and ix change the implied sizes: the sum no longer matches raw (the body decides nothing here)
    compact = compact_of()
    assert compact.k is not None and compact.ix is not None
    with pytest.raises(CodecError):
        expand(tamper(compact, k=(compact.k[0] - 1, *compact.k[1:])), SMALL)
    with pytest.raises(CodecError):
        expand(tamper(compact, ix="b" + compact.ix[1:]), SMALL)


def test_expand_bounds_lists_by_the_limits_before_using_them() -> None:
    compact = compact_of()
    huge = tamper(compact, k=(1,) * 100_000, ix="e" * 100_000)
    with pytest.raises(CodecError) as ei:
        expand(huge, SMALL, WireLimits(max_tensors=1024))
    assert ei.value.code is ErrorCode.LIMIT_EXCEEDED
    with pytest.raises(CodecError) as ei:
        expand(compact, SMALL, WireLimits(max_tensors=len(SMALL.tensors) - 1))
    assert ei.value.code is ErrorCode.LIMIT_EXCEEDED
    with pytest.raises(CodecError) as ei:
        expand(tamper(compact, raw=1 << 33), SMALL, WireLimits(max_body_bytes=1 << 20))
    assert ei.value.code is ErrorCode.LIMIT_EXCEEDED


def test_the_parser_bounds_list_lengths_and_values() -> None:
    compact = compact_of()
    with pytest.raises(ValidationError):
        tamper(compact, ix="e" * ((1 << 20) + 1))
    with pytest.raises(ValidationError):
        tamper(compact, k=(0,) * ((1 << 20) + 1))
    with pytest.raises(ValidationError):
        tamper(compact, k=(-1,) * len(SMALL.tensors))


@pytest.mark.parametrize(
    ("spec", "update"),
    [
        ("fp32", {"gran": "auto"}),  # int8 fields on fp32
        ("fp32", {"k": (1,)}),  # topk fields on fp32
        ("int8", {"gran": None}),  # int8 without its granularity
        ("int8", {"bs": 64}),  # a block size without block granularity
        ("int8-block64", {"bs": None}),
        ("int8-block64", {"bs": 0}),
        ("topk10", {"k": None}),
        ("topk10", {"vals": None}),
        ("topk10", {"ix": "x" * 14}),  # not an index code
        ("topk10", {"gran": "row"}),
        ("topk10", {"fp": "NOT-HEX"}),
        ("topk10", {"tensors": []}),  # unknown field
    ],
)
def test_structurally_invalid_compact_manifests_are_refused_when_parsed(spec: str, update: dict[str, object]) -> None:
    with pytest.raises(ValidationError):
        tamper(compact_of(spec), **update)
