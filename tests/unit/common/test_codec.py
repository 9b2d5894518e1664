import lz4.block
import numpy as np
import pytest
from fedquic.common.codec import (
    Compression,
    Encoding,
    EncodingSpec,
    Manifest,
    TensorRecord,
    decode_tensors,
    encode_payload,
    encode_tensors,
    fp32_nbytes,
)
from fedquic.common.errors import CodecError, ErrorCode
from fedquic.common.limits import WireLimits


def lora_like(rng: np.random.Generator, r: int = 8, d_in: int = 64, d_out: int = 96) -> dict[str, np.ndarray]:
    return {
        "m.q_proj.lora_A.weight": (rng.normal(size=(r, d_in)) * 1e-2).astype(np.float32),
        "m.q_proj.lora_B.weight": (rng.normal(size=(d_out, r)) * rng.lognormal(size=(1, r)) * 1e-3).astype(np.float32),
        "m.bias": rng.normal(size=(7,)).astype(np.float32),
    }


@pytest.mark.parametrize("seed", range(5))
def test_int8_lz4_round_trip_error_is_within_half_a_step(seed: int) -> None:
    rng = np.random.default_rng(seed)
    state = lora_like(rng)
    manifest, body = encode_tensors(state, EncodingSpec())
    out = decode_tensors(manifest, body)
    assert set(out) == set(state)
    for rec in manifest.tensors:
        x, y = state[rec.name], out[rec.name]
        assert y.dtype == np.float32 and y.shape == x.shape
        if rec.scale_axis is None:
            step = np.abs(x).max() / 127
        else:  # one scale per index of the smaller axis (per rank for LoRA)
            step = np.expand_dims(np.abs(x).max(axis=1 - rec.scale_axis) / 127, 1 - rec.scale_axis)
        assert np.all(np.abs(y - x) <= step / 2 + 1e-9)
    # scales ride along the rank axis: A is (r, in) -> axis 0, B is (out, r) -> axis 1
    by_name = {r.name: r for r in manifest.tensors}
    assert by_name["m.q_proj.lora_A.weight"].scale_axis == 0
    assert by_name["m.q_proj.lora_B.weight"].scale_axis == 1


def test_int8_is_about_four_times_smaller_than_fp32() -> None:
    state = lora_like(np.random.default_rng(0), r=16, d_in=512, d_out=512)
    manifest, body = encode_tensors(state, EncodingSpec(compression=Compression.NONE))
    assert fp32_nbytes(manifest) / len(body) > 3.9


def test_fp32_is_exact_and_fp16_is_close() -> None:
    state = lora_like(np.random.default_rng(1))
    m, b = encode_tensors(state, EncodingSpec(encoding=Encoding.FP32))
    assert all(np.array_equal(decode_tensors(m, b)[k], state[k]) for k in state)
    m, b = encode_tensors(state, EncodingSpec(encoding=Encoding.FP16))
    out = decode_tensors(m, b)
    assert all(np.allclose(out[k], state[k], rtol=1e-3, atol=1e-6) for k in state)


def test_zero_tensor_round_trips() -> None:
    m, b = encode_tensors({"z": np.zeros((4, 3), np.float32)})
    assert np.array_equal(decode_tensors(m, b)["z"], np.zeros((4, 3), np.float32))


def test_lz4_is_skipped_when_it_does_not_shrink() -> None:
    rng = np.random.default_rng(2)
    m, b = encode_tensors({"x": rng.normal(size=(64, 64)).astype(np.float32)}, EncodingSpec(encoding=Encoding.FP32))
    assert m.compression is Compression.NONE and len(b) == m.raw_size
    m, b = encode_tensors({"x": np.ones((64, 64), np.float32)}, EncodingSpec(encoding=Encoding.FP32))
    assert m.compression is Compression.LZ4 and len(b) < m.raw_size


def test_non_finite_values_are_refused_both_ways() -> None:
    with pytest.raises(CodecError) as ei:
        encode_tensors({"x": np.array([1.0, np.nan], np.float32)})
    assert ei.value.code is ErrorCode.NON_FINITE
    raw = np.array([1.0, np.inf], np.float32).tobytes()
    m = Manifest(tensors=(TensorRecord(name="x", shape=(2,), encoding=Encoding.FP32, offset=0, nbytes=8),), raw_size=8)
    with pytest.raises(CodecError) as ei:
        decode_tensors(m, raw)
    assert ei.value.code is ErrorCode.NON_FINITE


def test_decompression_bomb_is_refused_before_allocation() -> None:
    bomb = lz4.block.compress(bytes(1 << 20), store_size=False)
    m = Manifest(
        tensors=(TensorRecord(name="x", shape=(1 << 38,), encoding=Encoding.FP32, offset=0, nbytes=4 << 38),),
        compression=Compression.LZ4,
        raw_size=4 << 38,
    )
    with pytest.raises(CodecError) as ei:
        decode_tensors(m, bomb, WireLimits(max_body_bytes=1 << 24))
    assert ei.value.code is ErrorCode.LIMIT_EXCEEDED


def test_lz4_body_that_lies_about_its_size_is_refused() -> None:
    body = lz4.block.compress(bytes(4096), store_size=False)
    m = Manifest(
        tensors=(TensorRecord(name="x", shape=(16,), encoding=Encoding.FP32, offset=0, nbytes=64),),
        compression=Compression.LZ4,
        raw_size=64,
    )
    with pytest.raises(CodecError) as ei:
        decode_tensors(m, body)
    assert ei.value.code is ErrorCode.DECOMPRESSION


@pytest.mark.parametrize(
    "record",
    [
        TensorRecord(name="x", shape=(4,), encoding=Encoding.FP32, offset=0, nbytes=12),  # size mismatch
        TensorRecord(name="x", shape=(4,), encoding=Encoding.FP32, offset=8, nbytes=16),  # outside the body
        TensorRecord(name="x", shape=(4,), encoding=Encoding.INT8, offset=0, nbytes=12, scale_axis=1),
    ],
)
def test_inconsistent_manifests_raise_codec_errors(record: TensorRecord) -> None:
    m = Manifest(tensors=(record,), raw_size=16)
    with pytest.raises(CodecError):
        decode_tensors(m, bytes(16))


def test_too_many_tensors_is_a_limit_error() -> None:
    recs = tuple(
        TensorRecord(name=f"t{i}", shape=(1,), encoding=Encoding.FP32, offset=4 * i, nbytes=4) for i in range(5)
    )
    with pytest.raises(CodecError) as ei:
        decode_tensors(Manifest(tensors=recs, raw_size=20), bytes(20), WireLimits(max_tensors=4))
    assert ei.value.code is ErrorCode.LIMIT_EXCEEDED


@pytest.mark.filterwarnings("error")
@pytest.mark.parametrize("enc", ["int8", "int8-row", "int8-column", "int8-tensor", "int8-block8", "topk50"])
def test_tiny_values_quantize_without_overflow(enc: str) -> None:
    state = {"a": np.full((4, 8), 1e-37, np.float32), "b": np.array([1e-40, -2e-40, 3.0], np.float32)}
    m, body = encode_tensors(state, EncodingSpec.parse(enc))
    out = decode_tensors(m, body)
    for k, x in state.items():
        assert np.all(np.isfinite(out[k]))
        assert np.all(np.abs(out[k] - x) <= max(np.abs(x).max() / 254, 1.5e-36) * 1.0001)


@pytest.mark.parametrize(
    "text",
    ["fp32", "fp16+nolz4", "bf16", "int8", "int8-row", "int8-block64", "int8-tensor+nolz4", "topk10", "topk0.5-fp16"],
)
def test_short_form_reads_back_as_the_same_spec(text: str) -> None:
    spec = EncodingSpec.parse(text)
    assert spec.short() == text and EncodingSpec.parse(spec.short()) == spec


def test_lz4_is_tried_in_full_only_when_a_sample_shrinks() -> None:
    rng = np.random.default_rng(0)
    dense = {"w": rng.standard_normal((512, 512)).astype(np.float32)}  # 1 MiB of noise: LZ4 cannot shrink it
    zeros = {"w": np.zeros((512, 512), np.float32)}
    assert encode_tensors(dense, EncodingSpec.parse("fp32"))[0].compression is Compression.NONE
    manifest, body = encode_tensors(zeros, EncodingSpec.parse("fp32"))
    assert manifest.compression is Compression.LZ4 and len(body) < 10_000
    np.testing.assert_array_equal(decode_tensors(manifest, body)["w"], zeros["w"])


def test_an_fp32_payload_decodes_to_its_input_without_a_self_decode() -> None:
    state = {"a": np.arange(12, dtype=np.float32).reshape(3, 4), "b": np.ones(5, np.float64)}
    payload = encode_payload(state, EncodingSpec.parse("fp32"))
    received = decode_tensors(payload.manifest, payload.body)
    for k in state:
        assert payload.decoded[k].dtype == np.float32
        np.testing.assert_array_equal(payload.decoded[k], received[k])
