"""The real server job and sessions, driven in memory: no sockets, no threads, no event loop, a fake clock.

:class:`MemoryServer` carries out the actions of :class:`~fedquic.server.session.ServerSession`,
:class:`~fedquic.server.job.ServerJob` and :class:`~fedquic.server.close.RoundClose` the way the daemon does, but
inline: :class:`~fedquic.server.actions.Work` runs at once, sends land in a :class:`MemoryConn`'s ``outbox``, and
time moves only with :meth:`MemoryServer.advance`. Upload admission is the real
:class:`~fedquic.server.admission.UploadAdmission`. Tests script a client (or drive a client session) against
it and read what the server sent and stored; real clients (:class:`~fedquic.client.runner.FederatedClient`) reach
it through :meth:`MemoryServer.connector`, a link with faults (:mod:`testkit.memory_link`).
"""

from __future__ import annotations

import itertools
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fedquic.common.errors import ErrorCode, FedQuicError
from fedquic.common.messages import Error, Header, Message, MsgType, UploadGrant
from fedquic.server.actions import (
    Action,
    Close,
    JobDone,
    Permit,
    QueueUpload,
    Refuse,
    Replace,
    Revoke,
    Send,
    SendBulk,
    UploadDone,
    Work,
)
from fedquic.server.admission import Expired, Granted, UploadAdmission
from fedquic.server.config import ServerConfig
from fedquic.server.job import JobResult, ServerJob
from fedquic.server.session import ServerSession
from fedquic.server.store import ServerStore
from fedquic.transport.budget import BufferBudget
from fedquic.transport.connection import BULK_TYPES, BulkPermit

if TYPE_CHECKING:
    from .memory_link import LinkFaults, MemoryLink


class FakeClock:
    def __init__(self, t: float = 1000.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


@dataclass
class Closed:
    code: ErrorCode
    reason: str
    error: bool  # an ERROR message went first


@dataclass
class MemoryConn:
    """One client connection as the server sees it: what it was sent, how it was closed."""

    id: int
    session: ServerSession
    outbox: deque[Message] = field(default_factory=deque)
    permits: dict[MsgType, BulkPermit] = field(default_factory=dict)
    closed: Closed | None = None
    # Told after every send to this connection and after its close (the link forwards to a client from here).
    listener: Callable[[MemoryConn], None] | None = field(default=None, repr=False)

    def _notify(self) -> None:
        if self.listener is not None:
            self.listener(self)

    def take(self) -> list[Message]:
        """Everything sent since the last call, in order."""
        out = list(self.outbox)
        self.outbox.clear()
        return out

    def headers(self) -> list[Header]:
        return [m.header for m in self.take()]


class MemoryServer:
    def __init__(self, cfg: ServerConfig, *, clock: FakeClock | None = None, budget_bytes: int = 1 << 30) -> None:
        self.cfg = cfg
        self.clock = clock or FakeClock()
        self.job = ServerJob(cfg, ServerStore(Path(cfg.run_dir) / "state"), self.clock())
        self.budget = BufferBudget(limit=budget_bytes)
        self.admission = UploadAdmission(cfg.upload_slots, cfg.upload_slot_timeout_s, self.budget)
        self.conns: list[MemoryConn] = []
        self.result: JobResult | None = None
        self._ids = itertools.count(1)
        self._link: MemoryLink | None = None

    # -- what a test does ------------------------------------------------------------------------------

    def connect(self, identity: str | None = None) -> MemoryConn:
        session = ServerSession(self.job, None, identity, self.clock(), budget=self.budget)
        conn = MemoryConn(next(self._ids), session)
        session.handle = conn
        self.conns.append(conn)
        return conn

    def deliver(self, conn: MemoryConn, header: Header, body: bytes = b"") -> None:
        """The client sent ``header`` (and ``body``) on ``conn``."""
        assert conn.closed is None, f"connection {conn.id} is closed: {conn.closed}"
        if header.msg_type in BULK_TYPES:  # its stream used the permit: the room it reserved goes back
            self._unreserve(conn.permits.pop(header.msg_type, None))
        self.carry(conn.session.on_message(Message(header, body), self.clock()), conn)

    def drop(self, conn: MemoryConn) -> None:
        """The connection is lost (the client's network, a crash)."""
        if conn.closed is None:
            self._closed(conn, Closed(ErrorCode.INTERNAL, "dropped", False))
        self.carry(conn.session.on_closed(self.clock()), None)

    def link(self, faults: LinkFaults | None = None) -> MemoryLink:
        """The link real clients reach this server through (one, made on first use with ``faults``)."""
        from .memory_link import MemoryLink

        if self._link is None:
            self._link = MemoryLink(self, faults)
        return self._link

    def connector(self, faults: LinkFaults | None = None, *, certified: bool = True) -> Any:
        """A connector for :class:`~fedquic.client.runner.FederatedClient`: a new connection per connect, with the
        client's id as its certificate identity (``certified``), through :meth:`link`."""
        return self.link(faults).connector(certified=certified)

    def advance(self, seconds: float) -> None:
        """Time passes: connection timers, the job's tick (round deadlines, close ACK waits), upload expiries."""
        self.clock.t += seconds
        now = self.clock()
        for conn in list(self.conns):
            d = conn.session.deadline()
            if conn.closed is None and d is not None and now >= d:
                self.carry(conn.session.on_timer(now), conn)
        self._admission(self.admission.poll(now))
        self._admission(self.admission.admit(now))
        self.carry(self.job.tick(now), None)

    def conn_of(self, client_id: str) -> MemoryConn | None:
        rec = self.job.clients.get(client_id)
        return rec.peer if rec is not None else None

    # -- the executor ------------------------------------------------------------------------------

    def carry(self, actions: list[Action], conn: MemoryConn | None) -> None:
        for act in actions:
            self._one(act, conn)

    def _target(self, to: str | None, conn: MemoryConn | None) -> MemoryConn | None:
        target = conn if to is None else self.conn_of(to)
        return target if target is not None and target.closed is None else None

    def _one(self, act: Action, conn: MemoryConn | None) -> None:
        now = self.clock()
        if isinstance(act, Work):
            try:
                result = act.run()
            except FedQuicError as exc:
                if act.fail is None:
                    raise
                self.carry(act.fail(exc, now), conn)
                return
            self.carry(act.then(result, now), conn)
        elif isinstance(act, Send | SendBulk):
            target = self._target(act.to, conn)
            body = act.body if isinstance(act, SendBulk) else b""
            if target is not None:
                self._send(target, Message(act.header, body))
            if isinstance(act, SendBulk):
                self.carry(act.then(len(body) + 64 if target is not None else None, now), conn)
        elif isinstance(act, Refuse):
            assert conn is not None
            self._send(conn, Message(Error(code=int(act.error.code), message=str(act.error)[:4000])))
        elif isinstance(act, Close | Replace):
            target = act.handle if isinstance(act, Replace) else self._target(act.to, conn)
            if target is None or target.closed is not None:
                return
            if isinstance(act, Close) and act.error is not None:
                self._send(target, Message(Error(code=int(act.error.code), message=str(act.error)[:4000])))
            self._closed(target, Closed(act.code, act.reason, isinstance(act, Close) and act.error is not None))
            self.carry(target.session.on_closed(now), None)
        elif isinstance(act, Permit):
            target = self._target(act.to, conn)
            if target is not None:
                target.permits[act.msg_type] = act.permit
        elif isinstance(act, Revoke):
            target = self._target(act.to, conn)
            if target is not None:
                self._unreserve(target.permits.pop(act.msg_type, None))
        elif isinstance(act, QueueUpload):
            self.job.records[act.client_id].upload_done[act.round] = True
            self._admission(self.admission.request((act.client_id, act.round), act.nbytes, now))
        elif isinstance(act, UploadDone):
            rec = self.job.records.get(act.client_id)
            if rec is not None and rec.upload_done.pop(act.round, None) is not None:
                self._admission(self.admission.release((act.client_id, act.round), now))
        elif isinstance(act, JobDone):
            self.result = self.result or act.result
        else:  # pragma: no cover - a new action type must be carried here too
            raise AssertionError(f"unknown action {act!r}")

    def _admission(self, events: list[Granted | Expired]) -> None:
        for ev in events:
            cid, round_ = ev.key  # type: ignore[misc]
            target = self.conn_of(cid)
            rec = self.job.records.get(cid)
            if isinstance(ev, Expired):  # the unused grant's permit goes, and with it the reserved room
                self._unreserve(target.permits.pop(MsgType.UPDATE, None) if target is not None else None)
                if rec is not None:
                    rec.upload_done.pop(round_, None)
                continue
            if target is None or rec is None or round_ not in rec.upload_done:  # gone before its turn
                self.budget.unreserve(ev.nbytes)
                self._admission(self.admission.release(ev.key, self.clock()))
                continue
            target.permits[MsgType.UPDATE] = BulkPermit(max_body=ev.nbytes, count=1, reserved=True)
            self._send(target, Message(UploadGrant(round=round_, expires_s=self.cfg.upload_slot_timeout_s)))

    def _send(self, conn: MemoryConn, msg: Message) -> None:
        conn.outbox.append(msg)
        conn._notify()

    def _closed(self, conn: MemoryConn, closed: Closed) -> None:
        conn.closed = closed
        for permit in conn.permits.values():  # as the transport core's close: reserved room goes back at once
            self._unreserve(permit)
        conn.permits.clear()
        conn._notify()

    def _unreserve(self, permit: BulkPermit | None) -> None:
        if permit is not None and permit.reserved:
            self.budget.unreserve(permit.max_body)


def messages_of(conn: MemoryConn, kind: type[Any]) -> list[Any]:
    return [m.header for m in conn.outbox if isinstance(m.header, kind)]


__all__ = ["Closed", "FakeClock", "MemoryConn", "MemoryServer", "messages_of"]
