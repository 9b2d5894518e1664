"""The benchmarks run end to end (quick mode) and print their JSON line."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_codec_bench_quick_prints_json() -> None:
    proc = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "codec.py"), "--quick", "--json"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    for key in (
        "int8_ratio",
        "int8_lz4_ratio",
        "topk10_ratio",
        "topk1_ratio",
        "encode_gbps",
        "decode_gbps",
        "topk10_encode_gbps",
        "memcpy_gbps",
    ):
        assert result[key] > 0, key
    assert result["topk1_ratio"] > result["topk10_ratio"] > result["int8_ratio"] > 3.5
