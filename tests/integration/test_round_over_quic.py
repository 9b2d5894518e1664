"""A real server and three real clients (4-bit NF4 tiny Llama, peft) over loopback QUIC."""

from __future__ import annotations

import asyncio
from pathlib import Path

import numpy as np
import pytest
from fedquic.client.config import ClientConfig
from fedquic.client.runner import FederatedClient
from fedquic.common.messages import TrainSpec
from fedquic.server.config import JobConfig, ServerConfig
from fedquic.server.daemon import AggregationServer
from fedquic.server.rounds import RoundPolicy
from fedquic.transport.pki import issue_client_cert
from fedquic.transport.settings import TlsFiles

pytest.importorskip("torch")
pytest.importorskip("bitsandbytes")

TASKS = ("copy", "reverse", "sort")


async def run_job(
    model_dir: Path, pki, tmp_path: Path, job: JobConfig, tasks: tuple[str, ...], rounds: int
) -> tuple[list, list[FederatedClient], list]:  # type: ignore[no-untyped-def]
    """Start a real server and one real client per task on loopback; run the job to the end."""
    from fedquic.client.peft_learner import PeftLearner, PeftLearnerConfig

    server = AggregationServer(
        ServerConfig(
            host="127.0.0.1",
            port=0,
            tls=TlsFiles(ca=pki.ca_cert, cert=pki.server_cert, key=pki.server_key),
            policy=RoundPolicy(rounds=rounds, min_clients=len(tasks), round_timeout_s=120),
            job=job,
            run_dir=tmp_path / "server",
        )
    )
    port = await server.start()
    certs = [issue_client_cert(pki, f"c{i}") for i in range(len(tasks))]
    learners = [
        await asyncio.to_thread(
            PeftLearner,
            PeftLearnerConfig(model_path=model_dir, task=t, num_examples=32, data_seed=i, threads=1),
        )
        for i, t in enumerate(tasks)
    ]
    clients = [
        FederatedClient(
            ClientConfig(
                client_id=f"c{i}",
                port=port,
                server_name="localhost",
                tls=TlsFiles(ca=pki.ca_cert, cert=certs[i][0], key=certs[i][1]),
                run_dir=tmp_path / f"c{i}",
            ),
            learner,
        )
        for i, learner in enumerate(learners)
    ]
    for c in clients:
        c.keep_rows = True
    result, *client_results = await asyncio.wait_for(
        asyncio.gather(server.run(), *(c.run() for c in clients)), timeout=240
    )
    assert result.ok and result.rounds_completed == rounds
    return learners, clients, client_results


async def test_one_round_row_is_the_mean_of_the_other_two(tiny_model_dir: Path, dev_pki, tmp_path: Path) -> None:
    job = JobConfig(init_seed=11, train=TrainSpec(local_steps=4, lr=2e-2, batch_size=4))
    learners, clients, client_results = await run_job(tiny_model_dir, dev_pki, tmp_path, job, TASKS, rounds=1)
    assert all(len(r.rounds) == 1 and r.rounds[0].bytes_up > 0 for r in client_results)

    trained = [lr.local_state() for lr in learners]
    checked_b = 0
    for i, client in enumerate(clients):
        row = client.rows_received[1]
        installed = learners[i].fam.row_state()
        for name in row:
            np.testing.assert_array_equal(installed[name], row[name])  # what arrived is what is in the model
        others = [trained[j] for j in range(3) if j != i]
        for name in row:
            expected = (others[0][name] + others[1][name]) / 2
            err = np.abs(row[name] - expected).max()
            # INT8 up and down: each within half a quantization step of the tensor's range
            assert err <= np.abs(expected).max() / 127 + 1e-7, name
            if ".lora_B." in name:  # B starts at zero: the LOO mean is far from the all-client mean
                all_mean = sum(t[name] for t in trained) / 3
                assert err < 0.1 * np.abs(expected - all_mean).max(), name
                checked_b += 1
    assert checked_b > 0
    history = (tmp_path / "server" / "history.jsonl").read_text().splitlines()
    assert len(history) == 1


async def test_sparse_uplink_and_downlink_with_error_feedback_over_quic(
    tiny_model_dir: Path, dev_pki, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """top-k 10% both ways for two rounds: the server's copy plus the client's residual is the client's adapter,
    and each client holds exactly the Rest-of-World adapter the server computed it holds."""
    from fedquic.common.codec import EncodingSpec

    job = JobConfig(
        train=TrainSpec(local_steps=3, lr=2e-2, batch_size=4),
        uplink=EncodingSpec.parse("topk10"),
        downlink=EncodingSpec.parse("topk10"),
    )
    with caplog.at_level("INFO"):
        learners, clients, results = await run_job(tiny_model_dir, dev_pki, tmp_path, job, TASKS[:2], rounds=2)
    assert "the server expected" not in caplog.text  # every ACKed aggregate hash matched the server's
    assert all(r.rounds[-1].bytes_down > 0 for r in results)
    # Both directions carry compact manifests and Elias–Fano positions: ~17x here, ~7x with the full manifest
    # (8 tensors of 512 values, where per-tensor names and offsets would outweigh the body).
    for r in results:
        assert all(x.fp32_up / x.bytes_up > 12 and x.fp32_down / x.bytes_down > 12 for x in r.rounds), r.rounds
    for client, learner in zip(clients, learners, strict=True):
        local = learner.local_state()
        assert client.ef.residual_norm() > 0  # top-k really dropped something this round
        for name, value in local.items():
            # the client checked every ACK's hash, so ``view`` is exactly the server's copy
            np.testing.assert_allclose(client.view[name] + client.ef.residual[name], value, atol=1e-6)
        row = learner.fam.row_state()
        assert all(np.array_equal(row[k], client.held["row"][k]) for k in row)
        assert any(np.abs(v).max() > 0 for v in row.values())


async def test_exact_row_mode_with_two_clients_hands_over_the_other_product(
    tiny_model_dir: Path, dev_pki, tmp_path: Path
) -> None:
    job = JobConfig(train=TrainSpec(local_steps=3, lr=2e-2, batch_size=4), row_mode="exact", clip_norm=100.0)
    learners, clients, _ = await run_job(tiny_model_dir, dev_pki, tmp_path, job, TASKS[:2], rounds=1)
    trained = [lr.local_state() for lr in learners]
    for i, client in enumerate(clients):
        row, other = client.rows_received[1], trained[1 - i]
        for name in row:
            if ".lora_A." not in name:
                continue
            b_name = name.replace(".lora_A.", ".lora_B.")
            got = row[b_name].astype(np.float64) @ row[name].astype(np.float64)
            want = other[b_name].astype(np.float64) @ other[name].astype(np.float64)
            assert np.linalg.norm(got - want) <= 0.05 * np.linalg.norm(want), name  # INT8 both ways
