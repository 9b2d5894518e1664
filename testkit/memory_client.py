"""A client without its runner against :class:`~testkit.memory.MemoryServer`: the real
:class:`~fedquic.client.session.ClientSession`, :class:`~fedquic.client.work.LocalWork` and a learner (e.g.
:class:`~testkit.synthetic.SyntheticLearner`), driven synchronously.

One :class:`~testkit.memory.FakeClock` (the server's) for both sides; no event loop, no threads, no sockets.
:class:`MemoryClient` carries out its session's actions inline: a send reaches the server at once, local work runs
at once (unless its ``gate`` holds it), a bulk send and an acknowledgement wait return at once; it takes what the
server sent from its connection's outbox one message at a time, only when its session waits for one (as the runner
does not read while work runs). :func:`run` steps the clients in turn and moves the clock only when none can move:
to the next client timer, a second at most, so the server's deadlines (rounds, ACK waits, uploads) pass in
order. Faults are plain calls: :meth:`MemoryClient.drop` (both ends see the connection close, what was on its
way is lost) and ``silent`` (nothing crosses any more, the server's end stays open, the control stream stays
unacknowledged: only the liveness probe notices). A connection that ends retryably is replaced at once (no
backoff), at most ``connect_attempts`` times in a row without joining; any other end is the client's outcome.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from typing import Any

from fedquic.client.actions import (
    Action,
    Close,
    Finished,
    Joined,
    Landed,
    Outcome,
    Record,
    RunWork,
    Send,
    SendBulk,
    WaitAcked,
    Work,
)
from fedquic.client.config import ClientConfig
from fedquic.client.learner import Learner
from fedquic.client.session import ClientSession
from fedquic.client.sync import SyncedAdapter
from fedquic.client.work import LocalWork
from fedquic.common.errors import ErrorCode, TransportError
from fedquic.common.messages import Header, Message
from fedquic.transport.framing import frame_size

from .memory import MemoryConn, MemoryServer

Hook = Callable[["MemoryClient", Message], None]


class MemoryClient:
    def __init__(self, srv: MemoryServer, cfg: ClientConfig, learner: Learner) -> None:
        self.srv, self.cfg, self.learner = srv, cfg, learner
        self.sync = SyncedAdapter(learner, cfg.client_id)
        self.work = LocalWork(cfg, learner, self.sync)
        self.hello = self.work.hello()
        self.gate: Callable[[Work], bool] | None = None  # work it refuses waits (the clock may move meanwhile)
        self.on_sent: list[Hook] = []  # after each message of the client's reached the server (or was lost)
        self.session: ClientSession | None = None
        self.conn: MemoryConn | None = None
        self.conns: list[MemoryConn] = []  # every connection, in order
        self.sent: list[tuple[int, Header]] = []  # (connection id, header) of everything the client sent
        self.received: list[tuple[int, Header]] = []  # and of everything its session was handed
        self.ends: list[Finished] = []  # how each connection ended
        self.outcome: Finished | None = None  # how the client ended (not retried)
        self.silent = False
        self._todo: list[Action] = []
        self._beats = itertools.count(1)
        self._failures = 0
        self._joins_then = 0

    # -- what it holds (as FederatedClient exposes it) ------------------------------------------------------

    view = property(lambda self: self.sync.view)
    view_hash = property(lambda self: self.sync.view_hash)
    ef = property(lambda self: self.sync.ef)
    held = property(lambda self: self.sync.held)
    joins = property(lambda self: self.work.joins)
    resets = property(lambda self: self.work.resets)
    late_rounds = property(lambda self: self.work.late_rounds)
    result = property(lambda self: self.work.result)

    @property
    def client_id(self) -> str:
        return self.cfg.client_id

    @property
    def done(self) -> bool:
        return self.outcome is not None

    def now(self) -> float:
        return self.srv.clock()

    def sent_of(self, kind: type[Any]) -> list[Any]:
        return [h for _, h in self.sent if isinstance(h, kind)]

    def received_of(self, kind: type[Any]) -> list[Any]:
        return [h for _, h in self.received if isinstance(h, kind)]

    # -- faults ---------------------------------------------------------------------------------------------

    def drop(self) -> None:
        """The connection is lost: the server hears of it, the session ends; what was on its way is lost."""
        assert self.conn is not None and self.session is not None
        if self.conn.closed is None:
            self.srv.drop(self.conn)
        lost = TransportError("connection lost", code=ErrorCode.INTERNAL)
        self._todo = self.session.on_connection_lost(lost, self.now())

    # -- one step -------------------------------------------------------------------------------------------

    def step(self) -> bool:
        """Do the next thing: connect, carry out one action, or hand the session one message. False: nothing
        to do until time passes (or a gate opens)."""
        if self.done:
            return False
        if self.session is None:
            self._connect()
            return True
        if self._todo:
            return self._carry(self._todo.pop(0))
        conn = self.conn
        assert conn is not None
        if self.silent:
            return False
        if conn.outbox:
            msg = conn.outbox.popleft()
            self.received.append((conn.id, msg.header))
            self._todo = self.session.on_message(msg, self.now())
            return True
        if conn.closed is not None:  # the server closed it, and what it sent before is read
            err = TransportError(f"connection closed ({conn.closed.code.name})", code=conn.closed.code)
            self._todo = self.session.on_connection_lost(err, self.now())
            return True
        return False

    def timer(self) -> float | None:
        """When the session's timer is due (None: it awaits no message now)."""
        if self.done or self.session is None or self._todo:
            return None
        return self.session.get_timer()

    def fire(self) -> bool:
        """Run the session's timer if it is due."""
        when = self.timer()
        if when is None or self.now() < when:
            return False
        assert self.session is not None
        self._todo = self.session.handle_timer(self.now(), unacked_control=self.silent)
        return True

    def _connect(self) -> None:
        self.conn = self.srv.connect(identity=self.cfg.client_id)
        self.conns.append(self.conn)
        self.silent = False
        self._joins_then = self.joins
        self.session = ClientSession(self.cfg, self.sync, hello=self.hello, beats=self._beats)
        self._todo = self.session.start(self.now(), hello_sent=False)

    def _carry(self, action: Action) -> bool:
        session, now = self.session, self.now()
        assert session is not None
        if isinstance(action, Send):
            self._up(Message(action.header))
        elif isinstance(action, SendBulk):
            self._up(Message(action.header, bytes(action.body)))
            self._todo += session.on_bulk_sent(frame_size(action.header, len(action.body)), now)
        elif isinstance(action, WaitAcked):
            self._todo += session.on_acked(not self.silent, now)
        elif isinstance(action, RunWork):
            if self.gate is not None and not self.gate(action.work):
                self._todo.insert(0, action)
                return False
            self._todo += session.on_work_done(self.work.run(action.work), self.now())
        elif isinstance(action, Close):
            self._hang_up()
        elif isinstance(action, Joined | Record | Landed):
            self.work.note(action)
        elif isinstance(action, Finished):
            self._end(action)
        else:  # pragma: no cover - a new action type must be carried here too
            raise AssertionError(f"unknown action {action!r}")
        return True

    def _up(self, msg: Message) -> None:
        assert self.conn is not None
        self.sent.append((self.conn.id, msg.header))
        if not self.silent and self.conn.closed is None:
            self.srv.deliver(self.conn, msg.header, msg.body)
        for hook in list(self.on_sent):
            hook(self, msg)

    def _hang_up(self) -> None:
        """The client closes its end; the server hears of it unless the connection is silent."""
        if self.conn is not None and self.conn.closed is None and not self.silent:
            self.srv.drop(self.conn)

    def _end(self, end: Finished) -> None:
        self.ends.append(end)
        self._hang_up()
        self.session, self._todo = None, []
        if end.outcome is Outcome.RETRY:
            self._failures = 0 if self.joins > self._joins_then else self._failures
            self._failures += 1
            if self._failures < self.cfg.connect_attempts:
                return  # the next step connects again
        self.outcome = end


def run(
    srv: MemoryServer, *clients: MemoryClient, until: Callable[[], bool] | None = None, limit_s: float = 3600.0
) -> None:
    """Step ``clients`` in turn until all are done (or ``until()``); when none can move, fire the timers that are
    due, else move the shared clock to the next client timer (a second at most). Fails after ``limit_s`` of
    fake time without the end."""
    t0 = srv.clock()
    for _ in range(1_000_000):
        if (until is not None and until()) or all(c.done for c in clients):
            return
        if any([c.step() for c in clients]) or any([c.fire() for c in clients]):
            continue
        assert srv.clock() - t0 < limit_s, f"stuck: nothing moved for {limit_s} s of fake time"
        timers = [t for c in clients if (t := c.timer()) is not None]
        srv.advance(min([1.0, *(t - srv.clock() for t in timers)]))
    raise AssertionError("too many steps")


__all__ = ["MemoryClient", "run"]
