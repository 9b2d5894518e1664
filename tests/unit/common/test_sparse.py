"""Index codings of top-k positions: Elias–Fano round trips, sizes, choice of format, and hostile inputs."""

from __future__ import annotations

import math

import numpy as np
import pytest
from fedquic.common.errors import CodecError
from fedquic.common.sparse import IndexFormat, decode_indices, ef_low_bits, encode_indices, index_nbytes
from hypothesis import given, settings
from hypothesis import strategies as st

EF = IndexFormat.ELIAS_FANO
DELTAS = (IndexFormat.DELTA8, IndexFormat.DELTA16, IndexFormat.DELTA32)


def ef_encode(idx: np.ndarray, n: int) -> bytes:
    """Elias–Fano bytes whatever encode_indices would pick (the private encoder, exercised directly)."""
    from fedquic.common.sparse import _ef_encode

    return _ef_encode(np.asarray(idx, dtype=np.int64), n)


def positions(rng: np.random.Generator, n: int, k: int) -> np.ndarray:
    return np.sort(rng.choice(n, size=k, replace=False)).astype(np.int64) if k else np.zeros(0, np.int64)


def adversarial(n: int) -> list[np.ndarray]:
    """Sets that stress the edges: first/last positions, runs, equal high parts, maximal gaps."""
    sets = [np.zeros(0, np.int64), np.array([0]), np.array([n - 1]), np.arange(n)]
    if n > 1:
        sets += [np.array([0, n - 1]), np.arange(n // 2), np.arange(n // 2, n), np.arange(0, n, 2)]
    if n > 8:
        sets += [np.arange(n - 8, n), np.array([1, 2, 3, n - 2]), np.arange(0, n, max(1, n // 7))]
    return [s.astype(np.int64) for s in sets]


SIZES = [1, 2, 3, 7, 8, 9, 63, 64, 65, 100, 255, 256, 257, 1000, 4096, 65_537, 200_000]


@pytest.mark.parametrize("n", SIZES)
def test_elias_fano_round_trips_random_and_adversarial_sets(n: int) -> None:
    rng = np.random.default_rng(n)
    ks = sorted({0, 1, 2, n // 100, n // 10, n // 3, n // 2, n - 1, n} - {-1})
    sets = [positions(rng, n, k) for k in ks if 0 <= k <= n] + adversarial(n)
    for idx in sets:
        k = idx.size
        data = ef_encode(idx, n)
        assert len(data) == index_nbytes(EF, n, k)
        out = decode_indices(EF, data, n, k)
        assert out.dtype == np.int64 and np.array_equal(out, idx), (n, k)
        # and through the chooser, whatever it picks
        fmt, chosen = encode_indices(idx, n)
        assert np.array_equal(decode_indices(fmt, chosen, n, k), idx)


@settings(max_examples=400, deadline=None)
@given(st.integers(1, 5000), st.data())
def test_elias_fano_round_trips_any_set(n: int, data: st.DataObject) -> None:
    idx = np.array(sorted(data.draw(st.sets(st.integers(0, n - 1), max_size=min(n, 300)))), dtype=np.int64)
    assert np.array_equal(decode_indices(EF, ef_encode(idx, n), n, idx.size), idx)


@pytest.mark.parametrize(("n", "k"), [(0, 0), (1, 0), (1, 1), (10, 10), (100, 10), (1 << 20, 1000), (1000, 1)])
def test_elias_fano_size_is_a_function_of_n_and_k(n: int, k: int) -> None:
    low = ef_low_bits(n, k)
    assert low == (max(0, math.floor(math.log2(n / k))) if k else 0)
    upper_bits = k + ((n - 1) >> low) + 1 if k else 0
    assert index_nbytes(EF, n, k) == math.ceil(k * low / 8) + math.ceil(upper_bits / 8)


def test_elias_fano_layout_matches_the_protocol_example() -> None:
    # docs/protocol.md 5.4: n = 100, positions 5, 37, 90 -> L = 5, low stream 00101 00101 11010, upper 1010100
    idx = np.array([5, 37, 90])
    assert ef_encode(idx, 100).hex() == "2974a8"
    assert decode_indices(EF, bytes.fromhex("2974a8"), 100, 3).tolist() == [5, 37, 90]


def test_elias_fano_bits_per_position() -> None:
    n = 1_000_000
    assert index_nbytes(EF, n, n // 10) * 8 / (n // 10) == pytest.approx(5.25, abs=0.01)  # bitmap: 10
    assert index_nbytes(EF, n, n // 100) * 8 / (n // 100) < 8.7  # delta16: 16


@pytest.mark.parametrize("n", [1, 5, 64, 1000, 30_000])
@pytest.mark.parametrize("density", [0.0, 0.001, 0.01, 0.1, 0.3, 0.6, 1.0])
def test_the_chosen_format_is_no_larger_than_any_alternative(n: int, density: float) -> None:
    rng = np.random.default_rng(n)
    k = min(n, math.ceil(density * n))
    idx = positions(rng, n, k)
    fmt, data = encode_indices(idx, n)
    assert len(data) == index_nbytes(fmt, n, k)
    gaps = np.diff(idx, prepend=-1)
    widest = int(gaps.max()) if k else 0
    fits = [f for f, w in zip(DELTAS, (8, 16, 32), strict=True) if widest < 1 << w]
    for alt in (IndexFormat.BITMAP, EF, *fits):
        assert len(data) <= index_nbytes(alt, n, k), (fmt, alt)


def test_elias_fano_is_picked_at_lora_densities() -> None:
    rng = np.random.default_rng(0)
    for n, k in [(1536, 154), (4096, 410), (4096, 41), (10_000_000, 100_000)]:
        assert encode_indices(positions(rng, n, k), n)[0] is EF


def test_large_tensor_round_trip_is_vectorized() -> None:
    # 10M values at 10%: a Python loop per value would take seconds; this is a few tens of milliseconds.
    import time

    n, k = 10_000_000, 1_000_000
    idx = positions(np.random.default_rng(1), n, k)
    t0 = time.perf_counter()
    fmt, data = encode_indices(idx, n)
    out = decode_indices(fmt, data, n, k)
    assert fmt is EF and np.array_equal(out, idx)
    assert time.perf_counter() - t0 < 5.0


# -- hostile inputs --------------------------------------------------------------------------------------


def valid(n: int = 1000, k: int = 100, seed: int = 0) -> tuple[np.ndarray, bytearray]:
    idx = positions(np.random.default_rng(seed), n, k)
    return idx, bytearray(ef_encode(idx, n))


def test_wrong_number_of_ones_is_refused() -> None:
    n, k = 1000, 100
    _, data = valid(n, k)
    low_nbytes = math.ceil(k * ef_low_bits(n, k) / 8)
    first_upper = data[low_nbytes]
    for bad in (first_upper & (first_upper - 1), first_upper | 0x80 | 0x01):  # one bit fewer / more
        if bad == first_upper:
            continue
        tampered = bytearray(data)
        tampered[low_nbytes] = bad
        with pytest.raises(CodecError, match="mark"):
            decode_indices(EF, tampered, n, k)
    with pytest.raises(CodecError, match="mark"):
        decode_indices(EF, bytes(len(data)), n, k)  # no ones at all


def test_position_past_the_end_is_refused() -> None:
    # n=10, k=1: L=3, upper part 1 + (9 >> 3) + 1 = 3 bits. High part 1 with low bits 7 is position 15 >= 10.
    n, k = 10, 1
    assert ef_low_bits(n, k) == 3
    data = bytes([0b1110_0000, 0b0100_0000])  # low 0b111, then upper bits "010": high = 1
    with pytest.raises(CodecError, match="outside"):
        decode_indices(EF, data, n, k)
    assert decode_indices(EF, bytes([0b1110_0000, 0b1000_0000]), n, k).tolist() == [7]


def test_repeated_positions_are_refused() -> None:
    # n=16, k=2: L=3. Both positions 0b0_101: upper bits "1 1" at 0 and 1, low parts equal.
    n, k = 16, 2
    data = bytes([0b1011_0100, 0b1100_0000])
    with pytest.raises(CodecError, match="increase"):
        decode_indices(EF, data, n, k)


def test_padding_bits_must_be_zero() -> None:
    n, k = 10, 1
    with pytest.raises(CodecError, match="padding"):
        decode_indices(EF, bytes([0b1110_0001, 0b1000_0000]), n, k)  # low part padding
    with pytest.raises(CodecError, match="padding"):
        decode_indices(EF, bytes([0b1110_0000, 0b1000_0001]), n, k)  # upper part padding


@pytest.mark.parametrize("fmt", list(IndexFormat))
def test_truncated_or_padded_data_is_refused(fmt: IndexFormat) -> None:
    n, k = 1000, 100
    idx = positions(np.random.default_rng(3), n, k)
    data = ef_encode(idx, n) if fmt is EF else encode_indices(idx, n)[1]
    size = index_nbytes(fmt, n, k)
    data = (data + bytes(size))[:size]  # the right length for this format (content is irrelevant here)
    for bad in (data[:-1], data + b"\0", b""):
        with pytest.raises(CodecError):
            decode_indices(fmt, bad, n, k)


@pytest.mark.parametrize(("n", "k"), [(10, 11), (0, 1), (5, -1)])
def test_impossible_counts_are_refused(n: int, k: int) -> None:
    with pytest.raises(CodecError):
        decode_indices(EF, b"", n, k)


@settings(max_examples=2000, deadline=None)
@given(st.integers(1, 3000), st.integers(0, 3000), st.binary(max_size=1200))
def test_random_bytes_decode_or_raise_codec_error(n: int, k: int, noise: bytes) -> None:
    k = min(k, n)
    size = index_nbytes(EF, n, k)
    data = (noise * (size // max(len(noise), 1) + 1))[:size] if noise else bytes(size)
    try:
        out = decode_indices(EF, data, n, k)
    except CodecError:
        return
    assert out.size == k and (k == 0 or (out[0] >= 0 and out[-1] < n)) and (np.diff(out) > 0).all()
