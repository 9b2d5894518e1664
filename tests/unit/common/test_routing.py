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


def test_the_most_changed_blocks_are_sent_whole_within_the_budget() -> None:
    pending = _state({2: 10.0, 0: 5.0})  # 4 blocks of 12 values and the 2-value mixer: 50 values
    chosen = route(pending, 0.5)  # 25 values: layers 2 and 0 (24); nothing else fits
    assert chosen == {n for n in NAMES if ".layers.2." in n or ".layers.0." in n}
    assert route(pending, 0.01) == {n for n in NAMES if ".layers.2." in n}  # at least one block
    assert route(pending, 0.5) == route(dict(reversed(pending.items())), 0.5)  # order does not matter
    with pytest.raises(ValueError, match="routing fraction"):
        route(pending, 0.0)


def test_the_budget_is_in_values_and_blocks_rank_by_energy_per_value() -> None:
    rng = np.random.default_rng(5)
    big = {"big.lora_A.weight": rng.standard_normal((4, 60)), "big.lora_B.weight": rng.standard_normal((60, 4))}
    small = {f"s{i}.lora_A.weight": 2 * rng.standard_normal((1, 10)) for i in range(6)}
    small |= {f"s{i}.lora_B.weight": 2 * rng.standard_normal((10, 1)) for i in range(6)}
    pending = {k: v.astype(np.float32) for k, v in (big | small).items()}
    total = sum(v.size for v in pending.values())  # 480 + 120
    chosen = route(pending, 0.2)
    # the big block holds the most energy but the least per value: the small ones go first
    assert chosen == set(small)
    assert sum(pending[n].size for n in chosen) <= 0.2 * total


def test_what_is_not_sent_waits_in_the_residual_and_nothing_is_lost() -> None:
    ef = ErrorFeedback(enabled=True)
    spec = EncodingSpec.parse("int8")
    sent_total = {n: np.zeros_like(v, dtype=np.float64) for n, v in _state({}).items()}
    delta_total = {n: np.zeros_like(v, dtype=np.float64) for n, v in _state({}).items()}
    seen: set[str] = set()
    for r in range(6):
        delta = _state({r % 4: 3.0}, seed=r)
        payload = ef.compress(delta, spec, lambda p: route(p, 0.5))
        assert 0 < len(payload.decoded) < len(delta)  # a routed round sends some blocks only
        seen |= set(payload.decoded)
        for n in delta:
            delta_total[n] += delta[n]
            sent_total[n] += payload.decoded.get(n, 0.0)
    for n in delta_total:  # Σ sent + e == Σ Δ, block by block
        np.testing.assert_allclose(sent_total[n] + ef.residual[n], delta_total[n], atol=1e-4)
    assert seen >= set(NAMES) - {"mixer.weight"}  # every block with changes got its turn


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


def test_what_a_job_shares_ffa_b_fedsa_a_and_routing_among_them() -> None:
    from fedquic.common.messages import LoraJobSpec
    from fedquic.common.routing import uplink_selection

    a, b = "m.layers.0.q_proj.lora_A.weight", "m.layers.0.q_proj.lora_B.weight"
    assert LoraJobSpec().shares(a) and LoraJobSpec().shares(b) and LoraJobSpec().shares("mixer.weight")
    ffa, fedsa = LoraJobSpec(freeze_a=True), LoraJobSpec(local_b=True)
    assert not ffa.shares(a) and ffa.shares(b) and ffa.shares("mixer.weight")  # FFA-LoRA: A stays at the init
    assert fedsa.shares(a) and not fedsa.shares(b)  # FedSA-LoRA: B stays on the client
    with pytest.raises(ValueError, match="share nothing"):
        LoraJobSpec(freeze_a=True, local_b=True)
    with pytest.raises(ValueError, match="use federation fedavg"):
        JobTerms(init_seed=0, federation="fedalt", lora=fedsa)
    assert uplink_selection(JobTerms(init_seed=0, lora=ffa)) is None  # no routing: every shared tensor
    pending = _state({0: 5.0, 1: 3.0, 2: 0.1, 3: 0.1})
    shared = {k: v for k, v in pending.items() if ffa.shares(k)}
    select = uplink_selection(JobTerms(init_seed=0, lora=ffa, uplink_routing=0.5))
    assert select is not None
    chosen = select(shared)  # routing among the B factors (and other tensors) only
    assert {"m.layers.0.q_proj.lora_B.weight", "m.layers.1.q_proj.lora_B.weight"} <= chosen <= set(shared)
    assert "m.layers.3.q_proj.lora_B.weight" not in chosen
