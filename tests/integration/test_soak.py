"""Soak: 50 rounds with 8 light client processes against a server process: every round completes, the server's
resident memory stays flat (no leak), and no ERROR appears in any log."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from fedquic.transport.pki import issue_client_cert

pytestmark = pytest.mark.reliability

ROUNDS, CLIENTS = 50, 8


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


def test_fifty_rounds_with_eight_clients_keep_server_memory_flat(dev_pki, tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    ready = tmp_path / "ready.json"
    run_dir = tmp_path / "server"
    server_log = (tmp_path / "server.log").open("wb")
    server = subprocess.Popen(
        [
            *(sys.executable, "-m", "fedquic", "server", "--host", "127.0.0.1", "--port", "0"),
            *("--certs", str(dev_pki.root), "--run-dir", str(run_dir), "--ready-file", str(ready)),
            *("--metrics-port", "0", "--rounds", str(ROUNDS), "--min-clients", str(CLIENTS)),
            *("--local-steps", "1", "--round-timeout", "60"),
        ],
        stdout=server_log,
        stderr=subprocess.STDOUT,
        env=env,
    )
    clients: list[subprocess.Popen] = []
    try:
        end = time.monotonic() + 30
        while not ready.is_file():
            assert server.poll() is None and time.monotonic() < end, "server did not start"
            time.sleep(0.05)
        port = json.loads(ready.read_text())["port"]
        client_log = (tmp_path / "clients.log").open("wb")
        for i in range(CLIENTS):
            cid = f"soak-{i}"
            issue_client_cert(dev_pki, cid)
            clients.append(
                subprocess.Popen(
                    [
                        *(sys.executable, "-m", "testkit.synthetic", "--client-id", cid),
                        *("--server", f"127.0.0.1:{port}", "--certs", str(dev_pki.root)),
                        *("--run-dir", str(tmp_path / cid), "--seed", str(i)),
                        *("--layers", "2", "--dim", "128", "--rank", "8", "--log-level", "WARNING"),
                    ],
                    stdout=client_log,
                    stderr=subprocess.STDOUT,
                    env=env,
                )
            )
        history = run_dir / "history.jsonl"
        samples: dict[int, float] = {}
        end = time.monotonic() + 600
        while server.poll() is None:
            assert time.monotonic() < end, "the soak did not finish in time"
            done = len(history.read_text().splitlines()) if history.is_file() else 0
            if done not in samples:
                samples[done] = rss_mb(server.pid)
            time.sleep(0.05)
        assert server.returncode == 0
        for c in clients:
            assert c.wait(30) == 0
    finally:
        for p in [server, *clients]:
            if p.poll() is None:
                p.kill()
    rounds = [json.loads(line) for line in (run_dir / "history.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rounds] == list(range(1, ROUNDS + 1))
    assert all(len(r["contributors"]) == CLIENTS for r in rounds)
    warm = samples[min(k for k in samples if k >= 10)]
    late = max(v for k, v in samples.items() if k >= ROUNDS - 5)
    assert late - warm < 16, f"server RSS grew {late - warm:.1f} MB from round 10 to the end ({samples})"
    for log in (tmp_path / "server.log", tmp_path / "clients.log"):
        errors = [line for line in log.read_text().splitlines() if " ERROR " in line or "Traceback" in line]
        assert not errors, errors[:5]
    print(f"server RSS after round 10: {warm:.1f} MB, at the end: {late:.1f} MB")
