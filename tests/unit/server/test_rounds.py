import pytest
from fedquic.common.errors import ErrorCode, ProtocolError
from fedquic.server.rounds import CloseRound, Fail, Finish, Phase, RoundMachine, RoundPolicy, StartRound


def machine(**kw: object) -> RoundMachine:
    return RoundMachine(RoundPolicy(**{"rounds": 2, "min_clients": 2, "round_timeout_s": 10.0, **kw}), started_at=0.0)


def test_full_job_with_fake_time() -> None:
    m = machine()
    assert m.on_join("a", 1.0) == []
    [start] = m.on_join("b", 2.0)
    assert start == StartRound(1, ("a", "b"), 12.0)
    assert m.on_update("a", 1, 3.0) == []
    assert m.on_update("b", 1, 4.0) == [CloseRound(1, ("a", "b"))]
    assert m.phase is Phase.CLOSING
    [start2] = m.on_aggregated(1, 5.0)
    assert isinstance(start2, StartRound) and start2.round == 2
    m.on_update("a", 2, 6.0)
    m.on_update("b", 2, 6.0)
    assert m.on_aggregated(2, 7.0) == [Finish(2)]
    assert m.phase is Phase.FINISHED


def test_updates_for_a_round_not_open_are_refused() -> None:
    m = machine()
    with pytest.raises(ProtocolError) as ei:
        m.on_update("a", 1, 0.0)
    assert ei.value.code is ErrorCode.ROUND_NOT_OPEN
    m.on_join("a", 0.0)
    m.on_join("b", 0.0)
    with pytest.raises(ProtocolError):
        m.on_update("a", 2, 0.0)
    with pytest.raises(ProtocolError):
        m.on_update("late", 1, 0.0)  # not a participant


def test_a_client_that_leaves_does_not_stall_the_round() -> None:
    m = machine(rounds=1)
    m.on_join("a", 0.0)
    m.on_join("b", 0.0)
    m.on_join("c", 0.0)  # WAITING ended at two clients; c waits for round 2
    assert m.participants == {"a", "b"}
    assert m.on_update("a", 1, 1.0) == []
    assert m.on_leave("b", 2.0) == [CloseRound(1, ("a",))]


def test_deadline_closes_with_quorum_or_fails_without() -> None:
    m = machine(quorum=0.5)
    m.on_join("a", 0.0)
    m.on_join("b", 0.0)
    m.on_update("a", 1, 1.0)
    assert m.on_tick(9.9) == []
    assert m.on_tick(10.0) == [CloseRound(1, ("a",))]

    m = machine(quorum=1.0)
    m.on_join("a", 0.0)
    m.on_join("b", 0.0)
    m.on_update("a", 1, 1.0)
    [fail] = m.on_tick(11.0)
    assert isinstance(fail, Fail) and m.phase is Phase.FAILED


def test_registration_timeout_fails_the_job() -> None:
    m = machine(registration_timeout_s=5.0)
    m.on_join("a", 1.0)
    assert m.on_tick(4.0) == []
    [fail] = m.on_tick(6.0)
    assert isinstance(fail, Fail) and "1 of 2" in fail.reason
