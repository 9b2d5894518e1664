"""Layerwise routing (common/routing.py) and what error feedback does with the blocks it does not send."""

from __future__ import annotations

import numpy as np
import pytest
from fedquic.common.adapter import AdapterSchema, SchemaMismatchError, TensorSpec
from fedquic.common.codec import EncodingSpec, encode_tensors
from fedquic.common.feedback import ErrorFeedback
from fedquic.common.messages import JobTerms
from fedquic.common.routing import block_of, blocks, route

NAMES = [f"m.layers.{i}.q_proj.lora_{f}.weight" for i in range(4) for f in "AB"] + ["mixer.weight"]


def _state(scale: dict[int, float], seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    out = {n: rng.standard_normal((2, 3)).astype(np.float32) * scale.get(int(n.split(".")[2]), 1.0) for n in NAMES[:-1]}
    out["mixer.weight"] = np.full(2, 0.01, np.float32)
    return out


def test_a_modules_factors_are_one_block_and_other_tensors_their_own() -> None:
    assert (
        block_of("m.layers.0.q_proj.lora_A.weight")
        == block_of("m.layers.0.q_proj.lora_B.weight")
        == ("m.layers.0.q_proj")
    )
    groups = blocks(NAMES)
    assert len(groups) == 5 and groups["mixer.weight"] == ["mixer.weight"]


def test_the_most_changed_blocks_are_sent_whole() -> None:
    pending = _state({2: 10.0, 0: 5.0})
    chosen = route(pending, 0.4)  # ceil(0.4 x 5 blocks) = 2
    assert chosen == {n for n in NAMES if ".layers.2." in n or ".layers.0." in n}
    assert route(pending, 0.01) == {n for n in NAMES if ".layers.2." in n}  # at least one block
    assert route(pending, 0.4) == route(dict(reversed(pending.items())), 0.4)  # order does not matter
    with pytest.raises(ValueError, match="routing fraction"):
        route(pending, 0.0)


def test_what_is_not_sent_waits_in_the_residual_and_nothing_is_lost() -> None:
    ef = ErrorFeedback(enabled=True)
    spec = EncodingSpec.parse("int8")
    sent_total = {n: np.zeros_like(v, dtype=np.float64) for n, v in _state({}).items()}
    delta_total = {n: np.zeros_like(v, dtype=np.float64) for n, v in _state({}).items()}
    seen: set[str] = set()
    for r in range(6):
        delta = _state({r % 4: 3.0}, seed=r)
        payload = ef.compress(delta, spec, lambda p: route(p, 0.4))
        assert 0 < len(payload.decoded) < len(delta)  # a routed round sends some blocks only
        seen |= set(payload.decoded)
        for n in delta:
            delta_total[n] += delta[n]
            sent_total[n] += payload.decoded.get(n, 0.0)
    for n in delta_total:  # Σ sent + e == Σ Δ, block by block
        np.testing.assert_allclose(sent_total[n] + ef.residual[n], delta_total[n], atol=1e-4)
    assert seen == set(NAMES) - {"mixer.weight"}  # every block with changes got its turn


def test_routing_without_error_feedback_is_refused() -> None:
    with pytest.raises(ValueError, match="needs uplink_error_feedback"):
        JobTerms(init_seed=1, uplink_routing=0.5, uplink_error_feedback=False)
    with pytest.raises(ValueError, match="would drop"):
        ErrorFeedback(enabled=False).compress(_state({}), EncodingSpec(), lambda p: route(p, 0.5))
    assert JobTerms(init_seed=1, uplink_routing=0.5).uplink_routing == 0.5


def test_a_routed_manifest_may_name_some_tensors_but_no_unknown_ones() -> None:
    schema = AdapterSchema(tensors=tuple(TensorSpec(name=n, shape=(2, 3)) for n in NAMES[:-1]))
    part = {n: np.zeros((2, 3), np.float32) for n in NAMES[:2]}
    manifest, _ = encode_tensors(part)
    schema.check_manifest(manifest, subset=True)
    with pytest.raises(SchemaMismatchError, match="tensor names differ"):
        schema.check_manifest(manifest)  # an unrouted job's UPDATE carries every tensor
    stray, _ = encode_tensors({**part, "m.layers.9.q_proj.lora_A.weight": np.zeros((2, 3), np.float32)})
    with pytest.raises(SchemaMismatchError, match="unexpected"):
        schema.check_manifest(stray, subset=True)
    empty, _ = encode_tensors({})
    with pytest.raises(SchemaMismatchError):
        schema.check_manifest(empty, subset=True)
