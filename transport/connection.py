"""Sans-I/O protocol core: turns QUIC events (aioquic's API, either backend) into fedquic events.

Modelled on aioquic's ``h3/connection.py``: it owns no sockets, clocks or tasks. The asyncio adapter
(:mod:`fedquic.transport.aio`) feeds it QUIC events and flushes the QUIC connection afterwards.

Stream layout: the client opens one bidirectional *control* stream and sends HELLO on it; control
messages (small, latency-sensitive) travel only there. Every bulk transfer (UPDATE, AGGREGATE) goes on
a fresh unidirectional stream that carries exactly one frame, so a heartbeat or ACK never queues
behind megabytes of weights: QUIC schedules streams independently.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ..common.errors import ErrorCode, FedQuicError, ProtocolError
from ..common.limits import DEFAULT_LIMITS, WireLimits
from ..common.messages import Header, Message, MsgType
from .backend import backend_for
from .budget import BufferBudget
from .framing import FrameDecoder, FramePrefix, encode_frame, encode_frame_head
from .mtls import CertificateError, ClientCertVerifier, ClientIdentity
from .tickets import ServerTickets, TicketStore

# The only messages a server accepts in 0-RTT data (replayable): neither changes state.
EARLY_DATA_TYPES = frozenset({MsgType.HELLO, MsgType.HEARTBEAT})
# Messages that travel on a unidirectional stream of their own; every other type belongs on the control stream.
BULK_TYPES = frozenset({MsgType.UPDATE, MsgType.AGGREGATE, MsgType.METRICS})


def stream_is_unidirectional(stream_id: int) -> bool:
    """RFC 9000 2.1: bit 0x2 of a stream id marks a unidirectional stream."""
    return bool(stream_id & 0x2)


@dataclass
class BulkPermit:
    """Leave for the peer to open bulk streams of one message type.

    ``count`` streams (None: any number) with bodies of at most ``max_body`` bytes. ``reserved``: the permit
    holds a reservation of ``max_body`` bytes per stream in the server's :class:`BufferBudget` (taken by whoever
    granted it), so the stream is never refused for the budget; the connection gives the reservation back when
    the stream ends, the permit is revoked, or the connection closes.
    """

    max_body: int
    count: int | None = None
    reserved: bool = False


@dataclass(frozen=True)
class ConnectionReady:
    alpn: str | None
    session_resumed: bool
    early_data_accepted: bool
    identity: ClientIdentity | None = None  # server side, with mutual TLS: the verified client


@dataclass(frozen=True)
class MessageReceived:
    stream_id: int
    message: Message
    wire_bytes: int
    on_control: bool


@dataclass(frozen=True)
class StreamAborted:
    stream_id: int
    error_code: int


@dataclass(frozen=True)
class PeerClosed:
    error_code: int
    reason: str


@dataclass(frozen=True)
class ProtocolViolation:
    error: FedQuicError


AppEvent = ConnectionReady | MessageReceived | StreamAborted | PeerClosed | ProtocolViolation


@dataclass
class _StreamState:
    decoder: FrameDecoder
    bulk: bool
    opened_at: float
    frames: int = 0
    bytes_received: int = 0
    reservation: int = 0  # bytes of the server's budget reserved for this stream's frame (a granted upload)
    partial_since: float | None = None  # when the unfinished frame now buffered began (control stream progress)
    counted: int = field(default=0)  # bytes of this stream charged to the budget's ``held``


class FedQuicConnection:
    """fedquic framing over one ``QuicConnection`` of either backend (:mod:`.backend`)."""

    def __init__(
        self,
        quic: Any,
        *,
        limits: WireLimits = DEFAULT_LIMITS,
        verifier: ClientCertVerifier | None = None,
        tickets: TicketStore | None = None,
        budget: BufferBudget | None = None,
    ) -> None:
        self._quic = quic
        self.backend = backend = backend_for(quic)
        backend.prepare(quic, client_auth=verifier is not None)
        self._events = (
            backend.StreamDataReceived,
            backend.HandshakeCompleted,
            backend.StreamReset,
            backend.ConnectionTerminated,
        )
        self._verifier = verifier
        self._tickets: ServerTickets | None = None
        if verifier is not None and tickets is not None:  # resumption only where a ticket carries an identity
            self._tickets = ServerTickets(quic, tickets, verifier)
        self.established = False  # the handshake completed: what arrives before is 0-RTT data
        self._limits = limits
        self._is_client = quic.configuration.is_client
        self._streams: dict[int, _StreamState] = {}
        self.control_stream_id: int | None = None
        self._violated = False
        self._budget = budget
        self._held = 0  # bytes held in unfinished frames on this connection
        # Which bulk streams the peer may open. A client takes AGGREGATEs from its server; a server takes nothing
        # until its application grants it (METRICS after JOIN, one UPDATE per UPLOAD_GRANT).
        self._permits: dict[MsgType, BulkPermit] = (
            {MsgType.AGGREGATE: BulkPermit(max_body=limits.max_body_bytes)} if self._is_client else {}
        )
        self._closed = False

    @property
    def quic(self) -> Any:
        return self._quic

    # -- sending -------------------------------------------------------------------------------

    def open_control(self) -> int:
        if not self._is_client:
            raise RuntimeError("only the client opens the control stream")
        if self.control_stream_id is None:
            self.control_stream_id = self._quic.get_next_available_stream_id(is_unidirectional=False)
        return self.control_stream_id

    def send_control(self, header: Header, body: bytes = b"") -> int:
        if self.control_stream_id is None:
            if self._is_client:
                self.open_control()
            else:
                raise ProtocolError(
                    "the client has not opened its control stream (HELLO comes first)",
                    code=ErrorCode.UNEXPECTED_MESSAGE,
                )
        data = encode_frame(header, body)
        assert self.control_stream_id is not None
        self._quic.send_stream_data(self.control_stream_id, data, end_stream=False)
        return len(data)

    def open_bulk(self, header: Header, body_len: int) -> int:
        """Start one frame on a new unidirectional stream; the body follows with :meth:`write_bulk`."""
        sid = self._quic.get_next_available_stream_id(is_unidirectional=True)
        head = encode_frame_head(header, body_len)
        self._quic.send_stream_data(sid, head, end_stream=body_len == 0)
        return sid

    def write_bulk(self, stream_id: int, data: bytes | memoryview, *, end: bool) -> None:
        self._quic.send_stream_data(stream_id, data, end_stream=end)

    def buffered_bytes(self) -> int:
        """Bytes held in partially received frames on this connection."""
        return self._held

    def unacked_bytes(self, stream_id: int | None = None) -> int:
        """Bytes written but not yet acknowledged by the peer's QUIC stack, on one stream or all.

        The stream writers of both backends buffer without pushing back, so this is what the adapter bounds
        before it writes more (see :meth:`.backend.QuicBackend.unacked_bytes`).
        """
        return self.backend.unacked_bytes(self._quic, stream_id)

    # -- admission -----------------------------------------------------------------------------

    def permit(self, msg_type: MsgType, permit: BulkPermit) -> None:
        """Let the peer open bulk streams of ``msg_type`` (replaces an earlier permit of that type)."""
        if msg_type not in BULK_TYPES:
            raise ValueError(f"{msg_type.name} does not travel on a bulk stream")
        self.revoke(msg_type)
        if self._closed:  # a permit granted after the close would never be given back
            if permit.reserved and self._budget is not None:
                self._budget.unreserve(permit.max_body * (permit.count or 0))
            return
        self._permits[msg_type] = permit

    def revoke(self, msg_type: MsgType) -> None:
        """Withdraw a permit (an upload slot expired); unused reserved room goes back to the budget."""
        old = self._permits.pop(msg_type, None)
        if old is not None and old.reserved and self._budget is not None:
            self._budget.unreserve(old.max_body * (old.count or 0))

    def close(self) -> None:
        """The connection is gone: give back everything it held or reserved (idempotent)."""
        if self._closed:
            return
        self._closed = True
        for mtype in list(self._permits):
            self.revoke(mtype)
        for sid in list(self._streams):
            self._drop_stream(sid)

    def _drop_stream(self, sid: int) -> None:
        st = self._streams.pop(sid, None)
        if st is None:
            return
        self._held -= st.decoder.buffered
        if self._budget is not None:
            self._budget.charge(-st.counted)
            self._budget.unreserve(st.reservation)

    def _admit(self, st: _StreamState, p: FramePrefix) -> None:
        """Checks on a frame's prefix, before a byte of it is buffered."""
        name = p.msg_type.name
        if not self.established and not self._is_client and p.msg_type not in EARLY_DATA_TYPES:
            # 0-RTT data can be replayed by anyone who captured it: only idempotent messages may ride in it.
            raise ProtocolError(
                f"{name} arrived in 0-RTT data (only HELLO and HEARTBEAT may)", code=ErrorCode.UNEXPECTED_MESSAGE
            )
        if not st.bulk:
            if p.msg_type in BULK_TYPES:
                raise ProtocolError(f"{name} belongs on a stream of its own", code=ErrorCode.UNEXPECTED_MESSAGE)
            return
        if p.msg_type not in BULK_TYPES:
            raise ProtocolError(f"{name} belongs on the control stream", code=ErrorCode.UNEXPECTED_MESSAGE)
        permit = self._permits.get(p.msg_type)
        if permit is None:
            what = "UPLOAD_GRANT" if p.msg_type is MsgType.UPDATE else "registration"
            raise ProtocolError(
                f"{name} stream refused at its first bytes: no {what} allows it", code=ErrorCode.UNEXPECTED_MESSAGE
            )
        if p.body_len > permit.max_body:
            raise ProtocolError(
                f"{name} body of {p.body_len} bytes exceeds the {permit.max_body} allowed",
                code=ErrorCode.LIMIT_EXCEEDED,
            )
        total = p.header_len + p.body_len
        if self._held + total > self._limits.max_buffered_bytes:
            raise ProtocolError(
                f"a {total}-byte frame would pass the {self._limits.max_buffered_bytes}-byte connection buffer",
                code=ErrorCode.LIMIT_EXCEEDED,
            )
        if permit.reserved:
            st.reservation = permit.max_body  # the stream inherits one stream's worth of the permit's room
        elif self._budget is not None and not self._budget.fits(total):
            raise ProtocolError(
                f"the server's buffer budget ({self._budget.limit} bytes) is full: retry later",
                code=ErrorCode.LIMIT_EXCEEDED,
            )
        if permit.count is not None:
            permit.count -= 1
            if permit.count <= 0:
                del self._permits[p.msg_type]  # spent: the reservation moved to the stream

    # -- receiving -----------------------------------------------------------------------------

    def handle_event(self, event: Any, now: float) -> list[AppEvent]:
        """Our events for one QUIC event; ``now`` (seconds, any monotonic clock; required, so a caller cannot
        date every stream at 0 by forgetting it) dates new streams."""
        if self._violated:
            return []
        data_received, handshake_completed, stream_reset, terminated = self._events
        if isinstance(event, data_received):
            try:
                return self._on_data(event, now)
            except ProtocolError as exc:
                self._violated = True
                return [ProtocolViolation(exc)]
        if isinstance(event, handshake_completed):
            self.established = True
            identity = None
            if self._verifier is not None:
                try:
                    if event.session_resumed and self._tickets is not None:
                        identity = self._tickets.identity()
                    else:
                        identity = self._verifier.verify_connection(self._quic)
                except CertificateError as exc:
                    self._violated = True
                    return [ProtocolViolation(exc)]
            return [ConnectionReady(event.alpn_protocol, event.session_resumed, event.early_data_accepted, identity)]
        if isinstance(event, stream_reset):
            self._drop_stream(event.stream_id)
            return [StreamAborted(event.stream_id, event.error_code)]
        if isinstance(event, terminated):
            self.close()
            return [PeerClosed(event.error_code, event.reason_phrase)]
        return []

    def expire(self, now: float) -> list[AppEvent]:
        """A violation if a bulk stream has been open, or a control frame unfinished, longer than its limit.

        Call it periodically. The control stream must make progress: a frame begun on it and not completed
        within ``control_frame_timeout_s`` (a peer dripping one byte at a time) ends the connection.
        """
        if self._violated:
            return []
        lim = self._limits
        for sid, st in self._streams.items():
            late = None
            if st.bulk and now - st.opened_at > lim.stream_timeout_s:
                late = f"stream {sid} unfinished after {lim.stream_timeout_s:.0f} s"
            elif not st.bulk and st.partial_since is not None and now - st.partial_since > lim.control_frame_timeout_s:
                late = f"a control frame unfinished after {lim.control_frame_timeout_s:.0f} s"
            if late is not None:
                self._violated = True
                return [ProtocolViolation(ProtocolError(late, code=ErrorCode.TIMEOUT))]
        return []

    def _on_data(self, event: Any, now: float) -> list[AppEvent]:
        sid = event.stream_id
        st = self._streams.get(sid)
        if st is None:
            bulk = stream_is_unidirectional(sid)
            if not bulk:
                if self._is_client and sid != self.control_stream_id:
                    raise ProtocolError("server opened a bidirectional stream", code=ErrorCode.UNEXPECTED_MESSAGE)
                if not self._is_client:
                    if self.control_stream_id is not None and sid != self.control_stream_id:
                        raise ProtocolError("a second control stream was opened", code=ErrorCode.UNEXPECTED_MESSAGE)
                    self.control_stream_id = sid
            if bulk and sum(s.bulk for s in self._streams.values()) >= self._limits.max_open_streams:
                raise ProtocolError(
                    f"more than {self._limits.max_open_streams} bulk streams open at once",
                    code=ErrorCode.LIMIT_EXCEEDED,
                )
            # the prefix check finds the stream's state by id: it is registered before any byte is fed
            check = lambda p, sid=sid: self._admit(self._streams[sid], p)  # noqa: E731
            st = self._streams[sid] = _StreamState(FrameDecoder(self._limits, check), bulk=bulk, opened_at=now)
        if self._held + len(event.data) > self._limits.max_buffered_bytes:
            raise ProtocolError(
                f"more than {self._limits.max_buffered_bytes} bytes buffered in unfinished frames",
                code=ErrorCode.LIMIT_EXCEEDED,
            )
        if (
            self._budget is not None
            and not st.reservation
            and not self._budget.fits(len(event.data))
            and st.decoder.pending is not None  # a prefix not yet in is at most 16 bytes: checked at the prefix
        ):
            raise ProtocolError(
                f"the server's buffer budget ({self._budget.limit} bytes) is full", code=ErrorCode.LIMIT_EXCEEDED
            )
        st.bytes_received += len(event.data)
        out: list[AppEvent] = []
        before = st.bytes_received - len(event.data)
        held_before = st.decoder.buffered
        try:
            msgs = st.decoder.feed(event.data)
        finally:
            self._account(st, held_before)
        for msg in msgs:
            st.frames += 1
            if st.bulk and st.frames > 1:
                raise ProtocolError("a bulk stream carries exactly one frame", code=ErrorCode.MALFORMED_FRAME)
            wire = st.bytes_received - before - st.decoder.buffered
            before += wire
            out.append(MessageReceived(sid, msg, wire, on_control=not st.bulk))
        if msgs and st.reservation and st.bulk and self._budget is not None:
            self._budget.unreserve(st.reservation)  # the frame is complete: its room goes back
            st.reservation = 0
        if st.decoder.idle:
            st.partial_since = None
        elif msgs or st.partial_since is None:
            st.partial_since = now  # a frame began (perhaps right after one that completed)
        if event.end_stream:
            if not st.decoder.idle:
                raise ProtocolError(f"stream {sid} ended inside a frame", code=ErrorCode.MALFORMED_FRAME)
            self._drop_stream(sid)
        return out

    def _account(self, st: _StreamState, held_before: int) -> None:
        delta = st.decoder.buffered - held_before
        self._held += delta
        if self._budget is not None and not st.reservation:
            self._budget.charge(delta)
            st.counted += delta
