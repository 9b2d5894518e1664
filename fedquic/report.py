"""``fedquic report RUN_DIR``: servers' ``history.jsonl`` files as a table and plots (no torch).

RUN_DIR is one server run directory (it holds ``history.jsonl``) or a directory with several runs below it, such
as ``runs/`` or a ``bench/federated.py`` run (``jobs/<name>/server/history.jsonl``, each job beside a ``job.json``
naming its ``variant`` and ``seed``).

**Rows.** A run is named by the ``job_id`` its history records carry; older files without it are named by their
folder relative to RUN_DIR (RUN_DIR's own name when RUN_DIR is the run). Two runs with the same name get their
relative path appended. Runs are grouped into one row only when a ``job.json`` beside each declares the same
``variant`` (and they sit in the same folder of jobs): the row is named by the variant, accuracy is the mean ±
sample std over its ``n`` runs, bytes and wall time are means. Every other run is a row of its own (``n`` = 1, no
std); runs are never merged otherwise. One history file holding several jobs (the job id changes, or the round
number goes back) is split into one run per job; a round written twice (a resumed server) counts once.

Per run, from the server's per-round records (``clients``: each client's METRICS for the round, plus its bytes):

* **accuracy**: each client's held-out accuracy, the first of ``acc_tf`` (bench: teacher-forced greedy exact
  match), ``acc_exact``, ``acc_mc``, ``acc_cls`` that it reports; a round's value is the mean over clients. A
  value in round r's stats scores the model after round r (its aggregate installed; after training in ``local``
  mode), unless the client's ``eval_round`` says which round's model was scored (the benchmark scores at the start
  of a round the model after the previous one). ``base_<key>`` (round 1's stats, e.g. ``base_acc_exact``) is the
  base model: round 0. ``eval_final: 1`` marks the evaluation on the whole held-out set at the job's end: it wins
  over another value for the same round. Final accuracy = the last evaluated round (the last ``eval_final`` one
  when there is one). ``loss_eval`` / ``base_loss_eval`` give the held-out loss the same way; ``eval_n`` (items
  scored) goes to the JSON.
* **bytes**: every client's UPDATE (``bytes_up``) and AGGREGATE (``bytes_down``) frames as the server counted
  them, headers included, summed over rounds; rounds whose clients all report ``eval_only`` are left out (the
  benchmark's extra scoring round). ``wire_ratio`` (``x fp32``) = the same tensors as raw float32 / those bytes;
  n/a when no tensors were sent (``local`` federation: header-only UPDATEs).
* **wall time**: ``job.json``'s ``wall_s`` (the whole job, model loading included) when present, else first to
  last history record (round closes only: setup and round 1 are not in it). The table marks each row ``j``
  (job.json), ``h`` (history) or ``j+h`` (a row whose runs differ) when not all rows have the same source.

Outputs (``prefix`` default ``report``; in ``out_dir``, default RUN_DIR): the plain-text and markdown tables (each
with a legend), ``<prefix>.json`` (per row ``n``, ``runs``, ``acc_mean``, ``acc_std`` (null when n = 1), bytes,
``wall_s`` and ``wall_source``; per run; the tables; NaN as null), ``<prefix>_acc_rounds.png`` (mean accuracy per
round per row) and ``<prefix>_acc_mb.png`` (accuracy against cumulative MB sent). The default prefix gives
``report.json``, ``report_acc_rounds.png`` and ``report_acc_mb.png``; a run whose aggregation rule weighted the
contributors (``loo-simgrad``) also gets ``<prefix>_relevance_<run>.png``, its last round's matrix (history.jsonl's
``weights``), and ``relevance`` in its JSON entry.
"""

from __future__ import annotations

import json
import math
import statistics
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ACC_KEYS = ("acc_tf", "acc_exact", "acc_mc", "acc_cls")
LOSS_KEY = "loss_eval"
WALL_JOB, WALL_HISTORY = "job.json", "history"
_WALL_MARK = {WALL_JOB: "j", WALL_HISTORY: "h", "mixed": "j+h"}
LEGEND_ACC = "acc: held-out accuracy at the last evaluated round, mean over clients (points); n: runs in the row"
LEGEND_STD = "± = sample std over them (seeds a job.json declares for one variant)"
LEGEND_RATIO = "x fp32: fp32 tensor size / bytes sent (– if no tensors)"
LEGEND_WALL = (
    "wall s: job.json's wall_s (whole job incl. model load) when present, else first to last history record "
    "(round closes only)"
)


@dataclass
class JobSummary:
    name: str  # unique among the runs of a report: job id, else folder relative to RUN_DIR
    variant: str  # job.json's variant, else the name
    seed: int | None
    clients: dict[str, str]  # client id -> its task (or the id)
    acc_key: str | None  # the clients' accuracy key ("a+b" when clients report different ones)
    curve: list[tuple[int, float, float]]  # (evaluated round, mean accuracy, cumulative bytes up to that round)
    final_acc: float  # mean over clients; nan if nothing was evaluated
    final_per_client: dict[str, float]
    bytes_up: float
    bytes_down: float
    fp32_bytes: float
    wall_s: float
    rounds: int
    extra: dict[str, Any] = field(default_factory=dict)
    job_id: str | None = None  # from the history records (None: an older file)
    path: str = "."  # the run's folder relative to RUN_DIR
    declared: bool = False  # a job.json beside it declares its variant: grouped with the same variant's seeds
    group_dir: str = "."  # the folder its declared seeds share (a bench run directory)
    wall_source: str = ""  # WALL_JOB, WALL_HISTORY, or "" (unknown)
    final_round: int | None = None
    final_eval_n: dict[str, float] = field(default_factory=dict)  # client -> items scored at the final round
    loss_curve: list[tuple[int, float]] = field(default_factory=list)  # (evaluated round, mean held-out loss)
    final_loss: float = float("nan")
    # The last round's weights of a rule that weights contributors (loo-simgrad): recipient -> contributor -> share
    relevance: dict[str, dict[str, float]] = field(default_factory=dict)

    @property
    def bytes_total(self) -> float:
        return self.bytes_up + self.bytes_down

    @property
    def wire_ratio(self) -> float:
        """fp32 size / bytes sent; nan when nothing was sent or no tensors were (header-only UPDATEs)."""
        return _ratio(self.fp32_bytes, self.bytes_total)


def _ratio(fp32: float, total: float) -> float:
    return fp32 / total if fp32 > 0 and total > 0 else float("nan")


def _num(x: Any) -> float | None:
    """A finite number, else None (a missing, null, NaN or non-numeric METRICS value)."""
    if isinstance(x, bool) or not isinstance(x, (int, float)):
        return None
    x = float(x)
    return x if math.isfinite(x) else None


def load_history(path: Path) -> list[dict[str, Any]]:
    """One record per round (:mod:`fedquic.server.history`, either version), each client's METRICS and the
    server's figures merged under ``clients``; a torn last line (a crash mid-write) is skipped."""
    from .server.history import read_history_dicts

    return read_history_dicts(Path(path))


def split_jobs(history: list[dict[str, Any]]) -> list[list[dict[str, Any]]]:
    """The jobs one history file holds, in file order: a new one starts where ``job_id`` changes or the round
    number goes back (a new job appended to the same file). Records without ``job_id`` stay with their neighbours."""
    jobs: list[list[dict[str, Any]]] = []
    cur: list[dict[str, Any]] = []
    cur_id: str | None = None
    last: float | None = None
    for rec in history:
        jid = rec.get("job_id")
        rnd = _num(rec.get("round"))
        if cur and (
            (jid is not None and cur_id is not None and jid != cur_id)
            or (rnd is not None and last is not None and rnd < last)
        ):
            jobs.append(cur)
            cur, cur_id, last = [], None, None
        cur.append(rec)
        cur_id = jid if jid is not None else cur_id
        last = rnd if rnd is not None else last
    if cur:
        jobs.append(cur)
    return jobs


def _job_id(history: list[dict[str, Any]]) -> str | None:
    return next((str(r["job_id"]) for r in history if r.get("job_id") is not None), None)


def _client_keys(history: list[dict[str, Any]]) -> dict[str, str]:
    """Per client, the first of ACC_KEYS it reports in any round (plain or as ``base_<key>``)."""
    seen: dict[str, set[str]] = {}
    for rec in history:
        for cid, c in (rec.get("clients") or {}).items():
            if isinstance(c, dict):
                seen.setdefault(cid, set()).update(c)
    out = {}
    for cid, keys in seen.items():
        key = next((k for k in ACC_KEYS if k in keys or f"base_{k}" in keys), None)
        if key is not None:
            out[cid] = key
    return out


def _put(series: dict[int, dict[str, tuple[bool, float]]], rnd: int, cid: str, final: bool, value: float) -> None:
    """A later value for the same round and client replaces an earlier one, except over an ``eval_final`` one."""
    slot = series.setdefault(rnd, {})
    old = slot.get(cid)
    if old is None or final or not old[0]:
        slot[cid] = (final, value)


def _final_round(series: dict[int, dict[str, tuple[bool, float]]]) -> int | None:
    finals = [r for r, vals in series.items() if any(f for f, _ in vals.values())]
    return max(finals) if finals else (max(series) if series else None)


Series = dict[int, dict[str, tuple[bool, float]]]  # evaluated round -> client -> (eval_final, value)


@dataclass
class _Tally:
    """What one job's history rows add up to, round by round."""

    acc: Series = field(default_factory=dict)
    loss: Series = field(default_factory=dict)
    n_items: Series = field(default_factory=dict)
    base_acc: dict[str, float] = field(default_factory=dict)
    base_loss: dict[str, float] = field(default_factory=dict)
    cum: dict[int, float] = field(default_factory=dict)  # round -> bytes sent up to and including it
    up: float = 0.0
    down: float = 0.0
    fp32: float = 0.0
    rounds: int = 0
    clients: dict[str, None] = field(default_factory=dict)

    def add_round(self, rnd: int, rec: dict[str, Any], keys: dict[str, str]) -> None:
        cl = {cid: c for cid, c in (rec.get("clients") or {}).items() if isinstance(c, dict)}
        self.clients.update(dict.fromkeys(cl))
        if not (bool(cl) and all(c.get("eval_only") for c in cl.values())):  # an evaluation-only row sends nothing
            self.rounds += 1
            for c in cl.values():
                self.up += _num(c.get("bytes_up")) or 0.0
                self.down += _num(c.get("bytes_down")) or 0.0
                self.fp32 += (_num(c.get("fp32_up")) or 0.0) + (_num(c.get("fp32_down")) or 0.0)
        self.cum[rnd] = self.up + self.down
        for cid, c in cl.items():
            self._add_client(rnd, cid, c, keys.get(cid))

    def _add_client(self, rnd: int, cid: str, c: dict[str, Any], key: str | None) -> None:
        er = _num(c.get("eval_round"))
        r = int(er) if er is not None else rnd
        final = bool(c.get("eval_final"))
        acc = _num(c.get(key)) if key else None
        lss = _num(c.get(LOSS_KEY))
        if acc is not None:
            _put(self.acc, r, cid, final, acc)
        if lss is not None:
            _put(self.loss, r, cid, final, lss)
        n = _num(c.get("eval_n"))
        if n is not None and (acc is not None or lss is not None):
            _put(self.n_items, r, cid, final, n)
        if key and _num(c.get(f"base_{key}")) is not None:
            self.base_acc.setdefault(cid, float(c[f"base_{key}"]))
        if _num(c.get(f"base_{LOSS_KEY}")) is not None:
            self.base_loss.setdefault(cid, float(c[f"base_{LOSS_KEY}"]))

    def close(self) -> None:
        # the base model's evaluation is round 0, unless an eval_round-0 value (the benchmark's) already says it
        for series, base in ((self.acc, self.base_acc), (self.loss, self.base_loss)):
            for cid, v in base.items():
                series.setdefault(0, {}).setdefault(cid, (False, v))

    def cum_at(self, r: int) -> float:
        done = [rr for rr in self.cum if rr <= r]
        return self.cum[max(done)] if done else 0.0


def _wall(meta: dict[str, Any], times: list[float]) -> tuple[float, str]:
    if _num(meta.get("wall_s")) is not None:
        return float(meta["wall_s"]), WALL_JOB
    if len(times) >= 2:
        return max(times) - min(times), WALL_HISTORY
    return float("nan"), ""


def summarize_history(
    history: list[dict[str, Any]],
    name: str,
    meta: dict[str, Any] | None = None,
    *,
    path: str = ".",
    group_dir: str = ".",
) -> JobSummary:
    """One run's records (one job: see :func:`split_jobs`) and its ``job.json`` (``meta``), if any."""
    meta = meta or {}
    keys = _client_keys(history)
    records: dict[int, dict[str, Any]] = {}
    for rec in history:  # a round written twice (a resumed server): the later record
        rnd = _num(rec.get("round"))
        if rnd is not None:
            records[int(rnd)] = rec
    t = _Tally()
    for rnd, rec in sorted(records.items()):
        t.add_round(rnd, rec, keys)
    t.close()
    curve = [(r, statistics.fmean(v for _, v in t.acc[r].values()), t.cum_at(r)) for r in sorted(t.acc)]
    fr, lr = _final_round(t.acc), _final_round(t.loss)
    final = {cid: v for cid, (_, v) in t.acc[fr].items()} if fr is not None else {}
    times = [x for x in (_num(rec.get("time")) for rec in history) if x is not None]
    wall, source = _wall(meta, times)
    names = meta.get("clients") if isinstance(meta.get("clients"), dict) else {}
    used = [k for k in ACC_KEYS if k in keys.values()]
    return JobSummary(
        name=name,
        variant=str(meta.get("variant") or name),
        seed=meta.get("seed"),
        clients={c: str(names.get(c, c)) for c in sorted(t.clients)},
        acc_key="+".join(used) if used else None,
        curve=curve,
        final_acc=statistics.fmean(final.values()) if final else float("nan"),
        final_per_client=dict(sorted(final.items())),
        bytes_up=t.up,
        bytes_down=t.down,
        fp32_bytes=t.fp32,
        wall_s=wall,
        rounds=t.rounds,
        extra={"start": min(times) if times else 0.0},
        job_id=_job_id(history),
        path=path,
        declared=meta.get("variant") is not None,
        group_dir=group_dir,
        wall_source=source,
        final_round=fr,
        final_eval_n={cid: v for cid, (_, v) in sorted(t.n_items.get(fr, {}).items())} if fr is not None else {},
        loss_curve=[(r, statistics.fmean(v for _, v in t.loss[r].values())) for r in sorted(t.loss)],
        final_loss=statistics.fmean(v for _, v in t.loss[lr].values()) if lr is not None else float("nan"),
        relevance=_relevance(records),
    )


def _relevance(records: dict[int, dict[str, Any]]) -> dict[str, dict[str, float]]:
    """The last round's ``weights`` (history.jsonl), numbers only."""
    last = records[max(records)].get("weights") if records else None
    if not isinstance(last, dict):
        return {}
    return {
        str(r): {str(c): float(v) for c, v in row.items() if _num(v) is not None}
        for r, row in sorted(last.items())
        if isinstance(row, dict)
    }


def _history_file(job_dir: Path) -> Path:
    hist = job_dir / "history.jsonl"
    return hist if hist.is_file() else job_dir / "server" / "history.jsonl"


def _read_meta(job_dir: Path) -> dict[str, Any] | None:
    p = job_dir / "job.json"
    if not p.is_file():
        return None
    try:
        meta = json.loads(p.read_text())
    except (OSError, json.JSONDecodeError):
        return None
    return meta if isinstance(meta, dict) else None


def _rel(d: Path, root: Path) -> str:
    """``d`` relative to ``root``; ``root``'s own name for ``root`` itself; the absolute path outside it."""
    d, root = d.resolve(), root.resolve()
    if d == root:
        return d.name or str(d)
    try:
        return d.relative_to(root).as_posix()
    except ValueError:
        return str(d)


def summarize_runs(job_dir: Path, root: Path | None = None) -> list[JobSummary]:
    """Every job in a run directory holding ``history.jsonl`` or a bench job directory (``server/history.jsonl``
    + ``job.json``), named by job id, else by ``job_dir`` relative to ``root`` (default: ``job_dir``'s parent).
    Names are not yet unique across directories (:func:`load_runs` makes them so)."""
    job_dir = Path(job_dir)
    root = Path(root) if root is not None else job_dir.parent
    meta = _read_meta(job_dir)
    path = _rel(job_dir, root)
    group_dir = _rel(job_dir.parent.parent if job_dir.parent.name == "jobs" else job_dir.parent, root)
    parts = split_jobs(load_history(_history_file(job_dir))) or [[]]
    meta_id = None
    if meta is not None:
        meta_id = meta.get("job_id") or (meta.get("job") if isinstance(meta.get("job"), dict) else {}).get("job_id")
    if len(parts) == 1:
        owner = 0
    else:  # job.json describes the part with its job id (or none of them, rather than the wrong one)
        owner = max((i for i, p in enumerate(parts) if meta_id is not None and _job_id(p) == meta_id), default=-1)
    out = []
    for i, part in enumerate(parts):
        jid = _job_id(part)
        out.append(summarize_history(part, jid or path, meta if i == owner else None, path=path, group_dir=group_dir))
    return out


def summarize_job(job_dir: Path, root: Path | None = None) -> JobSummary:
    """The job in a run directory holding ``history.jsonl``, or a bench job directory (``server/history.jsonl`` +
    ``job.json``); of several jobs in one file, the one ``job.json`` describes, else the last."""
    runs = summarize_runs(job_dir, root)
    return next((j for j in runs if j.declared), runs[-1])


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


def _unique(pairs: list[tuple[str, str]]) -> list[str]:
    """Names (base, where): a base shared by several gets `` (where)``, one still shared a ``#k``."""
    count = Counter(b for b, _ in pairs)
    names = [f"{b} ({w})" if count[b] > 1 and w != b else b for b, w in pairs]
    count = Counter(names)
    seen: Counter[str] = Counter()
    out = []
    for n in names:
        seen[n] += 1
        out.append(f"{n} #{seen[n]}" if count[n] > 1 else n)
    return out


def load_runs(run_dir: Path) -> list[JobSummary]:
    """Every run below ``run_dir`` (:func:`find_jobs`), in run order, with unique names."""
    run_dir = Path(run_dir)
    runs = [j for d in find_jobs(run_dir) for j in summarize_runs(d, run_dir)]
    if not runs:
        raise FileNotFoundError(f"no history.jsonl under {run_dir}")
    for j, name in zip(runs, _unique([(j.name, j.path) for j in runs]), strict=True):
        if not j.declared and j.variant == j.name:
            j.variant = name
        j.name = name
    return sorted(runs, key=lambda j: j.extra["start"])


def _mean_std(xs: list[float]) -> tuple[float, float | None]:
    """Mean and sample std of the finite values; std None with fewer than two."""
    xs = [x for x in xs if not math.isnan(x)]
    if not xs:
        return float("nan"), None
    return statistics.fmean(xs), statistics.stdev(xs) if len(xs) > 1 else None


def _mean(xs: Any) -> float:
    xs = [x for x in xs if x is not None and not math.isnan(x)]
    return statistics.fmean(xs) if xs else float("nan")


def group(jobs: list[JobSummary]) -> list[dict[str, Any]]:
    """One row per declared variant (runs whose job.json names it, in one folder of jobs) and per other run, in
    first-seen order: accuracy in points (mean, std over the runs), per client, bytes, wall time."""
    order: dict[tuple[Any, ...], list[JobSummary]] = {}
    for i, j in enumerate(jobs):
        key = ("variant", j.group_dir, j.variant) if j.declared else ("run", i)
        order.setdefault(key, []).append(j)
    groups = list(order.values())
    names = _unique([(js[0].variant, js[0].group_dir) if js[0].declared else (js[0].name, js[0].path) for js in groups])
    rows = []
    for name, js in zip(names, groups, strict=True):
        acc, std = _mean_std([j.final_acc * 100 for j in js])
        cids = sorted({c for j in js for c in j.final_per_client})
        per_client = {c: _mean(j.final_per_client.get(c, float("nan")) * 100 for j in js) for c in cids}
        clients: dict[str, str] = {}
        for j in js:
            for c, task in j.clients.items():
                clients.setdefault(c, task)
        total = statistics.fmean(j.bytes_total for j in js)
        fp32 = statistics.fmean(j.fp32_bytes for j in js)
        sources = {j.wall_source for j in js if j.wall_source}
        eval_n = {c: _mean(j.final_eval_n.get(c) for j in js) for c in sorted({c for j in js for c in j.final_eval_n})}
        rows.append(
            {
                "variant": name,  # the row's name: the declared variant, else the run's job id
                "declared_variant": js[0].variant if js[0].declared else None,
                "n": len(js),
                "runs": [j.name for j in js],
                "job_ids": [j.job_id for j in js],
                "paths": [j.path for j in js],
                "seeds": [j.seed for j in js],
                "acc_mean": acc,
                "acc_std": std,
                "per_client": per_client,
                "clients": dict(sorted(clients.items())),
                "final_round": [j.final_round for j in js],
                "eval_n": eval_n,
                "loss_mean": _mean(j.final_loss for j in js),
                "bytes_total": total,
                "bytes_up": statistics.fmean(j.bytes_up for j in js),
                "bytes_down": statistics.fmean(j.bytes_down for j in js),
                "fp32_bytes": fp32,
                "wire_ratio": _ratio(fp32, total),
                "wall_s": _mean(j.wall_s for j in js),
                "wall_source": sources.pop() if len(sources) == 1 else "mixed" if sources else "",
                "rounds": max(j.rounds for j in js),
                "acc_key": js[0].acc_key,
                # mean curve over the runs: (round, acc points, cumulative MB)
                "curve": _mean_curve(js),
                "loss_curve": _mean_loss_curve(js),
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


def _mean_loss_curve(js: list[JobSummary]) -> list[tuple[int, float]]:
    rounds = sorted({r for j in js for r, _ in j.loss_curve})
    return [(r, statistics.fmean(v for j in js for rr, v in j.loss_curve if rr == r)) for r in rounds]


def _fmt(x: float | None, spec: str) -> str:
    return "–" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, spec)


def _acc_cell(r: dict[str, Any]) -> str:
    if r["acc_std"] is None:
        return _fmt(r["acc_mean"], ".2f")
    return f"{_fmt(r['acc_mean'], '.2f')} ± {r['acc_std']:.2f}"


def _columns(rows: list[dict[str, Any]]) -> tuple[list[tuple[str, str]], bool, bool]:
    """Client columns (id, task) over all rows; whether to show a loss column; whether to mark wall sources."""
    tasks: dict[str, set[str]] = {}
    for r in rows:
        for c in r["per_client"]:
            tasks.setdefault(c, set()).add(r["clients"].get(c, c))
    # a client's task names the column where the rows agree on it (unrelated jobs may reuse client ids)
    clients = {c: next(iter(t - {c})) if len(t - {c}) == 1 else c for c, t in tasks.items()}
    has_loss = any(not math.isnan(r["loss_mean"]) for r in rows)
    mark = len({r["wall_source"] for r in rows}) > 1 or any(r["wall_source"] == "mixed" for r in rows)
    return list(clients.items()), has_loss, mark


def _wall_cell(r: dict[str, Any], mark: bool) -> str:
    s = _fmt(r["wall_s"], ".0f")
    return f"{s} {_WALL_MARK.get(r['wall_source'], '?')}" if mark and r["wall_source"] else s


def legend(rows: list[dict[str, Any]]) -> list[str]:
    """What the columns mean (wall time's source, spelt out)."""
    _, _, mark = _columns(rows)
    std = any(r["acc_std"] is not None for r in rows)
    return [
        "; ".join([LEGEND_ACC] + [LEGEND_STD] * std + [LEGEND_RATIO]),
        LEGEND_WALL + ("; j = job.json, h = history" if mark else ""),
    ]


def text_table(rows: list[dict[str, Any]]) -> str:
    clients, has_loss, mark = _columns(rows)
    w = max([len("variant / job")] + [len(r["variant"]) for r in rows])
    head = f"{'variant / job':<{w}} {'n':>3} {'acc (pts)':>15} " + " ".join(f"{t[:8]:>8}" for _, t in clients)
    head += (f" {'loss':>7}" if has_loss else "") + f" {'MB up+down':>11} {'x fp32':>7} {'wall s':>9}"
    lines = [head]
    for r in rows:
        pc = " ".join(f"{_fmt(r['per_client'].get(c, float('nan')), '.1f'):>8}" for c, _ in clients)
        loss = f" {_fmt(r['loss_mean'], '.3f'):>7}" if has_loss else ""
        lines.append(
            f"{r['variant']:<{w}} {r['n']:>3} {_acc_cell(r):>15} {pc}{loss} {r['bytes_total'] / 1e6:>11.2f} "
            f"{_fmt(r['wire_ratio'], '.2f'):>7} {_wall_cell(r, mark):>9}"
        )
    return "\n".join(lines + legend(rows))


def markdown_table(rows: list[dict[str, Any]]) -> str:
    clients, has_loss, mark = _columns(rows)
    tasks = [t for _, t in clients]
    out = [
        "| variant / job | n | accuracy (points) | "
        + "".join(f"{t} | " for t in tasks)
        + ("loss | " if has_loss else "")
        + "MB up+down | x smaller than fp32 | wall s |",
        "|---|---:|---:|" + "---:|" * (len(tasks) + has_loss) + "---:|---:|---:|",
    ]
    for r in rows:
        pc = "".join(f"{_fmt(r['per_client'].get(c, float('nan')), '.1f')} | " for c, _ in clients)
        loss = f"{_fmt(r['loss_mean'], '.3f')} | " if has_loss else ""
        out.append(
            f"| {r['variant']} | {r['n']} | {_acc_cell(r)} | {pc}{loss}{r['bytes_total'] / 1e6:.2f} | "
            f"{_fmt(r['wire_ratio'], '.2f')} | {_wall_cell(r, mark)} |"
        )
    return "\n".join(out) + "\n\n" + "\n\n".join(legend(rows))


def _label(r: dict[str, Any]) -> str:
    return f"{r['variant']} (n={r['n']})" if r["n"] > 1 else r["variant"]


def write_plots(rows: list[dict[str, Any]], out_dir: Path, prefix: str = "report") -> list[str]:
    """``<prefix>_acc_rounds.png`` and ``<prefix>_acc_mb.png``; matplotlib (the ``report`` extra) with the Agg
    backend, no display needed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    for r in rows:
        if r["curve"]:
            xs, ys, _ = zip(*r["curve"], strict=True)
            ax.plot(xs, ys, marker="o", ms=3, label=_label(r))
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("round (model after it; 0 = base model)")
    ax.set_ylabel("held-out accuracy, mean over clients (points)")
    ax.grid(alpha=0.3)
    paths.append(_save(fig, ax, out_dir / f"{prefix}_acc_rounds.png"))
    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    for r in rows:
        pts = [(mb, a) for _, a, mb in r["curve"] if mb > 0]
        if pts:
            xs, ys = zip(*pts, strict=True)
            ax.plot(xs, ys, marker="o", ms=3, label=_label(r))
    ax.set_xscale("log")
    ax.set_xlabel("cumulative MB sent, all clients, up + down (log)")
    ax.set_ylabel("held-out accuracy (points)")
    ax.grid(alpha=0.3, which="both")
    paths.append(_save(fig, ax, out_dir / f"{prefix}_acc_mb.png"))
    return paths


def write_relevance_plots(jobs: list[JobSummary], out_dir: Path, prefix: str = "report") -> list[str]:
    """``<prefix>_relevance_<run>.png`` for every run whose rule weighted contributors: the last round's matrix,
    one row per recipient, one column per contributor (the share it had in that recipient's aggregate)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    for j in jobs:
        if not j.relevance:
            continue
        rows = sorted(j.relevance)
        cols = sorted({c for r in j.relevance.values() for c in r} | set(rows))
        grid = [[j.relevance[r].get(c, float("nan")) for c in cols] for r in rows]
        fig, ax = plt.subplots(figsize=(1.2 + 0.55 * len(cols), 1.0 + 0.5 * len(rows)))
        im = ax.imshow(grid, vmin=0.0, cmap="viridis")

        def label(cid: str, j: JobSummary = j) -> str:  # the client's task beside its id, when job.json names one
            task = j.clients.get(cid, cid)
            return cid if task == cid else f"{cid} {task}"

        ax.set_xticks(range(len(cols)), [label(c) for c in cols], rotation=45, ha="right", fontsize=7)
        ax.set_yticks(range(len(rows)), [label(r) for r in rows], fontsize=7)
        if len(cols) <= 12:
            for y, line in enumerate(grid):
                for x, v in enumerate(line):
                    if v == v:  # not NaN (a client's own cell)
                        ax.text(x, y, f"{v:.2f}", ha="center", va="center", fontsize=6, color="w")
        ax.set_xlabel("contributor")
        ax.set_ylabel("recipient")
        ax.set_title(f"{j.name}: share in each Rest-of-World (round {j.rounds})", fontsize=8)
        fig.colorbar(im, ax=ax, fraction=0.046)
        safe = "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in j.name)
        paths.append(_save(fig, ax, Path(out_dir) / f"{prefix}_relevance_{safe}.png"))
    return paths


def _save(fig: Any, ax: Any, path: Path) -> str:
    """Legend, layout, PNG, and the figure closed (pyplot keeps every open figure alive)."""
    import matplotlib.pyplot as plt

    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return str(path)


def _run_json(j: JobSummary) -> dict[str, Any]:
    return {
        "name": j.name,
        "job_id": j.job_id,
        "path": j.path,
        "variant": j.variant if j.declared else None,
        "seed": j.seed,
        "acc": j.final_acc * 100,
        "final_round": j.final_round,
        "bytes_total": j.bytes_total,
        "wire_ratio": j.wire_ratio,
        "wall_s": j.wall_s,
        "wall_source": j.wall_source or None,
        "rounds": j.rounds,
        "relevance": j.relevance or None,
    }


def _jsonable(x: Any) -> Any:
    """Strict JSON: NaN and infinities become null."""
    if isinstance(x, float):
        return x if math.isfinite(x) else None
    if isinstance(x, dict):
        return {k: _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    return x


def report(
    run_dir: Path, out_dir: Path | None = None, prefix: str = "report", plots: bool = True, json_dir: Path | None = None
) -> dict[str, Any]:
    """Summaries, tables, plots (in ``out_dir``, default ``run_dir``) and ``<prefix>.json`` (in ``json_dir``,
    default ``out_dir``). Raises FileNotFoundError when there is no history below ``run_dir``."""
    run_dir = Path(run_dir)
    jobs = load_runs(run_dir)
    rows = group(jobs)
    out_dir = Path(out_dir) if out_dir is not None else run_dir
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = [*write_plots(rows, out_dir, prefix), *write_relevance_plots(jobs, out_dir, prefix)] if plots else []
    result = {
        "run_dir": str(run_dir),
        "variants": rows,
        "runs": [_run_json(j) for j in jobs],
        "table": text_table(rows),
        "markdown": markdown_table(rows),
        "plots": paths,
    }
    json_dir = Path(json_dir) if json_dir is not None else out_dir
    json_dir.mkdir(parents=True, exist_ok=True)
    result["json"] = str(json_dir / f"{prefix}.json")
    Path(result["json"]).write_text(json.dumps(_jsonable(result), indent=1, allow_nan=False))
    return result


__all__ = [
    "ACC_KEYS",
    "JobSummary",
    "find_jobs",
    "group",
    "legend",
    "load_history",
    "load_runs",
    "markdown_table",
    "report",
    "split_jobs",
    "summarize_history",
    "summarize_job",
    "summarize_runs",
    "text_table",
    "write_plots",
    "write_relevance_plots",
]
