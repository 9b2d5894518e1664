"""Sans-I/O protocol core: turns aioquic's QUIC events into fedquic events.

Modelled on aioquic's ``h3/connection.py``: it owns no sockets, clocks or tasks. The asyncio adapter
(:mod:`fedquic.transport.aio`) feeds it QUIC events and flushes the QUIC connection afterwards.

Stream layout: the client opens one bidirectional *control* stream and sends HELLO on it; control
messages (small, latency-sensitive) travel only there. Every bulk transfer (UPDATE, AGGREGATE) goes on
a fresh unidirectional stream that carries exactly one frame, so a heartbeat or ACK never queues
behind megabytes of weights: QUIC schedules streams independently.
"""

from __future__ import annotations

from dataclasses import dataclass

from aioquic.quic.connection import QuicConnection, stream_is_unidirectional
from aioquic.quic.events import (
    ConnectionTerminated,
    HandshakeCompleted,
    QuicEvent,
    StreamDataReceived,
    StreamReset,
)

from ..common.errors import ErrorCode, FedQuicError, ProtocolError
from ..common.limits import DEFAULT_LIMITS, WireLimits
from ..common.messages import Header, Message, MsgType
from .flow import cap_windows
from .framing import FrameDecoder, encode_frame, encode_frame_head
from .mtls import CertificateError, ClientCertVerifier, ClientIdentity, request_client_certificate
from .tickets import ServerTickets, TicketStore, resend_early_data_after_retry

# The only messages a server accepts in 0-RTT data (replayable): neither changes state.
EARLY_DATA_TYPES = frozenset({MsgType.HELLO, MsgType.HEARTBEAT})


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


class FedQuicConnection:
    """fedquic framing over one :class:`QuicConnection`."""

    def __init__(
        self,
        quic: QuicConnection,
        *,
        limits: WireLimits = DEFAULT_LIMITS,
        verifier: ClientCertVerifier | None = None,
        tickets: TicketStore | None = None,
    ) -> None:
        self._quic = quic
        cap_windows(quic)  # aioquic would grow its receive windows without bound
        self._verifier = verifier
        self._tickets: ServerTickets | None = None
        if verifier is not None:
            request_client_certificate(quic)
            if tickets is not None:  # resumption only where the ticket can carry a verified identity
                self._tickets = ServerTickets(quic, tickets, verifier)
        self.established = False  # the handshake completed: what arrives before is 0-RTT data
        if quic.configuration.is_client:
            resend_early_data_after_retry(quic)
        self._limits = limits
        self._is_client = quic.configuration.is_client
        self._streams: dict[int, _StreamState] = {}
        self.control_stream_id: int | None = None
        self._violated = False

    @property
    def quic(self) -> QuicConnection:
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
        return sum(s.decoder.buffered for s in self._streams.values())

    def unacked_bytes(self, stream_id: int | None = None) -> int:
        """Bytes written but not yet acknowledged by the peer's QUIC stack, on one stream or all.

        aioquic's stream writer never pushes back, so this (read from its sender, pinned aioquic 1.7) is what
        the adapter bounds before it writes more.
        """
        streams = self._quic._streams
        if stream_id is not None:
            s = streams.get(stream_id)
            return 0 if s is None else s.sender._buffer_stop - s.sender._buffer_start
        return sum(s.sender._buffer_stop - s.sender._buffer_start for s in streams.values())

    # -- receiving -----------------------------------------------------------------------------

    def handle_event(self, event: QuicEvent, now: float = 0.0) -> list[AppEvent]:
        """Our events for one QUIC event; ``now`` (seconds, any monotonic clock) dates new streams."""
        if self._violated:
            return []
        if isinstance(event, StreamDataReceived):
            try:
                return self._on_data(event, now)
            except ProtocolError as exc:
                self._violated = True
                return [ProtocolViolation(exc)]
        if isinstance(event, HandshakeCompleted):
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
        if isinstance(event, StreamReset):
            self._streams.pop(event.stream_id, None)
            return [StreamAborted(event.stream_id, event.error_code)]
        if isinstance(event, ConnectionTerminated):
            self._streams.clear()
            return [PeerClosed(event.error_code, event.reason_phrase)]
        return []

    def expire(self, now: float) -> list[AppEvent]:
        """A violation if a bulk stream has been open longer than the limit (call it periodically)."""
        if self._violated:
            return []
        for sid, st in self._streams.items():
            if st.bulk and now - st.opened_at > self._limits.stream_timeout_s:
                self._violated = True
                return [
                    ProtocolViolation(
                        ProtocolError(
                            f"stream {sid} unfinished after {self._limits.stream_timeout_s:.0f} s",
                            code=ErrorCode.TIMEOUT,
                        )
                    )
                ]
        return []

    def _on_data(self, event: StreamDataReceived, now: float) -> list[AppEvent]:
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
            st = self._streams[sid] = _StreamState(FrameDecoder(self._limits), bulk=bulk, opened_at=now)
        if self.buffered_bytes() + len(event.data) > self._limits.max_buffered_bytes:
            raise ProtocolError(
                f"more than {self._limits.max_buffered_bytes} bytes buffered in unfinished frames",
                code=ErrorCode.LIMIT_EXCEEDED,
            )
        st.bytes_received += len(event.data)
        out: list[AppEvent] = []
        before = st.bytes_received - len(event.data)
        for msg in st.decoder.feed(event.data):
            st.frames += 1
            if st.bulk and st.frames > 1:
                raise ProtocolError("a bulk stream carries exactly one frame", code=ErrorCode.MALFORMED_FRAME)
            wire = st.bytes_received - before - st.decoder.buffered
            before += wire
            if not self.established and not self._is_client and msg.type not in EARLY_DATA_TYPES:
                # 0-RTT data can be replayed by anyone who captured it: only idempotent messages may ride in it.
                raise ProtocolError(
                    f"{msg.type.name} arrived in 0-RTT data (only HELLO and HEARTBEAT may)",
                    code=ErrorCode.UNEXPECTED_MESSAGE,
                )
            out.append(MessageReceived(sid, msg, wire, on_control=not st.bulk))
        if event.end_stream:
            if not st.decoder.idle:
                raise ProtocolError(f"stream {sid} ended inside a frame", code=ErrorCode.MALFORMED_FRAME)
            del self._streams[sid]
        return out
