"""client/checkpointer.py: background checkpoints are written in order, a waiting one is superseded by a newer
one, a failed write is raised, and flush/close wait for what was asked."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import pytest
from fedquic.client.checkpointer import BackgroundCheckpoints, InlineCheckpoints
from fedquic.client.state import StateStore


class GatedStore:
    """Records the round of each save; each save waits for its own release."""

    def __init__(self) -> None:
        self.dir = Path("/nonexistent")
        self.saved: list[int] = []
        self.started = threading.Semaphore(0)
        self.release = threading.Semaphore(0)
        self.fail_round: int | None = None

    def save(self, state: Any) -> None:
        self.started.release()
        assert self.release.acquire(timeout=10)
        if state.round == self.fail_round:
            raise OSError(28, "No space left on device")
        self.saved.append(state.round)


class State:
    def __init__(self, round_: int) -> None:
        self.round = round_


def test_writes_are_in_order_and_a_waiting_snapshot_is_superseded() -> None:
    store = GatedStore()
    ckpt = BackgroundCheckpoints(store)  # type: ignore[arg-type]
    ckpt.submit(State(1))  # type: ignore[arg-type]
    assert store.started.acquire(timeout=10)  # round 1 is being written
    ckpt.submit(State(2))  # type: ignore[arg-type]
    ckpt.submit(State(3))  # type: ignore[arg-type]  # replaces 2, which had not started
    store.release.release()
    assert store.started.acquire(timeout=10)
    store.release.release()
    ckpt.flush()
    assert store.saved == [1, 3] and ckpt.written == 2 and ckpt.superseded == 1
    ckpt.close()


def test_flush_waits_for_the_write_in_progress() -> None:
    store = GatedStore()
    ckpt = BackgroundCheckpoints(store)  # type: ignore[arg-type]
    ckpt.submit(State(1))  # type: ignore[arg-type]
    assert store.started.acquire(timeout=10)
    done = threading.Event()
    t = threading.Thread(target=lambda: (ckpt.flush(), done.set()))
    t.start()
    assert not done.wait(0.2)  # still writing
    store.release.release()
    assert done.wait(10) and store.saved == [1]
    t.join()
    ckpt.close()


def test_a_failed_write_is_raised_by_the_next_call() -> None:
    store = GatedStore()
    store.fail_round = 1
    ckpt = BackgroundCheckpoints(store)  # type: ignore[arg-type]
    ckpt.submit(State(1))  # type: ignore[arg-type]
    store.release.release()
    with pytest.raises(OSError, match="No space"):
        ckpt.flush()
    ckpt.submit(State(2))  # the failure was reported once; the writer goes on
    store.release.release()
    ckpt.close()
    assert store.saved == [2]


def test_both_kinds_write_a_real_checkpoint(tmp_path: Path) -> None:
    from tests.unit.client.test_client_state import assert_states_equal, make_state

    for kind, sub in ((InlineCheckpoints, "inline"), (BackgroundCheckpoints, "background")):
        store = StateStore(tmp_path / sub)
        ckpt = kind(store)
        ckpt.submit(make_state(1, seed=1))
        ckpt.submit(make_state(2, seed=2))
        ckpt.close()
        loaded = StateStore(tmp_path / sub).load()
        assert loaded is not None
        assert_states_equal(loaded, make_state(2, seed=2))
