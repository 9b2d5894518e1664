"""The benchmarks run end to end (quick mode) and print their JSON line."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def run_quick(bench: str) -> dict:
    proc = subprocess.run(
        [sys.executable, str(ROOT / "bench" / bench), "--quick", "--json"], capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_codec_bench_quick_prints_json() -> None:
    result = run_quick("codec.py")
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


def test_transport_bench_quick_prints_json() -> None:
    result = run_quick("transport.py")
    for key in (
        "quic_mbps",
        "quic_mbps_1452",
        "quic_mbps_max",
        "tls_tcp_mbps",
        "quic_vs_tls_tcp",
        "handshake_ms",
        "control_p99_ms",
    ):
        assert result[key] > 0, key
    assert result["resumed_handshake_ms"] > 0
    assert result["config"]["quic_sessions_resumed"] == result["config"]["handshakes"]  # every reconnect resumed


def test_aggregate_bench_quick_prints_json() -> None:
    result = run_quick("aggregate.py")
    for key in (
        "loo_vs_copy_floor",
        "loo_encoded_vs_copy_floor",
        "loo_vs_fedavg_time",
        "loo_per_client_ms_n8",
        "loo_per_client_ms_n256",
        "peak_rss_mb",
        "factor_mean_rel_err",
    ):
        assert result[key] > 0, key
    assert result["factor_mean_rel_err"] < result["factor_mean_rel_err_independent"]
    # alignment undoes what a change of basis costs the factor mean, and costs nothing where there is none
    assert result["factor_mean_rel_err_rotated_aligned"] < result["factor_mean_rel_err_rotated"] / 2
    assert result["factor_mean_rel_err_aligned"] < result["factor_mean_rel_err"] * 1.05
    assert result["align_ms_per_client"] > 0
    # across ranks 4/8/16, SVD re-projection is the best each rank can hold (Eckart-Young): below zero-padding
    assert 0 < result["hetero_rank_rel_err_svd"] < result["hetero_rank_rel_err_padded"] < 1
    assert result["hetero_rank_rel_err_svd_independent"] < result["hetero_rank_rel_err_padded_independent"]


def test_round_bench_quick_prints_json() -> None:
    result = run_quick("round.py")
    for key in ("round_s_fp32", "round_s_int8", "round_s_topk10"):
        assert result[key] > 0, key
    rows = result["rows"]
    assert rows["int8"]["wire_ratio_up"] > 3.5 and rows["topk10"]["wire_ratio_up"] > 15


def test_load_bench_quick_prints_json() -> None:
    result = run_quick("load.py")
    assert result["scale_ok"] and result["ingest_ok"], result
    assert result["rejected"] == 0 and result["failed_clients"] == 0
    assert result["round_s"] > 0 and result["server_cpu_s"] > 0 and result["server_rss_peak_mb"] > 0
    rows = result["ingest_rows"]
    assert rows["16"]["uploads_in_flight_max"] <= 8 < 16  # admission control: at most the slots upload at once
    assert all(r["mb_s"] > 0 for r in rows.values())
