"""kill -9 a client process while it trains: the round closes without it on quorum at its deadline; the restarted
client rejoins from its checkpoint (it replaces its dead connection), and the job and both processes end cleanly."""

from __future__ import annotations

import asyncio
import gc
import json
import os
import signal
import subprocess
import sys
import time
import weakref
from pathlib import Path

import pytest
from fedquic.common.codec import EncodingSpec
from fedquic.common.messages import TrainSpec
from fedquic.server.config import JobConfig
from fedquic.server.daemon import AggregationServer
from fedquic.server.rounds import RoundPolicy
from fedquic.transport.pki import issue_client_cert

pytestmark = pytest.mark.reliability


def client_proc(pki_root: Path, port: int, cid: str, run_dir: Path, log: Path, *extra: str) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "testkit.synthetic", "--client-id", cid, "--server", f"127.0.0.1:{port}"]
    cmd += ["--certs", str(pki_root), "--run-dir", str(run_dir), *extra]
    return subprocess.Popen(
        cmd, stdout=log.open("ab"), stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"}
    )


def accepted(server: AggregationServer, cid: str) -> set[int]:
    rec = server.records.get(cid)
    return set(rec.disk.updates) if rec else set()


async def test_kill9_client_while_training(dev_pki, loopback_server, tmp_path: Path) -> None:
    for cid in ("steady", "crashy"):
        issue_client_cert(dev_pki, cid)
    server = loopback_server(
        policy=RoundPolicy(rounds=3, min_clients=2, quorum=0.5, round_timeout_s=12, registration_timeout_s=60),
        job=JobConfig(train=TrainSpec(local_steps=1), uplink=EncodingSpec.parse("int8")),
    )
    port = await server.start()
    log = tmp_path / "clients.log"
    steady = client_proc(dev_pki.root, port, "steady", tmp_path / "steady", log, "--seed", "1")
    # crashy trains round 1 quickly, then takes 30 s over round 2: it is killed in the middle of it
    crashy = client_proc(dev_pki.root, port, "crashy", tmp_path / "crashy", log, "--seed", "2", "--slow-round", "2:30")
    job = asyncio.ensure_future(server.run())
    try:
        end = time.monotonic() + 60
        while not (server.machine.round == 2 and "crashy" in server.machine.participants):
            assert time.monotonic() < end and not job.done(), "round 2 did not start with both clients"
            await asyncio.sleep(0.05)
        assert accepted(server, "crashy") == {1}
        await asyncio.sleep(0.5)
        crashy.send_signal(signal.SIGKILL)  # in the middle of round 2's training
        crashy.wait(10)
        # round 2 closes without crashy at its deadline, on quorum (steady's update); the server has not even
        # noticed the kill yet (a dead peer sends no close: QUIC's idle timeout would)
        history_file = tmp_path / "server" / "history.jsonl"
        while not (history_file.is_file() and len(history_file.read_text().splitlines()) >= 2):
            assert time.monotonic() < end + 30 and not job.done(), "round 2 did not close without the killed client"
            await asyncio.sleep(0.05)
        # round 3 has started with crashy's dead connection still counted; the restart has until its deadline (12 s)
        restarted = client_proc(dev_pki.root, port, "crashy", tmp_path / "crashy", log, "--seed", "2")
        result = await asyncio.wait_for(job, timeout=90)
        assert restarted.wait(30) == 0 and steady.wait(30) == 0
    finally:
        for p in (steady, crashy):
            if p.poll() is None:
                p.kill()
        if not job.done():
            job.cancel()
    assert result.ok and result.rounds_completed == 3
    history = [json.loads(line) for line in (tmp_path / "server" / "history.jsonl").read_text().splitlines()]
    assert history[1]["round"] == 2 and history[1]["contributors"] == ["steady"]
    text = log.read_text()
    assert "resumed_from_checkpoint=1" in text  # the restarted client came back from its round-1 checkpoint
    got = accepted(server, "crashy")
    assert 1 in got and 2 not in got  # round 2 was lost to the crash (its change stays in the client's state)


async def test_kill9_client_during_its_upload(dev_pki, loopback_server, tmp_path: Path) -> None:
    """Killed with part of a 31 MB update received: the half-received frame is dropped with the dead connection
    (the restart replaces it), the upload slot is freed, the restarted client redoes the open round from its
    checkpoint, and at the end the server's copy of each client's adapter is exactly the client's."""
    for cid in ("steady", "crashy"):
        issue_client_cert(dev_pki, cid)
    server = loopback_server(
        policy=RoundPolicy(rounds=3, min_clients=2, quorum=0.5, round_timeout_s=60, registration_timeout_s=60),
        job=JobConfig(train=TrainSpec(local_steps=1), uplink=EncodingSpec.parse("fp32")),
    )
    port = await server.start()
    log = tmp_path / "clients.log"
    big = ("--layers", "60", "--dim", "2048", "--rank", "16")  # 31 MB fp32 per update: ~1-3 s on the wire
    steady = client_proc(dev_pki.root, port, "steady", tmp_path / "steady", log, "--seed", "1", *big)
    crashy = client_proc(dev_pki.root, port, "crashy", tmp_path / "crashy", log, "--seed", "2", *big)
    job = asyncio.ensure_future(server.run())
    restarted: subprocess.Popen | None = None
    try:
        end = time.monotonic() + 90
        while True:  # round 2, crashy holds an upload slot and part of its frame is in the server's buffers
            rec = server.clients.get("crashy")
            if (
                server.machine.round == 2
                and rec is not None
                and rec.peer is not None
                and "granted_at" in rec.stats.get(2, {})
                and rec.peer.core.buffered_bytes() > 1 << 20
            ):
                break
            assert time.monotonic() < end and not job.done(), "crashy's round-2 upload was never caught in flight"
            await asyncio.sleep(0.005)
        crashy.send_signal(signal.SIGKILL)
        crashy.wait(10)
        dead = weakref.ref(rec.peer)
        mid = rec.peer.core.buffered_bytes()
        assert accepted(server, "crashy") == {1} and mid > 0  # the server holds a partial frame, not an update
        rec = None
        restarted = client_proc(dev_pki.root, port, "crashy", tmp_path / "crashy", log, "--seed", "2", *big)
        while True:  # the restart's connection replaces the dead one: its partial frame goes with it
            new = server.clients.get("crashy")
            if new is not None and new.peer is not None and new.peer is not dead():
                break
            assert time.monotonic() < end and not job.done(), "the restarted client did not reconnect"
            await asyncio.sleep(0.01)
        new = None
        for _ in range(100):
            gc.collect()
            if dead() is None:
                break
            await asyncio.sleep(0.05)
        assert dead() is None, "the dead connection (and the partial upload it buffered) is still referenced"
        result = await asyncio.wait_for(job, timeout=120)
        assert restarted.wait(30) == 0 and steady.wait(30) == 0
    finally:
        for p in (steady, crashy, restarted):
            if p is not None and p.poll() is None:
                p.kill()
        if not job.done():
            job.cancel()
    assert result.ok and result.rounds_completed == 3
    assert server.metrics.uploads_in_flight == 0
    history = [json.loads(line) for line in (tmp_path / "server" / "history.jsonl").read_text().splitlines()]
    assert [h["round"] for h in history] == [1, 2, 3]
    assert "steady" in history[1]["contributors"]
    print(f"killed with {mid} bytes buffered; contributors per round: {[h['contributors'] for h in history]}")
    text = log.read_text()
    assert "client=crashy resumed_from_checkpoint=1" in text  # the restart came back from its round-1 checkpoint
    for cid in ("steady", "crashy"):
        meta = json.loads((tmp_path / "server" / "state" / "clients" / cid / "meta.json").read_text())
        last = [line for line in text.splitlines() if line.startswith(f"client={cid} ")][-1]
        assert f"view_hash={meta['view_hash']}" in last, (cid, last, meta["view_hash"])
