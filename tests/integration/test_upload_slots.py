"""Admission control over real QUIC: the server grants upload slots, so no more clients upload at once than it
allows, and every round still completes."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from fedquic.client.app import ClientConfig, FederatedClient
from fedquic.common.codec import EncodingSpec
from fedquic.common.messages import TrainSpec
from fedquic.server.app import AggregationServer
from fedquic.server.config import JobConfig, MetricsSettings, ServerConfig
from fedquic.server.rounds import RoundPolicy
from fedquic.transport.pki import issue_client_cert
from fedquic.transport.settings import TlsFiles

from fedquic.synthetic import SyntheticLearner, lora_schema


@pytest.mark.parametrize("slots", [1, 3])
async def test_upload_slots_bound_concurrent_uploads(dev_pki, tmp_path: Path, slots: int) -> None:
    schema = lora_schema(layers=4, dim=512, rank=16)  # ~0.5 MB fp32 per update: uploads overlap without slots
    server = AggregationServer(
        ServerConfig(
            host="127.0.0.1",
            port=0,
            tls=TlsFiles(ca=dev_pki.ca_cert, cert=dev_pki.server_cert, key=dev_pki.server_key),
            policy=RoundPolicy(rounds=2, min_clients=3),
            job=JobConfig(train=TrainSpec(local_steps=1), uplink=EncodingSpec.parse("fp32")),
            metrics=MetricsSettings(enabled=False),
            upload_slots=slots,
            run_dir=tmp_path / "server",
        )
    )
    port = await server.start()
    clients = []
    for i in range(3):
        cid = f"slot-{slots}-{i}"
        cert, key = issue_client_cert(dev_pki, cid)
        cfg = ClientConfig(
            client_id=cid,
            port=port,
            server_name="localhost",
            tls=TlsFiles(ca=dev_pki.ca_cert, cert=cert, key=key),
            run_dir=tmp_path / cid,
        )
        clients.append(FederatedClient(cfg, SyntheticLearner(schema, seed=i)))
    result, *_ = await asyncio.wait_for(asyncio.gather(server.run(), *(c.run() for c in clients)), timeout=120)
    assert result.ok and result.rounds_completed == 2
    m = server.metrics
    assert m.updates_accepted == 6
    assert 1 <= m.uploads_in_flight_max <= slots
    assert m.uploads_in_flight == 0 and m.uploads_waiting == 0  # every slot released
