"""When the client's checkpoint is written: at once (the default), or by a thread of its own.

A checkpoint follows the ACK it records (client/flight.py sends the ACK first): the server already holds what
the round made, and a client restarted from the checkpoint before reconciles at JOIN (a dense reset). So a
checkpoint need not hold up what comes next. Written inline it did: on 2 cores, the 3-4 adapter-sized sections
written after an acknowledged UPDATE (0.5-0.7 s) delayed the install of the AGGREGATE that arrived meanwhile, and
the write after that install delayed the next ROUND_START.

:class:`BackgroundCheckpoints` (what :class:`~fedquic.client.runner.FederatedClient` uses) takes the snapshot
when asked (on the caller's thread: the state is not changing then) and writes it in a thread of its own, one
at a time and in order. A snapshot asked for while another is being written waits; if a third comes before it
starts, it replaces the waiting one (the newer state supersedes it: nothing is written that is already out of
date). :meth:`flush` waits for the writes (before a restore reads the directory, and before the client ends);
a failed write is raised by the next ``submit`` or ``flush``. A process killed mid-write leaves the previous
checkpoint, as an inline write would (client/state.py's writes are atomic).

:class:`InlineCheckpoints` writes in the caller's thread: for ``testkit/memory_client.py``'s deterministic runs
and for anyone who wants the write done before the next step.
"""

from __future__ import annotations

import logging
import threading

from .state import ClientState, StateStore

log = logging.getLogger(__name__)


class InlineCheckpoints:
    def __init__(self, store: StateStore) -> None:
        self.store = store
        self.written = 0

    def submit(self, state: ClientState) -> None:
        self.store.save(state)
        self.written += 1

    def flush(self) -> None:
        pass

    def close(self) -> None:
        pass


class BackgroundCheckpoints:
    def __init__(self, store: StateStore) -> None:
        self.store = store
        self.written = 0  # saves completed
        self.superseded = 0  # snapshots replaced by a newer one before their write began
        self._cond = threading.Condition()
        self._pending: ClientState | None = None
        self._busy = False
        self._error: BaseException | None = None
        self._closed = False
        self._thread: threading.Thread | None = None

    def submit(self, state: ClientState) -> None:
        with self._cond:
            self._raise_failure()
            if self._closed:
                raise RuntimeError("checkpoint writer is closed")
            if self._pending is not None:
                self.superseded += 1
            self._pending = state
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="fedquic-checkpoint", daemon=True)
                self._thread.start()
            self._cond.notify_all()

    def flush(self) -> None:
        """Wait until every snapshot submitted so far is on disk; raise a write's failure."""
        with self._cond:
            self._cond.wait_for(lambda: (self._pending is None and not self._busy) or self._error is not None)
            self._raise_failure()

    def close(self) -> None:
        """Flush, then stop the thread."""
        try:
            self.flush()
        finally:
            with self._cond:
                self._closed = True
                self._cond.notify_all()
            if self._thread is not None:
                self._thread.join()

    def _raise_failure(self) -> None:
        if self._error is not None:
            error, self._error = self._error, None
            raise error

    def _run(self) -> None:
        while True:
            with self._cond:
                self._cond.wait_for(lambda: self._pending is not None or self._closed)
                if self._pending is None:
                    return
                state, self._pending = self._pending, None
                self._busy = True
            try:
                self.store.save(state)
            except BaseException as exc:  # kept for the caller: a checkpoint that cannot be written must be heard
                log.error("could not write the checkpoint of round %d to %s: %s", state.round, self.store.dir, exc)
                with self._cond:
                    self._error = exc
            else:
                with self._cond:
                    self.written += 1
            finally:
                with self._cond:
                    self._busy = False
                    self._cond.notify_all()


Checkpoints = InlineCheckpoints | BackgroundCheckpoints

__all__ = ["BackgroundCheckpoints", "Checkpoints", "InlineCheckpoints"]
