"""ClientSession driven by hand: scripted messages, a fake clock, work carried out inline by LocalWork (no asyncio,
no network).

Every test checks the actions the session returns and the state it is in, and where it matters what it did to
the SyncedAdapter (the residual rolled back, the round's start noted for a retrain).
"""

from __future__ import annotations

import asyncio
import itertools
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from fedquic.client.actions import (
    Action,
    Attach,
    Checkpoint,
    Close,
    Finished,
    Install,
    Installed,
    Joined,
    Landed,
    Outcome,
    Record,
    Restore,
    RunWork,
    SaveResults,
    Send,
    SendBulk,
    Train,
    WaitAcked,
    classify,
)
from fedquic.client.config import ClientConfig
from fedquic.client.flight import METRICS_TAKEN_S, Step
from fedquic.client.session import MAX_PENDING, TABLE, UNLISTED, ClientSession, State, Verdict
from fedquic.client.sync import SyncedAdapter
from fedquic.client.work import LocalWork
from fedquic.common.adapter import init_lora_state, state_hash, zeros_state
from fedquic.common.codec import EncodingSpec, encode_tensors
from fedquic.common.errors import (
    ErrorCode,
    JobError,
    ProtocolError,
    RemoteError,
    SchemaMismatchError,
    TransportError,
)
from fedquic.common.limits import WireLimits
from fedquic.common.messages import (
    Ack,
    Aggregate,
    Bye,
    Error,
    Heartbeat,
    Hello,
    Join,
    Message,
    Metrics,
    MsgType,
    RoundStart,
    TrainSpec,
    UploadGrant,
    UploadRequest,
    Welcome,
)
from fedquic.transport.settings import TlsFiles, TransportSettings

from testkit.synthetic import SyntheticLearner, lora_schema

SCHEMA = lora_schema(layers=1, dim=8, rank=2)
INT8 = EncodingSpec.parse("int8")
JOB = Welcome(version=1, job_id="job-1", rounds=3, init_seed=7)
HELLO = Hello(versions=(1,), client_id="c1", base_fingerprint="ab", num_samples=10)


def config(**kw: Any) -> ClientConfig:
    kw.setdefault("heartbeat_s", 5.0)
    kw.setdefault("liveness_timeout_s", 30.0)
    kw.setdefault("message_timeout_s", 100.0)
    return ClientConfig(client_id="c1", tls=TlsFiles(ca=Path("unused-ca.pem")), **kw)


class Harness:
    """A session and what a runner would do for it, inline: the local work (no checkpoint files), the clock."""

    def __init__(self, sync: SyncedAdapter | None = None, **cfg: Any) -> None:
        self.learner = sync.learner if sync is not None else SyntheticLearner(SCHEMA, seed=3)
        self.sync = sync or SyncedAdapter(self.learner, "c1")  # type: ignore[arg-type]
        self.session = ClientSession(config(**cfg), self.sync, hello=HELLO, beats=itertools.count(1))
        self.local = LocalWork(config(checkpoint=False, **cfg), self.learner, self.sync)  # type: ignore[arg-type]
        self.now = 0.0
        self.acked: list[Ack] = []  # the ACK(AGGREGATE)s the session sent

    def check(self, actions: list[Action]) -> list[Action]:
        """The invariant the runner relies on: what completes later (or ends the session) comes last, once."""
        later = [i for i, a in enumerate(actions) if isinstance(a, SendBulk | WaitAcked | RunWork | Finished)]
        assert later in ([], [len(actions) - 1]) or (
            len(later) == 2 and isinstance(actions[-1], Finished) and isinstance(actions[-2], Close)
        ), actions
        for a in actions:
            if isinstance(a, Send) and isinstance(a.header, Ack) and a.header.ref is MsgType.AGGREGATE:
                self.acked.append(a.header)
        return actions

    def msg(self, header: Any, body: bytes = b"", at: float | None = None) -> list[Action]:
        self.now = self.now if at is None else at
        return self.check(self.session.on_message(Message(header, body), self.now))

    def done(self, result: Any = None) -> list[Action]:
        return self.check(self.session.on_work_done(result, self.now))

    def sent(self, nbytes: int = 100) -> list[Action]:
        return self.check(self.session.on_bulk_sent(nbytes, self.now))

    def taken(self, ok: bool = True) -> list[Action]:
        return self.check(self.session.on_acked(ok, self.now))

    def timer(self, at: float, unacked: bool | None = False) -> list[Action]:
        self.now = at
        return self.check(self.session.handle_timer(at, unacked_control=unacked))

    def work(self, action: Action) -> Any:
        """Carry out a RunWork the way the runner does (minus threads and checkpoint files)."""
        assert isinstance(action, RunWork), action
        return None if isinstance(action.work, SaveResults) else self.local.run(action.work)

    def land(self, action: Action) -> list[Action]:
        """Carry out an Install that yields no figures: the session acknowledges, then checkpoints; returns what
        follows the Landed."""
        *ack, ckpt = self.done(self.work(action))
        assert [type(a) for a in ack] == [Send] and ckpt == RunWork(Checkpoint()), (ack, ckpt)
        landed, *rest = self.done()
        assert isinstance(landed, Landed) and landed.header == action.work.msg.header  # type: ignore[attr-defined]
        return rest

    def run_work(self, actions: list[Action]) -> list[Action]:
        """Carry out a trailing RunWork and return what the session says next (repeatedly)."""
        while actions and isinstance(actions[-1], RunWork):
            actions = actions[:-1] + self.done(self.work(actions[-1]))
        return actions

    def join(self, server_hash: str | None = None) -> list[Action]:
        """HELLO_SENT → WELCOME → attach → fresh start → JOIN → ACK(JOIN)."""
        assert self.check(self.session.start(self.now, hello_sent=False)) == [Send(HELLO)]
        out = self.run_work(self.msg(JOB))
        [send] = out
        assert isinstance(send, Send) and isinstance(send.header, Join) and send.header.resume is None
        assert self.session.state is State.JOIN_SENT
        return self.msg(Ack(ref=MsgType.JOIN, round=0, state_hash=server_hash or self.sync.view_hash))

    def to_round(self, r: int = 1) -> None:
        """Joined, then ROUND_START(r) trained and its METRICS sent: AWAIT_GRANT."""
        if self.session.state is not State.IDLE:
            assert isinstance(self.join()[-1], Joined)
        out = self.run_work(self.msg(round_start(r)))
        [bulk] = out
        assert isinstance(bulk, SendBulk) and isinstance(bulk.header, Metrics) and bulk.header.round == r
        [req] = self.sent()
        assert isinstance(req, Send) and req.header == UploadRequest(round=r, nbytes=len(self.prepared.body))
        assert self.session.step is Step.AWAIT_GRANT

    def to_ack_wait(self, r: int = 1) -> None:
        self.to_round(r)
        [bulk] = self.msg(UploadGrant(round=r, expires_s=60))
        assert isinstance(bulk, SendBulk) and bulk.header == self.prepared.header
        assert self.sent(1234) == [] and self.session.step is Step.AWAIT_ACK

    @property
    def prepared(self) -> Any:
        return self.session._flight.prepared  # type: ignore[union-attr]


def round_start(r: int) -> RoundStart:
    return RoundStart(round=r, train=TrainSpec(local_steps=1), uplink=INT8, deadline_s=60)


def dense(kind: str, state: dict, round_: int = 0, contributors: int = 0) -> tuple[Aggregate, bytes]:
    manifest, body = encode_tensors(state, EncodingSpec.parse("fp32"))
    return Aggregate(round=round_, kind=kind, delta=False, contributors=contributors, manifest=manifest), body


def finished(actions: list[Action]) -> Finished:
    end = actions[-1]
    assert isinstance(end, Finished), actions
    return end


# -- the table --------------------------------------------------------------------------------------------------


def test_the_table_names_real_handlers_and_only_waiting_states() -> None:
    for (where, _), rule in TABLE.items():
        assert where in UNLISTED
        if rule.verdict in (Verdict.ACCEPT, Verdict.STOP):
            assert callable(getattr(ClientSession, rule.handler)), rule.handler
    # a HEARTBEAT is dropped wherever the session waits, except before WELCOME, where it is unexpected
    for where in UNLISTED:
        if where is not State.HELLO_SENT:
            assert TABLE[(where, MsgType.HEARTBEAT)].verdict is Verdict.DROP, where
    assert (State.HELLO_SENT, MsgType.HEARTBEAT) not in TABLE and UNLISTED[State.HELLO_SENT] is Verdict.FAIL


# -- joining and heartbeats -------------------------------------------------------------------------------------


def test_a_connector_that_sent_hello_leaves_nothing_to_send() -> None:
    h = Harness()
    assert h.session.start(0.0, hello_sent=True) == [] and h.session.state is State.HELLO_SENT


def test_heartbeats_only_after_the_join_is_acknowledged() -> None:
    h = Harness()
    h.session.start(0.0, hello_sent=False)
    assert h.timer(5.0) == []  # HELLO_SENT: liveness is probed, nothing is sent
    out = h.msg(JOB, at=6.0)
    assert out == [RunWork(Attach(JOB))] and h.session.get_timer() is None  # no timers while work runs
    assert h.done(h.learner.attach(JOB)) == [RunWork(Restore(JOB, SCHEMA))]
    [join] = h.done(False)
    assert isinstance(join, Send) and isinstance(join.header, Join) and h.session.state is State.JOIN_SENT
    assert h.session.get_timer() == 11.0 and h.timer(11.0) == []  # JOIN_SENT: still no heartbeat
    assert h.msg(Ack(ref=MsgType.JOIN, round=0, state_hash=h.sync.view_hash), at=12.0) == [Joined(JOB, None)]
    assert h.session.state is State.IDLE and h.session.heartbeat_ok
    assert h.timer(17.0) == [Send(Heartbeat(seq=1))]
    assert h.timer(22.0) == [Send(Heartbeat(seq=2))]
    assert h.timer(22.5) == []  # not due yet


def test_no_heartbeat_and_no_liveness_without_a_quic_peer_to_probe() -> None:
    h = Harness()
    h.join()
    assert all(h.timer(5.0 * i, unacked=None) == [] for i in range(1, 20))
    assert h.session.state is State.IDLE and h.session.unanswered_since is None


def test_a_heartbeat_before_welcome_is_unexpected() -> None:
    h = Harness()
    h.session.start(0.0, hello_sent=True)
    end = finished(h.msg(Heartbeat(seq=1)))
    assert end.outcome is Outcome.FATAL and isinstance(end.error, ProtocolError)
    assert end.error.code is ErrorCode.UNEXPECTED_MESSAGE and h.session.state is State.FAILED
    assert h.msg(JOB) == [] and h.session.on_connection_lost(TransportError("x"), 1.0) == []  # over: ignored


def test_a_rejoin_to_another_job_or_schema_is_refused() -> None:
    h = Harness()
    h.join()
    again = Harness(h.sync)  # the next connection of the same process
    again.session.start(0.0, hello_sent=True)
    other_job = JOB.model_copy(update={"job_id": "job-2"})
    assert again.msg(other_job) == [RunWork(Attach(other_job))]
    end = finished(again.done(SCHEMA))
    assert end.outcome is Outcome.FATAL and isinstance(end.error, JobError)
    third = Harness(h.sync)
    third.session.start(0.0, hello_sent=True)
    third.msg(JOB)
    end = finished(third.done(lora_schema(layers=2, dim=8, rank=2)))
    assert isinstance(end.error, SchemaMismatchError)


def test_a_rejoin_resumes_from_memory_without_restoring() -> None:
    h = Harness()
    h.join()
    again = Harness(h.sync)
    again.session.start(0.0, hello_sent=True)
    again.msg(JOB)
    [join] = again.done(SCHEMA)
    assert isinstance(join, Send) and join.header.resume == h.sync.sync_state()  # type: ignore[attr-defined]


# -- deferral -------------------------------------------------------------------------------------------------


def test_messages_before_ack_join_wait_and_a_heartbeat_is_dropped() -> None:
    h = Harness()
    h.session.start(0.0, hello_sent=False)
    h.run_work(h.msg(JOB))
    assert h.msg(round_start(1)) == []
    assert h.msg(Heartbeat(seq=9)) == []
    assert h.msg(Ack(ref=MsgType.AGGREGATE, round=0, state_hash="ab")) == []  # not ACK(JOIN): waits
    assert h.msg(Metrics(round=0, values={})) == []
    assert [m.type for m in h.session.pending] == [MsgType.ROUND_START, MsgType.ACK, MsgType.METRICS]
    out = h.msg(Ack(ref=MsgType.JOIN, round=0, state_hash=h.sync.view_hash))
    # IDLE takes the queue from the front: the round starts; the ACK and METRICS wait behind its work
    assert out == [Joined(JOB, None), RunWork(Train(round_start(1)))]
    assert [m.type for m in h.session.pending] == [MsgType.ACK, MsgType.METRICS]


def test_messages_before_the_update_ack_are_handled_afterwards_in_order() -> None:
    h = Harness()
    h.to_ack_wait(1)
    row = {k: np.full(v.shape, 0.5, np.float32) for k, v in zeros_state(SCHEMA).items()}
    agg, body = dense("row", row, round_=1, contributors=2)
    for m in (Heartbeat(seq=1), Metrics(round=1, values={"x": 1.0}), agg, round_start(2)):
        assert h.msg(m, body if m is agg else b"") == []
    assert [m.type for m in h.session.pending] == [MsgType.METRICS, MsgType.AGGREGATE, MsgType.ROUND_START]
    out = h.msg(Ack(ref=MsgType.UPDATE, round=1, state_hash=state_hash(h.prepared.new_view)))
    assert out == [RunWork(Checkpoint())] and h.session.step is Step.COMMIT
    out = h.done()
    assert isinstance(out[0], Record) and out[0].record.accepted and not out[0].late
    assert out[1:] == [RunWork(Install(Message(agg, body), evaluate=True))]  # METRICS dropped, AGGREGATE next
    assert h.land(out[1]) == [RunWork(Train(round_start(2)))]  # then the next round
    assert h.acked[-1].state_hash == state_hash(row) and not h.session.pending


def test_a_grant_or_ack_for_another_round_waits_and_the_main_loop_refuses_it() -> None:
    h = Harness()
    h.to_round(2)
    assert h.msg(UploadGrant(round=1, expires_s=60)) == [] and h.session.step is Step.AWAIT_GRANT
    h.msg(UploadGrant(round=2, expires_s=60))
    h.sent()
    assert h.msg(Ack(ref=MsgType.UPDATE, round=1, state_hash="ab")) == []  # not our round
    assert h.msg(Ack(ref=MsgType.JOIN, round=2, state_hash="ab")) == []  # not an UPDATE's
    h.msg(Ack(ref=MsgType.UPDATE, round=2, state_hash=state_hash(h.prepared.new_view)))
    end = finished(h.done())  # IDLE: the stale grant is unexpected
    assert isinstance(end.error, ProtocolError) and end.error.code is ErrorCode.UNEXPECTED_MESSAGE


def test_messages_during_a_send_wait_and_a_bye_among_them_comes_after_those_before_it() -> None:
    h = Harness()
    h.to_round(1)
    h.msg(UploadGrant(round=1, expires_s=60))  # the UPDATE is being sent: whatever comes now is queued
    agg, body = dense("row", zeros_state(SCHEMA), round_=1)
    assert h.msg(agg, body) == [] and h.msg(Bye(reason="over")) == [] and len(h.session.pending) == 2
    out = h.sent()  # AWAIT_ACK: the AGGREGATE waits, the BYE ends the wait; IDLE then takes them in order
    assert isinstance(out[0], Record) and not out[0].record.accepted
    assert out[1:] == [RunWork(Install(Message(agg, body), evaluate=False))]  # a dense copy: nothing to measure
    assert h.land(out[1]) == [RunWork(SaveResults("over"))] and not h.session.pending


def test_the_pending_queue_is_bounded_in_messages() -> None:
    h = Harness()
    h.session.start(0.0, hello_sent=False)
    h.run_work(h.msg(JOB))
    for _ in range(MAX_PENDING):
        assert h.msg(Metrics(round=0, values={})) == []
    end = finished(h.msg(Metrics(round=0, values={})))
    assert end.outcome is Outcome.FATAL and isinstance(end.error, ProtocolError)
    assert end.error.code is ErrorCode.LIMIT_EXCEEDED


def test_the_pending_queue_is_bounded_in_body_bytes() -> None:
    h = Harness(transport=TransportSettings(limits=WireLimits(max_body_bytes=300)))
    h.to_ack_wait(1)
    rng = np.random.default_rng(0)
    agg, body = dense(
        "row", {k: rng.standard_normal(v.shape).astype(np.float32) for k, v in zeros_state(SCHEMA).items()}
    )
    assert len(body) <= 300 < 2 * len(body)
    assert h.msg(agg, body) == []
    end = finished(h.msg(agg, body))
    assert isinstance(end.error, ProtocolError) and end.error.code is ErrorCode.LIMIT_EXCEEDED
    assert h.sync.unacked is not None  # it ended the connection mid-round: the round was abandoned


# -- a round's outcomes ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("step", [Step.AWAIT_GRANT, Step.AWAIT_ACK])
def test_bye_instead_of_an_answer_rolls_back_and_ends_the_job(step: Step) -> None:
    h = Harness()
    if step is Step.AWAIT_GRANT:
        h.to_round(1)
    else:
        h.to_ack_wait(1)
    before, view, synced = h.prepared.residual_before, h.sync.view_hash, h.sync.synced
    assert h.sync.ef.residual is not before  # encoding the update moved the residual
    out = h.msg(Bye(reason="job complete"))
    assert isinstance(out[0], Record) and not out[0].record.accepted and not out[0].late
    assert out[1:] == [RunWork(SaveResults("job complete"))] and h.session.state is State.ENDING
    assert h.sync.ef.residual is before and h.sync.view_hash == view and h.sync.synced is synced
    assert h.sync.unacked is None
    assert h.done() == [Close(0, "bye"), Finished(Outcome.DONE, reason="job complete")]
    assert h.session.state is State.DONE


@pytest.mark.parametrize(
    ("step", "code"), [(Step.AWAIT_ACK, ErrorCode.LATE_UPDATE), (Step.AWAIT_GRANT, ErrorCode.ROUND_NOT_OPEN)]
)
def test_a_late_refusal_rolls_back_and_records_the_round(step: Step, code: ErrorCode) -> None:
    h = Harness()
    if step is Step.AWAIT_GRANT:
        h.to_round(2)
    else:
        h.to_ack_wait(2)
    before, view = h.prepared.residual_before, h.sync.view_hash
    assert h.msg(Error(code=int(code), message="closed")) == [RunWork(Checkpoint())]
    assert h.sync.ef.residual is before and h.sync.view_hash == view and h.sync.synced_round == 0
    [rec] = h.done()
    assert isinstance(rec, Record) and rec.late and rec.record.round == 2 and not rec.record.accepted
    assert h.session.state is State.IDLE and h.sync.unacked is None


def test_another_refusal_rolls_back_and_ends_the_connection() -> None:
    h = Harness()
    h.to_ack_wait(1)
    before = h.prepared.residual_before
    end = finished(h.msg(Error(code=int(ErrorCode.CONFLICTING_UPDATE), message="no")))
    assert end.outcome is Outcome.FATAL and isinstance(end.error, RemoteError)
    assert h.sync.ef.residual is before and h.sync.unacked is None  # rolled back, not marked for a retrain


def test_an_ack_commits_and_a_different_hash_is_fatal() -> None:
    h = Harness()
    h.to_ack_wait(1)
    new_view = h.prepared.new_view
    h.msg(Ack(ref=MsgType.UPDATE, round=1, state_hash=state_hash(new_view)))
    assert h.sync.view_hash == state_hash(new_view) and h.sync.synced_round == 1
    other = Harness()
    other.to_ack_wait(1)
    end = finished(other.msg(Ack(ref=MsgType.UPDATE, round=1, state_hash="ab")))
    assert isinstance(end.error, ProtocolError) and end.error.code is ErrorCode.CONFLICTING_UPDATE
    assert other.sync.unacked is None  # answered: nothing to retrain


@pytest.mark.parametrize("step", [Step.METRICS_OUT, Step.AWAIT_GRANT, Step.UPLOADING, Step.AWAIT_ACK])
def test_a_connection_lost_with_the_update_out_notes_the_round_start(step: Step) -> None:
    h = Harness()
    h.join()
    h.run_work(h.msg(round_start(1)))
    if step is not Step.METRICS_OUT:
        h.sent()
    if step in (Step.UPLOADING, Step.AWAIT_ACK):
        h.msg(UploadGrant(round=1, expires_s=60))
    if step is Step.AWAIT_ACK:
        h.sent()
    assert h.session.step is step
    prepared = h.prepared
    [end] = h.session.on_connection_lost(TransportError("lost"), 1.0)
    assert isinstance(end, Finished) and end.outcome is Outcome.RETRY and h.session.state is State.FAILED
    assert h.sync.ef.residual is prepared.residual_before and h.sync.unacked is prepared.start


def test_a_connection_lost_while_training_rolls_nothing_back() -> None:
    h = Harness()
    h.join()
    h.msg(round_start(1))
    [end] = h.session.on_connection_lost(asyncio.CancelledError(), 1.0)
    assert isinstance(end, Finished) and end.outcome is Outcome.FATAL and h.sync.unacked is None


# -- aggregates ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kind", "delta", "contributors", "measured"),
    [("row", True, 2, True), ("row", True, 0, True), ("global", False, 3, True), ("row", False, 0, False)],
)
def test_the_session_decides_whether_an_aggregate_is_measured(
    kind: str, delta: bool, contributors: int, measured: bool
) -> None:
    h = Harness()
    h.join()
    agg, body = dense(kind, zeros_state(SCHEMA), round_=1, contributors=contributors)
    agg = agg.model_copy(update={"delta": delta})
    assert h.msg(agg, body) == [RunWork(Install(Message(agg, body), evaluate=measured))]
    assert h.session.state is State.INSTALLING and h.session.get_timer() is None


def test_a_rounds_figures_are_sent_and_taken_before_the_ack_and_the_checkpoint_comes_last() -> None:
    h = Harness()
    h.join()
    agg, body = dense("row", zeros_state(SCHEMA), round_=1, contributors=2)
    assert h.msg(agg, body) == [RunWork(Install(Message(agg, body), evaluate=True))]
    installed = Installed("cd" * 16, h.sync.decode(agg, body, WireLimits())[0], 99, {"acc": 0.5, "bad": np.nan}, False)
    [bulk] = h.done(installed)
    assert bulk == SendBulk(Metrics(round=1, values={"acc": 0.5}))  # what JSON can carry
    assert h.msg(round_start(2)) == [] and h.msg(Heartbeat(seq=3)) == []  # queued meanwhile (no state waits)
    assert h.sent() == [WaitAcked(METRICS_TAKEN_S)] and h.session.get_timer() is None
    assert h.taken(False) == [Send(Ack(ref=MsgType.AGGREGATE, round=1, state_hash="cd" * 16)), RunWork(Checkpoint())]
    assert h.done() == [Landed(agg, installed), RunWork(Train(round_start(2)))]  # then the queue, in order
    assert h.session.state is State.ROUND and [m.type for m in h.session.pending] == [MsgType.HEARTBEAT]


def test_an_aggregate_without_figures_is_acknowledged_at_once() -> None:
    h = Harness()
    h.join()
    agg, body = dense("row", zeros_state(SCHEMA), round_=1, contributors=2)
    [work] = h.msg(agg, body)
    [ack, ckpt] = h.done(h.work(work))  # the learner has no evaluate: no figures, no METRICS
    assert ack == Send(Ack(ref=MsgType.AGGREGATE, round=1, state_hash=state_hash(zeros_state(SCHEMA))))
    assert ckpt == RunWork(Checkpoint())
    [landed] = h.done()
    assert isinstance(landed, Landed) and landed.installed.figures == {} and h.session.state is State.IDLE


def test_a_connection_lost_while_installing_ends_it_without_an_ack() -> None:
    h = Harness()
    h.join()
    agg, body = dense("row", zeros_state(SCHEMA), round_=1, contributors=2)
    [work] = h.msg(agg, body)
    [end] = h.session.on_connection_lost(TransportError("lost"), 1.0)
    assert isinstance(end, Finished) and end.outcome is Outcome.RETRY
    assert h.done(h.work(work)) == [] and h.acked == []  # over: nothing more is sent


# -- resets -------------------------------------------------------------------------------------------------------


def test_a_reset_that_agrees_completes_the_join() -> None:
    h = Harness()
    server = {k: v + 1.0 for k, v in init_lora_state(SCHEMA, JOB.init_seed).items()}
    assert h.join(server_hash=state_hash(server)) == [] and h.session.state is State.RESETTING
    assert h.msg(Heartbeat(seq=1)) == [] and h.msg(Metrics(round=0, values={})) == []  # dropped / waits
    agg, body = dense("local", server)
    out = h.msg(agg, body)
    assert out == [RunWork(Install(Message(agg, body), evaluate=False))]
    assert h.land(out[0]) == [Joined(JOB, None)] and h.session.state is State.IDLE
    assert h.sync.view_hash == state_hash(server) and h.acked[-1].state_hash == state_hash(server)


def test_a_reset_mismatch_after_a_local_reset_is_a_schema_mismatch() -> None:
    h = Harness()
    h.join(server_hash="ab" * 16)
    agg, body = dense("local", {k: v + 1.0 for k, v in init_lora_state(SCHEMA, JOB.init_seed).items()})
    out = h.msg(agg, body)
    end = finished(h.land(out[0]))
    assert end.outcome is Outcome.FATAL and isinstance(end.error, SchemaMismatchError)


@pytest.mark.parametrize("header", [round_start(1), Bye(reason="over")])
def test_a_round_or_bye_instead_of_a_reset_is_a_schema_mismatch(header: Any) -> None:
    h = Harness()
    h.join(server_hash="ab" * 16)
    end = finished(h.msg(header))
    assert isinstance(end.error, SchemaMismatchError)


# -- timers -------------------------------------------------------------------------------------------------------


def test_liveness_timeout_when_control_data_stays_unacknowledged() -> None:
    h = Harness()
    h.join()
    beats = [h.timer(t, unacked=True) for t in (5.0, 10.0, 15.0, 20.0, 25.0)]
    assert beats == [[Send(Heartbeat(seq=i))] for i in range(1, 6)] and h.session.unanswered_since == 0.0
    end = finished(h.timer(30.0, unacked=True))
    assert end.outcome is Outcome.RETRY and isinstance(end.error, TransportError)
    assert end.error.code is ErrorCode.TIMEOUT


def test_an_acknowledgement_resets_the_liveness_clock() -> None:
    h = Harness()
    h.join()
    for t in (5.0, 10.0, 15.0, 20.0, 25.0):
        h.timer(t, unacked=True)
    h.timer(30.0, unacked=False)
    assert h.session.unanswered_since is None
    assert all(isinstance(h.timer(t, unacked=True)[-1], Send) for t in (35.0, 40.0, 45.0, 50.0, 55.0))
    assert isinstance(h.timer(60.0, unacked=True)[-1], Finished)  # unanswered since 35 - 5: 30 s


def test_the_message_timeout_restarts_with_each_message() -> None:
    h = Harness(message_timeout_s=12.0)
    h.join()
    assert h.timer(5.0) and h.timer(10.0)
    h.msg(Metrics(round=0, values={}), at=11.0)  # any message starts the wait over
    assert h.session.get_timer() == 16.0 and h.timer(16.0) and h.timer(21.0)
    assert h.session.get_timer() == 23.0
    end = finished(h.timer(23.0))
    assert end.outcome is Outcome.RETRY and isinstance(end.error, TransportError)
    assert "timed out" in str(end.error)


# -- how a connection ends --------------------------------------------------------------------------------------


def test_job_ended_is_a_success_wherever_it_comes() -> None:
    h = Harness()
    h.session.start(0.0, hello_sent=True)
    end = finished(h.msg(Error(code=int(ErrorCode.JOB_ENDED), message="over")))
    assert end.outcome is Outcome.JOB_ENDED and h.session.state is State.DONE
    h = Harness()
    h.to_ack_wait(1)
    [end] = h.session.on_connection_lost(TransportError("closed", code=ErrorCode.JOB_ENDED), 1.0)
    assert isinstance(end, Finished) and end.outcome is Outcome.JOB_ENDED


@pytest.mark.parametrize(
    ("exc", "outcome"),
    [
        (TransportError("lost"), Outcome.RETRY),
        (TransportError("timeout", code=ErrorCode.TIMEOUT), Outcome.RETRY),
        (TransportError("full", code=ErrorCode.LIMIT_EXCEEDED), Outcome.RETRY),
        (TransportError("cert", code=ErrorCode.CERTIFICATE), Outcome.FATAL),
        (TransportError("id", code=ErrorCode.IDENTITY_MISMATCH), Outcome.FATAL),
        (TransportError("end", code=ErrorCode.JOB_ENDED), Outcome.JOB_ENDED),
        (RemoteError("stopping", code=ErrorCode.SHUTTING_DOWN), Outcome.RETRY),
        (RemoteError("end", code=ErrorCode.JOB_ENDED), Outcome.JOB_ENDED),
        (RemoteError("bad", code=ErrorCode.CONFLICTING_UPDATE), Outcome.FATAL),
        (ProtocolError("odd", code=ErrorCode.UNEXPECTED_MESSAGE), Outcome.FATAL),
        (SchemaMismatchError("schema"), Outcome.FATAL),
        (asyncio.CancelledError(), Outcome.FATAL),
        (ValueError("bug"), Outcome.FATAL),
    ],
)
def test_classify(exc: BaseException, outcome: Outcome) -> None:
    assert classify(exc) is outcome


def test_unexpected_messages_in_the_main_loop_end_the_connection_and_a_stray_ack_does_not() -> None:
    h = Harness()
    h.join()
    assert h.msg(Ack(ref=MsgType.UPDATE, round=7, state_hash="ab")) == [] and h.session.state is State.IDLE
    end = finished(h.msg(JOB))
    assert isinstance(end.error, ProtocolError) and end.error.code is ErrorCode.UNEXPECTED_MESSAGE
