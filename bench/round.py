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
    .venv/bin/python bench/round.py --wan --flower --json  # and the same over an emulated 50 Mbit/s, 40 ms link

Over a constrained link (``--wan``, root only): after the loopback rounds, the same rounds again through
``testkit.wan``'s packet-level link emulator (TUN devices and a network namespace; default 50 Mbit/s, 40 ms RTT,
0.5 % random loss each way, 256 kB drop-tail queue), which QUIC's datagrams and gRPC's TCP segments cross alike:
the servers listen on the link's root side and the 2 clients of each run inside the namespace, behind the one
link they share. A self-check first measures the link (TCP goodput both ways on a loss-free copy and on the
lossy link, UDP round trips and loss). ``--wan-only`` skips the loopback rounds; ``--wan-tcp-cc cubic`` sets
the TCP congestion control across the link (default: the system's). Without root, TUN or network namespaces
the WAN part is skipped with a message.

Keys: ``round_s_fp32``, ``round_s_int8``, ``round_s_topk10``, ``int8_vs_fp32``, ``topk10_vs_fp32`` (time ratios);
with ``--flower`` also ``flower_round_s`` (the median of one Flower FedAvg round after each encoding, from
``bench/flower_round.py`` in a scratch venv under runs/), ``flower_runs_s`` and ``<encoding>_vs_flower``. With
``--wan`` the same keys prefixed ``wan_`` (``wan_round_s_int8``, ``wan_flower_round_s``, ``wan_int8_vs_flower``...)
and ``wan_link`` (the link's parameters, TCP congestion control, self-checks and the emulator's counters).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shlex
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict
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
from testkit import wan
from testkit.synthetic import SyntheticLearner, schema_for_bytes

ENCODINGS = {"fp32": "fp32", "int8": "int8", "topk10": "topk10"}


def client_main(args: argparse.Namespace) -> int:
    from fedquic.client.config import ClientConfig
    from fedquic.client.runner import FederatedClient

    pki = DevPki(Path(args.pki))
    cfg = ClientConfig(
        client_id=args.client_id,
        host=args.host,
        port=args.port,
        server_name="localhost",
        tls=TlsFiles(ca=pki.ca_cert, cert=pki.client_cert(args.client_id), key=pki.client_key(args.client_id)),
        transport=TransportSettings(max_datagram_size=args.dgram),
        run_dir=Path(args.run_dir),
    )
    # trivial training at the cost of Flower's peer (one pass per tensor): noise windows of one pool
    learner = SyntheticLearner(schema_for_bytes(args.bytes), seed=args.seed, step_scale=1e-3, noise_pool=1 << 20)
    asyncio.run(FederatedClient(cfg, learner).run())
    return 0


async def one_encoding(
    name: str, pki: DevPki, work: Path, nbytes: int, dgram: int, link: wan.WanLink | None = None
) -> dict[str, Any]:
    spec = EncodingSpec.parse(ENCODINGS[name])
    host = link.server_addr if link else "127.0.0.1"  # over the link: its root side, which the clients dial
    timeout = 1800 if link else 600
    cfg = ServerConfig(
        host=host,
        port=0,
        tls=TlsFiles(ca=pki.ca_cert, cert=pki.server_cert, key=pki.server_key),
        transport=TransportSettings(max_datagram_size=dgram),
        policy=RoundPolicy(rounds=2, min_clients=2, round_timeout_s=timeout),
        job=JobConfig(job_id=f"bench-{name}", train=TrainSpec(local_steps=1), uplink=spec, downlink=spec),
        metrics=MetricsSettings(enabled=False),
        run_dir=work / name / "server",
    )
    server = AggregationServer(cfg)
    port = await server.start()

    def argv(i: int) -> list[str]:
        cmd = [
            *(sys.executable, __file__, "--client", f"c{i}", "--host", host, "--port", str(port)),
            *("--pki", str(pki.root), "--bytes", str(nbytes), "--dgram", str(dgram), "--seed", str(i)),
            *("--run-dir", str(work / name / f"c{i}")),
        ]
        return link.wrap(cmd) if link else cmd  # the server name stays "localhost": the dev certificate's

    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    procs = [subprocess.Popen(argv(i), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL) for i in range(2)]
    try:
        result = await asyncio.wait_for(server.run(), timeout=timeout + 300)
    except BaseException:  # Ctrl-C, a timeout: the clients would wait for a server that is gone
        for p in procs:
            p.kill()
        raise
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


HEADER = (
    f"{'encoding':<8} {'round s':>8} {'train+enc':>9} {'upload':>8} {'decode':>7} {'persist':>8} "
    f"{'aggr':>6} {'downlink':>8} {'MB up':>7} {'x fp32':>7}"
)


async def series(
    pki: DevPki, work: Path, nbytes: int, dgram: int, flower_py: Path | None, link: wan.WanLink | None = None
) -> tuple[dict[str, Any], list[float]]:
    """Each encoding's round, each followed by Flower's on the same payload (alternated): rows, Flower's times."""
    rows, flower = {}, []
    print(HEADER)
    for name in ENCODINGS:
        r = rows[name] = await one_encoding(name, pki, work, nbytes, dgram, link)
        print(
            f"{name:<8} {r['round_s']:>8.2f} {r['client_train_encode_s']:>9.2f} {r['upload_transfer_s']:>8.2f} "
            f"{r['server_decode_s']:>7.2f} {r['server_persist_s']:>8.2f} {r['aggregate_s']:>6.2f} "
            f"{r['downlink_s']:>8.2f} {r['bytes_up'] / 1e6:>7.2f} {r['wire_ratio_up']:>7.1f}",
            flush=True,
        )
        if flower_py is not None:
            f = await asyncio.to_thread(flower_round, flower_py, nbytes, link)
            if f is not None:
                flower.append(f)
                print(f"{'flower':<8} {f:>8.2f}  (FedAvg over gRPC, fp32, {FLOWER})", flush=True)
    return rows, flower


def series_keys(rows: dict[str, Any], flower: list[float], prefix: str = "") -> dict[str, Any]:
    out = {
        f"{prefix}round_s_fp32": rows["fp32"]["round_s"],
        f"{prefix}round_s_int8": rows["int8"]["round_s"],
        f"{prefix}round_s_topk10": rows["topk10"]["round_s"],
        f"{prefix}int8_vs_fp32": rows["int8"]["round_s"] / rows["fp32"]["round_s"],
        f"{prefix}topk10_vs_fp32": rows["topk10"]["round_s"] / rows["fp32"]["round_s"],
    }
    peer = _flower_keys(rows, flower) if flower else {}
    return {**out, **{f"{prefix}{k}": v for k, v in peer.items()}, f"{prefix}rows": rows}


async def wan_series(
    args: argparse.Namespace, pki: DevPki, work: Path, nbytes: int, flower_py: Path | None
) -> dict[str, Any]:
    """The same series through the emulated link (testkit.wan), after a self-check of the link."""
    why = wan.unavailable()
    if why is not None:
        print(f"\nwan: skipped, {why}", flush=True)
        return {"wan_skipped": why}
    p = {"rate_mbit": args.wan_rate_mbit, "rtt_ms": args.wan_rtt_ms, "queue_bytes": int(args.wan_queue_kb * 1000)}
    p.update(seed=args.wan_seed, tcp_cc=args.wan_tcp_cc)
    try:
        with wan.WanLink(**p, loss=0.0) as clean:  # the emulator's own capacity: TCP on a loss-free copy
            check_clean = await asyncio.to_thread(wan.check, clean, 16_000_000)
        with wan.WanLink(**p, loss=args.wan_loss) as link:
            check_lossy = await asyncio.to_thread(wan.check, link, 16_000_000)
            print(f"\nwan link {link.params}, TCP congestion control {link.tcp_cc}")
            print(f"  loss-free copy: {_fmt(check_clean)}\n  lossy: {_fmt(check_lossy)}", flush=True)
            rows, flower = await series(pki, work, nbytes, args.dgram, flower_py, link)
    except wan.WanUnavailable as exc:
        print(f"\nwan: skipped, {exc}", flush=True)
        return {"wan_skipped": str(exc)}
    emulator = {k: link.stats.get(k) for k in ("elapsed_s", "cpu_s", "up", "down")}
    info = {"params": asdict(link.params), "tcp_cc": link.tcp_cc, "check_loss_free": check_clean}
    info.update(check=check_lossy, emulator=emulator)
    return {**series_keys(rows, flower, "wan_"), "wan_link": info}


def _fmt(check: dict[str, Any]) -> str:
    return (
        f"TCP up {check['tcp_up_mbit_s']:.1f} / down {check['tcp_down_mbit_s']:.1f} Mbit/s, "
        f"UDP RTT {check['udp_rtt_ms_median']:.1f} ms, UDP loss {check['udp_loss_up'] * 100:.2f} %"
    )


async def run(args: argparse.Namespace) -> dict[str, Any]:
    nbytes = 4_000_000 if args.quick else args.bytes
    out: dict[str, Any] = {"bench": "round", "quick": args.quick, "dgram": args.dgram}
    out["quic_backend"] = f"{get_backend().name} {get_backend().version}"
    with tempfile.TemporaryDirectory(prefix="fedquic-round-") as tmp:
        work = Path(tmp)
        pki = init_dev_pki(work / "pki")
        for i in range(2):
            issue_client_cert(pki, f"c{i}")
        flower_py = flower_python() if args.flower else None
        if not args.wan_only:
            rows, flower = await series(pki, work / "loopback", nbytes, args.dgram, flower_py)
            out.update(update_fp32_bytes=rows["fp32"]["fp32_up"], **series_keys(rows, flower))
        if args.wan or args.wan_only:
            out.update(await wan_series(args, pki, work / "wan", nbytes, flower_py))
    return out


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


def flower_round(py: Path, nbytes: int, link: wan.WanLink | None = None) -> float | None:
    """One Flower FedAvg measurement of the same payload (bench/flower_round.py): its round-2 time, or None."""
    layers = max(1, round(nbytes / LAYER_BYTES))
    cmd = [str(py), str(Path(__file__).with_name("flower_round.py")), "--layers", str(layers)]
    if link is not None:  # the server on the link's root side, the clients behind the link
        cmd += ["--host", link.server_addr, "--client-prefix", shlex.join(link.wrap([]))]
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=1800 if link else 600)
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
    ap.add_argument("--wan", action="store_true", help="then the same rounds over an emulated link (root only)")
    ap.add_argument("--wan-only", action="store_true", help="only the rounds over the emulated link")
    ap.add_argument("--wan-rate-mbit", type=float, default=50.0, help="link rate each way (default 50 Mbit/s)")
    ap.add_argument("--wan-rtt-ms", type=float, default=40.0, help="round-trip propagation delay (default 40 ms)")
    ap.add_argument("--wan-loss", type=float, default=0.005, help="random loss each way (default 0.005)")
    ap.add_argument("--wan-queue-kb", type=float, default=256.0, help="drop-tail queue each way (default 256 kB)")
    ap.add_argument("--wan-seed", type=int, default=0)
    ap.add_argument("--wan-tcp-cc", help="TCP congestion control across the link, e.g. cubic (default: the system's)")
    # client-process mode (internal)
    ap.add_argument("--client", dest="client_id")
    ap.add_argument("--host", default="127.0.0.1")
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
    for prefix, what in (("", "loopback"), ("wan_", "emulated link")):
        summary(out, prefix, what)
    if args.json:
        print(json.dumps(out))
    return 0


def summary(out: dict[str, Any], prefix: str, what: str) -> None:
    if f"{prefix}round_s_fp32" not in out:
        return
    k = {name[len(prefix) :]: v for name, v in out.items() if name.startswith(prefix)}
    print(
        f"\n{what}: round time fp32 {k['round_s_fp32']:.2f} s, int8 {k['round_s_int8']:.2f} s "
        f"({k['int8_vs_fp32']:.2f}x), top-k 10% + EF {k['round_s_topk10']:.2f} s ({k['topk10_vs_fp32']:.2f}x)"
    )
    if "flower_round_s" in k:
        print(
            f"{what}: Flower (FedAvg, gRPC, fp32) {k['flower_round_s']:.2f} s: int8 {k['int8_vs_flower']:.2f}x, "
            f"top-k 10% {k['topk10_vs_flower']:.2f}x, fp32 {k['fp32_vs_flower']:.2f}x of Flower's round"
        )


if __name__ == "__main__":
    sys.exit(main())
