"""Shared helpers of the integration tests."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from fedquic.server.history import read_history_dicts

OneRound = Callable[..., Awaitable[list[Any]]]


@pytest.fixture
def one_round(dev_pki: Any) -> OneRound:
    """``await one_round(model_dir, [data.jsonl, ...], tmp, job={...}, **learner_fields)``: one round (by
    default FedALT, learned mixer, fp32; ``job`` overrides JobConfig fields) between one real client per data
    file and a real server over loopback QUIC. Checks that every client's base-model and post-aggregate
    held-out figures reached the server's history; returns the learners."""
    from fedquic.client.config import ClientConfig
    from fedquic.client.runner import FederatedClient
    from fedquic.common.messages import LoraJobSpec, TrainSpec
    from fedquic.server.config import JobConfig, ServerConfig
    from fedquic.server.daemon import AggregationServer
    from fedquic.server.rounds import RoundPolicy
    from fedquic.transport.pki import issue_client_cert
    from fedquic.transport.settings import TlsFiles

    pki = dev_pki

    async def run(
        model_dir: Path, data: list[Path], tmp: Path, *, job: dict | None = None, **learner: Any
    ) -> list[Any]:
        from fedquic.client.peft_learner import PeftLearner, PeftLearnerConfig

        server = AggregationServer(
            ServerConfig(
                host="127.0.0.1",
                port=0,
                tls=TlsFiles(ca=pki.ca_cert, cert=pki.server_cert, key=pki.server_key),
                policy=RoundPolicy(rounds=1, min_clients=len(data), round_timeout_s=120),
                job=JobConfig(
                    init_seed=3,
                    mixer="learned",
                    lora=LoraJobSpec(rank=4),
                    train=TrainSpec(local_steps=2, lr=5e-2, batch_size=4),
                    uplink="fp32",
                    downlink="fp32",
                    **(job or {}),
                ),
                run_dir=tmp / "server",
            )
        )
        port = await server.start()
        learners, clients = [], []
        for i, path in enumerate(data):
            cert, key = issue_client_cert(pki, f"c{i}")
            fields = {"threads": 1, "progress": False, **learner}
            cfg = PeftLearnerConfig(model_path=model_dir, data_path=path, data_seed=i, **fields)
            learners.append(await asyncio.to_thread(PeftLearner, cfg))
            clients.append(
                FederatedClient(
                    ClientConfig(
                        client_id=f"c{i}",
                        port=port,
                        server_name="localhost",
                        tls=TlsFiles(ca=pki.ca_cert, cert=cert, key=key),
                        run_dir=tmp / f"c{i}",
                    ),
                    learners[-1],
                )
            )
        result, *_ = await asyncio.wait_for(asyncio.gather(server.run(), *(c.run() for c in clients)), timeout=240)
        assert result.ok and result.rounds_completed == 1
        history = read_history_dicts(tmp / "server" / "history.jsonl")
        # The held-out figures of the base model and after the aggregate reached the server's history.
        for cid in (f"c{i}" for i in range(len(data))):
            stats = history[0]["clients"][cid]
            assert stats["bytes_up"] > 0 and "loss_eval" in stats and "base_loss_eval" in stats, stats
            assert stats.get("eval_final") == 1.0  # the last round is measured on the whole held-out set
        return learners

    return run
