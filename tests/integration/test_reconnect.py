"""A client started before its server keeps retrying (exponential backoff with jitter) and then joins."""

from __future__ import annotations

import asyncio
import socket
from pathlib import Path

import pytest
from fedquic.client.config import ClientConfig
from fedquic.client.runner import FederatedClient
from fedquic.common.messages import TrainSpec
from fedquic.server.config import JobConfig, ServerConfig
from fedquic.server.daemon import AggregationServer
from fedquic.server.rounds import RoundPolicy
from fedquic.transport.pki import issue_client_cert
from fedquic.transport.settings import TlsFiles, TransportSettings

pytest.importorskip("bitsandbytes")


def free_udp_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def test_client_started_before_the_server_joins_once_it_is_up(
    tiny_model_dir: Path, dev_pki, tmp_path: Path
) -> None:
    from fedquic.client.peft_learner import PeftLearner, PeftLearnerConfig

    port = free_udp_port()
    clients = []
    for i, task in enumerate(("copy", "sort")):
        cert, key = issue_client_cert(dev_pki, f"early-{i}")
        learner = await asyncio.to_thread(
            PeftLearner, PeftLearnerConfig(model_path=tiny_model_dir, task=task, num_examples=16, threads=1)
        )
        cfg = ClientConfig(
            client_id=f"early-{i}",
            port=port,
            server_name="localhost",
            tls=TlsFiles(ca=dev_pki.ca_cert, cert=cert, key=key),
            run_dir=tmp_path / f"early-{i}",
            transport=TransportSettings(connect_timeout_s=0.5),
            backoff_initial_s=0.2,
        )
        clients.append(FederatedClient(cfg, learner))
    tasks = [asyncio.ensure_future(c.run()) for c in clients]
    await asyncio.sleep(1.5)  # several failed attempts before the server exists
    assert not any(t.done() for t in tasks)
    server = AggregationServer(
        ServerConfig(
            host="127.0.0.1",
            port=port,
            tls=TlsFiles(ca=dev_pki.ca_cert, cert=dev_pki.server_cert, key=dev_pki.server_key),
            policy=RoundPolicy(rounds=1, min_clients=2),
            job=JobConfig(train=TrainSpec(local_steps=2, batch_size=4)),
            run_dir=tmp_path / "server",
        )
    )
    await server.start()
    result, *client_results = await asyncio.wait_for(asyncio.gather(server.run(), *tasks), timeout=120)
    assert result.ok and all(len(r.rounds) == 1 for r in client_results)
