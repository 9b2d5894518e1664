"""Load benchmark: many concurrent light clients against one server process, and the server's ingest ceiling.

What it measures
----------------
Two parts, each against a real ``fedquic server`` process on loopback (its CPU time and resident memory are read
from ``/proc``; its ``/status`` endpoint is polled for refusals), with light clients (``python -m testkit.synthetic
--count N``: N :class:`~fedquic.client.runner.FederatedClient` objects with a numpy learner per process, each with its
own QUIC connection, certificate and state, the same protocol and codec as a real client):

* **scale**: a baseline of ``--base`` clients, then ``--clients`` (500) clients, tiny adapters (8 KB), 3 rounds each.
  Reported per run: time to register everyone and finish round 1, mean round time of the later rounds, server CPU
  seconds (total and per client-round), peak server RSS, refused messages/connections, failed clients; and the
  500-client figures as ratios to the baseline (``round_s_ratio`` against ``clients_ratio``: linear is 1:1).
* **ingest**: clients with realistic payloads (``--payload-mb`` fp32 per update, 4 MB by default; fp32 uplink so the
  bytes on the wire are the payload) upload at the same moment: 1 client (the baseline), then 4, 16 and 32 with the
  default 8 upload slots, and 32 with 32 slots (no admission control). Ingest rate = bytes received in a round /
  (last update accepted - first upload slot granted), from the server's history; also the round time, server peak
  RSS and the most uploads in flight at once.

Every client process shares the 2 cores with the server on this machine: on loopback the clients' own pure-Python
QUIC stacks compete with the server's, so the ceiling measured here is a lower bound for a dedicated server.

Run
---
::

    .venv/bin/python bench/load.py --json            # 500 clients + ingest sweep (~5-8 min)
    .venv/bin/python bench/load.py --quick --json    # 40 clients, 1 MB payloads: smoke test (~1 min)
    .venv/bin/python bench/load.py --part ingest     # one part only

Keys: ``clients``, ``round_s``, ``round_s_base``, ``round_s_ratio``, ``clients_ratio``,
``server_cpu_s_per_client_round``, ``server_rss_peak_mb``, ``rejected``, ``failed_clients``, ``ingest_mb_s_1``,
``ingest_mb_s_16``, ``ingest_ratio_16_vs_1``, ``ingest_ratio_32_noslots_vs_1``.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from fedquic.transport.pki import DevPki, init_dev_pki, issue_client_cert

TICK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a live process (its threads included)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICK


def rss_mb(pid: int, field: str = "VmRSS") -> float:
    """Resident memory in MB: ``VmRSS`` (all), or ``RssAnon`` (anonymous: what the kernel cannot drop; the
    server keeps client states as maps of their files, which count in VmRSS as page cache while touched)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1]) / 1024
    return 0.0


@dataclass
class RunResult:
    clients: int
    rounds: int
    ok: bool
    wall_s: float
    first_round_s: float  # start of the server -> round 1 closed (includes every client's handshake and join)
    round_s: float  # mean of rounds 2..R
    server_cpu_s: float
    server_rss_peak_mb: float
    server_anon_peak_mb: float
    rejected: dict[str, int]
    failed_clients: int
    uploads_in_flight_max: int
    history: list[dict[str, Any]] = field(repr=False)

    @property
    def cpu_s_per_client_round(self) -> float:
        return self.server_cpu_s / max(self.clients * self.rounds, 1)


def run_job(
    pki: DevPki,
    work: Path,
    *,
    name: str,
    clients: int,
    rounds: int,
    procs: int,
    layers: int,
    dim: int,
    rank: int,
    uplink: str,
    slots: int,
    timeout_s: float,
) -> RunResult:
    """One job: a server process and ``procs`` light client processes sharing ``clients`` clients."""
    run = work / name
    run.mkdir(parents=True)
    repo = str(Path(__file__).resolve().parents[1])  # `-m testkit.synthetic`: testkit/ lives in the checkout
    env = {
        **os.environ,
        "PYTHONUNBUFFERED": "1",
        "PYTHONPATH": os.pathsep.join(filter(None, [repo, os.environ.get("PYTHONPATH")])),
    }
    ready = run / "ready.json"
    server_log = (run / "server.log").open("wb")
    server = subprocess.Popen(
        [
            *(sys.executable, "-m", "fedquic", "server", "--host", "127.0.0.1", "--port", "0"),
            *("--certs", str(pki.root), "--run-dir", str(run / "server"), "--ready-file", str(ready)),
            *("--metrics-port", "0", "--rounds", str(rounds), "--min-clients", str(clients)),
            *("--local-steps", "1", "--round-timeout", str(timeout_s), "--registration-timeout", str(timeout_s)),
            *("--uplink", uplink, "--downlink", uplink, "--upload-slots", str(slots), "--log-level", "WARNING"),
        ],
        stdout=server_log,
        stderr=subprocess.STDOUT,
        env=env,
    )
    t0, t0_wall = time.monotonic(), time.time()
    workers: list[subprocess.Popen[bytes]] = []
    status: dict[str, Any] = {}
    peak = anon = cpu = 0.0
    try:
        while not ready.is_file():
            if server.poll() is not None or time.monotonic() - t0 > 60:
                raise RuntimeError(f"{name}: the server did not start (see {run / 'server.log'})")
            time.sleep(0.05)
        info = json.loads(ready.read_text())
        for j, n in enumerate(split(clients, procs)):
            if n == 0:
                continue
            workers.append(
                subprocess.Popen(
                    [
                        *(sys.executable, "-m", "testkit.synthetic", "--client-id", f"{name}-p{j}", "--count", str(n)),
                        *("--server", f"127.0.0.1:{info['port']}", "--certs", str(pki.root)),
                        *("--run-dir", str(run / f"p{j}"), "--seed", str(1000 * j)),
                        *("--layers", str(layers), "--dim", str(dim), "--rank", str(rank)),
                        *("--connect-attempts", "60", "--log-level", "WARNING"),
                    ],
                    stdout=(run / f"p{j}.log").open("wb"),
                    stderr=subprocess.STDOUT,
                    env=env,
                )
            )
        url = f"http://127.0.0.1:{info['metrics_port']}/status"
        last_poll = 0.0
        while server.poll() is None:
            if time.monotonic() - t0 > timeout_s * (rounds + 1):
                raise RuntimeError(f"{name}: the job did not finish in time")
            try:
                peak = max(peak, rss_mb(server.pid))
                anon = max(anon, rss_mb(server.pid, "RssAnon"))
                cpu = cpu_seconds(server.pid)
            except (FileNotFoundError, ProcessLookupError):
                break
            if time.monotonic() - last_poll > 1.0:
                last_poll = time.monotonic()
                try:
                    with urllib.request.urlopen(url, timeout=2) as resp:
                        status = json.loads(resp.read())
                except OSError:
                    pass  # the endpoint closes with the job
            time.sleep(0.05)
        wall = time.monotonic() - t0
        failed = 0
        for w in workers:
            try:
                w.wait(timeout=60)
            except subprocess.TimeoutExpired:
                w.kill()
        for j in range(len(workers)):
            failed += sum(" failed: " in line for line in (run / f"p{j}.log").read_text().splitlines())
    finally:
        for p in [server, *workers]:
            if p.poll() is None:
                p.kill()
    hist_file = run / "server" / "history.jsonl"
    from fedquic.server.history import read_history_dicts

    history = read_history_dicts(hist_file)
    times = [h["time"] for h in history]
    gaps = [b - a for a, b in itertools.pairwise(times)]
    return RunResult(
        clients=clients,
        rounds=len(history),
        ok=server.returncode == 0 and len(history) == rounds,
        wall_s=wall,
        first_round_s=(times[0] - t0_wall) if times else float("nan"),
        round_s=sum(gaps) / len(gaps) if gaps else float("nan"),
        server_cpu_s=cpu,
        server_rss_peak_mb=peak,
        server_anon_peak_mb=anon,
        rejected={str(k): int(v) for k, v in dict(status.get("rejected", {})).items()},
        failed_clients=failed,
        uploads_in_flight_max=int(status.get("uploads_in_flight_max", 0)),
        history=history,
    )


def ingest_rate(history: list[dict[str, Any]]) -> tuple[float, float]:
    """(MB/s, upload window seconds) of the best round: bytes up / (last accepted - first granted)."""
    best = (0.0, float("nan"))
    for h in history:
        st = [c for c in h["clients"].values() if "accepted_at" in c and "granted_at" in c]
        if not st:
            continue
        window = max(c["accepted_at"] for c in st) - min(c["granted_at"] for c in st)
        rate = sum(c["bytes_up"] for c in st) / max(window, 1e-9) / 1e6
        if rate > best[0]:
            best = (rate, window)
    return best


def split(clients: int, procs: int) -> list[int]:
    """How many clients each of ``procs`` processes runs (as even as possible)."""
    return [clients // procs + (1 if j < clients % procs else 0) for j in range(procs)]


def issue(pki: DevPki, name: str, clients: int, procs: int) -> None:
    for j, n in enumerate(split(clients, procs)):
        for i in range(n):
            issue_client_cert(pki, f"{name}-p{j}-{i}")


def scale_part(pki: DevPki, work: Path, args: argparse.Namespace) -> dict[str, Any]:
    rows: dict[str, RunResult] = {}
    print(
        f"{'clients':>7} {'ok':>3} {'join+r1 s':>9} {'round s':>8} {'cpu s':>7} {'cpu ms/cl-rd':>12} "
        f"{'RSS MB':>7} {'refused':>7} {'failed':>6}"
    )
    for label, n in (("base", args.base), ("full", args.clients)):
        procs = max(1, min(args.procs, n))
        issue(pki, f"scale{n}", n, procs)
        r = rows[label] = run_job(
            pki,
            work,
            name=f"scale{n}",
            clients=n,
            rounds=3,
            procs=procs,
            layers=2,
            dim=64,
            rank=4,
            uplink="int8",
            slots=8,
            timeout_s=600,
        )
        print(
            f"{n:>7} {'yes' if r.ok else 'NO':>3} {r.first_round_s:>9.1f} {r.round_s:>8.2f} {r.server_cpu_s:>7.1f} "
            f"{1000 * r.cpu_s_per_client_round:>12.1f} {r.server_rss_peak_mb:>7.1f} {sum(r.rejected.values()):>7} "
            f"{r.failed_clients:>6}",
            flush=True,
        )
    base, full = rows["base"], rows["full"]
    return {
        "clients": full.clients,
        "scale_ok": full.ok and base.ok,
        "rounds_completed": full.rounds,
        "first_round_s": full.first_round_s,
        "round_s": full.round_s,
        "round_s_base": base.round_s,
        "round_s_ratio": full.round_s / base.round_s,
        "clients_ratio": full.clients / base.clients,
        "server_cpu_s": full.server_cpu_s,
        "server_cpu_s_per_client_round": full.cpu_s_per_client_round,
        "cpu_per_client_round_ratio": full.cpu_s_per_client_round / base.cpu_s_per_client_round,
        "server_rss_peak_mb": full.server_rss_peak_mb,
        "server_rss_peak_mb_base": base.server_rss_peak_mb,
        "server_anon_peak_mb": full.server_anon_peak_mb,
        "rejected": sum(full.rejected.values()),
        "failed_clients": full.failed_clients,
        "scale_rows": {k: {kk: vv for kk, vv in asdict(v).items() if kk != "history"} for k, v in rows.items()},
    }


def ingest_part(pki: DevPki, work: Path, args: argparse.Namespace) -> dict[str, Any]:
    # fp32 LoRA of width 1024 at rank 16 on q/v: 262 KB per layer
    layers = max(1, round(args.payload_mb * 1e6 / (2 * 2 * 16 * 1024 * 4)))
    sweep = [(1, 8), (4, 8), (16, 8)] if args.quick else [(1, 8), (4, 8), (16, 8), (32, 8), (32, 32)]
    out: dict[str, Any] = {"payload_mb": layers * 2 * 2 * 16 * 1024 * 4 / 1e6, "ingest_rows": {}}
    print(
        f"{'clients':>7} {'slots':>5} {'ok':>3} {'MB/s':>6} {'x 1 cl':>6} {'window s':>8} {'round s':>8} "
        f"{'RSS MB':>7} {'anon MB':>7} {'in flight':>9} {'srv CPU':>7}"
    )
    base_rate = None
    for n, slots in sweep:
        name = f"ingest{n}s{slots}"
        procs = min(n, args.procs)
        issue(pki, name, n, procs)
        r = run_job(
            pki,
            work,
            name=name,
            clients=n,
            rounds=2,
            procs=procs,
            layers=layers,
            dim=1024,
            rank=16,
            uplink="fp32",
            slots=slots,
            timeout_s=600,
        )
        rate, window = ingest_rate(r.history)
        base_rate = base_rate or rate
        print(
            f"{n:>7} {slots:>5} {'yes' if r.ok else 'NO':>3} {rate:>6.1f} {rate / base_rate:>6.2f} {window:>8.2f} "
            f"{r.round_s if r.round_s == r.round_s else r.wall_s:>8.2f} {r.server_rss_peak_mb:>7.1f} "
            f"{r.server_anon_peak_mb:>7.1f} {r.uploads_in_flight_max:>9} {r.server_cpu_s / r.wall_s:>7.2f}",
            flush=True,
        )
        key = f"{n}" if slots == 8 else f"{n}_noslots"
        out["ingest_rows"][key] = {
            "clients": n,
            "slots": slots,
            "ok": r.ok,
            "mb_s": rate,
            "window_s": window,
            "round_s": r.round_s,
            "server_rss_peak_mb": r.server_rss_peak_mb,
            "server_anon_peak_mb": r.server_anon_peak_mb,
            "server_cpu_util": r.server_cpu_s / r.wall_s,  # cores' worth of CPU the server used over the job
            "uploads_in_flight_max": r.uploads_in_flight_max,
            "failed_clients": r.failed_clients,
            "rejected": sum(r.rejected.values()),
        }
        out[f"ingest_mb_s_{key}"] = rate
    rows = out["ingest_rows"]
    out["ingest_ok"] = all(v["ok"] for v in rows.values())
    out["ingest_ratio_16_vs_1"] = rows["16"]["mb_s"] / rows["1"]["mb_s"]
    if "32_noslots" in rows:
        out["ingest_ratio_32_noslots_vs_1"] = rows["32_noslots"]["mb_s"] / rows["1"]["mb_s"]
        rss = rows["32_noslots"]["server_rss_peak_mb"] / rows["32"]["server_rss_peak_mb"]
        out["rss_ratio_32_noslots_vs_slots"] = rss
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json", action="store_true", help="print one JSON object as the last line")
    ap.add_argument("--quick", action="store_true", help="40 clients (baseline 10), 1 MB payloads: a smoke test")
    ap.add_argument("--part", choices=("scale", "ingest", "all"), default="all")
    ap.add_argument("--clients", type=int, default=500)
    ap.add_argument("--base", type=int, default=50, help="clients in the baseline run of the scale part")
    ap.add_argument("--procs", type=int, default=4, help="light client processes")
    ap.add_argument("--payload-mb", type=float, default=4.0, help="fp32 update size in the ingest part")
    ap.add_argument("--keep", type=Path, help="keep the run directories here (default: a temporary directory)")
    args = ap.parse_args(argv)
    if args.quick:
        args.clients, args.base, args.payload_mb = 40, 10, 1.0
    out: dict[str, Any] = {"bench": "load", "quick": args.quick}
    with tempfile.TemporaryDirectory(prefix="fedquic-load-") as tmp:
        work = args.keep or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        pki = init_dev_pki(work / "pki")
        if args.part in ("scale", "all"):
            out.update(scale_part(pki, work, args))
        if args.part in ("ingest", "all"):
            out.update(ingest_part(pki, work, args))
    if args.json:
        print(json.dumps(out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
