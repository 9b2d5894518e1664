"""A progress bar over the local training steps of a round (rich), shown only on an interactive terminal.

Training runs in a worker thread; rich's live display refreshes from its own thread and its updates are
thread-safe. When the stream is not a TTY (logs to a file, CI, a demo's subprocess) or the client is quiet,
nothing is drawn and the per-quarter log lines are the record.
"""

from __future__ import annotations

import sys
from types import TracebackType
from typing import IO, Any


def _is_tty(stream: IO[str]) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):  # closed or not a real stream
        return False


class TrainProgress:
    """``with TrainProgress("round 3", total=20) as bar: ... bar.update(step, total, loss)``."""

    def __init__(self, description: str, total: int, *, enabled: bool = True, stream: IO[str] | None = None) -> None:
        self.description = description
        self.total = total
        stream = stream if stream is not None else sys.stderr
        self.active = enabled and total > 0 and _is_tty(stream)
        self._progress: Any = None
        self._task: Any = None
        if self.active:
            from rich.console import Console
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

            self._progress = Progress(
                TextColumn("{task.description}"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("loss {task.fields[loss]}"),
                TimeRemainingColumn(),
                console=Console(file=stream, force_terminal=True),
                transient=True,
            )

    def __enter__(self) -> TrainProgress:
        if self._progress is not None:
            self._progress.start()
            self._task = self._progress.add_task(self.description, total=self.total, loss="-")
        return self

    def update(self, step: int, total: int, loss: float) -> None:
        if self._progress is not None:
            self._progress.update(self._task, completed=step, total=total, loss=f"{loss:.4f}")

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self._progress is not None:
            self._progress.stop()
