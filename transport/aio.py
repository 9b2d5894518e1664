"""Thin asyncio adapter over the sans-I/O core: sockets, timers and tasks live here only.

Delivery is confirmed by the peer's application-level ACK, never by a write returning: the QUIC stream
writers buffer without limit and never push back. The QUIC implementation is a setting
(:attr:`TransportSettings.quic_backend`, :mod:`.backend`); each backend's connection protocol class is combined
with :class:`Peer` once (:func:`peer_class`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import socket
import ssl
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from functools import cache
from typing import Any

from ..common.errors import ErrorCode, FedQuicError, TransportError
from ..common.messages import Error, Header, Message, MsgType
from .backend import QuicBackend, backend_for, get_backend
from .budget import BufferBudget
from .connection import (
    EARLY_DATA_TYPES,
    BulkPermit,
    ConnectionReady,
    FedQuicConnection,
    MessageReceived,
    PeerClosed,
    ProtocolViolation,
    StreamAborted,
)
from .framing import frame_size
from .mtls import ClientCertVerifier, ClientIdentity
from .settings import TlsFiles, TransportSettings
from .tickets import TicketJar, TicketStore

log = logging.getLogger(__name__)

_CLOSED = object()


def _tune_socket(sock: socket.socket | None, size: int) -> tuple[int, int]:
    """Ask for large UDP buffers (the ~208 kB default drops datagrams) and read back what was granted."""
    if sock is None:
        return (0, 0)
    for opt in (socket.SO_RCVBUF, socket.SO_SNDBUF):
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, opt, size)
    return (
        sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF),
        sock.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF),
    )


class _PreciseClockLoop:
    """The event loop as aioquic sees it under uvloop: a precise clock, and timers that never fire early.

    uvloop's ``loop.time()`` is libuv's cached clock, advancing in 1 ms steps, and its ``call_at`` rounds a delay
    to the nearest millisecond. aioquic's pacer arms timers microseconds ahead; under uvloop they fire at once,
    ``transmit()`` sees the same stale time, sends nothing and re-arms: about one empty wake-up per datagram
    (measured: ~97% of pacing-timer fires early under uvloop, none under asyncio). This proxy gives aioquic
    ``time.monotonic()`` (uvloop's clock shares its base and lags it by 0-1 ms) and rounds timer delays up, as
    asyncio's epoll wait does. Everything else is the real loop.
    """

    __slots__ = ("_loop",)

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop

    def time(self) -> float:
        return time.monotonic()

    def call_at(self, when: float, callback: Any, *args: Any, context: Any = None) -> asyncio.TimerHandle:
        # Whole milliseconds from uvloop's own (lagging) clock: libuv fires once that clock reaches the deadline,
        # and that clock never runs ahead of time.monotonic(), so the callback never runs before ``when``.
        delay = math.ceil(max(when - self._loop.time(), 0.0) * 1000) / 1000
        return self._loop.call_later(delay, callback, *args, context=context)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._loop, name)


MAX_PROBED_DATAGRAM = 16_000  # TransportSettings.max_datagram_size's bound: the largest size measured to work
_IP_MTU = getattr(socket, "IP_MTU", 14)  # Linux
_IPV6_MTU = getattr(socket, "IPV6_MTU", 24)


def route_datagram_limit(host: str, port: int) -> int | None:
    """The largest UDP payload the route to ``host`` carries unfragmented: the outgoing interface's MTU (the
    kernel's, for a connected socket) less the IP and UDP headers. None where the kernel cannot tell.

    This is the upper bound a path MTU search probes up to, not the path MTU itself: a hop beyond the first may
    carry less, which only a probe finds out."""
    try:
        family, _, _, _, addr = socket.getaddrinfo(host, port, type=socket.SOCK_DGRAM)[0]
        with socket.socket(family, socket.SOCK_DGRAM) as sock:
            sock.connect(addr)
            if family == socket.AF_INET6:
                return int(sock.getsockopt(socket.IPPROTO_IPV6, _IPV6_MTU)) - 48
            return int(sock.getsockopt(socket.IPPROTO_IP, _IP_MTU)) - 28
    except (OSError, IndexError):
        return None


def _on_uvloop(loop: asyncio.AbstractEventLoop) -> bool:
    return type(loop).__module__.startswith("uvloop")


class Peer:
    """One fedquic connection: receive messages in order, send control or bulk messages.

    A mixin: the class that is instantiated is :func:`peer_class` of a backend, which puts the backend's
    ``QuicConnectionProtocol`` after this one in the method order (the ``super()`` calls below reach it).
    """

    _quic: Any
    _loop: Any
    _timer: Any
    _timer_at: float | None
    _handle_timer: Callable[[], None]
    _process_events: Callable[[], None]
    _transmit_soon: Callable[[], None]

    def __new__(cls, quic: Any, *args: Any, **kwargs: Any) -> Peer:
        if cls is Peer:  # built directly over a QuicConnection: the class for its backend
            cls = peer_class(backend_for(quic))
        return super().__new__(cls)

    def __init__(
        self,
        quic: Any,
        stream_handler: Any = None,
        *,
        settings: TransportSettings,
        on_ready: Callable[[Peer], None] | None = None,
        verifier: ClientCertVerifier | None = None,
        tickets: TicketStore | None = None,
        budget: BufferBudget | None = None,
    ) -> None:
        super().__init__(quic, stream_handler)  # type: ignore[call-arg]
        if _on_uvloop(self._loop):
            self._loop = _PreciseClockLoop(self._loop)
            if hasattr(self, "_loop_time"):  # qh3 keeps the loop's clock function too
                self._loop_time = self._loop.time
        self.settings = settings
        self.core = FedQuicConnection(quic, limits=settings.limits, verifier=verifier, tickets=tickets, budget=budget)
        self.identity: ClientIdentity | None = None
        self._inbox: asyncio.Queue[Any] = asyncio.Queue()
        self._on_ready = on_ready
        self.ready = asyncio.Event()
        self._progress = asyncio.Event()
        self.closed = asyncio.Event()
        self.close_reason: str = ""
        self.close_code = 0
        self.session_resumed = False
        self.early_data_accepted = False
        self.refused_with: ErrorCode | None = None  # set when we closed the connection over a protocol violation
        self._keepalive: asyncio.Task[None] | None = None
        self.socket_buffers: tuple[int, int] = (0, 0)

    # -- asyncio / aioquic hooks -----------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)  # type: ignore[misc]
        if self._quic.configuration.is_client:  # server peers share the listening socket, tuned once in start()
            self.socket_buffers = _tune_socket(transport.get_extra_info("socket"), self.settings.socket_buffer_bytes)

    def quic_event_received(self, event: Any) -> None:
        for ev in self.core.handle_event(event, time.monotonic()):
            if isinstance(ev, MessageReceived):
                self._inbox.put_nowait(ev)
            elif isinstance(ev, ConnectionReady):
                self.session_resumed = ev.session_resumed
                self.early_data_accepted = ev.early_data_accepted
                self.identity = ev.identity
                self.ready.set()
                self._keepalive = asyncio.ensure_future(self._keepalive_loop())
                if self._on_ready is not None:
                    self._on_ready(self)
            elif isinstance(ev, ProtocolViolation):
                log.warning("protocol violation from %s: %s", self.remote_address, ev.error)
                self._refuse(ev.error)
            elif isinstance(ev, StreamAborted):
                log.info("stream %d reset by peer (code %d)", ev.stream_id, ev.error_code)
            elif isinstance(ev, PeerClosed):
                self.close_code = ev.error_code
                self._mark_closed(ev.reason or f"closed with code {ev.error_code}")

    def datagram_received(self, data: bytes | str, addr: Any) -> None:
        self._received(self._quic.receive_datagram, data, addr)

    def datagrams_received(self, data: list[bytes], addr: Any) -> None:
        """A batch from one receive system call (qh3's UDP transport, with GRO)."""
        self._received(self._quic.receive_many_datagrams, data, addr)

    def _received(self, receive: Callable[..., None], data: Any, addr: Any) -> None:
        try:
            receive(data, addr, now=self._loop.time())
        except self.core.backend.ConnectionError as exc:
            # qh3 raises for a packet its core refuses (e.g. one it has no key for yet): drop it, as QUIC would
            log.debug("datagram from %s dropped: %s", addr, exc)
        self._process_events()
        if self.core.backend.batch_transmit:
            # One transmit after a burst of datagrams, not one per datagram as the protocol classes do: the burst's
            # ACKs go out together and the loop is back to the application sooner (docs/benchmarks.md, transport)
            self._transmit_soon()
        else:
            self.transmit()
        self._progress.set()  # ACKs may have freed send budget
        closed = self.core.backend.peer_closed(self._quic)
        if closed is not None and not self.closed.is_set():
            self.close_code = closed[0]
            self._mark_closed(closed[1] or f"closed with code {closed[0]}")

    def transmit(self) -> None:
        try:
            super().transmit()  # type: ignore[misc]
        except self.core.backend.ConnectionError as exc:
            # qh3 2.1 raises "packet builder capacity exhausted" when the anti-amplification limit (an address
            # not yet validated: Retry off) leaves less room than a packet: what it polled is retransmitted by
            # loss recovery; the timer must still be armed, or nothing would ever retry
            log.debug("QUIC transmit to %s failed: %s", self.remote_address, exc)
            self._rearm_timer()

    def _rearm_timer(self) -> None:
        """What the protocol's transmit() does after sending: arm its timer for the connection's next deadline."""
        timer_at = self._quic.get_timer()
        if self._timer is not None:
            self._timer.cancel()
        self._timer = None if timer_at is None else self._loop.call_at(timer_at, self._handle_timer)
        self._timer_at = timer_at

    def connection_lost(self, exc: Exception | None) -> None:
        super().connection_lost(exc)  # type: ignore[misc]
        self._mark_closed(str(exc) if exc else "connection lost")

    # -- public API --------------------------------------------------------------------------------

    @property
    def remote_address(self) -> Any:
        return self.core.backend.remote_address(self._quic)

    async def recv(self, timeout: float | None = None) -> Message:
        """Next message (control or bulk, in arrival order). Raises TransportError once closed."""
        ev = await self.recv_event(timeout)
        return ev.message

    async def recv_event(self, timeout: float | None = None) -> MessageReceived:
        if self.closed.is_set() and self._inbox.empty():
            raise self._closed_error()
        try:
            item = await asyncio.wait_for(self._inbox.get(), timeout)
        except asyncio.TimeoutError:
            raise TransportError("timed out waiting for a message", code=ErrorCode.TIMEOUT) from None
        if item is _CLOSED:
            self._inbox.put_nowait(_CLOSED)  # keep later receivers from blocking forever
            raise self._closed_error()
        return item

    def send(self, header: Header, body: bytes = b"") -> int:
        """Send on the control stream; returns the frame's size in bytes."""
        self._check_open()
        n = self._call(self.core.send_control, header, body)
        self.transmit()
        return n

    async def send_bulk(self, header: Header, body: bytes) -> int:
        """Send one message on a stream of its own; returns the frame's size in bytes.

        The body goes out in chunks, each written only while the bytes not yet acknowledged by the peer stay
        under the stream and connection budgets, so memory stays bounded however large the message is.
        Returning means queued, not delivered: delivery is the peer's application-level ACK.
        """
        self._check_open()
        s = self.settings
        sid = self._call(self.core.open_bulk, header, len(body))
        self.transmit()
        view = memoryview(body)
        for off in range(0, len(body), s.bulk_chunk_bytes):
            while (
                self.core.unacked_bytes(sid) > s.max_unacked_per_stream
                or self.core.unacked_bytes() > s.max_unacked_per_connection
            ):
                self._check_open()
                self._progress.clear()
                await self._progress.wait()
            self._check_open()
            end = off + s.bulk_chunk_bytes >= len(body)
            self._call(self.core.write_bulk, sid, view[off : off + s.bulk_chunk_bytes], end=end)
            self.transmit()
        return frame_size(header, len(body))

    async def wait_acked(self, timeout: float) -> bool:
        """Wait until the peer's QUIC stack has acknowledged everything written so far (every stream); False on
        timeout. A message acknowledged this way has reached the peer's inbox, so a control message sent after
        it is handled after it, although the two travel on different streams."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while self.core.unacked_bytes() > 0:
            self._check_open()
            left = deadline - loop.time()
            if left <= 0:
                return False
            self._progress.clear()
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._progress.wait(), left)
        return True

    def send_error(self, exc: FedQuicError) -> None:
        with contextlib.suppress(Exception):
            self.send(Error(code=int(exc.code), message=str(exc)[:4000]))

    async def aclose(self, code: int = 0, reason: str = "") -> None:
        if not self.closed.is_set():
            with contextlib.suppress(self.core.backend.ConnectionError):
                self._quic.close(error_code=code, reason_phrase=reason)
            self.transmit()
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(self.closed.wait(), 2.0)
        self._mark_closed(reason or "closed locally")

    # -- internals ---------------------------------------------------------------------------------

    def _closed_error(self) -> TransportError:
        # The peer's QUIC application close code carries our error code as 0x100 + code.
        code = self.close_code - 0x100
        known = ErrorCode(code) if code in ErrorCode._value2member_map_ else ErrorCode.INTERNAL
        return TransportError(f"connection closed: {self.close_reason}", code=known)

    def _check_open(self) -> None:
        if self.closed.is_set():
            raise self._closed_error()

    def _call(self, operation: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """A call into the QUIC connection; one that finds it closed (qh3 raises) closes this peer."""
        try:
            return operation(*args, **kwargs)
        except self.core.backend.ConnectionError as exc:
            self._mark_closed(f"connection closed: {exc}")
            raise self._closed_error() from None

    def _refuse(self, exc: FedQuicError) -> None:
        if self.core.control_stream_id is not None and not self.closed.is_set():
            self.send_error(exc)
        # QUIC application error codes carry our numbered error code (0x100 + code).
        with contextlib.suppress(self.core.backend.ConnectionError):
            self._quic.close(error_code=0x100 + int(exc.code), reason_phrase=str(exc)[:200])
        self.transmit()
        self.close_code = 0x100 + int(exc.code)
        self.refused_with = exc.code
        self._mark_closed(f"refused: {exc}")  # the application stops now, not after QUIC's draining period

    def discard_inbox(self) -> None:
        """Drop every message received and not read (the handler is done with this connection)."""
        while not self._inbox.empty():
            self._inbox.get_nowait()
        self._inbox.put_nowait(_CLOSED)

    def _mark_closed(self, reason: str) -> None:
        if not self.closed.is_set():
            self.close_reason = reason
            self.closed.set()
            self._progress.set()
            self._inbox.put_nowait(_CLOSED)
            self.core.close()  # partial frames and reserved room go back at once, not when the peer is collected
            if self._keepalive is not None:
                self._keepalive.cancel()

    async def _keepalive_loop(self) -> None:
        uid = 0
        last_ping = time.monotonic()
        while not self.closed.is_set():
            await asyncio.sleep(1.0)
            now = time.monotonic()
            for ev in self.core.expire(now):  # a bulk stream that never finishes
                if isinstance(ev, ProtocolViolation):
                    log.warning("closing %s: %s", self.remote_address, ev.error)
                    self._refuse(ev.error)
            if now - last_ping >= self.settings.keepalive_s:
                uid += 1
                last_ping = now
                try:
                    self._quic.send_ping(uid)
                except self.core.backend.ConnectionError as exc:
                    self._mark_closed(f"connection closed: {exc}")
                    return
                self.transmit()


@cache
def peer_class(backend: QuicBackend) -> type[Peer]:
    """:class:`Peer` over ``backend``'s connection protocol."""
    return type(f"{backend.name.capitalize()}Peer", (Peer, backend.QuicConnectionProtocol), {})


def _quic_config(
    settings: TransportSettings,
    backend: QuicBackend,
    *,
    is_client: bool,
    tls: TlsFiles,
    server_name: str | None = None,
) -> Any:
    extra: dict[str, Any] = {}
    if backend.congestion_control:
        extra["congestion_control_algorithm"] = settings.congestion_control
    cfg = backend.QuicConfiguration(
        is_client=is_client,
        alpn_protocols=[settings.alpn],
        max_datagram_size=settings.max_datagram_size,
        idle_timeout=settings.idle_timeout_s,
        max_data=settings.max_data,
        max_stream_data=settings.max_stream_data,
        server_name=server_name,
        **extra,
    )
    try:
        if is_client:
            cfg.verify_mode = ssl.CERT_REQUIRED
            cfg.load_verify_locations(cafile=str(tls.ca))
            if tls.cert is not None and tls.key is not None:
                cfg.load_cert_chain(str(tls.cert), str(tls.key))
        else:
            if tls.cert is None or tls.key is None:
                raise TransportError("the server needs a certificate and a key")
            cfg.load_cert_chain(str(tls.cert), str(tls.key))
            cfg.load_verify_locations(cafile=str(tls.ca))
    except (OSError, ValueError) as exc:
        raise TransportError(f"cannot load TLS files: {exc}") from exc
    return cfg


def _client_config(
    settings: TransportSettings, backend: QuicBackend, tls: TlsFiles, host: str, port: int, name: str
) -> Any:
    cfg = _quic_config(settings, backend, is_client=True, tls=tls, server_name=name)
    if hasattr(cfg, "probe_datagram_size"):  # qh3: path MTU probing, client side
        limit = route_datagram_limit(host, port) if settings.path_mtu_probing else None
        cfg.probe_datagram_size = limit is not None and limit > settings.max_datagram_size
        if cfg.probe_datagram_size:
            cfg.max_datagram_size = min(limit, MAX_PROBED_DATAGRAM)
    return cfg


class FedQuicServer:
    """A listening QUIC endpoint that hands every connected :class:`Peer` to ``on_connect``."""

    def __init__(
        self,
        settings: TransportSettings,
        tls: TlsFiles,
        on_connect: Callable[[Peer], Awaitable[None]],
        *,
        bulk_permits: Callable[[], dict[MsgType, BulkPermit]] | None = None,
    ) -> None:
        """``bulk_permits``: the bulk streams every new connection may open before its handler grants any (the
        aggregation server grants them as registration proceeds; a measurement harness may allow them upfront)."""
        self.settings = settings
        self._bulk_permits = bulk_permits
        self.tls = tls
        self._on_connect = on_connect
        self.backend = get_backend(settings.quic_backend)
        self._server: Any = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._peers: set[Peer] = set()
        self._by_identity: dict[str, list[Peer]] = {}  # live connections per verified client id, oldest first
        # Session tickets, single-use, bound to the verified client identity (resumption and 0-RTT).
        self.tickets = TicketStore()
        # Bytes held in unfinished frames across every connection (WireLimits.max_total_buffered_bytes).
        self.budget = BufferBudget(settings.limits.max_total_buffered_bytes)
        self.refused_connections = 0  # over max_connections
        self.replaced_connections = 0  # over max_connections_per_identity

    async def start(self, host: str, port: int) -> int:
        backend = self.backend
        cfg = _quic_config(self.settings, backend, is_client=False, tls=self.tls)
        verifier = None
        if self.settings.require_client_cert:
            verifier = ClientCertVerifier(self.tls.ca, self.tls.revoked)
            log.info(
                "mutual TLS: client certificates must chain to %s (%d revoked)", self.tls.ca, len(verifier.revoked)
            )

        tickets = self.tickets if verifier is not None else None

        cls = peer_class(backend)

        def create(*args: Any, **kw: Any) -> Peer:
            peer = cls(
                *args,
                settings=self.settings,
                on_ready=self._spawn,
                verifier=verifier,
                tickets=tickets,
                budget=self.budget,
                **kw,
            )
            for mtype, permit in (self._bulk_permits() if self._bulk_permits is not None else {}).items():
                peer.core.permit(mtype, permit)
            return peer

        if backend.name == "qh3" and not self.settings.retry:
            log.warning(
                "qh3 server without QUIC Retry: an aioquic client's handshake can stall on a lossy path (qh3 2.1 "
                "fails to send under the anti-amplification limit); keep retry on, or use quic_backend=aioquic"
            )
        self._server = await backend.serve(
            host, port, configuration=cfg, create_protocol=create, retry=self.settings.retry
        )
        sock = self._server._transport.get_extra_info("socket")
        rcv, snd = _tune_socket(sock, self.settings.socket_buffer_bytes)
        bound = sock.getsockname()[1]
        log.info(
            "listening on %s:%d (QUIC: %s %s; UDP buffers granted: rcv=%d snd=%d)",
            host,
            bound,
            backend.name,
            backend.version,
            rcv,
            snd,
        )
        return int(bound)

    @property
    def connections(self) -> int:
        return sum(not p.closed.is_set() for p in self._peers)

    def _spawn(self, peer: Peer) -> None:
        s = self.settings
        if self.connections >= s.max_connections:
            self.refused_connections += 1
            log.warning("refusing a connection from %s: %d connections open", peer.remote_address, s.max_connections)
            peer._refuse(
                TransportError(f"server full ({s.max_connections} connections)", code=ErrorCode.LIMIT_EXCEEDED)
            )
            return
        if peer.identity is not None:
            mine = self._by_identity.setdefault(peer.identity.client_id, [])
            mine[:] = [p for p in mine if not p.closed.is_set()]
            while len(mine) >= s.max_connections_per_identity:
                old = mine.pop(0)
                self.replaced_connections += 1
                log.info("%s: closing its oldest connection (a newer one arrived)", peer.identity.client_id)
                old._refuse(
                    TransportError(
                        "replaced by a newer connection of the same client", code=ErrorCode.IDENTITY_MISMATCH
                    )
                )
            mine.append(peer)
        self._peers.add(peer)
        task = asyncio.ensure_future(self._run(peer))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        task.add_done_callback(lambda _t: self._forget(peer))

    def _forget(self, peer: Peer) -> None:
        self._peers.discard(peer)
        if peer.identity is not None:
            mine = self._by_identity.get(peer.identity.client_id)
            if mine is not None:
                mine[:] = [p for p in mine if p is not peer]
                if not mine:
                    del self._by_identity[peer.identity.client_id]

    async def _run(self, peer: Peer) -> None:
        """Run the handler; whatever way it ends, the connection is closed and what it held is dropped.

        A handler that returned or gave up (a HELLO that never came) must not leave the connection open: our
        own keepalive PINGs would hold it up forever.
        """
        try:
            await self._on_connect(peer)
        except TransportError as exc:
            log.info("connection from %s ended: %s", peer.remote_address, exc)
            if not peer.closed.is_set():
                await peer.aclose(0x100 + int(exc.code), str(exc)[:200])
        except Exception:
            log.exception("connection handler failed")
            await peer.aclose(0x100 + int(ErrorCode.INTERNAL), "internal error")
        finally:
            if not peer.closed.is_set():
                await peer.aclose(0, "connection handler done")
            peer.discard_inbox()

    async def close(self, code: int = 0, reason: str = "") -> None:
        """Close every connection with application ``code`` (0x100 + an ErrorCode), then stop listening."""
        live = [p for p in self._peers if not p.closed.is_set()]
        await asyncio.gather(*(p.aclose(code, reason) for p in live), return_exceptions=True)
        for t in list(self._tasks):
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._server is not None:
            self._server.close()
            self._server = None


@contextlib.asynccontextmanager
async def connect_peer(
    host: str,
    port: int,
    settings: TransportSettings,
    tls: TlsFiles,
    server_name: str | None = None,
    *,
    tickets: TicketJar | None = None,
    early: Sequence[Header] = (),
) -> AsyncIterator[Peer]:
    """Connect, verify the server's certificate against ``tls.ca``, and yield the :class:`Peer`.

    With a ``tickets`` jar the connection resumes the last session with this server when it can (and stores
    the server's new tickets there); ``early`` messages (HELLO, HEARTBEAT only) are then sent as 0-RTT data,
    before the handshake completes. Without a ticket they are sent once it completes.
    """
    name = server_name or host
    for h in early:
        if h.msg_type not in EARLY_DATA_TYPES:
            raise ValueError(f"{h.msg_type.name} may not be sent in 0-RTT data (only HELLO and HEARTBEAT)")
    backend = get_backend(settings.quic_backend)
    cfg = _client_config(settings, backend, tls, host, port, name)
    if tickets is not None:
        cfg.session_ticket = tickets.take(name)
    cls = peer_class(backend)

    def create(*args: Any, **kw: Any) -> Peer:
        return cls(*args, settings=settings, **kw)

    try:
        cm = backend.connect(
            host,
            port,
            configuration=cfg,
            create_protocol=create,
            wait_connected=False,
            session_ticket_handler=tickets.store if tickets is not None else None,
        )
        async with cm as proto:
            peer = proto
            assert isinstance(peer, Peer)
            sent_early = cfg.session_ticket is not None and bool(early)
            if sent_early:
                for h in early:
                    peer.core.send_control(h)
            peer.transmit()
            waits = [asyncio.ensure_future(peer.ready.wait()), asyncio.ensure_future(peer.closed.wait())]
            _, pending = await asyncio.wait(
                waits, timeout=settings.connect_timeout_s, return_when=asyncio.FIRST_COMPLETED
            )
            for w in pending:
                w.cancel()
            if not peer.ready.is_set():
                reason = peer.close_reason or f"no answer within {settings.connect_timeout_s:.0f} s"
                raise TransportError(
                    f"QUIC handshake with {host}:{port} failed: {reason}",
                    code=ErrorCode.TIMEOUT if not peer.closed.is_set() else ErrorCode.INTERNAL,
                )
            peer.core.open_control()
            if not sent_early:
                for h in early:
                    peer.core.send_control(h)
                peer.transmit()
            yield peer
    except ConnectionError as exc:
        raise TransportError(f"cannot connect to {host}:{port}: {exc}") from exc
