"""bench/client.py runs end to end (quick mode) and prints its JSON line with consistent figures."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

pytest.importorskip("torch")
pytest.importorskip("bitsandbytes")


def test_client_bench_quick_prints_json() -> None:
    proc = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "client.py"), "--quick", "--json"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    for key in ("weight_bytes_4bit_vs_fp32", "peak_rss_4bit_vs_fp32", "step_time_4bit_vs_fp32"):
        assert result[key] > 0, key
    assert result["weight_bytes_4bit_vs_fp32"] == result["weight_bytes_4bit"] / result["weight_bytes_fp32"]
    # NF4 packs two weights a byte (+ scales); even the quick model's fp32 embeddings leave it well under 0.3
    assert result["weight_bytes_4bit_vs_fp32"] < 0.3
    assert result["peak_rss_4bit"] >= result["train_peak_rss_4bit"] > result["rss_after_imports"]
    assert result["nf4_loader"] == "streamed"
    assert result["load_peak_rss_4bit_vs_fp32"] == result["load_peak_rss_4bit"] / result["load_peak_rss_fp32"]
    assert result["load_peak_rss_4bit"] >= result["rss_after_load_4bit"] > result["rss_after_imports"]
    assert 0 < result["load_peak_rss_above_imports_4bit"] < result["load_peak_rss_4bit"]
    assert result["step_s_4bit"] > 0 and result["step_s_fp32"] > 0 and result["steps_timed"] == 2
