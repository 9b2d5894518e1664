"""Server durability with a real process: kill -9 mid-round, restart, the job resumes and nothing acknowledged
is lost; SIGTERM saves and exits cleanly. Clients are real FederatedClients with a synthetic learner."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from fedquic.client.config import ClientConfig
from fedquic.client.runner import FederatedClient
from fedquic.transport.pki import DevPki, issue_client_cert
from fedquic.transport.settings import TlsFiles, TransportSettings

from testkit.synthetic import SyntheticLearner, lora_schema

pytestmark = pytest.mark.reliability


def free_udp_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class ServerProcess:
    def __init__(self, pki: DevPki, port: int, run_dir: Path, log: Path, *extra: str) -> None:
        self.ready = run_dir.parent / "ready.json"
        self.ready.unlink(missing_ok=True)
        cmd = [sys.executable, "-m", "fedquic", "server", "--host", "127.0.0.1", "--port", str(port)]
        cmd += ["--certs", str(pki.root), "--run-dir", str(run_dir), "--ready-file", str(self.ready)]
        cmd += ["--metrics-port", "0", "--min-clients", "2", "--round-timeout", "120", *extra]
        self.log = log.open("ab")
        self.proc = subprocess.Popen(
            cmd, stdout=self.log, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"}
        )

    async def wait_ready(self, timeout: float = 30.0) -> dict[str, int]:
        end = time.monotonic() + timeout
        while not self.ready.is_file():
            assert self.proc.poll() is None, "server exited during start-up"
            assert time.monotonic() < end, "server did not start"
            await asyncio.sleep(0.05)
        return json.loads(self.ready.read_text())

    async def wait(self, timeout: float) -> int:
        end = time.monotonic() + timeout
        while self.proc.poll() is None:
            assert time.monotonic() < end, "server did not exit"
            await asyncio.sleep(0.05)
        self.log.close()
        return int(self.proc.returncode)


def make_client(pki: DevPki, cid: str, port: int, run_dir: Path, learner: SyntheticLearner) -> FederatedClient:
    cert, key = issue_client_cert(pki, cid)
    cfg = ClientConfig(
        client_id=cid,
        port=port,
        server_name="localhost",
        tls=TlsFiles(ca=pki.ca_cert, cert=cert, key=key),
        run_dir=run_dir / cid,
        transport=TransportSettings(connect_timeout_s=1.0),
        connect_attempts=40,
        backoff_initial_s=0.1,
        backoff_max_s=0.5,
    )
    return FederatedClient(cfg, learner)


async def wait_for(pred, timeout: float, what: str) -> None:  # type: ignore[no-untyped-def]
    end = time.monotonic() + timeout
    while not pred():
        assert time.monotonic() < end, f"timed out waiting for {what}"
        await asyncio.sleep(0.05)


def accepted_rounds(run_dir: Path, cid: str) -> set[int]:
    meta = run_dir / "state" / "clients" / cid / "meta.json"
    if not meta.is_file():
        return set()
    return {int(r) for r in json.loads(meta.read_text())["updates"]}


async def test_kill9_mid_round_resumes_the_round_and_loses_no_acknowledged_update(dev_pki, tmp_path: Path) -> None:
    port, run_dir = free_udp_port(), tmp_path / "server"
    schema = lora_schema(layers=2, dim=64, rank=4)
    hold = threading.Event()
    a = SyntheticLearner(schema, seed=1)
    b = SyntheticLearner(schema, seed=2, gates={2: hold})  # b is still training round 2 when the server dies
    server = ServerProcess(dev_pki, port, run_dir, tmp_path / "server.log", "--rounds", "3")
    await server.wait_ready()
    clients = [make_client(dev_pki, cid, port, tmp_path, lr) for cid, lr in (("a", a), ("b", b))]
    tasks = [asyncio.ensure_future(c.run()) for c in clients]
    try:
        await wait_for(lambda: 2 in accepted_rounds(run_dir, "a"), 60, "a's round-2 update on disk")
        await asyncio.sleep(0.2)  # let a receive its ACK
        server.proc.kill()  # kill -9: no chance to save anything beyond what is already on disk
        assert await server.wait(10) == -signal.SIGKILL
        assert accepted_rounds(run_dir, "b") == {1}

        server = ServerProcess(dev_pki, port, run_dir, tmp_path / "server.log", "--rounds", "3")
        await server.wait_ready()
        hold.set()
        results = await asyncio.wait_for(asyncio.gather(*tasks), timeout=120)
        assert await server.wait(30) == 0
    finally:
        hold.set()
        for t in tasks:
            t.cancel()
        if server.proc.poll() is None:
            server.proc.kill()
    log = (tmp_path / "server.log").read_text()
    assert "resumed job fedquic-job" in log and "round 2 (training)" in log
    history = [json.loads(line) for line in (run_dir / "history.jsonl").read_text().splitlines()]
    assert [h["round"] for h in history] == [1, 2, 3]
    assert all(h["contributors"] == ["a", "b"] for h in history)
    # a's acknowledged round-2 update survived the crash: the restarted server did not ask a to train it again
    assert a.trained_rounds == [1, 2, 3]
    assert accepted_rounds(run_dir, "a") == accepted_rounds(run_dir, "b") == {1, 2, 3}
    # and the server's view of each client is exactly the client's
    for c, r in zip(clients, results, strict=True):
        meta = json.loads((run_dir / "state" / "clients" / c.cfg.client_id / "meta.json").read_text())
        assert meta["view_hash"] == c.view_hash
        assert "job complete" in r.bye_reason


async def test_sigterm_saves_and_a_restart_finishes_the_job(dev_pki, tmp_path: Path) -> None:
    port, run_dir = free_udp_port(), tmp_path / "server"
    schema = lora_schema(layers=1, dim=32, rank=2)
    hold = threading.Event()
    learners = [SyntheticLearner(schema, seed=1, gates={2: hold}), SyntheticLearner(schema, seed=2, gates={2: hold})]
    server = ServerProcess(dev_pki, port, run_dir, tmp_path / "server.log", "--rounds", "2")
    ready = await server.wait_ready()
    assert ready["metrics_port"]
    clients = [make_client(dev_pki, f"t{i}", port, tmp_path, lr) for i, lr in enumerate(learners)]
    tasks = [asyncio.ensure_future(c.run()) for c in clients]
    try:
        await wait_for(
            lambda: accepted_rounds(run_dir, "t0") == {1} and accepted_rounds(run_dir, "t1") == {1}, 60, "round 1"
        )
        await wait_for(lambda: '"round": 2' in (run_dir / "state" / "job.json").read_text(), 30, "round 2 open")
        server.proc.send_signal(signal.SIGTERM)
        assert await server.wait(20) == 0  # a graceful stop is not a failure
        job = json.loads((run_dir / "state" / "job.json").read_text())
        assert job["round"]["round"] == 2 and job["round"]["phase"] == "training"
        server = ServerProcess(dev_pki, port, run_dir, tmp_path / "server.log", "--rounds", "2")
        await server.wait_ready()
        hold.set()
        await asyncio.wait_for(asyncio.gather(*tasks), timeout=120)
        assert await server.wait(30) == 0
    finally:
        hold.set()
        for t in tasks:
            t.cancel()
        if server.proc.poll() is None:
            server.proc.kill()
    history = [json.loads(line) for line in (run_dir / "history.jsonl").read_text().splitlines()]
    assert [h["round"] for h in history] == [1, 2]
