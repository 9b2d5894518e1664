"""The client's protocol session, sans-I/O: one :class:`ClientSession` per connection.

In the style of h11's ``_state.py`` and aioquic's ``QuicConnection``: the session is told what happened (a
message, the end of local work, a bulk send or an acknowledgement wait returning, a timer, the connection ending),
always with the time ``now``, and returns the actions to carry out, in order (:mod:`fedquic.client.actions`; at
most one that completes later, and it comes last). It reads no clock, socket or file; :mod:`fedquic.client.runner`
carries the actions out (``testkit/memory_client.py`` does so inline, on a fake clock).

It owns the connection's :class:`State` (a round's steps and an aggregate's are in :mod:`fedquic.client.flight`),
the transition table (:data:`TABLE`, and :data:`UNLISTED` for what a state does not list: handled, ending the wait
but staying queued, dropped, or deferred to ``pending`` for the main loop), the bounded ``pending`` queue, the
message timeout and the liveness rule. What outlives a connection is in the
:class:`~fedquic.client.sync.SyncedAdapter` it is given (the adapter state) and in the driver's
:class:`~fedquic.client.work.LocalWork` (the checkpoint, counters, results).
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Callable, Iterator
from enum import Enum
from typing import Any

from ..common.adapter import AdapterSchema
from ..common.errors import ErrorCode, FedQuicError, JobError, ProtocolError, SchemaMismatchError, TransportError
from ..common.messages import Heartbeat, Hello, Join, Message, MsgType, SyncState, Welcome
from .actions import (
    Action,
    Attach,
    Checkpoint,
    Close,
    Finished,
    Install,
    Installed,
    Joined,
    Outcome,
    Restore,
    Rule,
    RunWork,
    SaveResults,
    Send,
    Train,
    Trained,
    Verdict,
    Work,
    classify,
)
from .config import ClientConfig
from .flight import Flight, Landing, Step
from .reconnect import remote_error
from .sync import SyncedAdapter

log = logging.getLogger(__name__)

# A server that sends more than this while the client waits for something else does not follow the protocol (a
# legitimate one has a few queued at most: the round's AGGREGATE and the next ROUND_START before the ACK of our
# UPDATE). Bodies are held to the configured max_body_bytes in all: room for that one AGGREGATE.
MAX_PENDING = 64


class State(Enum):
    HELLO_SENT = "hello sent"  # waiting for WELCOME
    ATTACHING = "attaching"  # the learner builds its adapters; a first connection may restore the checkpoint
    JOIN_SENT = "join sent"  # waiting for ACK(JOIN)
    RESETTING = "resetting"  # the server holds another view of our adapter: waiting for its dense AGGREGATEs
    IDLE = "idle"  # joined: the main loop
    ROUND = "round"  # one of our rounds, at a Step
    INSTALLING = "installing"  # an AGGREGATE being installed, its METRICS sent, acknowledged, checkpointed
    ENDING = "ending"  # BYE: results and adapters being saved
    DONE = "done"
    FAILED = "failed"


def _acks_join(s: ClientSession, h: Any) -> bool:
    return h.ref is MsgType.JOIN


def _names_our_round(s: ClientSession, h: Any) -> bool:
    return s.round is not None and h.round == s.round


def _acks_our_update(s: ClientSession, h: Any) -> bool:
    return h.ref is MsgType.UPDATE and _names_our_round(s, h)


A, S, D, T = Verdict.ACCEPT, Verdict.STOP, Verdict.DROP, MsgType  # short names: the table reads as one
# The whole protocol as the client sees it: (waiting state, message type) -> what happens. Local work and sends
# in between (attach, train, install, checkpoint; METRICS and UPDATE going out) are not waiting states: a message
# that arrives then is queued for the next one.
TABLE: dict[tuple[State | Step, MsgType], Rule] = {
    (State.HELLO_SENT, T.WELCOME): Rule(A, "_on_welcome"),
    (State.HELLO_SENT, T.ERROR): Rule(A, "_on_error"),
    (State.JOIN_SENT, T.ACK): Rule(A, "_on_join_ack", guard=_acks_join),
    (State.JOIN_SENT, T.ERROR): Rule(A, "_on_error"),
    (State.JOIN_SENT, T.HEARTBEAT): Rule(D),
    (State.RESETTING, T.AGGREGATE): Rule(A, "_on_aggregate"),
    (State.RESETTING, T.ROUND_START): Rule(A, "_on_no_reset"),
    (State.RESETTING, T.BYE): Rule(A, "_on_no_reset"),
    (State.RESETTING, T.ERROR): Rule(A, "_on_error"),
    (State.RESETTING, T.HEARTBEAT): Rule(D),
    (State.IDLE, T.ROUND_START): Rule(A, "_on_round_start"),
    (State.IDLE, T.AGGREGATE): Rule(A, "_on_aggregate"),
    (State.IDLE, T.BYE): Rule(A, "_on_bye"),
    (State.IDLE, T.ERROR): Rule(A, "_on_error"),
    (State.IDLE, T.ACK): Rule(A, "_on_stray_ack"),
    (State.IDLE, T.HEARTBEAT): Rule(D),
    (State.IDLE, T.METRICS): Rule(D),
    (Step.AWAIT_GRANT, T.UPLOAD_GRANT): Rule(A, "_on_grant", guard=_names_our_round),
    (Step.AWAIT_GRANT, T.ERROR): Rule(A, "_on_refusal"),
    (Step.AWAIT_GRANT, T.BYE): Rule(S, "_on_bye_in_round"),
    (Step.AWAIT_GRANT, T.HEARTBEAT): Rule(D),
    (Step.AWAIT_ACK, T.ACK): Rule(A, "_on_update_ack", guard=_acks_our_update),
    (Step.AWAIT_ACK, T.ERROR): Rule(A, "_on_refusal"),
    (Step.AWAIT_ACK, T.BYE): Rule(S, "_on_bye_in_round"),
    (Step.AWAIT_ACK, T.HEARTBEAT): Rule(D),
}
# A type a waiting state does not list, or whose guard fails: the first message and the main loop refuse it, every
# other wait keeps it for later. The keys are the states in which the session receives.
UNLISTED: dict[State | Step, Verdict] = {
    State.HELLO_SENT: Verdict.FAIL,  # a HEARTBEAT before WELCOME too
    State.JOIN_SENT: Verdict.DEFER,
    State.RESETTING: Verdict.DEFER,
    State.IDLE: Verdict.FAIL,
    Step.AWAIT_GRANT: Verdict.DEFER,
    Step.AWAIT_ACK: Verdict.DEFER,
}


class ClientSession:
    """One connection's protocol; ``sync`` is the process's adapter state, ``beats`` its HEARTBEAT numbering."""

    def __init__(self, cfg: ClientConfig, sync: SyncedAdapter, *, hello: Hello, beats: Iterator[int]) -> None:
        self.cfg = cfg
        self.sync = sync
        self._hello = hello
        self._beats = beats  # HEARTBEAT seq, shared across connections (not reset on reconnect)
        self.state = State.HELLO_SENT
        self.pending: deque[Message] = deque()
        self.max_pending_bytes = cfg.transport.limits.max_body_bytes
        self.heartbeat_ok = False  # before the JOIN is acknowledged the server expects HELLO/JOIN only
        self.unanswered_since: float | None = None  # control bytes unacknowledged since (liveness)
        self._deadline = self._beat_at = 0.0  # the message timeout; the next liveness check (and heartbeat)
        self._work: Work | None = None
        self._welcome: Welcome | None = None
        self._resume: SyncState | None = None
        self._server_hash = ""  # ACK(JOIN)'s view hash while resetting
        self._flight: Flight | None = None
        self._landing: Landing | None = None

    # -- events in ------------------------------------------------------------------------------------------

    def start(self, now: float, *, hello_sent: bool) -> list[Action]:
        """The connection is up; the QUIC connector may have sent HELLO already (in 0-RTT data)."""
        self._arm(now)
        return [] if hello_sent else [Send(self._hello)]

    def on_message(self, msg: Message, now: float) -> list[Action]:
        return self._handle(now, lambda out: self._message(msg, out))

    def on_work_done(self, result: AdapterSchema | bool | Trained | Installed | None, now: float) -> list[Action]:
        return self._handle(now, lambda out: self._work_done(result, out))

    def on_bulk_sent(self, nbytes: int, now: float) -> list[Action]:
        if self.state is State.INSTALLING:  # an aggregate's METRICS
            return self._handle(now, lambda out: out.extend(self._landing_().bulk_sent()))
        return self._handle(now, lambda out: out.extend(self._round_().bulk_sent(nbytes)))

    def on_acked(self, ok: bool, now: float) -> list[Action]:
        """A :class:`WaitAcked` returned: ``ok`` whether the server's QUIC stack acknowledged in time."""
        return self._handle(now, lambda out: out.extend(self._landing_().taken(ok)))

    def handle_timer(self, now: float, *, unacked_control: bool | None) -> list[Action]:
        """``get_timer()`` is due. ``unacked_control``: whether bytes written on the control stream are still
        unacknowledged by the server's QUIC stack (None: not a QUIC peer, nothing to probe)."""
        return self._handle(None, lambda out: self._timer(now, unacked_control, out))

    def on_connection_lost(self, exc: BaseException, now: float) -> list[Action]:
        """The connection ended under us (closed, refused, cancelled): a round in flight is rolled back."""
        return [] if self.state in (State.DONE, State.FAILED) else [self._fail(exc)]

    @property
    def round(self) -> int | None:
        """The round in progress, if any."""
        return self._flight.round if self._flight is not None else None

    @property
    def step(self) -> Step | None:
        return self._flight.step if self._flight is not None else None

    def get_timer(self) -> float | None:
        """When to call handle_timer if no message comes first; None while no message is awaited."""
        return min(self._deadline, self._beat_at) if self._wait() is not None else None

    # -- dispatch -------------------------------------------------------------------------------------------

    def _handle(self, now: float | None, body: Callable[[list[Action]], None]) -> list[Action]:
        out: list[Action] = []
        if self.state in (State.DONE, State.FAILED):
            return out
        if now is not None:  # a new wait begins: as the old loop's receive did, the timeouts start over
            self._arm(now)
        try:
            body(out)
            if out and isinstance(out[-1], RunWork):  # work a flight or a landing asks for is awaited too
                self._work = out[-1].work
            self._pump(out)
        except FedQuicError as exc:
            out.append(self._fail(exc))
        return out

    def _arm(self, now: float) -> None:
        self._deadline = now + self.cfg.message_timeout_s
        self._beat_at = now + self.cfg.heartbeat_s

    def _wait(self) -> State | Step | None:
        """The waiting state the session receives in; None while local work or a send is in progress."""
        if self._work is not None:
            return None
        where = self.step if self.state is State.ROUND else self.state
        return where if where in UNLISTED else None

    def _rule(self, where: State | Step, msg: Message) -> Rule:
        rule = TABLE.get((where, msg.type))
        if rule is None or (rule.guard is not None and not rule.guard(self, msg.header)):
            return Rule(UNLISTED[where])
        return rule

    def _message(self, msg: Message, out: list[Action]) -> None:
        where = self._wait()
        rule = self._rule(where, msg) if where is not None else Rule(Verdict.DEFER)
        if rule.verdict in (Verdict.DEFER, Verdict.STOP):
            self._defer(msg)
        if rule.verdict is Verdict.FAIL:
            raise self._unexpected(msg)
        if rule.verdict in (Verdict.ACCEPT, Verdict.STOP):
            getattr(self, rule.handler)(msg, out)

    def _pump(self, out: list[Action]) -> None:
        """Hand what is queued to the state that now waits, from the front; a message it does not handle stays
        where it is (the old loop put what one wait deferred back in front of the queue, in order)."""
        i = 0
        while i < len(self.pending) and (where := self._wait()) is not None:
            msg = self.pending[i]
            rule = self._rule(where, msg)
            if rule.verdict is Verdict.DEFER:
                i += 1
                continue
            if rule.verdict is not Verdict.STOP:
                del self.pending[i]
            if rule.verdict is Verdict.FAIL:
                raise self._unexpected(msg)
            if rule.verdict is not Verdict.DROP:
                getattr(self, rule.handler)(msg, out)
                i = 0  # the state moved on: its wait starts from the front

    def _defer(self, msg: Message) -> None:
        held = sum(len(m.body) for m in self.pending) + len(msg.body)
        if len(self.pending) >= MAX_PENDING or held > self.max_pending_bytes:
            raise ProtocolError(
                f"the server sent more than the client can queue ({MAX_PENDING} messages, "
                f"{self.max_pending_bytes} body bytes) while it waited for something else",
                code=ErrorCode.LIMIT_EXCEEDED,
            )
        log.debug("queued %s while waiting (%s)", msg.type.name, self.state.value)
        self.pending.append(msg)

    def _unexpected(self, msg: Message) -> ProtocolError:
        what = f"unexpected {msg.type.name} from the server ({self.state.value})"
        return ProtocolError(what, code=ErrorCode.UNEXPECTED_MESSAGE)

    def _start(self, state: State, work: Work, out: list[Action]) -> None:
        self.state, self._work = state, work
        out.append(RunWork(work))

    def _fail(self, exc: BaseException) -> Finished:
        if self.state is State.ROUND and self._flight is not None:
            self._flight.abandon(self.sync)
        outcome = classify(exc)
        self.state, self._work = (State.DONE if outcome is Outcome.JOB_ENDED else State.FAILED), None
        return Finished(outcome, exc)

    def _timer(self, now: float, unacked_control: bool | None, out: list[Action]) -> None:
        if self._wait() is None:  # no timers while local work runs (and no heartbeats: as before)
            return
        if now >= self._beat_at:
            self._beat_at = now + self.cfg.heartbeat_s
            self._check_liveness(now, unacked_control, out)
        if now >= self._deadline:
            raise TransportError("timed out waiting for a message", code=ErrorCode.TIMEOUT)

    def _check_liveness(self, now: float, unacked: bool | None, out: list[Action]) -> None:
        """Every heartbeat_s of silence: the server is gone if its QUIC stack stopped acknowledging."""
        cfg = self.cfg
        if unacked is None:  # not a QUIC peer: nothing to probe
            return
        if unacked:  # the last heartbeat (heartbeat_s ago) is still not acknowledged
            if self.unanswered_since is None:
                self.unanswered_since = now - cfg.heartbeat_s
            elif now - self.unanswered_since >= cfg.liveness_timeout_s:
                self.unanswered_since = None
                raise TransportError(
                    f"the server acknowledged nothing for {cfg.liveness_timeout_s:.0f} s", code=ErrorCode.TIMEOUT
                )
        else:
            self.unanswered_since = None
        if self.heartbeat_ok:
            out.append(Send(Heartbeat(seq=next(self._beats))))

    # -- joining --------------------------------------------------------------------------------------------

    def _on_welcome(self, msg: Message, out: list[Action]) -> None:
        job = msg.header
        assert isinstance(job, Welcome)
        self.sync.ef.enabled = job.uplink_error_feedback
        self._welcome = job
        self._start(State.ATTACHING, Attach(job), out)

    def _on_error(self, msg: Message, out: list[Action]) -> None:
        raise remote_error(msg.header)  # type: ignore[arg-type]

    def _attached(self, schema: AdapterSchema, out: list[Action]) -> None:
        job, sync = self._welcome, self.sync
        assert job is not None
        if sync.job is None:  # the first connection: the checkpoint, if it is this job's, or a fresh start
            sync.job, sync.schema = job, schema
            self._start(State.ATTACHING, Restore(job, schema), out)
            return
        # a rejoin: our in-memory state is the truth
        if job.job_id != sync.job.job_id:
            raise JobError(f"the server now runs job {job.job_id!r}, not {sync.job.job_id!r}")
        if sync.schema is None or schema.fingerprint() != sync.schema.fingerprint():
            raise SchemaMismatchError("the learner's adapter schema changed between connections")
        self._send_join(schema, sync.sync_state(), out)

    def _restored(self, restored: bool, out: list[Action]) -> None:
        sync = self.sync
        assert self._welcome is not None and sync.schema is not None
        if not restored:
            sync.fresh(self._welcome, sync.schema)
        self._send_join(sync.schema, sync.sync_state() if restored else None, out)

    def _send_join(self, schema: AdapterSchema, resume: SyncState | None, out: list[Action]) -> None:
        out.append(Send(Join(adapter=schema, resume=resume)))
        self._resume, self.state = resume, State.JOIN_SENT

    def _on_join_ack(self, msg: Message, out: list[Action]) -> None:
        ack: Any = msg.header
        view = self.sync.view_hash
        self.heartbeat_ok = True
        if ack.state_hash is not None and ack.state_hash != view:
            log.warning("the server holds adapter state %s, we hold %s: waiting for its reset", ack.state_hash, view)
            self._server_hash = ack.state_hash
            self.state = State.RESETTING
        else:
            self._joined(out)

    def _on_no_reset(self, msg: Message, out: list[Action]) -> None:
        raise SchemaMismatchError(
            f"the server holds adapter state {self._server_hash}, the client {self.sync.view_hash}, "
            f"and it sent {msg.type.name} instead of a reset"
        )

    def _on_aggregate(self, msg: Message, out: list[Action]) -> None:
        """A dense reset while RESETTING, a round's aggregate in the main loop (flight.py: its steps)."""
        self._landing = Landing(msg, reset=self.state is State.RESETTING)
        self._start(State.INSTALLING, self._landing.work(), out)

    def _landing_(self) -> Landing:
        assert self.state is State.INSTALLING and self._landing is not None, self.state
        return self._landing

    def _landed(self, out: list[Action]) -> None:
        """An aggregate is installed, acknowledged and checkpointed; after a reset, the join may be done."""
        landing, self._landing = self._landing_(), None
        out.append(landing.done())
        if not landing.reset:  # a round's aggregate
            self.state = State.IDLE
        elif landing.reset_complete(self.sync.view_hash, self._server_hash):
            self._joined(out)
        else:  # more resets to come (row/global first, then local)
            self.state = State.RESETTING

    def _joined(self, out: list[Action]) -> None:
        assert self._welcome is not None
        self.state = State.IDLE
        out.append(Joined(self._welcome, self._resume))

    # -- the main loop --------------------------------------------------------------------------------------

    def _on_bye(self, msg: Message, out: list[Action]) -> None:
        reason = msg.header.reason  # type: ignore[attr-defined]
        log.info("server said bye: %s", reason)
        self._start(State.ENDING, SaveResults(reason), out)

    def _on_stray_ack(self, msg: Message, out: list[Action]) -> None:
        h: Any = msg.header
        log.warning("ignoring a stray ACK of %s for round %d", h.ref.name, h.round)

    # -- a round (the steps are in flight.py) ------------------------------------------------------------

    def _on_round_start(self, msg: Message, out: list[Action]) -> None:
        self._flight = Flight(msg.header)  # type: ignore[arg-type]
        self._start(State.ROUND, Train(msg.header), out)  # type: ignore[arg-type]

    def _on_grant(self, msg: Message, out: list[Action]) -> None:
        out.append(self._round_().granted())

    def _on_update_ack(self, msg: Message, out: list[Action]) -> None:
        self._round_().acked(self.sync, msg.header.state_hash)  # type: ignore[attr-defined]
        self._start(State.ROUND, Checkpoint(), out)

    def _on_refusal(self, msg: Message, out: list[Action]) -> None:
        self._round_().refused(self.sync, msg.header)  # type: ignore[arg-type]
        self._start(State.ROUND, Checkpoint(), out)

    def _on_bye_in_round(self, msg: Message, out: list[Action]) -> None:
        out.append(self._round_().stopped(self.sync))  # the BYE stays queued for the main loop
        self._flight, self.state = None, State.IDLE

    def _round_(self) -> Flight:
        assert self.state is State.ROUND and self._flight is not None, self.state
        return self._flight

    # -- work results ---------------------------------------------------------------------------------------

    def _work_done(self, result: Any, out: list[Action]) -> None:
        work, self._work = self._work, None
        if isinstance(work, Attach):
            self._attached(result, out)
        elif isinstance(work, Restore):
            self._restored(bool(result), out)
        elif isinstance(work, Train):
            out.append(self._round_().trained(result))
        elif isinstance(work, Install):
            out.extend(self._landing_().done_installing(result))
        elif isinstance(work, Checkpoint) and self.state is State.INSTALLING:
            self._landed(out)
        elif isinstance(work, Checkpoint):
            out.append(self._round_().done())
            self._flight, self.state = None, State.IDLE
        elif isinstance(work, SaveResults):
            self.state = State.DONE
            out += [Close(0, "bye"), Finished(Outcome.DONE, reason=work.reason)]
        else:
            raise RuntimeError("no work was pending")


__all__ = ["MAX_PENDING", "TABLE", "UNLISTED", "ClientSession", "Rule", "State", "Step", "Verdict"]
