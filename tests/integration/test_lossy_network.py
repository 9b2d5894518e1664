"""A federated job through a UDP chaos relay (loss, delay, reordering, duplication, corruption): rounds complete and
every update arrives bit-exact (the server's copy of each client's adapter hashes equal to the client's own)."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest
from fedquic.client.app import ClientConfig, FederatedClient
from fedquic.common.codec import EncodingSpec
from fedquic.common.messages import TrainSpec
from fedquic.server.app import AggregationServer
from fedquic.server.config import JobConfig, MetricsSettings, ServerConfig
from fedquic.server.rounds import RoundPolicy
from fedquic.transport.pki import issue_client_cert
from fedquic.transport.settings import TlsFiles, TransportSettings

from fedquic.chaos import ChaosRelay, Faults
from fedquic.synthetic import SyntheticLearner, lora_schema

pytestmark = pytest.mark.reliability

CASES = {
    "loss5-delay50-reorder1": Faults(loss=0.05, delay_ms=25, jitter_ms=5, reorder=0.01, duplicate=0.01, corrupt=0.005),
    "loss10": Faults(loss=0.10, delay_ms=5, reorder=0.01),
}


@pytest.mark.parametrize("case", list(CASES))
async def test_a_job_through_a_lossy_relay_completes_bit_exact(dev_pki, tmp_path: Path, case: str) -> None:
    schema = lora_schema(layers=2, dim=256, rank=8)  # ~65 KB fp32 per update: many datagrams each way
    server = AggregationServer(
        ServerConfig(
            host="127.0.0.1",
            port=0,
            tls=TlsFiles(ca=dev_pki.ca_cert, cert=dev_pki.server_cert, key=dev_pki.server_key),
            policy=RoundPolicy(rounds=3, min_clients=2, round_timeout_s=120),
            job=JobConfig(
                train=TrainSpec(local_steps=1), uplink=EncodingSpec.parse("fp32"), downlink=EncodingSpec.parse("int8")
            ),
            metrics=MetricsSettings(enabled=False),
            run_dir=tmp_path / "server",
        )
    )
    port = await server.start()
    relay = ChaosRelay(("127.0.0.1", port), CASES[case], seed=7)
    relay_port = await relay.start()
    clients = []
    for i in range(2):
        cid = f"lossy-{case}-{i}"
        cert, key = issue_client_cert(dev_pki, cid)
        cfg = ClientConfig(
            client_id=cid,
            port=relay_port,
            server_name="localhost",
            tls=TlsFiles(ca=dev_pki.ca_cert, cert=cert, key=key),
            transport=TransportSettings(connect_timeout_s=10),
            run_dir=tmp_path / cid,
        )
        clients.append(FederatedClient(cfg, SyntheticLearner(schema, seed=i)))
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
