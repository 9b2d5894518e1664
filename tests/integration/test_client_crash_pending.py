"""A client whose UPDATE was never acknowledged (its connection dropped, or its process was killed, after it
trained and before the ACK) is handed the open round again: it must train it once from the state it had at the
round's start, never a second time on top of its first training."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from fedquic.common.adapter import TensorDict, init_lora_state
from fedquic.common.codec import EncodingSpec
from fedquic.common.errors import ErrorCode
from fedquic.common.messages import TrainSpec
from fedquic.server.config import JobConfig
from fedquic.server.daemon import AggregationServer
from fedquic.server.rounds import RoundPolicy
from fedquic.transport.pki import issue_client_cert

from testkit.synthetic import SyntheticLearner, lora_schema

pytestmark = pytest.mark.reliability


def client_proc(
    pki_root: Path, port: int, cid: str, run_dir: Path, log: Path, seed: int, *extra: str
) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "testkit.synthetic", "--client-id", cid, "--server", f"127.0.0.1:{port}"]
    cmd += ["--certs", str(pki_root), "--run-dir", str(run_dir), "--seed", str(seed), *extra]
    return subprocess.Popen(
        cmd, stdout=log.open("ab"), stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"}
    )


def trained_once_per_round(seed: int, rounds: int, init_seed: int = 0) -> TensorDict:
    """The synthetic learner's adapter after training each round exactly once (its steps are seeded by round)."""
    schema = lora_schema(2, 64, 4)  # testkit.synthetic's defaults
    learner = SyntheticLearner(schema, seed=seed)
    learner.set_local_state(init_lora_state(schema, init_seed))
    for r in range(1, rounds + 1):
        learner.train(r, TrainSpec(local_steps=1))
    return learner.local_state()


def withhold_grant(server: AggregationServer, cid: str, round_: int) -> asyncio.Event:
    """Make the server sit on ``cid``'s upload request for ``round_`` (set when it arrived): the client has
    trained and encoded its update, and waits for a slot that never comes. Only the first request is held."""
    asked = asyncio.Event()
    grant = server._grant

    async def never(rec, r: int, *rest: object) -> None:  # type: ignore[no-untyped-def]
        if rec.client_id == cid and r == round_ and not asked.is_set():
            asked.set()
            done = rec.upload_done[r]
            await done.wait()  # set when the connection goes; then free the request as the real _grant does
            del rec.upload_done[r]
            return
        await grant(rec, r, *rest)

    server._grant = never  # type: ignore[method-assign]
    return asked


async def run_interrupted_job(
    dev_pki, loopback_server, tmp_path: Path, interrupt: str
) -> tuple[AggregationServer, subprocess.Popen | None, Path]:
    """A 3-round job of two synthetic client processes; crashy trains round 2, asks to upload, and is then
    interrupted while it waits: ``"drop"`` closes its connection from the server (the client process reconnects
    and rejoins from memory), ``"kill9"`` kills its process and starts it again (it rejoins from its checkpoint).
    steady trains round 2 slowly, so the round is still open when crashy comes back."""
    for cid in ("steady", "crashy"):
        issue_client_cert(dev_pki, cid)
    server = loopback_server(
        policy=RoundPolicy(rounds=3, min_clients=2, quorum=1.0, round_timeout_s=60, registration_timeout_s=60),
        # fp32: the server's copy of each adapter is the client's, so it shows how often each round was trained
        job=JobConfig(train=TrainSpec(local_steps=1), uplink=EncodingSpec.parse("fp32")),
    )
    port = await server.start()
    asked = withhold_grant(server, "crashy", 2)
    log = tmp_path / "clients.log"
    steady = client_proc(dev_pki.root, port, "steady", tmp_path / "steady", log, 1, "--slow-round", "2:6")
    crashy = client_proc(dev_pki.root, port, "crashy", tmp_path / "crashy", log, 2)
    job = asyncio.ensure_future(server.run())
    restarted: subprocess.Popen | None = None
    try:
        await asyncio.wait_for(asked.wait(), 60)  # crashy trained round 2 and waits for its upload slot
        if interrupt == "kill9":
            crashy.send_signal(signal.SIGKILL)
            crashy.wait(10)
            restarted = client_proc(dev_pki.root, port, "crashy", tmp_path / "crashy", log, 2)
        else:
            peer = server.clients["crashy"].peer
            assert peer is not None
            await peer.aclose(0x100 + int(ErrorCode.SHUTTING_DOWN), "dropped by the test")
        result = await asyncio.wait_for(job, timeout=90)
        for p in (steady, restarted or crashy):
            assert p.wait(30) == 0, log.read_text()
    finally:
        for p in (steady, crashy, restarted):
            if p is not None and p.poll() is None:
                p.kill()
        if not job.done():
            job.cancel()
    assert result.ok and result.rounds_completed == 3, log.read_text()
    history = [json.loads(line) for line in (tmp_path / "server" / "history.jsonl").read_text().splitlines()]
    assert [sorted(h["contributors"]) for h in history] == [["crashy", "steady"]] * 3  # crashy sent round 2
    return server, restarted, log


async def assert_trained_once_per_round(server: AggregationServer, cid: str, seed: int) -> None:
    rec = server.records[cid]
    await asyncio.to_thread(server._load, rec)
    assert rec.view is not None
    want = trained_once_per_round(seed=seed, rounds=3)
    once = max(float(np.max(np.abs(rec.view[k] - want[k]))) for k in want)
    # a second training of round 2 adds another seeded step of scale 1e-2: far above float rounding
    assert once < 1e-5, f"{cid}'s adapter is {once:.3g} away from one training per round"


async def test_connection_lost_before_the_ack_retrains_from_the_round_start(
    dev_pki, loopback_server, tmp_path: Path
) -> None:
    server, _, log = await run_interrupted_job(dev_pki, loopback_server, tmp_path, "drop")
    await assert_trained_once_per_round(server, "crashy", seed=2)
    await assert_trained_once_per_round(server, "steady", seed=1)
    assert "rolled back to the start of round 2" in log.read_text()


async def test_kill9_between_training_and_ack_trains_the_round_once(dev_pki, loopback_server, tmp_path: Path) -> None:
    server, _, log = await run_interrupted_job(dev_pki, loopback_server, tmp_path, "kill9")
    assert "client=crashy resumed_from_checkpoint=1 rounds=[2, 3]" in log.read_text()  # the restart redid round 2
    await assert_trained_once_per_round(server, "crashy", seed=2)
