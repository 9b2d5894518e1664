"""server/close.py's pieces that the in-memory session tests cannot reach: they run work inline, one at a time,
where the daemon runs several downlinks at once in worker threads."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest
from fedquic.common.codec import EncodingSpec, encode_payload
from fedquic.server.close import _Prepared, _SingleFlight


def _prepared(tag: float) -> _Prepared:
    payload = encode_payload({"w": np.full(4, tag, dtype=np.float32)}, EncodingSpec())
    return _Prepared(payload, {"w": payload.decoded["w"]}, f"hash-{tag}", encode_s=0.5)


def test_concurrent_recipients_of_one_change_compute_it_once() -> None:
    flight = _SingleFlight()
    calls: list[str] = []
    gate = threading.Event()

    def compute() -> _Prepared:
        calls.append(threading.current_thread().name)
        gate.wait(5)  # the others arrive while this one is still computing
        return _prepared(1.0)

    results: list[_Prepared] = []
    threads = [threading.Thread(target=lambda: results.append(flight.get(("mean", "h0"), compute))) for _ in range(4)]
    for t in threads:
        t.start()
    time.sleep(0.1)
    gate.set()
    for t in threads:
        t.join(5)
    assert len(calls) == 1 and len(results) == 4
    assert sorted(r.encode_s for r in results) == [0.0, 0.0, 0.0, 0.5]  # the cost is counted once, by its owner
    assert len({id(r.payload) for r in results}) == 1  # one payload, sent to all of them


def test_different_states_are_different_changes() -> None:
    flight = _SingleFlight()
    a = flight.get(("mean", "h0"), lambda: _prepared(1.0))
    b = flight.get(("mean", "h1"), lambda: _prepared(2.0))
    assert a.held_hash != b.held_hash


def test_a_failed_owner_leaves_the_work_to_the_next_caller() -> None:
    flight = _SingleFlight()

    def broken() -> _Prepared:
        raise MemoryError("out of memory while encoding")

    with pytest.raises(MemoryError):
        flight.get(("mean", "h0"), broken)
    got = flight.get(("mean", "h0"), lambda: _prepared(3.0))  # not stuck waiting for the failed one
    assert got.held_hash == "hash-3.0" and got.encode_s == 0.5


def test_history_keeps_the_largest_shares_of_a_many_client_round() -> None:
    from fedquic.server.close import _largest

    shares = {f"c{i:03d}": (i + 1) / 5050 for i in range(100)}
    kept = _largest(shares)
    assert list(kept) == [f"c{i:03d}" for i in range(99, 83, -1)]  # the 16 largest, largest first
    assert _largest({"a": 0.5, "b": 0.5}) == {"a": 0.5, "b": 0.5}
