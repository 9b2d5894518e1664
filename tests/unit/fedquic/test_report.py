"""fedquic report: a hand-written history turned into the table, the plots and the JSON summary."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from fedquic import cli
from fedquic.report import find_jobs, report, summarize_history, summarize_job


def _client(acc: float, eval_round: int, up: float = 100.0, down: float = 50.0, **extra: float) -> dict[str, float]:
    return {
        "acc_tf": acc,
        "eval_round": eval_round,
        "bytes_up": up,
        "bytes_down": down,
        "fp32_up": 400.0,
        "fp32_down": 400.0,
        **extra,
    }


def _write(path: Path, records: list[dict]) -> None:
    path.mkdir(parents=True, exist_ok=True)
    (path / "history.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records) + '{"round": 9, "tor')


def bench_history(accs: list[tuple[float, float]], t0: float = 1000.0) -> list[dict]:
    """Rounds 1..len(accs): clients a and b score (accs[r-1]) the model after round r-1; the last is eval-only."""
    out = []
    for r, (a, b) in enumerate(accs, start=1):
        last = r == len(accs)
        extra = {"eval_only": 1.0} if last else {}
        out.append(
            {
                "round": r,
                "time": t0 + 10 * r,
                "clients": {"a": _client(a, r - 1, **extra), "b": _client(b, r - 1, **extra)},
            }
        )
    return out


def test_summary_of_a_bench_history() -> None:
    s = summarize_history(bench_history([(0.0, 0.1), (0.5, 0.3), (0.8, 0.6)]), "x")
    assert s.acc_key == "acc_tf"
    assert [r for r, _, _ in s.curve] == [0, 1, 2]
    assert s.curve[1][1] == pytest.approx(0.4)
    assert s.final_acc == pytest.approx(0.7) and s.final_per_client == {"a": 0.8, "b": 0.6}
    # two training rounds x two clients; the eval-only round's bytes are not counted
    assert s.bytes_up == 400 and s.bytes_down == 200 and s.fp32_bytes == 3200
    assert s.wire_ratio == pytest.approx(3200 / 600)
    assert s.curve[2][2] == 600 and s.curve[1][2] == 300  # cumulative bytes up to the evaluated round
    assert s.rounds == 2 and s.wall_s == pytest.approx(20.0)


def test_plain_server_history_uses_its_own_rounds(tmp_path: Path) -> None:
    hist = [{"round": r, "time": 5.0 * r, "clients": {"c": {"acc_exact": 0.1 * r, "bytes_up": 10.0}}} for r in (1, 2)]
    _write(tmp_path / "run", hist)
    s = summarize_job(tmp_path / "run")
    assert s.acc_key == "acc_exact" and [r for r, _, _ in s.curve] == [1, 2] and s.final_acc == pytest.approx(0.2)
    assert s.bytes_total == 20 and s.variant == "run"


def test_report_groups_seeds_and_writes_plots(tmp_path: Path) -> None:
    run = tmp_path / "bench"
    for i, (variant, seed, final) in enumerate([("fedalt", 0, 0.8), ("fedalt", 1, 0.6), ("local", 0, 0.5)]):
        job = run / "jobs" / f"{variant}-s{seed}"
        _write(job / "server", bench_history([(0.0, 0.0), (final, final)], t0=100.0 * i))
        (job / "job.json").write_text(
            json.dumps({"variant": variant, "seed": seed, "wall_s": 30.0 + i, "clients": {"a": "copy", "b": "reverse"}})
        )
    assert len(find_jobs(run)) == 3
    out = report(run, tmp_path / "img", prefix="t")
    rows = {r["variant"]: r for r in out["variants"]}
    assert list(rows) == ["fedalt", "local"]  # run order
    assert rows["fedalt"]["acc_mean"] == pytest.approx(70.0) and rows["fedalt"]["acc_std"] == pytest.approx(
        14.142, 1e-3
    )
    assert rows["fedalt"]["seeds"] == [0, 1] and rows["fedalt"]["per_client"]["a"] == pytest.approx(70.0)
    assert rows["local"]["acc_std"] is None and rows["local"]["n"] == 1 and rows["fedalt"]["n"] == 2
    assert rows["fedalt"]["wall_s"] == pytest.approx(30.5) and rows["fedalt"]["wall_source"] == "job.json"
    assert "copy" in out["table"] and "reverse" in out["markdown"] and "70.00 ± 14.14" in out["markdown"]
    for p in out["plots"]:
        assert Path(p).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    saved = json.loads((tmp_path / "img" / "t.json").read_text())
    assert saved["variants"][0]["variant"] == "fedalt" and saved["variants"][1]["acc_std"] is None
    assert not (tmp_path / "img" / "t_report.json").exists()


def test_cli_report(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _write(tmp_path / "run", bench_history([(0.0, 0.0), (0.25, 0.75), (0.5, 0.5)]))
    assert cli.main(["report", str(tmp_path / "run"), "--markdown"]) == 0
    out = capsys.readouterr().out
    assert "| run | 1 | 50.00 |" in out
    assert (tmp_path / "run" / "report_acc_rounds.png").is_file() and (tmp_path / "run" / "report_acc_mb.png").is_file()
    with pytest.raises(SystemExit, match=r"no history\.jsonl"):
        cli.main(["report", str(tmp_path / "empty")])


def test_a_relevance_weighted_run_gets_its_matrix_plotted_and_in_the_json(tmp_path: Path) -> None:
    hist = bench_history([(0.0, 0.0), (0.5, 0.5)])
    hist[0]["weights"] = {"a": {"b": 1.0}, "b": {"a": 1.0}}
    hist[-1]["weights"] = {"a": {"b": 0.7, "c": 0.3}, "b": {"a": 0.4, "c": 0.6}}  # the last round's is kept
    _write(tmp_path / "run", hist)
    _write(tmp_path / "plain", bench_history([(0.0, 0.0), (0.5, 0.5)]))
    out = report(tmp_path, tmp_path / "img", prefix="t")
    runs = {r["name"]: r for r in out["runs"]}
    assert runs["run"]["relevance"] == {"a": {"b": 0.7, "c": 0.3}, "b": {"a": 0.4, "c": 0.6}}
    assert runs["plain"]["relevance"] is None
    heat = [p for p in out["plots"] if "_relevance_" in Path(p).name]
    assert [Path(p).name for p in heat] == ["t_relevance_run.png"]  # only the weighted run has one
    assert Path(heat[0]).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
