import pytest
from fedquic.common.errors import ErrorCode, ProtocolError
from fedquic.server.rounds import (
    CloseRound,
    Fail,
    Finish,
    Phase,
    ResumeRound,
    RoundMachine,
    RoundPolicy,
    RoundSnapshot,
    StartRound,
    UpdateKind,
)


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


def test_deadline_closes_on_quorum_of_the_clients_still_active() -> None:
    m = machine(quorum=0.5)
    m.on_join("a", 0.0)
    m.on_join("b", 0.0)
    m.on_update("a", 1, 1.0)
    assert m.on_tick(9.9) == []
    assert m.on_tick(10.0) == [CloseRound(1, ("a",))]

    # quorum 1.0: b sent nothing by the deadline, so it missed the round and no longer counts (no free-riding):
    # the round closes with a's update instead of failing the job.
    m = machine(quorum=1.0)
    m.on_join("a", 0.0)
    m.on_join("b", 0.0)
    m.on_update("a", 1, 1.0)
    assert m.on_tick(11.0) == [CloseRound(1, ("a",))]
    assert not m.eligible("b") and m.missed == {"b": 1}


@pytest.mark.reliability
def test_a_lazy_client_is_not_sampled_and_does_not_fail_the_job() -> None:
    m = machine(rounds=5, min_clients=2)
    for c in ("a", "b", "lazy"):
        m.on_join(c, 0.0)
    # WAITING ended at two clients; lazy joins round 2 onwards
    m.on_update("a", 1, 1.0)
    m.on_update("b", 1, 1.0)
    [start] = m.on_aggregated(1, 2.0)
    assert isinstance(start, StartRound) and set(start.participants) == {"a", "b", "lazy"}
    m.on_update("a", 2, 3.0)
    m.on_update("b", 2, 3.0)
    assert m.on_tick(start.deadline) == [CloseRound(2, ("a", "b"))]
    [start3] = m.on_aggregated(2, 13.0)
    assert isinstance(start3, StartRound) and set(start3.participants) == {"a", "b"}  # lazy is not drawn
    assert m.active == {"a", "b"}
    # it rejoins (a restarted process): it may be sampled again, but gets no aggregate until it contributes
    m.on_join("lazy", 14.0)
    assert m.eligible("lazy") and not m.receives_aggregate("lazy")
    m.on_update("a", 3, 15.0)
    m.on_update("b", 3, 15.0)
    [start4] = m.on_aggregated(3, 16.0)
    assert "lazy" in start4.participants
    m.on_update("lazy", 4, 17.0)
    assert m.receives_aggregate("lazy")


def test_reconnecting_does_not_reset_a_lazy_clients_record() -> None:
    m = machine(rounds=5, min_clients=2)
    for c in ("a", "b", "lazy"):
        m.on_join(c, 0.0)
    m.on_update("a", 1, 1.0)
    m.on_update("b", 1, 1.0)
    [start] = m.on_aggregated(1, 2.0)
    m.on_update("a", 2, 3.0)
    m.on_update("b", 2, 3.0)
    m.on_tick(start.deadline)
    m.on_leave("lazy", 13.0)
    m.on_join("lazy", 13.5)  # reconnects: on probation, one miss from inactive
    assert not m.receives_aggregate("lazy")
    [start3] = m.on_aggregated(2, 14.0)
    assert "lazy" in start3.participants
    m.on_update("a", 3, 15.0)
    m.on_update("b", 3, 15.0)
    m.on_tick(start3.deadline)
    assert not m.eligible("lazy") and not m.receives_aggregate("lazy")


def test_a_client_gets_max_missed_rounds_deadlines_before_it_is_cut() -> None:
    m = machine(quorum=1.0, max_missed_rounds=2)
    m.on_join("a", 0.0)
    m.on_join("b", 0.0)
    m.on_update("a", 1, 1.0)
    assert m.on_tick(10.0) == [] and m.deadline == 20.0  # b still counts: the deadline moves on
    assert m.on_update("b", 1, 15.0) == [CloseRound(1, ("a", "b"))]  # a slow client, not a lazy one
    assert m.missed == {}
    [start] = m.on_aggregated(1, 16.0)
    m.on_update("a", 2, 17.0)
    assert m.on_tick(start.deadline) == []
    assert m.on_tick(start.deadline + 10.0) == [CloseRound(2, ("a",))]
    assert not m.eligible("b")


def test_a_round_without_updates_is_drawn_again_and_the_job_waits_for_active_clients() -> None:
    m = machine(min_clients=2, registration_timeout_s=50.0)
    m.on_join("a", 0.0)
    m.on_join("b", 0.0)
    assert m.on_tick(10.0) == []  # nobody sent: both missed, nobody is left to sample
    assert m.phase is Phase.WAITING and m.round == 0
    with pytest.raises(ProtocolError):
        m.on_update("a", 1, 11.0)  # round 1 is not open while waiting
    [fail] = m.on_tick(61.0)
    assert isinstance(fail, Fail) and "0 of 2 active clients" in fail.reason and "inactive" in fail.reason
    # one of them restarting in time reopens round 1
    m = machine(min_clients=2)
    m.on_join("a", 0.0)
    m.on_join("b", 0.0)
    m.on_tick(10.0)
    m.on_join("a", 11.0)
    [start] = m.on_join("b", 12.0)
    assert isinstance(start, StartRound) and start.round == 1


def test_missed_rounds_survive_a_restart() -> None:
    m = machine(quorum=1.0)
    m.on_join("a", 0.0)
    m.on_join("b", 0.0)
    m.on_update("a", 1, 1.0)
    m.on_tick(10.0)
    snap = RoundSnapshot.model_validate_json(m.snapshot().model_dump_json())
    m2, _ = RoundMachine.restore(m.policy, snap, {"a": 1}, 20.0)
    assert not m2.eligible("b")


def test_registration_timeout_fails_the_job() -> None:
    m = machine(registration_timeout_s=5.0)
    m.on_join("a", 1.0)
    assert m.on_tick(4.0) == []
    [fail] = m.on_tick(6.0)
    assert isinstance(fail, Fail) and "1 of 2" in fail.reason


def test_sampling_draws_a_seeded_fraction_with_min_clients_as_floor() -> None:
    m = machine(min_clients=2, sample_fraction=0.25, rounds=5)
    for c in "abcdefgh":
        m.on_join(c, 0.0)  # round 1 started at the second join, with a and b
    m.on_update("a", 1, 1.0)
    m.on_update("b", 1, 1.0)
    [start] = m.on_aggregated(1, 2.0)
    assert isinstance(start, StartRound) and len(start.participants) == 2  # ceil(0.25 * 8)
    assert set(start.participants) <= set("abcdefgh")
    # the same seed and round draw the same sample (a restarted server agrees with itself)
    again = machine(min_clients=8, sample_fraction=0.25)
    for c in "abcdefgh":
        again.on_join(c, 0.0)
    assert len(again.participants) == 8  # min_clients is the floor
    draws = {tuple(sorted(m._sample(r))) for r in range(2, 12)}
    assert len(draws) > 1  # rounds draw different samples
    assert m._sample(2) == set(start.participants)


def test_a_sampled_client_that_comes_back_resumes_the_round() -> None:
    m = machine()
    m.on_join("a", 0.0)
    m.on_join("b", 0.0)
    assert m.on_leave("b", 1.0) == []  # a has not sent: the round stays open
    assert m.on_join("b", 2.0) == [ResumeRound("b", 1, 10.0)]
    m.on_update("a", 1, 3.0)
    assert m.on_update("b", 1, 4.0) == [CloseRound(1, ("a", "b"))]
    assert m.on_join("c", 5.0) == []  # not sampled: waits for the next round


def test_late_update_is_refused_under_drop_and_folded_under_fold() -> None:
    for policy in ("drop", "fold"):
        m = machine(quorum=0.5, straggler=policy, rounds=3)
        m.on_join("a", 0.0)
        m.on_join("b", 0.0)
        m.on_update("a", 1, 1.0)
        assert m.on_tick(10.0) == [CloseRound(1, ("a",))]
        if policy == "drop":
            with pytest.raises(ProtocolError) as ei:
                m.on_update("b", 1, 10.5)  # arrives while round 1 closes
            assert ei.value.code is ErrorCode.LATE_UPDATE
        else:
            assert m.on_update("b", 1, 10.5) == []
        m.on_aggregated(1, 11.0)
        m.on_update("a", 2, 12.0)
        closed = m.on_update("b", 2, 12.0)
        assert closed == [CloseRound(2, ("a", "b"))]
        m.on_aggregated(2, 13.0)
        m.on_update("a", 3, 14.0)
        if policy == "fold":
            # a late round-2 update from b counts at round 3's close even though b sends nothing for round 3
            m.on_leave("b", 14.5)
            with pytest.raises(ProtocolError):
                m.on_update("b", 4, 15.0)  # a future round is never "late"


def test_fold_counts_a_late_update_at_the_next_close() -> None:
    m = machine(quorum=0.5, straggler="fold", rounds=3)
    m.on_join("a", 0.0)
    m.on_join("b", 0.0)
    m.on_update("a", 1, 1.0)
    m.on_tick(10.0)
    assert m.on_aggregated(1, 11.0) == []  # b missed round 1: too few active clients, the job waits
    assert m.check_update("b", 1) is UpdateKind.LATE
    m.on_update("b", 1, 11.5)  # the late update shows b is training: active again
    [start] = m.on_tick(11.75)
    assert isinstance(start, StartRound) and start.round == 2
    m.on_update("a", 2, 12.0)
    assert m.on_tick(21.75) == [CloseRound(2, ("a", "b"))]  # b contributes through its folded update


def test_next_round_waits_for_min_clients() -> None:
    m = machine(rounds=3)
    m.on_join("a", 0.0)
    m.on_join("b", 0.0)
    m.on_update("a", 1, 1.0)
    m.on_update("b", 1, 1.0)
    m.on_leave("b", 1.5)
    assert m.on_aggregated(1, 2.0) == []
    assert m.phase is Phase.WAITING
    [start] = m.on_join("b", 3.0)
    assert isinstance(start, StartRound) and start.round == 2


@pytest.mark.parametrize("phase", list(Phase))
def test_snapshot_restore_resumes_each_phase(phase: Phase) -> None:
    m = machine(rounds=3)
    m.on_join("a", 0.0)
    m.on_join("b", 0.0)
    m.on_update("a", 1, 1.0)
    m.phase = phase
    snap = m.snapshot()
    assert RoundSnapshot.model_validate_json(snap.model_dump_json()) == snap
    r, actions = RoundMachine.restore(m.policy, snap, {"a": 1, "x": 0}, now=100.0)
    if phase is Phase.TRAINING:
        assert actions == [] and r.received == {"a": 1} and r.deadline == 110.0
        assert r.on_join("b", 101.0) == [ResumeRound("b", 1, 110.0)]
        assert r.on_update("b", 1, 102.0) == [CloseRound(1, ("a", "b"))]
    elif phase is Phase.CLOSING:
        assert actions == [CloseRound(1, ("a",))]
        r.on_join("a", 101.0)
        assert r.on_aggregated(1, 102.0) == []  # waits for min_clients before round 2
        [start] = r.on_join("b", 103.0)
        assert isinstance(start, StartRound) and start.round == 2
    elif phase is Phase.FINISHED:
        assert actions == [Finish(1)]
    else:  # WAITING (round 1 closed) goes on with round 2; FAILED retries the failed round
        assert actions == []
        r.on_join("a", 101.0)
        [start] = r.on_join("b", 101.0)
        assert isinstance(start, StartRound) and start.round == (2 if phase is Phase.WAITING else 1)


def test_restore_closes_a_training_round_whose_updates_are_all_on_disk() -> None:
    snap = RoundSnapshot(round=2, phase=Phase.TRAINING, sampled=("a", "b"))
    _, actions = RoundMachine.restore(RoundPolicy(rounds=3), snap, {"a": 2, "b": 2}, now=0.0)
    assert actions == [CloseRound(2, ("a", "b"))]
