"""Round benchmark: one whole federated round over loopback QUIC with realistic payload sizes.

What it measures
----------------
A server (in this process) and 2 client processes (each a :class:`~fedquic.client.runner.FederatedClient` with a
numpy :class:`~testkit.synthetic.SyntheticLearner`: trivial training, an update the size of a 45 MB fp32 LoRA
state, 344 tensors of rank-16 q/v adapters at width 2048) run 2 rounds per encoding; round 2 is timed (round 1
includes joining). For each of fp32, INT8 (per rank, LZ4) and top-k 10% with error feedback both ways:

* ``round_s``: wall time of round 2, from the previous round's close to this one's (server history);
* its breakdown from the server's per-round stats: client train+encode (``round_s`` the client reports),
  server ``decode_s`` and ``persist_s`` (apply the delta, write and fsync before the ACK), ``aggregate_s``,
  ``downlink_s`` (encode + send + wait for every client's ACK), and the upload transfer as the remainder;
* bytes up/down per client and the ratio to fp32.

The datagram size is the default (1350 bytes; see ``bench/transport.py`` for why pure-Python QUIC tops out
near 25 MB/s per process at that size): fewer bytes is what shortens a round. ``--dgram 16000`` shows the
loopback maximum.

Run
---
::

    .venv/bin/python bench/round.py --json           # 45 MB updates (~1-2 min)
    .venv/bin/python bench/round.py --quick --json   # 4 MB updates: smoke test
    .venv/bin/python bench/round.py --flower --json  # and Flower 1.41 on the same payload, alternated
    .venv/bin/python bench/round.py --backend aioquic --json   # server and clients on aioquic (default: auto)

Keys: ``round_s_fp32``, ``round_s_int8``, ``round_s_topk10``, ``int8_vs_fp32``, ``topk10_vs_fp32`` (time ratios);
with ``--flower`` also ``flower_round_s`` (the median of one Flower FedAvg round after each encoding, from
``bench/flower_round.py`` in a scratch venv under runs/), ``flower_runs_s`` and ``<encoding>_vs_flower``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from fedquic.common.codec import EncodingSpec
from fedquic.common.messages import TrainSpec
from fedquic.server.config import JobConfig, MetricsSettings, ServerConfig
from fedquic.server.daemon import AggregationServer
from fedquic.server.history import read_history_dicts
from fedquic.server.rounds import RoundPolicy
from fedquic.transport.backend import ENV_VAR, get_backend
from fedquic.transport.pki import DevPki, init_dev_pki, issue_client_cert
from fedquic.transport.settings import TlsFiles, TransportSettings

# testkit/ (the test doubles) lives in the checkout, not in the installed package.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from testkit.synthetic import SyntheticLearner, schema_for_bytes

ENCODINGS = {"fp32": "fp32", "int8": "int8", "topk10": "topk10"}


def client_main(args: argparse.Namespace) -> int:
    from fedquic.client.config import ClientConfig
    from fedquic.client.runner import FederatedClient

    pki = DevPki(Path(args.pki))
    cfg = ClientConfig(
        client_id=args.client_id,
        port=args.port,
        server_name="localhost",
        tls=TlsFiles(ca=pki.ca_cert, cert=pki.client_cert(args.client_id), key=pki.client_key(args.client_id)),
        transport=TransportSettings(max_datagram_size=args.dgram),
        run_dir=Path(args.run_dir),
    )
    learner = SyntheticLearner(schema_for_bytes(args.bytes), seed=args.seed, step_scale=1e-3)
    asyncio.run(FederatedClient(cfg, learner).run())
    return 0


async def one_encoding(name: str, pki: DevPki, work: Path, nbytes: int, dgram: int) -> dict[str, Any]:
    spec = EncodingSpec.parse(ENCODINGS[name])
    cfg = ServerConfig(
        host="127.0.0.1",
        port=0,
        tls=TlsFiles(ca=pki.ca_cert, cert=pki.server_cert, key=pki.server_key),
        transport=TransportSettings(max_datagram_size=dgram),
        policy=RoundPolicy(rounds=2, min_clients=2, round_timeout_s=600),
        job=JobConfig(job_id=f"bench-{name}", train=TrainSpec(local_steps=1), uplink=spec, downlink=spec),
        metrics=MetricsSettings(enabled=False),
        run_dir=work / name / "server",
    )
    server = AggregationServer(cfg)
    port = await server.start()

    def argv(i: int) -> list[str]:
        return [
            *(sys.executable, __file__, "--client", f"c{i}", "--port", str(port), "--pki", str(pki.root)),
            *("--bytes", str(nbytes), "--dgram", str(dgram), "--seed", str(i), "--run-dir", str(work / name / f"c{i}")),
        ]

    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    procs = [subprocess.Popen(argv(i), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL) for i in range(2)]
    try:
        result = await asyncio.wait_for(server.run(), timeout=900)
    finally:
        for p in procs:
            try:
                p.wait(timeout=60)
            except subprocess.TimeoutExpired:
                p.kill()
    if not result.ok:
        raise RuntimeError(f"{name}: job failed: {result.reason}")
    hist = read_history_dicts(work / name / "server" / "history.jsonl")
    r1, r2 = hist[0], hist[1]
    clients = list(r2["clients"].values())

    def mean(key: str) -> float:
        vals = [c.get(key, 0.0) for c in clients]
        return sum(vals) / len(vals)

    round_s = r2["time"] - r1["time"]
    train_encode = mean("round_s")
    downlink = r2["close_s"] - r2["aggregate_s"]
    server_in = mean("decode_s") + mean("persist_s")
    return {
        "round_s": round_s,
        "client_train_encode_s": train_encode,
        "server_decode_s": mean("decode_s"),
        "server_persist_s": mean("persist_s"),
        "aggregate_s": r2["aggregate_s"],
        "downlink_s": downlink,
        "downlink_encode_s": mean("downlink_encode_s"),
        "upload_transfer_s": max(round_s - train_encode - server_in - r2["close_s"], 0.0),
        "bytes_up": mean("bytes_up"),
        "bytes_down": mean("bytes_down"),
        "fp32_up": mean("fp32_up"),
        "wire_ratio_up": mean("fp32_up") / max(mean("bytes_up"), 1.0),
    }


async def run(args: argparse.Namespace) -> dict[str, Any]:
    nbytes = 4_000_000 if args.quick else args.bytes
    with tempfile.TemporaryDirectory(prefix="fedquic-round-") as tmp:
        work = Path(tmp)
        pki = init_dev_pki(work / "pki")
        for i in range(2):
            issue_client_cert(pki, f"c{i}")
        rows = {}
        print(
            f"{'encoding':<8} {'round s':>8} {'train+enc':>9} {'upload':>8} {'decode':>7} {'persist':>8} "
            f"{'aggr':>6} {'downlink':>8} {'MB up':>7} {'x fp32':>7}"
        )
        flower_py = flower_python() if args.flower else None
        flower: list[float] = []
        for name in ENCODINGS:
            r = rows[name] = await one_encoding(name, pki, work, nbytes, args.dgram)
            print(
                f"{name:<8} {r['round_s']:>8.2f} {r['client_train_encode_s']:>9.2f} {r['upload_transfer_s']:>8.2f} "
                f"{r['server_decode_s']:>7.2f} {r['server_persist_s']:>8.2f} {r['aggregate_s']:>6.2f} "
                f"{r['downlink_s']:>8.2f} {r['bytes_up'] / 1e6:>7.2f} {r['wire_ratio_up']:>7.1f}",
                flush=True,
            )
            if flower_py is not None:  # alternated: each encoding's round, then Flower's on the same payload
                f = await asyncio.to_thread(flower_round, flower_py, nbytes)
                if f is not None:
                    flower.append(f)
                    print(f"{'flower':<8} {f:>8.2f}  (FedAvg over gRPC, fp32, {FLOWER})", flush=True)
    peer = _flower_keys(rows, flower) if flower else {}
    return {
        "bench": "round",
        "quick": args.quick,
        "update_fp32_bytes": rows["fp32"]["fp32_up"],
        "dgram": args.dgram,
        "quic_backend": f"{get_backend().name} {get_backend().version}",
        "round_s_fp32": rows["fp32"]["round_s"],
        "round_s_int8": rows["int8"]["round_s"],
        "round_s_topk10": rows["topk10"]["round_s"],
        "int8_vs_fp32": rows["int8"]["round_s"] / rows["fp32"]["round_s"],
        "topk10_vs_fp32": rows["topk10"]["round_s"] / rows["fp32"]["round_s"],
        **peer,
        "rows": rows,
    }


def _flower_keys(rows: dict[str, Any], flower: list[float]) -> dict[str, Any]:
    import statistics

    f = statistics.median(flower)
    return {
        "flower_round_s": f,
        "flower_runs_s": flower,
        **{f"{name}_vs_flower": rows[name]["round_s"] / f for name in ENCODINGS},
    }


FLOWER = "flwr==1.41.0"
FLOWER_VENV = Path(__file__).resolve().parents[1] / "runs" / "flower-venv"
LAYER_BYTES = 2 * 2 * 16 * 2048 * 4  # q and v, A and B, rank 16 at width 2048, fp32: one layer of the update


def flower_python() -> Path | None:
    """The scratch venv with Flower (created once under runs/; never a dependency of fedquic), or None."""
    py = FLOWER_VENV / "bin" / "python"
    if py.exists():
        return py
    print(f"flower: creating {FLOWER_VENV} with {FLOWER} (once, about a minute)", flush=True)
    try:
        subprocess.run([sys.executable, "-m", "venv", str(FLOWER_VENV)], check=True, capture_output=True)
        subprocess.run([str(py), "-m", "pip", "install", "-q", FLOWER, "numpy"], check=True, capture_output=True)
    except (OSError, subprocess.CalledProcessError) as exc:
        print(f"flower: skipped, {FLOWER} could not be installed into {FLOWER_VENV}: {exc}", flush=True)
        return None
    return py


def flower_round(py: Path, nbytes: int) -> float | None:
    """One Flower FedAvg measurement of the same payload (bench/flower_round.py): its round-2 time, or None."""
    layers = max(1, round(nbytes / LAYER_BYTES))
    script = Path(__file__).with_name("flower_round.py")
    try:
        r = subprocess.run([str(py), str(script), "--layers", str(layers)], capture_output=True, text=True, timeout=600)
    except subprocess.TimeoutExpired:
        r = None
    if r is None or r.returncode != 0:
        print(f"flower: the round failed: {(r.stderr[-500:] if r else 'timed out')}", flush=True)
        return None
    return float(json.loads(r.stdout.strip().splitlines()[-1])["flower_round_s"])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--quick", action="store_true", help="4 MB updates (smoke test)")
    ap.add_argument("--bytes", type=int, default=45_000_000, help="fp32 size of each update (default 45 MB)")
    ap.add_argument("--dgram", type=int, default=TransportSettings().max_datagram_size)
    ap.add_argument(
        "--backend",
        choices=("auto", "aioquic", "qh3"),
        default="auto",
        help="QUIC implementation of the server and the clients (default auto: qh3 when installed)",
    )
    ap.add_argument(
        "--flower",
        action="store_true",
        help=f"also time the same payload through Flower (FedAvg, gRPC) after each encoding; {FLOWER} is installed "
        "into runs/flower-venv the first time (skipped with a message if it cannot be)",
    )
    # client-process mode (internal)
    ap.add_argument("--client", dest="client_id")
    ap.add_argument("--port", type=int)
    ap.add_argument("--pki")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--run-dir")
    args = ap.parse_args(argv)
    if args.backend != "auto":
        os.environ[ENV_VAR] = args.backend  # this process and the client processes it starts
    if args.client_id:
        return client_main(args)
    t0 = time.perf_counter()
    out = asyncio.run(run(args))
    out["elapsed_s"] = time.perf_counter() - t0
    print(
        f"\nround time: fp32 {out['round_s_fp32']:.2f} s, int8 {out['round_s_int8']:.2f} s "
        f"({out['int8_vs_fp32']:.2f}x), top-k 10% + EF {out['round_s_topk10']:.2f} s ({out['topk10_vs_fp32']:.2f}x)"
    )
    if "flower_round_s" in out:
        print(
            f"Flower (FedAvg, gRPC, fp32) {out['flower_round_s']:.2f} s: int8 {out['int8_vs_flower']:.2f}x, "
            f"top-k 10% {out['topk10_vs_flower']:.2f}x, fp32 {out['fp32_vs_flower']:.2f}x of Flower's round"
        )
    if args.json:
        print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
