"""``history.jsonl``: one versioned record per closed round, appended by the server and read by everything else.

Schema (``version`` 2), one JSON object per line::

    {"version": 2, "round": 3, "time": 1796141891.96, "job_id": "demo", "federation": "fedalt",
     "contributors": ["c0", "c1"], "aggregate_s": 0.007, "close_s": 29.7,
     "clients":  {"c0": {"bytes_up": 77733.0, "fp32_up": 1843200.0, "granted_at": ..., ...}, ...},
     "reported": {"c0": {"loss_before": 1.46, "loss_after": 0.56, "acc_tf": 0.24, ...}, ...}}

``weights`` (present when the rule weights contributors, e.g. ``loo-simgrad``) maps each recipient to the share
of each contributor in what it was sent, the 16 largest: ``{"c0": {"c1": 0.61, "c2": 0.39}, ...}``.

``clients`` holds what the server measured for each client in the round (bytes and fp32 sizes each way,
grant/accept times, decode/persist/encode seconds); ``reported`` what the client said about itself in its
METRICS (loss, accuracy, training time: any finite numbers under names the client chose). They are kept apart so
that a client cannot overwrite the server's figures with its own (a METRICS value named ``bytes_up``), and a
reader can tell measured from claimed. :meth:`HistoryRow.figures` merges the two for one client, the server's
figures winning a name both use.

Version 1 rows (before this module: no ``version``, the client's METRICS merged into ``clients``) are read as
they are: ``reported`` empty. A torn last line (a crash mid-append) is skipped.
"""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

log = logging.getLogger(__name__)

HISTORY_VERSION = 2
Figures = dict[str, float]


class HistoryRow(BaseModel):
    """One closed round."""

    # A newer writer's extra fields survive a read-modify-write; NaN and infinities are written as json.dumps
    # writes them (NaN, Infinity), not as null, so a round with a diverged figure still reads back.
    model_config = ConfigDict(extra="allow", ser_json_inf_nan="constants")

    version: int = 1  # absent in version-1 files
    round: int
    time: float | None = None  # wall clock at the close (None: absent from an old row)
    job_id: str | None = None
    federation: str | None = None
    contributors: list[str] = Field(default_factory=list)
    aggregate_s: float = 0.0
    close_s: float = 0.0
    clients: dict[str, Figures] = Field(default_factory=dict)  # measured by the server
    reported: dict[str, Figures] = Field(default_factory=dict)  # the clients' own METRICS
    # Per recipient, the share of each contributor in what it was sent, for rules that weight them (loo-simgrad's
    # relevance matrix); empty for the plain means.
    weights: dict[str, Figures] = Field(default_factory=dict)

    def client_ids(self) -> list[str]:
        return sorted({*self.clients, *self.reported})

    def figures(self, client_id: str) -> Figures:
        """Everything known about one client in this round: its METRICS, then the server's figures over them."""
        return {**self.reported.get(client_id, {}), **self.clients.get(client_id, {})}

    def merged(self) -> dict[str, Any]:
        """This row as a plain dict with ``clients`` holding :meth:`figures` for every client (the shape
        version-1 readers expect)."""
        out = self.model_dump()
        out["clients"] = {cid: self.figures(cid) for cid in self.client_ids()}
        return out


def history_row(
    round_: int,
    job: Any,
    contributors: list[str],
    aggregate_s: float,
    close_s: float,
    *,
    clients: dict[str, Figures],
    reported: dict[str, Figures],
    wall: float | None = None,
    weights: dict[str, dict[str, float]] | None = None,
) -> HistoryRow:
    """The record of one closed round (``job``: the server's JobConfig, for its id and federation); ``wall``: the
    wall-clock time it closed (default now)."""
    return HistoryRow(
        version=HISTORY_VERSION,
        round=round_,
        time=time.time() if wall is None else wall,
        job_id=job.job_id,
        federation=job.federation,
        contributors=contributors,
        aggregate_s=round(aggregate_s, 6),
        close_s=round(close_s, 6),
        clients=clients,
        reported=reported,
        weights=weights or {},
    )


def read_history(path: Path) -> list[HistoryRow]:
    """Every round record in ``path`` (empty if there is no file yet), in file order."""
    path = Path(path)
    if not path.exists():
        return []
    rows: list[HistoryRow] = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            rows.append(HistoryRow.model_validate(json.loads(line)))
        except (json.JSONDecodeError, ValidationError, TypeError) as exc:
            log.warning("%s:%d: skipped an unreadable history record (%s)", path, n, type(exc).__name__)
    return rows


def read_history_dicts(path: Path) -> list[dict[str, Any]]:
    """:func:`read_history` as plain dicts, each client's figures merged (:meth:`HistoryRow.merged`)."""
    return [row.merged() for row in read_history(path)]


def append_history(path: Path, row: HistoryRow) -> None:
    """Append one record and fsync it: a round is in the history once this returns."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as f:
        f.write(row.model_dump_json() + "\n")
        f.flush()
        os.fsync(f.fileno())


__all__ = ["HISTORY_VERSION", "HistoryRow", "append_history", "history_row", "read_history", "read_history_dicts"]
