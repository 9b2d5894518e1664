"""Adapter kinds the client installs (fedquic.client.kinds): the built-ins, a handler registered from outside
taking over a kind, and a kind the protocol does not carry refused."""

from __future__ import annotations

import numpy as np
import pytest
from fedquic.client.kinds import RestOfWorld, get_kind, kind_names, register_kind
from fedquic.client.sync import SyncedAdapter
from fedquic.common.adapter import TensorDict, initial_held, state_hash, zeros_state
from fedquic.common.errors import ConfigError
from fedquic.common.limits import WireLimits

from tests.unit.client.test_sync import JOB, SCHEMA, aggregate, fresh


class CountingRow:
    """A row handler from outside: installs as the built-in does and counts what it was given."""

    name = "row"

    def __init__(self) -> None:
        self.seen: list[str] = []

    def install(self, sync: SyncedAdapter, state: TensorDict) -> None:
        self.seen.append(state_hash(state))
        RestOfWorld().install(sync, state)


def test_the_built_in_kinds_and_their_initial_states() -> None:
    assert kind_names() == ["global", "row"]
    init = {"a": np.ones((2, 2), np.float32)}
    np.testing.assert_array_equal(initial_held("global", SCHEMA, init)["a"], init["a"])
    assert initial_held("global", SCHEMA, init)["a"] is not init["a"]  # a copy: installing never aliases the init
    assert all(not v.any() for v in initial_held("row", SCHEMA, init).values())
    with pytest.raises(ValueError, match="kind 'local'"):
        initial_held("local", SCHEMA, init)


def test_an_outside_handler_takes_over_a_kind_and_an_unknown_kind_is_refused() -> None:
    counting = CountingRow()
    register_kind(counting, replace=True)
    try:
        sync, learner = fresh(JOB)
        row = {k: v + 0.5 for k, v in zeros_state(SCHEMA).items()}
        h, body = aggregate("row", row)
        _, decoded = sync.decode(h, body, WireLimits())
        state, _ = sync.install(h, decoded)
        assert counting.seen == [state_hash(row)] == [state_hash(state)]
        assert state_hash(learner.row_state()) == state_hash(row)
    finally:
        register_kind(RestOfWorld(), replace=True)
    assert isinstance(get_kind("row"), RestOfWorld)

    class Shadow:
        name = "shadow"

        def install(self, sync: SyncedAdapter, state: TensorDict) -> None: ...

    with pytest.raises(ConfigError, match="not one the protocol carries"):
        register_kind(Shadow())
