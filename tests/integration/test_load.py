"""Load: 500 concurrent light clients (numpy learner, the real protocol, codec and QUIC stack, one connection and
certificate each) against one server process on loopback, via ``bench/load.py``: every round completes with every
client, nothing is refused, no client fails, and the server's memory stays bounded."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

pytestmark = [pytest.mark.reliability, pytest.mark.slow]


def test_five_hundred_light_clients_complete_every_round(tmp_path: Path) -> None:
    proc = subprocess.run(
        [
            *(sys.executable, str(ROOT / "bench" / "load.py"), "--part", "scale", "--clients", "500"),
            *("--base", "50", "--json", "--keep", str(tmp_path)),
        ],
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["scale_ok"] and out["clients"] == 500 and out["rounds_completed"] == 3, out
    assert out["rejected"] == 0 and out["failed_clients"] == 0, out
    history = [json.loads(x) for x in (tmp_path / "scale500" / "server" / "history.jsonl").read_text().splitlines()]
    assert all(len(h["contributors"]) == 500 for h in history)
    assert out["server_rss_peak_mb"] < 1024, out  # 500 connections and their (small) states: bounded, not per-byte
    print(proc.stdout)
