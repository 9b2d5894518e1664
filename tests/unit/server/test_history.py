"""history.jsonl's schema: versioned rows, the clients' METRICS apart from the server's figures."""

from __future__ import annotations

import json
from pathlib import Path

from fedquic.server.history import HISTORY_VERSION, HistoryRow, append_history, read_history, read_history_dicts


def _row(r: int) -> HistoryRow:
    return HistoryRow(
        version=HISTORY_VERSION,
        round=r,
        job_id="j",
        contributors=["c0"],
        clients={"c0": {"bytes_up": 100.0, "fp32_up": 400.0}, "c1": {}},
        reported={"c0": {"loss_after": 0.5, "bytes_up": 1.0}},  # a client claiming a server figure
    )


def test_round_trip_and_the_server_figures_win(tmp_path: Path) -> None:
    path = tmp_path / "h" / "history.jsonl"
    append_history(path, _row(1))
    append_history(path, _row(2))
    raw = [json.loads(line) for line in path.read_text().splitlines()]
    assert raw[0]["version"] == 2 and raw[0]["reported"]["c0"]["bytes_up"] == 1.0  # kept, apart
    rows = read_history(path)
    assert [r.round for r in rows] == [1, 2]
    assert rows[0].figures("c0") == {"loss_after": 0.5, "bytes_up": 100.0, "fp32_up": 400.0}
    assert rows[0].client_ids() == ["c0", "c1"]
    [merged, _] = read_history_dicts(path)
    assert merged["clients"]["c0"]["bytes_up"] == 100.0 and merged["clients"]["c1"] == {}


def test_version_1_rows_and_a_torn_last_line(tmp_path: Path) -> None:
    path = tmp_path / "history.jsonl"
    v1 = {"round": 1, "time": 5.0, "contributors": ["c0"], "clients": {"c0": {"loss_after": 0.2, "bytes_up": 9.0}}}
    path.write_text(json.dumps(v1) + "\n" + '{"round": 2, "clie')  # a crash mid-append
    [row] = read_history(path)
    assert row.version == 1 and row.reported == {}
    assert row.figures("c0") == {"loss_after": 0.2, "bytes_up": 9.0}
    assert read_history(tmp_path / "missing.jsonl") == []
