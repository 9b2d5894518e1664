"""Clients that write their checkpoints in the background (``checkpoint_in_background``): over real loopback QUIC
the job completes, and what each client left on disk is exactly what the server records it holds."""

from __future__ import annotations

import asyncio

from fedquic.client.checkpointer import BackgroundCheckpoints
from fedquic.client.state import StateStore
from fedquic.common.adapter import state_hash
from fedquic.common.messages import TrainSpec
from fedquic.server.config import JobConfig
from fedquic.server.rounds import RoundPolicy

from testkit.synthetic import SyntheticLearner, lora_schema

SCHEMA = lora_schema(layers=4, dim=256, rank=8)


async def test_background_checkpoints_end_the_job_with_what_the_server_records(
    loopback_server, light_client, tmp_path
) -> None:
    server = loopback_server(
        policy=RoundPolicy(rounds=3, min_clients=2, round_timeout_s=60),
        job=JobConfig(train=TrainSpec(local_steps=1)),
    )
    port = await server.start()
    clients = [
        light_client(f"bg-{i}", port, SyntheticLearner(SCHEMA, seed=i), checkpoint_in_background=True) for i in range(2)
    ]
    assert all(isinstance(c.work.checkpoints, BackgroundCheckpoints) for c in clients)
    result, *_ = await asyncio.wait_for(asyncio.gather(server.run(), *(c.run() for c in clients)), timeout=120)
    assert result.ok and result.rounds_completed == 3
    for c in clients:
        ckpt = c.work.checkpoints
        assert isinstance(ckpt, BackgroundCheckpoints) and ckpt.written >= 3  # at least one per round
        state = StateStore(tmp_path / c.cfg.client_id / "state").load()
        rec = server.records[c.cfg.client_id]
        assert state is not None and state.round == 3
        assert state.view_hash == rec.view_hash == c.view_hash
        assert state_hash(state.held["row"]) == rec.disk.held_hash["row"]
