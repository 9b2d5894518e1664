"""Real clients against the in-memory server: :class:`MemoryLink` connects
:class:`~fedquic.client.runner.FederatedClient` to :class:`~testkit.memory.MemoryServer`, with faults.

``link.connector()`` is what ``FederatedClient(connector=...)`` takes: each connect opens a server connection with
the client's id as its certificate identity and yields a :class:`MemoryPeer` (the client's end). A client's send
reaches the synchronous server at once; what the server sends is staged and reaches the client once the server
has settled, unless a fault (:class:`LinkFaults`) says otherwise: a connection dropped after a message (with the
answers to it) or gone silent (the server's end stays open; only the client's liveness probe notices), connects
refused or unanswered, server messages delayed, held, lost or injected, a round closed without the client.
:class:`Phantom` is a scripted participant: a lone real client needs one to be sent a Rest-of-World (the privacy
floor ``min_row_contributors`` is at least two).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
from fedquic.common.adapter import AdapterSchema, TensorDict, init_lora_state, state_hash, zeros_state
from fedquic.common.codec import Encoding, EncodingSpec, decode_tensors, encode_payload, expand
from fedquic.common.errors import ErrorCode, TransportError
from fedquic.common.messages import (
    SUPPORTED_VERSIONS,
    Ack,
    Aggregate,
    Error,
    Header,
    Heartbeat,
    Hello,
    Join,
    Message,
    MsgType,
    RoundStart,
    Update,
    UploadGrant,
    UploadRequest,
    Welcome,
)
from fedquic.server.rounds import Phase
from fedquic.transport.framing import frame_size

from .memory import MemoryConn, MemoryServer

Match = Callable[[Header], bool]
Hook = Callable[["MemoryPeer"], None]


def on(msg_type: MsgType, round_: int | None = None, *, ref: MsgType | None = None) -> Match:
    """Matches a message of ``msg_type`` (for ``round_``; an ACK of ``ref``)."""

    def match(h: Header) -> bool:
        return (
            h.msg_type is msg_type
            and (round_ is None or getattr(h, "round", None) == round_)
            and (ref is None or getattr(h, "ref", None) is ref)
        )

    return match


@dataclass(eq=False)
class Fault:
    """What happens when a client sends a message ``match`` accepts (the first time, unless not ``once``).

    ``before(peer)`` runs first; the message is then delivered, unless not ``deliver``; then the connection is
    ``"drop"``-ped (both ends see it close, and what the server answered is lost: also without ``deliver``) or goes
    ``"silent"`` (nothing crosses any more either way; the server's end stays open); then ``after(peer)`` runs."""

    match: Match
    then: Literal["drop", "silent"] | None = None
    deliver: bool = True
    before: Hook | None = None
    after: Hook | None = None
    client_id: str | None = None  # only this client's messages
    once: bool = True


@dataclass
class LinkFaults:
    faults: list[Fault] = field(default_factory=list)
    down: bool = False  # a connect goes unanswered (TransportError TIMEOUT: retried)
    refuse: ErrorCode | None = None  # a connect is refused with this code
    delay_s: dict[MsgType, float] = field(default_factory=dict)  # real seconds before a server message of this
    # type reaches the client (what the server sent after it waits behind it)
    bulk_s: float = 0.0  # real seconds a bulk send takes to reach the server (others' messages overtake it)

    def add(self, match: Match, **kw: Any) -> Fault:
        fault = Fault(match, **kw)
        self.faults.append(fault)
        return fault

    def drop_after(self, msg_type: MsgType, round_: int | None = None, *, deliver: bool = True, **kw: Any) -> Fault:
        """The connection is lost once the client sent this (delivered or not): the server's answer is lost."""
        return self.add(on(msg_type, round_), then="drop", deliver=deliver, **kw)

    def silence_after(self, msg_type: MsgType, round_: int | None = None, **kw: Any) -> Fault:
        return self.add(on(msg_type, round_), then="silent", **kw)

    def late(self, round_: int, **kw: Any) -> Fault:
        """The client's UPLOAD_REQUEST for ``round_`` comes after the round's deadline: the phantoms send theirs,
        the server's clock passes the deadline, then the request is delivered and the clock ticks once more (a
        round waiting for the client, active again, starts)."""
        return self.add(on(MsgType.UPLOAD_REQUEST, round_), before=_past_deadline, after=_tick, **kw)

    def take(self, client_id: str, header: Header) -> list[Fault]:
        hits = [f for f in self.faults if f.client_id in (None, client_id) and f.match(header)]
        self.faults = [f for f in self.faults if not (f.once and f in hits)]
        return hits


def _past_deadline(peer: MemoryPeer) -> None:
    link, machine = peer.link, peer.link.srv.job.machine
    for phantom in link.phantoms:
        phantom.upload()
    link.settle()
    if machine.phase is Phase.TRAINING:
        link.advance(max(machine.deadline - link.srv.clock(), 0.0) + 1.0)


def _tick(peer: MemoryPeer) -> None:
    peer.link.advance(0.0)


_CLOSE = object()  # in a receive queue: the connection is closed


class MemoryPeer:
    """The client's end of one connection (what :class:`fedquic.transport.aio.Peer` is over QUIC)."""

    session_resumed = False
    hello_sent = False

    def __init__(self, link: MemoryLink, conn: MemoryConn, client_id: str) -> None:
        self.link, self.conn, self.client_id = link, conn, client_id
        self.core = self  # the liveness probe reads core.control_stream_id and core.unacked_bytes
        self.control_stream_id = 0
        self.sent: list[Message] = []  # everything the client sent on this connection
        self.hello: Hello | None = None
        self.silent = False
        self.closed = False  # the client's end
        self.close_code = ErrorCode.INTERNAL
        self._inbox: asyncio.Queue[Any] = asyncio.Queue()
        self._staged: list[Any] = []  # sent by the server, not yet on its way
        self._held: list[Message] = []
        self._hold: Match | None = None
        self._backlog: deque[tuple[float, Any]] = deque()  # on its way: (due, message)
        self._timer: asyncio.TimerHandle | None = None
        conn.listener = self._server_sent

    @property
    def heartbeats(self) -> int:
        return sum(isinstance(m.header, Heartbeat) for m in self.sent)

    # -- the peer protocol ---------------------------------------------------------------------------------

    def unacked_bytes(self, stream_id: int | None = None) -> int:
        return 1 if self.silent else 0

    def send(self, header: Header, body: bytes | bytearray = b"") -> int:
        self._check_open()
        self.link.up(self, Message(header, bytes(body)))
        return frame_size(header, len(body))

    async def send_bulk(self, header: Header, body: bytes | bytearray) -> int:
        self._check_open()
        await asyncio.sleep(self.link.faults.bulk_s)
        return self.send(header, body)

    async def recv(self, timeout: float | None = None) -> Message:
        try:
            item = await asyncio.wait_for(self._inbox.get(), timeout)
        except asyncio.TimeoutError:
            raise TransportError("timed out waiting for a message", code=ErrorCode.TIMEOUT) from None
        if item is _CLOSE:
            self._inbox.put_nowait(_CLOSE)
            raise self._closed_error()
        for fn in self.link.on_recv:
            fn(self, item)
        return item

    async def wait_acked(self, timeout: float) -> bool:
        self._check_open()
        return not self.silent

    async def aclose(self, code: int = 0, reason: str = "") -> None:
        self.link.hang_up(self)

    # -- what a fault does ------------------------------------------------------------------------------

    def hold(self, match: Match) -> None:
        """Keep back what the server sends from now on that ``match`` accepts (the rest passes it)."""
        self._hold = match

    def release(self, *, deliver: bool = True) -> list[Message]:
        """Stop holding; what was held goes on its way after what is staged (or is lost). Returns it."""
        held, self._held, self._hold = self._held, [], None
        if deliver:
            self._staged.extend(held)
        return held

    def inject(self, *headers: Header, first: bool = False) -> None:
        """Messages the server did not send, on their way to the client as if it had (``first``: before what the
        server sent and is not yet on its way)."""
        msgs = [Message(h) for h in headers]
        self._staged[: 0 if first else len(self._staged)] = msgs

    # -- internals ---------------------------------------------------------------------------------------

    def _server_sent(self, conn: MemoryConn) -> None:
        for m in conn.take():
            self.link.log.append(("down", self.client_id, m.header))
            if self.silent or self.closed:
                continue
            (self._held if self._hold is not None and self._hold(m.header) else self._staged).append(m)
        if conn.closed is not None and not (self.silent or self.closed) and all(m is not _CLOSE for m in self._staged):
            self.close_code = conn.closed.code
            self._staged.append(_CLOSE)

    def _flush(self) -> None:
        if self.closed or self.silent:
            self._staged.clear()
            return
        now = asyncio.get_running_loop().time()
        for m in self._staged:
            delay = self.link.faults.delay_s.get(m.header.msg_type, 0.0) if m is not _CLOSE else 0.0
            self._backlog.append((now + delay, m))
        self._staged.clear()
        self._drain()

    def _drain(self) -> None:
        self._timer = None
        loop = asyncio.get_running_loop()
        while self._backlog and not self.closed:
            due, m = self._backlog[0]
            if due > loop.time():
                self._timer = loop.call_at(due, self._drain)
                return
            self._backlog.popleft()
            self._inbox.put_nowait(m)
            if m is _CLOSE:
                self.closed = True

    def _lose(self) -> None:
        """The client's end closes: what is still on its way is lost (what it received stays readable)."""
        if self._timer is not None:
            self._timer.cancel()
        self._staged.clear()
        self._held.clear()
        self._backlog.clear()
        if not self.closed:
            self.closed = True
            self._inbox.put_nowait(_CLOSE)

    def _check_open(self) -> None:
        if self.closed:
            raise self._closed_error()

    def _closed_error(self) -> TransportError:
        return TransportError(f"connection closed ({self.close_code.name})", code=self.close_code)


class MemoryLink:
    """Clients' connections to one :class:`MemoryServer`, with ``faults``; what crossed is in ``log``."""

    def __init__(self, srv: MemoryServer, faults: LinkFaults | None = None) -> None:
        self.srv = srv
        self.faults = faults or LinkFaults()
        self.peers: list[MemoryPeer] = []  # every connection made, in order
        self.phantoms: list[Phantom] = []
        self.observers: list[Callable[[MemoryPeer, Message], None]] = []  # after a client's message was handled
        self.on_recv: list[Callable[[MemoryPeer, Message], None]] = []  # as the client takes a message
        self.log: list[tuple[str, str, Header]] = []  # ("up" | "down", client id, header): sent, in order
        self.refusals: list[tuple[str, int, ErrorCode]] = []  # (client, round, code): its request or UPDATE refused

    connections = property(lambda self: len(self.peers), doc="connections made")

    def connector(self, *, certified: bool = True) -> Callable[[Any], contextlib.AbstractAsyncContextManager[Any]]:
        @contextlib.asynccontextmanager
        async def connect(cfg: Any) -> AsyncIterator[MemoryPeer]:
            if self.faults.refuse is not None:
                raise TransportError("the link refused the connection", code=self.faults.refuse)
            if self.faults.down:
                raise TransportError("no answer: the link is down", code=ErrorCode.TIMEOUT)
            conn = self.srv.connect(identity=cfg.client_id if certified else None)
            peer = MemoryPeer(self, conn, cfg.client_id)
            self.peers.append(peer)
            try:
                yield peer
            finally:
                self.hang_up(peer)

        return connect

    def phantom(self, client_id: str = "phantom", *, follow: str | None = None, seed: int = 0) -> Phantom:
        return Phantom(self, client_id, follow=follow, seed=seed)

    def advance(self, seconds: float) -> None:
        """Server time passes (:meth:`MemoryServer.advance`); what it sent meanwhile goes on its way."""
        self.srv.advance(seconds)
        self.settle()

    def settle(self, *, flush: bool = True) -> None:
        """Let the phantoms answer until they have nothing left to say; then (``flush``) send what the server sent
        on its way to the clients."""
        for _ in range(10_000):
            if not any([p.pump() for p in self.phantoms]):
                break
        for peer in self.peers if flush else ():
            peer._flush()

    def deliver(self, peer: MemoryPeer, msg: Message) -> None:
        """``msg`` reaches the server on ``peer``'s connection (faults aside); refusals of it are noted."""
        h, mark = msg.header, len(self.log)
        self.log.append(("up", peer.client_id, h))
        if peer.conn.closed is not None:
            return  # the server closed it; the close is on its way to the client
        self.srv.deliver(peer.conn, h, msg.body)
        round_ = getattr(h, "round", None)
        if isinstance(h, UploadRequest | Update) and round_ is not None:
            for d, cid, out in self.log[mark:]:
                if d == "down" and cid == peer.client_id and isinstance(out, Error):
                    self.refusals.append((cid, round_, ErrorCode(out.code)))
        for fn in self.observers:
            fn(peer, msg)

    def up(self, peer: MemoryPeer, msg: Message) -> None:
        """A client sent ``msg``."""
        peer.sent.append(msg)
        if isinstance(msg.header, Hello):
            peer.hello = msg.header
        if peer.silent:
            return
        faults = self.faults.take(peer.client_id, msg.header)
        for f in faults:
            if f.before is not None:
                f.before(peer)
        if all(f.deliver for f in faults) and not peer.closed:
            self.deliver(peer, msg)
        self.settle(flush=False)  # a fault may still lose what the server answered
        for f in faults:
            if f.then == "drop" or not f.deliver:
                self.drop(peer)
            elif f.then == "silent":
                peer.silent = True
            if f.after is not None:
                f.after(peer)
        self.settle()

    def drop(self, peer: MemoryPeer) -> None:
        """The connection is lost: both ends see it close; what was on its way to the client is lost."""
        peer._lose()
        if peer.conn.closed is None:
            self.srv.drop(peer.conn)
        self.settle()

    def hang_up(self, peer: MemoryPeer) -> None:
        """The client closed its end; the server hears of it unless the connection is silent."""
        peer._lose()
        if not peer.silent and peer.conn.closed is None:
            self.srv.drop(peer.conn)
            self.settle()


class Phantom:
    """A scripted participant with no runner, on the server of ``link``: it registers with the schema and base
    model of the first real client to JOIN (or those given to :meth:`register`), uploads a seeded change for
    every round it is handed (at once, or when ``follow``'s UPDATE for that round has reached the server) and
    installs and acknowledges every aggregate. A refusal of anything it sends fails the test."""

    def __init__(self, link: MemoryLink, client_id: str, *, follow: str | None = None, seed: int = 0) -> None:
        self.link, self.client_id, self.follow, self.seed = link, client_id, follow, seed
        self.conn: MemoryConn | None = None
        self.schema: AdapterSchema | None = None
        self.view: TensorDict = {}
        self.held: dict[str, TensorDict] = {}
        self.round = 0  # the round handed last
        self.uplink = EncodingSpec.parse("fp32")
        self.acked: list[int] = []  # rounds whose UPDATE the server acknowledged
        self._pending: dict[int, tuple[Update, bytes, TensorDict]] = {}
        link.phantoms.append(self)
        link.observers.append(self._observe)

    def register(self, fingerprint: str, schema: AdapterSchema) -> None:
        srv, cid = self.link.srv, self.client_id
        self.conn, self.schema = srv.connect(identity=cid), schema
        srv.deliver(self.conn, Hello(versions=SUPPORTED_VERSIONS, client_id=cid, base_fingerprint=fingerprint,
                                     num_samples=100, encodings=tuple(Encoding)))  # fmt: skip
        [welcome] = self.conn.headers()
        assert isinstance(welcome, Welcome), welcome
        self.view = init_lora_state(schema, welcome.init_seed)
        self.held = {"row": zeros_state(schema), "global": {k: v.copy() for k, v in self.view.items()}}
        srv.deliver(self.conn, Join(adapter=schema))

    def upload(self, round_: int | None = None) -> None:
        """Ask to upload the change for ``round_`` (the round handed last), once, if it is the one handed."""
        self.pump()
        r = self.round if round_ is None else round_
        if self.conn is None or self.conn.closed is not None or r != self.round or r in self._pending or not r:
            return
        rng = np.random.default_rng([self.seed, r])
        delta = {k: (1e-2 * rng.standard_normal(v.shape)).astype(np.float32) for k, v in self.view.items()}
        payload = encode_payload(delta, self.uplink)
        base = state_hash(self.view)
        header = Update(round=r, client_id=self.client_id, num_samples=100, base_hash=base, manifest=payload.manifest)
        self._pending[r] = (header, payload.body, {k: v + payload.decoded[k] for k, v in self.view.items()})
        self.link.srv.deliver(self.conn, UploadRequest(round=r, nbytes=len(payload.body)))

    def pump(self) -> bool:
        """Answer what the server sent; False if it sent nothing."""
        if self.conn is None or not self.conn.outbox:
            return False
        for m in self.conn.take():
            h = m.header
            if isinstance(h, RoundStart):
                self.round, self.uplink = h.round, h.uplink
                if self.follow is None:
                    self.upload()
            elif isinstance(h, UploadGrant):
                header, body, _ = self._pending[h.round]
                self.link.srv.deliver(self.conn, header, body)
            elif isinstance(h, Ack) and h.ref is MsgType.UPDATE:
                _, _, view = self._pending[h.round]
                assert h.state_hash == state_hash(view), f"{self.client_id}: the server holds another view"
                self.view = view
                self.acked.append(h.round)
            elif isinstance(h, Aggregate):
                self._install(h, m.body)
            elif isinstance(h, Error):
                raise AssertionError(f"the server refused phantom {self.client_id}: {h.code} {h.message}")
        return True

    def _install(self, h: Aggregate, body: bytes) -> None:
        assert self.conn is not None and self.schema is not None
        decoded = decode_tensors(expand(h.manifest, self.schema), body)
        base = self.view if h.kind == "local" else self.held[h.kind]
        new = {k: base[k] + decoded[k] for k in base} if h.delta else decoded
        if h.kind != "local":
            self.held[h.kind] = new
        if h.kind != "row":
            self.view = new
        self.link.srv.deliver(self.conn, Ack(ref=MsgType.AGGREGATE, round=h.round, state_hash=state_hash(new)))

    def _observe(self, peer: MemoryPeer, msg: Message) -> None:
        h = msg.header
        if self.conn is None and isinstance(h, Join) and peer.hello is not None and self.link.srv.job.schema:
            self.register(peer.hello.base_fingerprint, h.adapter)
        elif self.follow == peer.client_id and isinstance(h, Update):
            self.upload(h.round)


__all__ = ["Fault", "LinkFaults", "MemoryLink", "MemoryPeer", "Phantom", "on"]
