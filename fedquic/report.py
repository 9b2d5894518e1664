"""``fedquic report RUN_DIR``: a run's ``history.jsonl`` as a table and plots (no torch).

RUN_DIR is either one server run directory (it holds ``history.jsonl``) or a directory with several of them
below it, such as a ``bench/federated.py`` run (``jobs/<name>/server/history.jsonl``, each job beside a
``job.json`` naming its variant and seed). Runs with the same variant are grouped: accuracy is given as mean ±
std over seeds (sample std), bytes and wall time as means.

Per run, from the server's per-round records:

* **accuracy**: each client's held-out accuracy as it reported it in METRICS, the first of ``acc_tf``
  (bench: teacher-forced greedy exact match), ``acc_exact``, ``acc_mc``, ``acc_cls``; a round's value is the
  mean over clients. A client's ``eval_round`` metric, when present, says which round's model was scored (the
  benchmark scores at the start of a round the model after the previous one); otherwise the round itself.
  Final accuracy = the last evaluated round.
* **bytes**: every client's UPDATE (``bytes_up``) and AGGREGATE (``bytes_down``) frames, headers included,
  summed over rounds; rounds whose clients all report ``eval_only`` are left out (the benchmark's extra
  scoring round). ``wire_ratio`` = the same tensors as raw float32 / those bytes.
* **wall time**: ``job.json``'s ``wall_s`` when present, else from the first to the last history record.

Outputs: a plain-text and a markdown table, ``<prefix>_acc_rounds.png`` (mean accuracy per round per variant)
and ``<prefix>_acc_mb.png`` (accuracy against cumulative MB sent), and ``<prefix>_report.json``.
"""

from __future__ import annotations

import json
import math
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ACC_KEYS = ("acc_tf", "acc_exact", "acc_mc", "acc_cls")


@dataclass
class JobSummary:
    name: str
    variant: str
    seed: int | None
    clients: dict[str, str]  # client id -> its task (or the id)
    acc_key: str | None
    curve: list[tuple[int, float, float]]  # (evaluated round, mean accuracy, cumulative bytes up to that round)
    final_acc: float  # mean over clients; nan if nothing was evaluated
    final_per_client: dict[str, float]
    bytes_up: float
    bytes_down: float
    fp32_bytes: float
    wall_s: float
    rounds: int
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def bytes_total(self) -> float:
        return self.bytes_up + self.bytes_down

    @property
    def wire_ratio(self) -> float:
        return self.fp32_bytes / self.bytes_total if self.bytes_total else float("nan")


def load_history(path: Path) -> list[dict[str, Any]]:
    """One record per line; a torn last line (a crash mid-write) is skipped."""
    out = []
    for line in Path(path).read_text().splitlines():
        if line.strip():
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return out


def _acc_key(history: list[dict[str, Any]]) -> str | None:
    for key in ACC_KEYS:
        if any(key in c for rec in history for c in rec.get("clients", {}).values()):
            return key
    return None


def summarize_history(history: list[dict[str, Any]], name: str, meta: dict[str, Any] | None = None) -> JobSummary:
    meta = meta or {}
    key = _acc_key(history)
    by_round: dict[int, dict[str, float]] = {}  # evaluated round -> client -> accuracy
    cum: dict[int, float] = {}  # round -> bytes sent up to and including it
    up = down = fp32 = 0.0
    clients: set[str] = set()
    for rec in sorted(history, key=lambda r: r["round"]):
        cl = rec.get("clients", {})
        clients.update(cl)
        eval_only = bool(cl) and all(c.get("eval_only") for c in cl.values())
        if not eval_only:
            for c in cl.values():
                up += c.get("bytes_up", 0.0)
                down += c.get("bytes_down", 0.0)
                fp32 += c.get("fp32_up", 0.0) + c.get("fp32_down", 0.0)
        cum[rec["round"]] = up + down
        if key is None:
            continue
        for cid, c in cl.items():
            if key in c:
                r = int(c.get("eval_round", rec["round"]))
                by_round.setdefault(r, {})[cid] = float(c[key])
    curve = []
    for r in sorted(by_round):
        vals = list(by_round[r].values())
        curve.append((r, sum(vals) / len(vals), cum.get(r, 0.0)))
    final = by_round[max(by_round)] if by_round else {}
    if meta.get("wall_s") is not None:
        wall = float(meta["wall_s"])
    elif len(history) >= 2:
        wall = history[-1]["time"] - history[0]["time"]
    else:
        wall = float("nan")
    names = meta.get("clients") or {}
    return JobSummary(
        name=name,
        variant=str(meta.get("variant") or name),
        seed=meta.get("seed"),
        clients={c: names.get(c, c) for c in sorted(clients)},
        acc_key=key,
        curve=curve,
        final_acc=sum(final.values()) / len(final) if final else float("nan"),
        final_per_client=dict(sorted(final.items())),
        bytes_up=up,
        bytes_down=down,
        fp32_bytes=fp32,
        wall_s=wall,
        rounds=sum(1 for rec in history if not all(c.get("eval_only") for c in rec.get("clients", {}).values())),
        extra={"start": history[0]["time"] if history else 0.0},
    )


def summarize_job(job_dir: Path) -> JobSummary:
    """A run directory holding ``history.jsonl``, or a bench job directory (``server/history.jsonl`` + ``job.json``)."""
    job_dir = Path(job_dir)
    hist = job_dir / "history.jsonl"
    if not hist.is_file():
        hist = job_dir / "server" / "history.jsonl"
    meta_path = job_dir / "job.json"
    meta = json.loads(meta_path.read_text()) if meta_path.is_file() else None
    return summarize_history(load_history(hist), job_dir.name, meta)


def find_jobs(run_dir: Path) -> list[Path]:
    """Directories of every run below ``run_dir`` (itself if it holds a history)."""
    run_dir = Path(run_dir)
    if (run_dir / "history.jsonl").is_file():
        return [run_dir]
    jobs = set()
    for h in run_dir.rglob("history.jsonl"):
        d = h.parent
        jobs.add(d.parent if d.name == "server" and (d.parent / "job.json").is_file() else d)
    return sorted(jobs)


def _mean_std(xs: list[float]) -> tuple[float, float]:
    xs = [x for x in xs if not math.isnan(x)]
    if not xs:
        return float("nan"), float("nan")
    return statistics.fmean(xs), statistics.stdev(xs) if len(xs) > 1 else 0.0


def group(jobs: list[JobSummary]) -> list[dict[str, Any]]:
    """One row per variant (in first-seen order): accuracy in points (mean, std over seeds), per client, bytes."""
    order: dict[str, list[JobSummary]] = {}
    for j in jobs:
        order.setdefault(j.variant, []).append(j)
    rows = []
    for variant, js in order.items():
        acc, std = _mean_std([j.final_acc * 100 for j in js])
        per_client: dict[str, float] = {}
        for cid in js[0].final_per_client:
            per_client[cid] = statistics.fmean(j.final_per_client.get(cid, float("nan")) * 100 for j in js)
        total = statistics.fmean(j.bytes_total for j in js)
        fp32 = statistics.fmean(j.fp32_bytes for j in js)
        rows.append(
            {
                "variant": variant,
                "seeds": [j.seed for j in js],
                "acc_mean": acc,
                "acc_std": std,
                "per_client": per_client,
                "clients": js[0].clients,
                "bytes_total": total,
                "bytes_up": statistics.fmean(j.bytes_up for j in js),
                "bytes_down": statistics.fmean(j.bytes_down for j in js),
                "fp32_bytes": fp32,
                "wire_ratio": fp32 / total if total else float("nan"),
                "wall_s": statistics.fmean(j.wall_s for j in js),
                "rounds": js[0].rounds,
                "acc_key": js[0].acc_key,
                # mean curve over seeds: (round, acc points, cumulative MB)
                "curve": _mean_curve(js),
            }
        )
    return rows


def _mean_curve(js: list[JobSummary]) -> list[tuple[int, float, float]]:
    rounds = sorted({r for j in js for r, _, _ in j.curve})
    out = []
    for r in rounds:
        pts = [(a, b) for j in js for rr, a, b in j.curve if rr == r]
        out.append((r, statistics.fmean(a for a, _ in pts) * 100, statistics.fmean(b for _, b in pts) / 1e6))
    return out


def _fmt(x: float, spec: str) -> str:
    return "–" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, spec)


def text_table(rows: list[dict[str, Any]]) -> str:
    clients = list(rows[0]["per_client"]) if rows else []
    tasks = [rows[0]["clients"].get(c, c) for c in clients] if rows else []
    head = f"{'variant':<20} {'seeds':>5} {'acc (pts)':>14} " + " ".join(f"{t[:8]:>8}" for t in tasks)
    head += f" {'MB up+down':>11} {'x fp32':>7} {'wall s':>7}"
    lines = [head]
    for r in rows:
        acc = f"{_fmt(r['acc_mean'], '.2f')} ± {_fmt(r['acc_std'], '.2f')}"
        pc = " ".join(f"{_fmt(r['per_client'].get(c, float('nan')), '.1f'):>8}" for c in clients)
        lines.append(
            f"{r['variant']:<20} {len(r['seeds']):>5} {acc:>14} {pc} {r['bytes_total'] / 1e6:>11.2f} "
            f"{_fmt(r['wire_ratio'], '.2f'):>7} {_fmt(r['wall_s'], '.0f'):>7}"
        )
    return "\n".join(lines)


def markdown_table(rows: list[dict[str, Any]]) -> str:
    clients = list(rows[0]["per_client"]) if rows else []
    tasks = [rows[0]["clients"].get(c, c) for c in clients] if rows else []
    out = [
        "| variant | seeds | accuracy (points) | "
        + " | ".join(tasks)
        + " | MB up+down | x smaller than fp32 | wall s |",
        "|---|---:|---:|" + "---:|" * len(tasks) + "---:|---:|---:|",
    ]
    for r in rows:
        acc = (
            f"{_fmt(r['acc_mean'], '.2f')} ± {_fmt(r['acc_std'], '.2f')}"
            if len(r["seeds"]) > 1
            else _fmt(r["acc_mean"], ".2f")
        )
        pc = " | ".join(_fmt(r["per_client"].get(c, float("nan")), ".1f") for c in clients)
        out.append(
            f"| {r['variant']} | {len(r['seeds'])} | {acc} | {pc} | {r['bytes_total'] / 1e6:.2f} | "
            f"{_fmt(r['wire_ratio'], '.2f')} | {_fmt(r['wall_s'], '.0f')} |"
        )
    return "\n".join(out)


def write_plots(rows: list[dict[str, Any]], out_dir: Path, prefix: str = "report") -> list[str]:
    """The two PNGs; matplotlib (the ``report`` extra) with the Agg backend, no display needed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    for r in rows:
        if r["curve"]:
            xs, ys, _ = zip(*r["curve"], strict=True)
            ax.plot(
                xs, ys, marker="o", ms=3, label=f"{r['variant']} ({len(r['seeds'])} seed{'s' * (len(r['seeds']) > 1)})"
            )
    ax.set_xlabel("round (model after it; 0 = base model)")
    ax.set_ylabel("held-out accuracy, mean over clients (points)")
    ax.grid(alpha=0.3)
    paths.append(_save(fig, ax, out_dir / f"{prefix}_acc_rounds.png"))
    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    for r in rows:
        pts = [(mb, a) for _, a, mb in r["curve"] if mb > 0]
        if pts:
            xs, ys = zip(*pts, strict=True)
            ax.plot(xs, ys, marker="o", ms=3, label=r["variant"])
    ax.set_xscale("log")
    ax.set_xlabel("cumulative MB sent, all clients, up + down (log)")
    ax.set_ylabel("held-out accuracy (points)")
    ax.grid(alpha=0.3, which="both")
    paths.append(_save(fig, ax, out_dir / f"{prefix}_acc_mb.png"))
    return paths


def _save(fig: Any, ax: Any, path: Path) -> str:
    """Legend, layout, PNG, and the figure closed (pyplot keeps every open figure alive)."""
    import matplotlib.pyplot as plt

    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return str(path)


def report(
    run_dir: Path, out_dir: Path | None = None, prefix: str = "report", plots: bool = True, json_dir: Path | None = None
) -> dict[str, Any]:
    """Summaries, tables, plots (in ``out_dir``, default ``run_dir``) and ``<prefix>_report.json`` (in
    ``json_dir``, default ``out_dir``)."""
    run_dir = Path(run_dir)
    dirs = find_jobs(run_dir)
    if not dirs:
        raise FileNotFoundError(f"no history.jsonl under {run_dir}")
    jobs = sorted((summarize_job(d) for d in dirs), key=lambda j: j.extra["start"])  # run order
    rows = group(jobs)
    out_dir = Path(out_dir) if out_dir is not None else run_dir
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = write_plots(rows, out_dir, prefix) if plots else []
    result = {
        "run_dir": str(run_dir),
        "variants": rows,
        "table": text_table(rows),
        "markdown": markdown_table(rows),
        "plots": paths,
    }
    json_dir = Path(json_dir) if json_dir is not None else out_dir
    json_dir.mkdir(parents=True, exist_ok=True)
    (json_dir / f"{prefix}_report.json").write_text(json.dumps(result, indent=1))
    return result


__all__ = [
    "JobSummary",
    "find_jobs",
    "group",
    "load_history",
    "markdown_table",
    "report",
    "summarize_history",
    "summarize_job",
    "text_table",
    "write_plots",
]
