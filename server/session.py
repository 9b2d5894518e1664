"""One client connection's protocol on the server, sans-I/O: HELLO → WELCOME → JOIN → dense reset → rounds.

:class:`ServerSession` takes a message (:meth:`~ServerSession.on_message`), the time (:meth:`~ServerSession.on_timer`
at :meth:`~ServerSession.deadline`) or the connection's end (:meth:`~ServerSession.on_closed`), and returns
:mod:`~fedquic.server.actions` for the daemon to carry out. Which message is taken in which state is the table
:data:`TABLE`, in one place; any other (state, message) pair is UNEXPECTED_MESSAGE: a close before the client is
ready, a refusal of that one message after. A refusal before READY closes with ERROR (a missing HELLO or JOIN, a
reset never acknowledged: a TIMEOUT close without one).

The job's shared state (round machine, records, schema) is the :class:`~fedquic.server.job.ServerJob`; slow steps
(hashing or decoding an upload, the fsynced commit that must precede its ACK) are :class:`Work` whose result comes
back to the continuation named in it. The daemon feeds one event at a time per connection and no message while a
Work of the connection runs, so the handlers see the order the client sent.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from enum import Enum
from functools import partial
from typing import Any

from ..common.adapter import TensorDict
from ..common.codec import EncodingSpec, encode_payload
from ..common.errors import ErrorCode, FedQuicError, ProtocolError, SchemaMismatchError
from ..common.messages import (
    SUPPORTED_VERSIONS,
    Ack,
    Aggregate,
    Bye,
    Error,
    Hello,
    Join,
    Message,
    Metrics,
    MsgType,
    Update,
    Welcome,
)
from ..transport.connection import BulkPermit
from ..transport.framing import frame_size
from .actions import Action, Close, Permit, Refuse, Replace, Send, SendBulk, UploadDone, Work
from .close import wire
from .ingest import UploadHandling
from .job import KINDS, ClientRecord, ServerJob
from .store import ClientRecordOnDisk

log = logging.getLogger(__name__)

JOIN_TIMEOUT_S = 300.0  # after WELCOME the client builds its adapters (a real model loads first)
RESET_ACK_TIMEOUT_S = 300.0
DENSE = EncodingSpec.parse("fp32")


class State(str, Enum):
    AWAIT_HELLO = "await-hello"
    AWAIT_JOIN = "await-join"
    LOADING = "loading"  # the client's record is written or read (Work)
    RESETTING = "resetting"  # dense state sent, its ACKs awaited
    READY = "ready"  # a participant: uploads, metrics, ACKs of aggregates
    CLOSED = "closed"


Handler = Callable[["ServerSession", Message, float], list[Action]]


class ServerSession(UploadHandling):
    def __init__(self, job: ServerJob, handle: Any, identity: str | None, now: float, *, budget: Any) -> None:
        self.job = job
        self.handle = handle  # the daemon's connection (opaque here: recorded as the client's while attached)
        self.identity = identity  # the client id of the verified certificate, if any
        self.budget = budget  # the transport's receive budget (limit, try_reserve)
        self.state = State.AWAIT_HELLO
        self.hello: Hello | None = None
        self.rec: ClientRecord | None = None
        self._deadline: float | None = now + job.cfg.transport.hello_timeout_s
        self._reset_hashes: set[str] = set()
        self._join: Join | None = None  # the JOIN being answered (its resume is logged when the client is ready)

    @property
    def client_id(self) -> str | None:
        return self.hello.client_id if self.hello is not None else None

    @property
    def closed(self) -> bool:
        return self.state is State.CLOSED

    # -- events --------------------------------------------------------------------------------------

    def deadline(self) -> float | None:
        """When :meth:`on_timer` must be called (the HELLO, JOIN or reset ACK still awaited), or None."""
        return self._deadline

    def on_timer(self, now: float) -> list[Action]:
        if self._deadline is None or now < self._deadline or self.closed:
            return []
        what = {State.AWAIT_HELLO: "HELLO", State.AWAIT_JOIN: "JOIN"}.get(self.state, "the ACK of a reset")
        log.warning("closing connection: no %s in time", what)
        self.job.metrics.reject(ErrorCode.TIMEOUT)
        return self._close(ErrorCode.TIMEOUT, f"timed out waiting for {what}")

    def on_message(self, msg: Message, now: float) -> list[Action]:
        if self.closed:
            return []
        if self.state is State.READY:
            self.job.metrics.bytes_in += frame_size(msg.header, len(msg.body))
        handler = TABLE.get((self.state, msg.type))
        try:
            if handler is None:
                raise ProtocolError(
                    f"unexpected {msg.type.name} from a client in state {self.state.value}",
                    code=ErrorCode.UNEXPECTED_MESSAGE,
                )
            return handler(self, msg, now)
        except FedQuicError as exc:
            return self._refuse(msg, exc)

    def on_closed(self, now: float) -> list[Action]:
        """The connection is gone. If it is still the client's, the client leaves (its state stays on disk)."""
        self.state, self._deadline = State.CLOSED, None
        rec = self.rec
        if rec is None or self.job.clients.get(rec.client_id) is not rec or rec.peer is not self.handle:
            return []
        done: list[Action] = [UploadDone(rec.client_id, r) for r in list(rec.upload_done)]  # slots to the next
        return done + self.job.detach(rec, now)

    # -- registration --------------------------------------------------------------------------------

    def _on_hello(self, msg: Message, now: float) -> list[Action]:
        hello = msg.header
        assert isinstance(hello, Hello)
        job, cfg = self.job, self.job.cfg
        if job.ended:  # said at once, so a client that comes back after the end does not retry into timeouts
            raise ProtocolError(f"job {cfg.job.job_id!r} has ended", code=ErrorCode.JOB_ENDED)
        common = set(hello.versions) & set(SUPPORTED_VERSIONS)
        if not common:
            raise ProtocolError(
                f"no common protocol version (client {hello.versions}, server {SUPPORTED_VERSIONS})",
                code=ErrorCode.UNSUPPORTED_VERSION,
            )
        cid = hello.client_id
        if self.identity is not None and self.identity != cid:
            raise ProtocolError(
                f"HELLO claims client id {cid!r} but the certificate is {self.identity!r}",
                code=ErrorCode.IDENTITY_MISMATCH,
            )
        if job.stopping:
            raise ProtocolError("the server is shutting down", code=ErrorCode.SHUTTING_DOWN)
        missing = sorted(e.value for e in job.required_encodings() if e not in hello.encodings)
        if missing:
            raise ProtocolError(
                f"the job sends {', '.join(missing)} (downlink {cfg.job.downlink.encoding.value}, dense "
                f"resets fp32); HELLO lists only {', '.join(e.value for e in hello.encodings)}",
                code=ErrorCode.UNSUPPORTED_ENCODING,
            )
        out = self._take_over(cid, now)
        self._check_fingerprint(hello)
        self.hello, self.state = hello, State.AWAIT_JOIN
        self._deadline = now + JOIN_TIMEOUT_S  # the client builds its adapters first
        welcome = Welcome(version=max(common), job_id=cfg.job.job_id, rounds=cfg.policy.rounds, **cfg.job.job_terms())
        return [*out, Send(welcome)]

    def _take_over(self, cid: str, now: float) -> list[Action]:
        """A client id already attached: only the same verified certificate may replace that connection."""
        stale = self.job.clients.get(cid)
        if stale is None:
            return []
        if self.identity is None:  # without a verified certificate, an id alone cannot take a session over
            raise ProtocolError(f"client id {cid!r} is already connected", code=ErrorCode.IDENTITY_MISMATCH)
        # The same certificate again: the old connection is dead on the client's side (its network changed or
        # dropped before our idle timeout noticed). The new one replaces it.
        log.info("client %s reconnected: replacing its previous connection", cid)
        old = stale.peer
        out = [UploadDone(cid, r) for r in list(stale.upload_done)] + self.job.detach(stale, now)
        if old is not None:
            out.append(Replace(old, ErrorCode.IDENTITY_MISMATCH, "replaced by a new connection"))
        return out

    def _check_fingerprint(self, hello: Hello) -> None:
        # The first client to JOIN fixes the job's base model (with its adapter schema); a HELLO alone does not,
        # so a misconfigured client that never joins cannot lock the job to its model.
        fp = self.job.base_fingerprint
        if fp is not None and hello.base_fingerprint != fp:
            raise SchemaMismatchError(
                f"{hello.client_id}: base model fingerprint {hello.base_fingerprint} differs from the job's {fp}"
            )

    def _on_join(self, msg: Message, now: float) -> list[Action]:
        join, hello, job = msg.header, self.hello, self.job
        assert isinstance(join, Join) and hello is not None
        self._check_fingerprint(hello)  # another client may have joined first while this one built its adapters
        cid, out = hello.client_id, []
        if job.schema is None:
            if join.adapter.numel > job.cfg.max_adapter_parameters:  # before the init is allocated from it
                raise ProtocolError(
                    f"{cid}: an adapter of {join.adapter.numel} parameters is over the server's "
                    f"max_adapter_parameters ({job.cfg.max_adapter_parameters})",
                    code=ErrorCode.LIMIT_EXCEEDED,
                )
            job.base_fingerprint = hello.base_fingerprint
            job.set_schema(join.adapter)
            out.append(job.save())
            log.info(
                "adapter schema %s: %d tensors, %d parameters",
                join.adapter.fingerprint(),
                len(join.adapter.tensors),
                join.adapter.numel,
            )
        elif join.adapter.fingerprint() != job.schema.fingerprint():
            raise SchemaMismatchError(
                f"{cid}: adapter schema {join.adapter.fingerprint()} differs from the "
                f"job's {job.schema.fingerprint()} (rank and target modules are job-level)"
            )
        self.state, self._deadline = State.LOADING, None
        rec = job.records.get(cid)
        if rec is not None:
            return [*out, self._load(rec, join)]
        disk = ClientRecordOnDisk(client_id=cid, num_samples=hello.num_samples, view_hash=job.init_hash())
        new = ClientRecord(cid, disk)

        def created(_: None, now: float) -> list[Action]:
            job.records[cid] = new
            return [self._load(new, join)]

        return [*out, Work(lambda: job.store.commit(disk, {}, None), created, keys=(cid,), name="new record")]

    def _load(self, rec: ClientRecord, join: Join) -> Work:
        return Work(partial(self.job.load, rec), partial(self._on_loaded, rec, join), keys=(rec.client_id,))

    def _on_loaded(self, rec: ClientRecord, join: Join, _: None, now: float) -> list[Action]:
        job = self.job
        self.rec = rec
        job.attach(rec, self.handle)
        out: list[Action] = [
            Permit(MsgType.METRICS, BulkPermit(max_body=0)),  # telemetry streams, headers only
            Send(Ack(ref=MsgType.JOIN, round=job.machine.round, state_hash=rec.view_hash)),
        ]
        sends = self._reset_plan(rec, join)
        if not sends:
            return out + self._ready(join, now)
        log.info("state differs from the server's, sending a dense reset of %s", ", ".join(k for k, _ in sends))
        self.state, self._deadline = State.RESETTING, now + RESET_ACK_TIMEOUT_S
        # the hashes the client's ACKs will carry: the view's, or each kind's committed one
        self._reset_hashes = {rec.view_hash if kind == "local" else job.held_hash(rec, kind) for kind, _ in sends}
        self._join = join
        for kind, state in sends:
            out.append(Work(partial(encode_payload, state, DENSE), partial(self._send_reset, kind), name="reset"))
        return out

    def _reset_plan(self, rec: ClientRecord, join: Join) -> list[tuple[str, TensorDict]]:
        """The states to send dense: wherever what the client holds differs from the server's record of it."""
        assert rec.view is not None and rec.held is not None
        theirs_view = join.resume.view_hash if join.resume else self.job.init_hash()
        theirs_held = dict(join.resume.held) if join.resume else {}
        sends: list[tuple[str, TensorDict]] = []
        if theirs_view != rec.view_hash:
            sends.append(("local", rec.view))
        for kind in KINDS:
            mine = self.job.held_hash(rec, kind)
            if theirs_held.get(kind, self.job.default_held_hash(kind)) != mine:
                sends.append((kind, rec.held[kind]))
        return sends

    def _send_reset(self, kind: str, payload: Any, now: float) -> list[Action]:
        assert self.job.schema is not None
        manifest = wire(self.job.schema, payload)
        header = Aggregate(round=self.job.machine.round, kind=kind, delta=False, contributors=0, manifest=manifest)
        return [SendBulk(header, payload.body, then=self._count_out)]

    def _count_out(self, nbytes: int | None, now: float) -> list[Action]:
        self.job.metrics.bytes_out += nbytes or 0
        return []

    def _on_reset_ack(self, msg: Message, now: float) -> list[Action]:
        h = msg.header
        if not (isinstance(h, Ack) and h.ref is MsgType.AGGREGATE):
            raise ProtocolError(f"expected the ACK of a reset, got {msg.type.name}", code=ErrorCode.UNEXPECTED_MESSAGE)
        if h.state_hash not in self._reset_hashes:
            raise ProtocolError(
                "the client acknowledged a reset with a different state", code=ErrorCode.CONFLICTING_UPDATE
            )
        self._reset_hashes.discard(h.state_hash)
        assert self._join is not None
        return [] if self._reset_hashes else self._ready(self._join, now)

    def _ready(self, join: Join, now: float) -> list[Action]:
        assert self.hello is not None
        self.state, self._deadline = State.READY, None
        cid = self.hello.client_id
        log.info("client %s joined (%d samples)%s", cid, self.hello.num_samples, " (resumed)" if join.resume else "")
        out: list[Action] = []
        if self.job.ended:  # it registered while the job ended: it missed the BYE
            out.append(Send(Bye(reason="job already ended")))
        return out + self.job.apply(self.job.machine.on_join(cid, now), now)

    # -- a ready client ---------------------------------------------------------------------------------

    def _on_metrics(self, msg: Message, now: float) -> list[Action]:
        h = msg.header
        assert isinstance(h, Metrics) and self.rec is not None
        self.rec.reported.setdefault(h.round, {}).update(h.values)  # kept apart from the server's figures
        return []

    def _on_ack(self, msg: Message, now: float) -> list[Action]:
        h, rec = msg.header, self.rec
        assert isinstance(h, Ack) and rec is not None
        if h.ref is not MsgType.AGGREGATE:
            raise ProtocolError(f"unexpected ACK of {h.ref.name} from a client", code=ErrorCode.UNEXPECTED_MESSAGE)
        kind_hash = rec.held_hash_pending.get(h.round)
        ok, out = self.job.on_aggregate_ack(rec, h.round, h.state_hash or "", now)
        if ok:
            return out
        # The client installed something other than what we sent it: its held adapter is no longer what every
        # later delta is computed against. Closing with CONFLICTING_UPDATE (no ERROR: a client takes that close as
        # retryable) makes it rejoin, and the rejoin's dense reset sends the server's record before another round.
        kind = kind_hash[0] if kind_hash else "?"
        log.error(
            "round %d: the client acknowledged %s adapter %s, the server sent it %s: closing for a dense reset",
            h.round,
            kind,
            h.state_hash,
            kind_hash[1] if kind_hash else None,
        )
        self.job.metrics.reject(ErrorCode.CONFLICTING_UPDATE)
        return out + self._close(ErrorCode.CONFLICTING_UPDATE, f"held {kind} adapter differs: rejoin for a dense reset")

    def _on_bye(self, msg: Message, now: float) -> list[Action]:
        assert isinstance(msg.header, Bye)
        log.info("client said bye: %s", msg.header.reason)
        return []

    def _on_error(self, msg: Message, now: float) -> list[Action]:
        assert isinstance(msg.header, Error)
        log.warning("client reported error %d: %s", msg.header.code, msg.header.message)
        return []

    def _ignore(self, msg: Message, now: float) -> list[Action]:
        return []

    # -- helpers ---------------------------------------------------------------------------------------

    def _refuse(self, msg: Message | None, exc: FedQuicError) -> list[Action]:
        self.job.metrics.reject(exc.code)
        if self.state is not State.READY:
            log.warning("closing connection: %s", exc)
            return self._close(exc.code, str(exc), error=exc)
        log.warning("refused %s: %s", msg.type.name if msg is not None else "UPDATE", exc)
        out: list[Action] = [Refuse(exc)]
        if msg is not None and isinstance(msg.header, Update) and self.rec is not None:
            out.append(self._slot_free(msg.header))  # accepted or refused, the slot is free
        return out

    def _close(self, code: ErrorCode, reason: str, error: FedQuicError | None = None) -> list[Action]:
        self.state, self._deadline = State.CLOSED, None
        return [Close(code, reason[:200], error=error)]


_S = ServerSession
# The protocol, one row per (state, message) the server takes. Anything else is UNEXPECTED_MESSAGE.
TABLE: dict[tuple[State, MsgType], Handler] = {
    (State.AWAIT_HELLO, MsgType.HELLO): _S._on_hello,
    (State.AWAIT_HELLO, MsgType.HEARTBEAT): _S._ignore,  # may ride in 0-RTT beside HELLO; the deadline holds
    (State.AWAIT_JOIN, MsgType.JOIN): _S._on_join,  # a HEARTBEAT here is unexpected: the JOIN comes first
    (State.RESETTING, MsgType.ACK): _S._on_reset_ack,
    (State.RESETTING, MsgType.METRICS): _S._ignore,  # an evaluation of the reset state: not a round's figures
    (State.RESETTING, MsgType.HEARTBEAT): _S._ignore,
    (State.READY, MsgType.UPLOAD_REQUEST): _S._on_upload_request,
    (State.READY, MsgType.UPDATE): _S._on_update,
    (State.READY, MsgType.METRICS): _S._on_metrics,
    (State.READY, MsgType.ACK): _S._on_ack,
    (State.READY, MsgType.BYE): _S._on_bye,
    (State.READY, MsgType.ERROR): _S._on_error,
    (State.READY, MsgType.HEARTBEAT): _S._ignore,
}

__all__ = ["DENSE", "JOIN_TIMEOUT_S", "RESET_ACK_TIMEOUT_S", "TABLE", "ServerSession", "State"]
