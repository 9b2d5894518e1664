"""Admission control over real QUIC: the server grants upload slots, so no more clients upload at once than it
allows, and every round still completes."""

from __future__ import annotations

import asyncio

import pytest
from fedquic.common.codec import EncodingSpec
from fedquic.common.messages import TrainSpec
from fedquic.server.config import JobConfig
from fedquic.server.rounds import RoundPolicy

from testkit.synthetic import SyntheticLearner, lora_schema


@pytest.mark.parametrize("slots", [1, 3])
async def test_upload_slots_bound_concurrent_uploads(loopback_server, light_client, slots: int) -> None:
    schema = lora_schema(layers=4, dim=512, rank=16)  # ~0.5 MB fp32 per update: uploads overlap without slots
    server = loopback_server(
        policy=RoundPolicy(rounds=2, min_clients=3),
        job=JobConfig(train=TrainSpec(local_steps=1), uplink=EncodingSpec.parse("fp32")),
        upload_slots=slots,
    )
    port = await server.start()
    clients = [light_client(f"slot-{slots}-{i}", port, SyntheticLearner(schema, seed=i)) for i in range(3)]
    result, *_ = await asyncio.wait_for(asyncio.gather(server.run(), *(c.run() for c in clients)), timeout=120)
    assert result.ok and result.rounds_completed == 2
    m = server.metrics
    assert m.updates_accepted == 6
    assert 1 <= m.uploads_in_flight_max <= slots
    assert m.uploads_in_flight == 0 and m.uploads_waiting == 0  # every slot released
