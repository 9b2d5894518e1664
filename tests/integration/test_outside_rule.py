"""An aggregation rule registered from outside the package (a coordinate-wise median) runs a job over real QUIC:
the extension point of fedquic.server.rules, used exactly as a user's plugin would."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest
from fedquic.common.adapter import TensorDict
from fedquic.common.codec import EncodingSpec
from fedquic.common.messages import TrainSpec
from fedquic.server.aggregation import fedavg
from fedquic.server.config import JobConfig
from fedquic.server.rounds import RoundPolicy
from fedquic.server.rules import RoundInputs, Target, get_rule, register_rule

from testkit.synthetic import SyntheticLearner, lora_schema

SCHEMA = lora_schema(layers=2, dim=32, rank=2)


class CoordinateMedian:
    """A robust FedAvg: the per-coordinate median of the contributions (Yin et al. 2018)."""

    name = "test-coordinate-median"
    kind = "global"

    def __init__(self) -> None:
        self.seen: list[tuple[list[TensorDict], TensorDict]] = []

    def targets(self, inp: RoundInputs) -> dict[str, Target]:
        states = [dict(s) for s in inp.states]
        med = {k: np.median(np.stack([s[k] for s in states]), axis=0).astype(np.float32) for k in states[0]}
        self.seen.append((states, med))
        return {cid: Target(lambda: med, "global", len(states)) for cid in inp.recipients}


@pytest.fixture
def median_rule():  # type: ignore[no-untyped-def]
    try:
        rule = get_rule(CoordinateMedian.name)
    except Exception:
        rule = register_rule(CoordinateMedian())
    rule.seen.clear()  # type: ignore[attr-defined]
    return rule


async def test_a_registered_median_rule_aggregates_a_job(median_rule, loopback_server, light_client) -> None:  # type: ignore[no-untyped-def]
    fp32 = EncodingSpec.parse("fp32")
    job = JobConfig(
        federation="fedavg",
        aggregation=median_rule.name,
        uplink=fp32,
        downlink=fp32,
        train=TrainSpec(local_steps=1),
    )
    server = loopback_server(policy=RoundPolicy(rounds=2, min_clients=3), job=job)
    port = await server.start()
    learners = [SyntheticLearner(SCHEMA, seed=i, step_scale=0.1) for i in range(3)]
    try:
        clients = [light_client(f"c{i}", port, lr) for i, lr in enumerate(learners)]
        await asyncio.wait_for(asyncio.gather(*(c.run() for c in clients)), 60)
        assert (await server.run()).ok
    finally:
        await server.close()
    assert len(median_rule.seen) == 2  # the server called the outside rule once per round
    states, med = median_rule.seen[-1]
    mean = fedavg(states, [1.0] * len(states))
    assert any(not np.allclose(med[k], mean[k]) for k in med)  # a median, not the built-in mean
    for lr in learners:  # every client holds the median of the last round as its adapter
        local = lr.local_state()
        for k, v in med.items():
            np.testing.assert_allclose(local[k], v, atol=1e-6)
