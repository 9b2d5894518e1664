"""Uplink error feedback on and off (``JobConfig.uplink_error_feedback``, sent in WELCOME) through a real server.

With EF the client's view of its adapter as the server holds it plus the carried residual is exactly its local
adapter; without it nothing is carried and whatever top-k dropped never reaches the server.
"""

from __future__ import annotations

import asyncio

import numpy as np
import pytest
from fedquic.common.codec import EncodingSpec
from fedquic.common.messages import TrainSpec
from fedquic.server.config import JobConfig
from fedquic.server.rounds import RoundPolicy

from testkit.synthetic import SyntheticLearner, lora_schema


@pytest.mark.parametrize("ef", [True, False])
async def test_uplink_error_feedback_switch(loopback_server, light_client, ef: bool) -> None:
    schema = lora_schema(layers=2, dim=64, rank=4)
    server = loopback_server(
        policy=RoundPolicy(rounds=3, min_clients=2),
        job=JobConfig(
            train=TrainSpec(local_steps=1),
            uplink=EncodingSpec.parse("topk1"),
            uplink_error_feedback=ef,
            downlink_error_feedback=ef,
        ),
    )
    port = await server.start()
    learners = [SyntheticLearner(schema, seed=i) for i in range(2)]
    clients = [light_client(f"ef-{ef}-{i}", port, lr) for i, lr in enumerate(learners)]
    result, *_ = await asyncio.wait_for(asyncio.gather(server.run(), *(c.run() for c in clients)), timeout=60)
    assert result.ok and result.rounds_completed == 3
    for client, learner in zip(clients, learners, strict=True):
        local = learner.local_state()
        gap = sum(float(np.abs(local[k] - client.view[k]).sum()) for k in local)
        assert gap > 0  # top-k 1% leaves most of every delta unsent
        if ef:
            for k in local:
                np.testing.assert_allclose(client.view[k] + client.ef.residual[k], local[k], rtol=0, atol=1e-5)
            assert client.ef.residual_norm() > 0
        else:
            assert client.ef.residual == {}  # nothing carried: the dropped part is lost
