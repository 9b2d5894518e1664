"""The server's answers to the correctness items of the hardening issue, over real loopback QUIC: honoured HELLO
encodings, JOB_ENDED at once, a finished run directory, upload figures that survive a crash, and a client whose
held aggregate differs from the server's record."""

from __future__ import annotations

import asyncio
import shutil
import threading

import pytest
from fedquic.client.runner import FederatedClient
from fedquic.common.adapter import state_hash
from fedquic.common.codec import Encoding, EncodingSpec
from fedquic.common.errors import ErrorCode
from fedquic.common.messages import SUPPORTED_VERSIONS, Error, Hello, TrainSpec
from fedquic.server.config import JobConfig
from fedquic.server.daemon import AggregationServer
from fedquic.server.history import read_history_dicts
from fedquic.server.rounds import RoundPolicy
from fedquic.transport.aio import connect_peer
from fedquic.transport.pki import issue_client_cert
from fedquic.transport.settings import TlsFiles, TransportSettings

from testkit.synthetic import SyntheticLearner, lora_schema

pytestmark = pytest.mark.reliability

SCHEMA = lora_schema(layers=1, dim=32, rank=2)


async def hello_answer(dev_pki, port: int, cid: str, encodings: tuple[Encoding, ...]) -> Error:  # type: ignore[no-untyped-def]
    cert, key = issue_client_cert(dev_pki, cid)
    tls = TlsFiles(ca=dev_pki.ca_cert, cert=cert, key=key)
    async with connect_peer("127.0.0.1", port, TransportSettings(connect_timeout_s=5), tls, "localhost") as peer:
        peer.send(
            Hello(versions=SUPPORTED_VERSIONS, client_id=cid, base_fingerprint="ab", num_samples=1, encodings=encodings)
        )
        h = (await peer.recv(timeout=5)).header
        assert isinstance(h, Error), h
        await asyncio.wait_for(peer.closed.wait(), 5)
        return h


async def test_hello_encodings_are_honoured(dev_pki, loopback_server) -> None:  # type: ignore[no-untyped-def]
    server = loopback_server(job=JobConfig(downlink=EncodingSpec.parse("topk10")))
    port = await server.start()
    try:
        err = await hello_answer(dev_pki, port, "old-peer", (Encoding.FP32, Encoding.INT8))
        assert err.code == ErrorCode.UNSUPPORTED_ENCODING and "topk" in err.message
        assert "old-peer" not in server.clients
        status = server.status()  # what `fedquic status` and /status show
        assert status["buffered_bytes"] == 0 and status["reserved_bytes"] == 0 and status["connections_refused"] == 0
    finally:
        await server.close()


async def run_job(server, light_client, port: int, n: int = 2, **cfg: object) -> list[FederatedClient]:  # type: ignore[no-untyped-def]
    clients = [light_client(f"c{i}", port, SyntheticLearner(SCHEMA, seed=i), **cfg) for i in range(n)]
    await asyncio.wait_for(asyncio.gather(*(c.run() for c in clients)), 60)
    return clients


async def test_a_client_that_arrives_after_the_end_learns_it_at_once(dev_pki, loopback_server, light_client) -> None:  # type: ignore[no-untyped-def]
    server = loopback_server(policy=RoundPolicy(rounds=1, min_clients=2), job=JobConfig(train=TrainSpec(local_steps=1)))
    port = await server.start()
    try:
        await run_job(server, light_client, port)
        assert server._done is not None and server._done.done()
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        err = await hello_answer(dev_pki, port, "late", tuple(Encoding))
        assert err.code == ErrorCode.JOB_ENDED and loop.time() - t0 < 3.0
    finally:
        await server.close()


async def test_a_finished_run_directory_exits_or_starts_a_new_job(loopback_server, light_client) -> None:  # type: ignore[no-untyped-def]
    policy = RoundPolicy(rounds=1, min_clients=2)
    first = loopback_server(policy=policy)
    port = await first.start()
    await run_job(first, light_client, port)
    assert (await first.run()).ok
    run_dir = first.cfg.run_dir
    # "exit" (the default): nothing to resume, says so and ends at once without a round
    again = loopback_server(policy=policy)
    await again.start()
    result = await asyncio.wait_for(again.run(), 10)
    assert result.ok and result.rounds_completed == 1
    # "restart": the finished job moves aside and a new one runs in the same directory
    fresh = loopback_server(policy=policy, on_finished="restart")
    port = await fresh.start()
    await run_job(fresh, light_client, port)
    result = await fresh.run()
    assert result.ok and result.rounds_completed == 1
    [archived] = run_dir.glob("state.finished-*")
    assert (archived / "job.json").is_file() and (archived / "history.jsonl").is_file()
    assert len((run_dir / "history.jsonl").read_text().splitlines()) == 1  # the new job's round only


async def test_upload_figures_survive_a_server_crash_after_the_ack(loopback_server, light_client, tmp_path) -> None:  # type: ignore[no-untyped-def]
    policy = RoundPolicy(rounds=1, min_clients=2, round_timeout_s=60)
    server = loopback_server(policy=policy, job=JobConfig(train=TrainSpec(local_steps=1)))
    port = await server.start()
    gate = threading.Event()  # c1 does not train round 1: the round stays open after c0's update is acknowledged
    learners = [SyntheticLearner(SCHEMA, seed=0), SyntheticLearner(SCHEMA, seed=1, gates={1: gate})]
    clients = [light_client(f"c{i}", port, lr) for i, lr in enumerate(learners)]
    tasks = [asyncio.ensure_future(c.run()) for c in clients]
    crashed = tmp_path / "crashed"
    try:
        for _ in range(200):
            rec = server.records.get("c0")
            if rec is not None and 1 in rec.disk.updates:
                break
            await asyncio.sleep(0.05)
        assert 1 in server.records["c0"].disk.updates
        # a crash right after the ACK: what survives is what is on disk now (every commit is fsynced)
        shutil.copytree(server.cfg.run_dir, crashed)
    finally:
        gate.set()
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await server.close()
    assert not (crashed / "history.jsonl").exists()  # the round had not closed
    restarted = AggregationServer(server.cfg.model_copy(update={"run_dir": crashed}))
    restarted._restore()
    restarted._write_history(1, ["c0"], 0.0, 0.0)  # what its round close writes
    [row] = read_history_dicts(crashed / "history.jsonl")
    figures = row["clients"]["c0"]
    assert figures["bytes_up"] > 0 and figures["fp32_up"] > 0 and "loss_after" in figures and "round_s" in figures


class CorruptingClient(FederatedClient):
    """Flips one byte of the first delta AGGREGATE it receives: it then holds (and acknowledges) something else."""

    corrupted = 0

    async def _install(self, h, body, **kw):  # type: ignore[no-untyped-def]
        if h.delta and not self.corrupted:
            self.corrupted += 1
            body = bytearray(body)
            body[-1] ^= 0x55
        return await super()._install(h, body, **kw)  # what it installed: the session acknowledges its hash


async def test_a_wrong_aggregate_ack_leads_to_a_dense_reset(dev_pki, loopback_server, light_client) -> None:  # type: ignore[no-untyped-def]
    spec = EncodingSpec.parse("int8+nolz4")
    server = loopback_server(
        policy=RoundPolicy(rounds=3, min_clients=2, round_timeout_s=30),
        job=JobConfig(train=TrainSpec(local_steps=1), uplink=spec, downlink=spec),
    )
    port = await server.start()
    good = light_client("c0", port, SyntheticLearner(SCHEMA, seed=0), backoff_initial_s=0.1)
    bad_base = light_client("c1", port, SyntheticLearner(SCHEMA, seed=1), backoff_initial_s=0.1)
    bad = CorruptingClient(bad_base.cfg, bad_base.learner)
    results = await asyncio.wait_for(asyncio.gather(server.run(), good.run(), bad.run()), 90)
    assert results[0].ok and results[0].rounds_completed == 3
    assert bad.corrupted == 1 and bad.joins == 2  # it was made to rejoin once
    assert server.metrics.rejected.get("CONFLICTING_UPDATE") == 1
    # after the reset it holds exactly what the server recorded, round after round
    assert state_hash(bad.held["row"]) == server.records["c1"].disk.held_hash["row"]


async def test_a_first_join_claiming_a_huge_adapter_fixes_nothing(dev_pki, loopback_server) -> None:  # type: ignore[no-untyped-def]
    """The first JOIN fixes the job's schema and the server builds the initial adapter from it: a schema of
    65536 x 65536 (16 GiB fp32) is refused before any allocation, and neither it nor its model becomes the job's."""
    from fedquic.common.adapter import AdapterSchema, TensorSpec
    from fedquic.common.messages import Join, Welcome

    server = loopback_server()
    port = await server.start()
    try:
        cert, key = issue_client_cert(dev_pki, "huge")
        tls = TlsFiles(ca=dev_pki.ca_cert, cert=cert, key=key)
        async with connect_peer("127.0.0.1", port, TransportSettings(connect_timeout_s=5), tls, "localhost") as peer:
            peer.send(Hello(versions=SUPPORTED_VERSIONS, client_id="huge", base_fingerprint="bad0", num_samples=1))
            assert isinstance((await peer.recv(timeout=5)).header, Welcome)
            huge = AdapterSchema(tensors=(TensorSpec(name="x.lora_A.weight", shape=(65536, 65536)),))
            peer.send(Join(adapter=huge))
            h = (await peer.recv(timeout=5)).header
            assert isinstance(h, Error) and h.code == ErrorCode.LIMIT_EXCEEDED
        assert server.schema is None and server.base_fingerprint is None
    finally:
        await server.close()
