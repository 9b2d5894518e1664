"""A federated job through a UDP chaos relay (loss, delay, reordering, duplication, corruption): rounds complete and
every update arrives bit-exact (the server's copy of each client's adapter hashes equal to the client's own)."""

from __future__ import annotations

import asyncio
import json

import pytest
from fedquic.common.codec import EncodingSpec
from fedquic.common.messages import TrainSpec
from fedquic.server.config import JobConfig
from fedquic.server.rounds import RoundPolicy
from fedquic.transport.settings import TransportSettings

from testkit.chaos import ChaosRelay, Faults
from testkit.synthetic import SyntheticLearner, lora_schema

pytestmark = [pytest.mark.reliability, pytest.mark.usefixtures("quic_backend")]  # each test once per QUIC backend

CASES = {
    "loss5-delay50-reorder1": Faults(loss=0.05, delay_ms=25, jitter_ms=5, reorder=0.01, duplicate=0.01, corrupt=0.005),
    "loss10-delay100-reorder1": Faults(loss=0.10, delay_ms=50, jitter_ms=10, reorder=0.01),
}


@pytest.mark.parametrize("case", list(CASES))
async def test_a_job_through_a_lossy_relay_completes_bit_exact(loopback_server, light_client, tmp_path, case) -> None:
    schema = lora_schema(layers=2, dim=256, rank=8)  # ~65 KB fp32 per update: many datagrams each way
    server = loopback_server(
        policy=RoundPolicy(rounds=3, min_clients=2, round_timeout_s=120),
        job=JobConfig(
            train=TrainSpec(local_steps=1), uplink=EncodingSpec.parse("fp32"), downlink=EncodingSpec.parse("int8")
        ),
    )
    port = await server.start()
    relay = ChaosRelay(("127.0.0.1", port), CASES[case], seed=7)
    relay_port = await relay.start()
    clients = [
        light_client(
            f"lossy-{case}-{i}",
            relay_port,
            SyntheticLearner(schema, seed=i),
            transport=TransportSettings(connect_timeout_s=10),
        )
        for i in range(2)
    ]
    try:
        result, *_ = await asyncio.wait_for(asyncio.gather(server.run(), *(c.run() for c in clients)), timeout=240)
    finally:
        relay.close()
    assert result.ok and result.rounds_completed == 3
    assert relay.stats.dropped > 0 and relay.stats.by_direction["up"] > 0 and relay.stats.by_direction["down"] > 0
    for c in clients:
        meta = json.loads((tmp_path / "server" / "state" / "clients" / c.cfg.client_id / "meta.json").read_text())
        assert meta["view_hash"] == c.view_hash  # every update applied exactly as the client encoded it
        assert sorted(int(r) for r in meta["updates"]) == [1, 2, 3]
