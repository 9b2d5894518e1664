"""fedquic report: which runs make one row (job ids, job.json variants), n and std, file names, the base-model
point, eval_final, header-only uploads and where the wall time comes from."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest

from fedquic import cli
from fedquic.report import load_runs, report, split_jobs, summarize_history, summarize_job


def _write(path: Path, records: list[dict[str, Any]], meta: dict[str, Any] | None = None) -> None:
    """``path/history.jsonl``; with ``meta``, ``path`` is a bench job: ``path/server/history.jsonl`` + job.json."""
    hist_dir = path / "server" if meta is not None else path
    hist_dir.mkdir(parents=True, exist_ok=True)
    (hist_dir / "history.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    if meta is not None:
        (path / "job.json").write_text(json.dumps(meta))


def server_history(
    accs: list[float], job_id: str | None = "job", t0: float = 1000.0, base: float | None = None, **stats: float
) -> list[dict[str, Any]]:
    """The server's records as it writes them now: round r's stats score the model after round r (one client)."""
    out = []
    for r, acc in enumerate(accs, start=1):
        c: dict[str, float] = {"acc_exact": acc, "bytes_up": 100.0, "bytes_down": 50.0, "fp32_up": 300.0, **stats}
        if r == 1 and base is not None:
            c["base_acc_exact"] = base
        rec: dict[str, Any] = {"round": r, "time": t0 + 10 * r, "clients": {"c0": c}}
        if job_id is not None:
            rec["job_id"] = job_id
        out.append(rec)
    return out


def rows_of(run: Path, **kw: Any) -> dict[str, dict[str, Any]]:
    out = report(run, plots=False, **kw)
    return {r["variant"]: r for r in out["variants"]}


def test_unrelated_jobs_under_one_dir_are_rows_named_by_job_id(tmp_path: Path) -> None:
    runs = tmp_path / "runs"
    for i, (name, jid, acc) in enumerate([("a", "alpha", 0.5), ("b", "beta", 0.25), ("c", "gamma", 1.0)]):
        _write(runs / name / "server", server_history([0.1, acc], job_id=jid, t0=100.0 * i))
    out = report(runs, plots=False)
    assert [r["variant"] for r in out["variants"]] == ["alpha", "beta", "gamma"]  # run order, one row each
    rows = {r["variant"]: r for r in out["variants"]}
    assert rows["beta"]["acc_mean"] == pytest.approx(25.0) and rows["beta"]["n"] == 1
    assert rows["beta"]["acc_std"] is None and rows["beta"]["paths"] == ["b/server"]
    assert "server" not in rows and "±" not in out["table"] and "±" not in out["markdown"]
    assert out["table"].splitlines()[2].split()[:3] == ["beta", "1", "25.00"]


def test_the_same_job_id_in_two_folders_is_two_rows(tmp_path: Path) -> None:
    runs = tmp_path / "runs"
    _write(runs / "a" / "server", server_history([0.2], job_id="fedquic-job", t0=0.0))
    _write(runs / "b" / "server", server_history([0.6], job_id="fedquic-job", t0=50.0))
    rows = rows_of(runs)
    assert list(rows) == ["fedquic-job (a/server)", "fedquic-job (b/server)"]
    assert rows["fedquic-job (b/server)"]["acc_mean"] == pytest.approx(60.0)


def test_old_files_without_job_id_are_named_by_relative_path(tmp_path: Path) -> None:
    runs = tmp_path / "runs"
    _write(runs / "x" / "server", server_history([0.3], job_id=None, t0=0.0))
    _write(runs / "y" / "server", server_history([0.7, 0.9], job_id=None, t0=50.0))
    rows = rows_of(runs)
    assert list(rows) == ["x/server", "y/server"]  # never just "server", never merged
    assert rows["y/server"]["acc_mean"] == pytest.approx(90.0) and rows["y/server"]["job_ids"] == [None]
    # the run directory itself: its own name
    assert list(rows_of(runs / "y" / "server")) == ["server"]


def test_bench_seeds_of_one_variant_are_one_row_and_nothing_else_joins_them(tmp_path: Path) -> None:
    run = tmp_path / "bench"
    for i, (seed, acc) in enumerate([(0, 0.8), (1, 0.6)]):
        meta = {"variant": "fedalt", "seed": seed, "wall_s": 40.0 + 10 * i}
        _write(run / "jobs" / f"fedalt-s{seed}", server_history([0.1, acc], job_id=f"fedalt-s{seed}", t0=i), meta)
    # a job.json-less server run with the variant's name as job id, and another bench run of the same variant
    _write(run / "extra", server_history([0.0], job_id="fedalt", t0=10.0))
    _write(
        tmp_path / "bench" / "other" / "jobs" / "fedalt-s0",
        server_history([0.2], "fedalt-s0", 20.0),
        {"variant": "fedalt", "seed": 0},
    )
    out = report(run, plots=False)
    rows = {r["variant"]: r for r in out["variants"]}
    assert list(rows) == ["fedalt (bench)", "fedalt (extra)", "fedalt (other)"]
    grp = rows["fedalt (bench)"]
    assert grp["n"] == 2 and grp["seeds"] == [0, 1] and grp["job_ids"] == ["fedalt-s0", "fedalt-s1"]
    assert grp["acc_mean"] == pytest.approx(70.0) and grp["acc_std"] == pytest.approx(math.sqrt(200))
    assert grp["wall_s"] == pytest.approx(45.0) and grp["declared_variant"] == "fedalt"
    assert rows["fedalt (other)"]["n"] == 1 and rows["fedalt (other)"]["acc_std"] is None
    assert rows["fedalt (extra)"]["declared_variant"] is None
    assert "70.00 ± 14.14" in out["table"] and "70.00 ± 14.14" in out["markdown"]
    assert sum("±" in line for line in out["table"].splitlines()[1:4]) == 1  # the rows; the legend explains it
    assert "± = sample std over them" in out["table"]
    # alone under its run directory the variant keeps its plain name (what bench/federated.py looks rows up by)
    (run / "extra" / "history.jsonl").unlink()
    (run / "other" / "jobs" / "fedalt-s0" / "job.json").unlink()
    rows = rows_of(run)
    assert list(rows) == ["fedalt", "fedalt-s0 (other/jobs/fedalt-s0/server)"]  # its job id is a seed's too
    assert rows["fedalt"]["n"] == 2 and rows["fedalt"]["runs"] == ["fedalt-s0 (jobs/fedalt-s0)", "fedalt-s1"]


def test_output_file_names(tmp_path: Path) -> None:
    _write(tmp_path / "run", server_history([0.5]))
    out = report(tmp_path / "run")
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == [
        "history.jsonl",
        "report.json",
        "report_acc_mb.png",
        "report_acc_rounds.png",
    ]
    saved = json.loads((tmp_path / "run" / "report.json").read_text())
    assert saved["variants"][0]["n"] == 1 and saved["variants"][0]["acc_std"] is None
    assert saved["table"] == out["table"] and saved["runs"][0]["job_id"] == "job"
    report(tmp_path / "run", tmp_path / "o", prefix="p", plots=False)
    assert sorted(p.name for p in (tmp_path / "o").iterdir()) == ["p.json"]


def test_base_model_is_round_zero_and_loss_follows(tmp_path: Path) -> None:
    hist = server_history([0.5, 0.75], base=0.125)
    hist[0]["clients"]["c0"].update(loss_eval=2.0, base_loss_eval=3.0)
    hist[1]["clients"]["c0"].update(loss_eval=1.5)
    s = summarize_history(hist, "x")
    assert [(r, a) for r, a, _ in s.curve] == [(0, 0.125), (1, 0.5), (2, 0.75)]
    assert [b for _, _, b in s.curve] == [0.0, 150.0, 300.0]
    assert s.final_acc == 0.75 and s.final_round == 2
    assert s.loss_curve == [(0, 3.0), (1, 2.0), (2, 1.5)] and s.final_loss == 1.5
    _write(tmp_path / "run", hist)
    out = report(tmp_path / "run", plots=False)
    assert [c[0] for c in out["variants"][0]["curve"]] == [0, 1, 2]
    assert out["variants"][0]["curve"][0][1] == pytest.approx(12.5) and "1.500" in out["table"]


def test_eval_round_still_overrides_and_beats_base(tmp_path: Path) -> None:
    """The old benchmark convention: round r scores the model after round r-1 (eval_round)."""
    hist = server_history([0.2, 0.4], base=0.9)
    for r, rec in enumerate(hist):
        rec["clients"]["c0"]["eval_round"] = r
    s = summarize_history(hist, "x")
    assert [(r, a) for r, a, _ in s.curve] == [(0, 0.2), (1, 0.4)]  # eval_round 0 is the base point


def test_eval_final_is_the_final_accuracy(tmp_path: Path) -> None:
    hist = server_history([0.2, 0.4, 0.5])
    # the whole held-out set after round 2, and a later subset score for the same round that must not replace it
    hist[1]["clients"]["c0"].update(eval_final=1.0, eval_n=1000.0, acc_exact=0.45)
    hist[2]["clients"]["c0"].update(eval_round=2.0, eval_n=32.0, acc_exact=0.3)
    hist[2]["clients"]["c0"].pop("bytes_up")
    s = summarize_history(hist, "x")
    assert s.final_round == 2 and s.final_acc == 0.45 and s.final_eval_n == {"c0": 1000.0}
    assert [(r, a) for r, a, _ in s.curve] == [(1, 0.2), (2, 0.45)]


def test_header_only_uploads_have_no_wire_ratio(tmp_path: Path) -> None:
    """local federation: UPDATE frames without tensors; the bytes count as sent, the ratio is n/a."""
    _write(tmp_path / "run", server_history([0.5, 0.6], fp32_up=0.0, bytes_down=0.0))
    out = report(tmp_path / "run", plots=True)
    r = out["variants"][0]
    assert r["bytes_total"] == 200.0 and math.isnan(r["wire_ratio"])
    assert json.loads((tmp_path / "run" / "report.json").read_text())["variants"][0]["wire_ratio"] is None
    assert out["table"].splitlines()[1].split()[-3:] == ["0.00", "–", "10"]
    assert math.isnan(summarize_job(tmp_path / "run").wire_ratio)


def test_wall_time_source_is_said_and_marked_when_rows_differ(tmp_path: Path) -> None:
    run = tmp_path / "runs"
    _write(
        run / "jobs" / "a-s0", server_history([0.5, 0.5], "a-s0", t0=0.0), {"variant": "a", "seed": 0, "wall_s": 99.0}
    )
    _write(run / "plain", server_history([0.5, 0.5, 0.5], "plain", t0=100.0))
    out = report(run, plots=False)
    rows = {r["variant"]: r for r in out["variants"]}
    assert rows["a"]["wall_s"] == 99.0 and rows["a"]["wall_source"] == "job.json"
    assert rows["plain"]["wall_s"] == pytest.approx(20.0) and rows["plain"]["wall_source"] == "history"
    lines = out["table"].splitlines()
    assert lines[1].endswith("99 j") and lines[2].endswith("20 h")
    for text in (out["table"], out["markdown"]):
        assert "wall_s (whole job incl. model load)" in text and "first to last history record" in text
        assert "j = job.json, h = history" in text
    # one source only: no marks
    single = report(run / "plain", plots=False)["table"]
    assert single.splitlines()[1].endswith(" 20") and "j = job.json" not in single


def test_one_file_with_several_jobs_is_split(tmp_path: Path) -> None:
    # written before and after the server learnt to write job_id: one job
    old = server_history([0.1, 0.2, 0.3], job_id=None, t0=0.0)
    old[2]["job_id"] = "first"
    again = server_history([0.9], job_id="first", t0=60.0)  # round 1 again: a new job with the same id
    second = server_history([0.5, 0.6], job_id="second", t0=90.0)
    second.insert(1, dict(second[0]))  # round 1 written twice (a resumed server): counted once
    assert [len(p) for p in split_jobs(old + again + second)] == [3, 1, 3]
    _write(tmp_path / "runs" / "server", old + again + second)
    rows = rows_of(tmp_path / "runs")
    assert list(rows) == ["first (server) #1", "first (server) #2", "second"]
    assert rows["first (server) #1"]["acc_mean"] == pytest.approx(30.0) and rows["first (server) #1"]["rounds"] == 3
    assert rows["second"]["rounds"] == 2 and rows["second"]["bytes_total"] == 300.0


def test_summarize_job_of_a_bench_job_and_load_runs(tmp_path: Path) -> None:
    job = tmp_path / "jobs" / "fedalt-s3"
    _write(job, server_history([0.4], "fedalt-s3"), {"variant": "fedalt", "seed": 3, "wall_s": 5.0})
    s = summarize_job(job)
    assert s.variant == "fedalt" and s.seed == 3 and s.declared and s.job_id == "fedalt-s3" and s.wall_s == 5.0
    assert [j.name for j in load_runs(tmp_path)] == ["fedalt-s3"]


def test_cli_report_on_a_dir_of_runs(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    for i, jid in enumerate(["one", "two"]):
        _write(tmp_path / "runs" / jid / "server", server_history([0.25 * (i + 1)], job_id=jid, t0=float(i)))
    assert cli.main(["report", str(tmp_path / "runs"), "--markdown", "--no-plots"]) == 0
    out = capsys.readouterr().out
    assert "| one | 1 | 25.00 |" in out and "| two | 1 | 50.00 |" in out and "±" not in out
    assert (tmp_path / "runs" / "report.json").is_file()
