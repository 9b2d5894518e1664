"""Aggregation across LoRA ranks (server/ranks.py): zero-padding (HetLoRA) and SVD re-projection (FlexLoRA)."""

from __future__ import annotations

import numpy as np
import pytest
from fedquic.common.errors import JobError
from fedquic.server.aggregation import product_rel_error
from fedquic.server.ranks import pad_to_rank, padded_mean, rank_of, reprojected_mean, truncate_to_rank

A, B = "m.q_proj.lora_A.weight", "m.q_proj.lora_B.weight"


def _state(rank: int, rng: np.random.Generator, dim: int = 24) -> dict[str, np.ndarray]:
    return {
        A: rng.standard_normal((rank, dim)).astype(np.float32),
        B: rng.standard_normal((dim, rank)).astype(np.float32),
    }


def test_padding_keeps_the_product_and_truncation_undoes_it() -> None:
    s = _state(4, np.random.default_rng(0))
    p = pad_to_rank(s, 16)
    assert rank_of(p) == 16 and p[A].shape == (16, 24) and p[B].shape == (24, 16)
    np.testing.assert_allclose(p[B] @ p[A], s[B] @ s[A], rtol=1e-5, atol=1e-5)  # float32 sums, reordered
    back = truncate_to_rank(p, 4)
    np.testing.assert_array_equal(back[A], s[A])
    np.testing.assert_array_equal(back[B], s[B])
    with pytest.raises(JobError, match="above the padded rank"):
        pad_to_rank(p, 8)


def test_reprojection_is_the_exact_mean_when_the_rank_allows_and_beats_padding_when_it_does_not() -> None:
    rng = np.random.default_rng(1)
    states = [_state(r, rng) for r in (4, 8, 16)]
    w = [1.0, 2.0, 1.0]
    coeffs = [x / 4 for x in w]
    full = reprojected_mean(states, w, rank=28)  # 4 + 8 + 16 components span the whole mean
    assert product_rel_error(full, states, coeffs) < 1e-5
    for r in (4, 8, 16):  # each recipient at its own rank: SVD's best rank-r error is below the padded mean's
        svd = product_rel_error(reprojected_mean(states, w, rank=r), states, coeffs)
        pad = product_rel_error(truncate_to_rank(padded_mean(states, w), r), states, coeffs)
        assert rank_of(reprojected_mean(states, w, rank=r)) == r
        assert svd < pad


def test_the_padded_mean_is_the_mean_of_the_padded_factors_and_checks_ranks() -> None:
    rng = np.random.default_rng(2)
    s4, s8 = _state(4, rng), _state(8, rng)
    mean = padded_mean([s4, s8], [1.0, 3.0])
    np.testing.assert_allclose(mean[A][:4], 0.25 * s4[A] + 0.75 * s8[A][:4], rtol=1e-6)
    np.testing.assert_allclose(mean[A][4:], 0.75 * s8[A][4:], rtol=1e-6)  # the rank-4 client adds zeros there
    with pytest.raises(JobError, match="disagree on their rank"):
        rank_of({**s4, "n.lora_A.weight": s8[A], "n.lora_B.weight": s8[B]})
