"""The demo's code path: separate server and client processes on loopback, shortened."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("torch")


def test_demo_runs_and_prints_its_table(tmp_path: Path) -> None:
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "fedquic",
            "demo",
            "--workdir",
            str(tmp_path / "demo"),
            "--clients",
            "2",
            "--rounds",
            "2",
            "--local-steps",
            "3",
            "--timeout",
            "240",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    out = proc.stdout
    assert "loss before" in out and "bytes up" in out
    rows = [r for r in (line.split() for line in out.splitlines()) if len(r) > 2 and r[1].startswith("client-")]
    assert {(r[0], r[1]) for r in rows} == {(r, c) for r in ("1", "2") for c in ("client-1", "client-2")}
    assert "2 rounds in" in out
    assert (tmp_path / "demo" / "server" / "history.jsonl").is_file()
    adapters = tmp_path / "demo" / "client-1" / "adapters"
    assert (adapters / "peft" / "local" / "adapter_config.json").is_file()
    assert (adapters / "fedalt" / "fedalt.json").is_file() and (adapters / "fedalt" / "row.safetensors").is_file()
