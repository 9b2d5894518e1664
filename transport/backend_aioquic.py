"""aioquic 1.7 as fedquic's QUIC backend, with what fedquic patches into it.

aioquic can only ask for a client certificate through a private flag of its TLS context
(``_request_client_certificate``, meant for its own tests); it doubles receive windows without bound
(:mod:`.flow` caps them); and it forgets 0-RTT data across a Retry. Each patch is per connection and tied to the
pinned ``aioquic==1.7.*``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import aioquic
from aioquic.asyncio import QuicConnectionProtocol, connect, serve
from aioquic.quic.configuration import QuicConfiguration
from aioquic.quic.connection import QuicConnection, QuicConnectionError
from aioquic.quic.events import ConnectionTerminated, HandshakeCompleted, StreamDataReceived, StreamReset

from .backend import QuicBackend
from .flow import cap_windows

if TYPE_CHECKING:
    from cryptography import x509


def request_client_certificate(quic: QuicConnection) -> None:
    """Make a server-side QuicConnection request a client certificate on full handshakes."""
    original = quic._initialize

    def initialize(peer_cid: bytes) -> None:
        original(peer_cid)
        quic.tls._request_client_certificate = True

    quic._initialize = initialize  # type: ignore[method-assign]


def resend_early_data_after_retry(quic: QuicConnection) -> None:
    """Client side: re-queue stream data sent as 0-RTT when the server answers with a QUIC Retry.

    aioquic 1.7 restarts the handshake on Retry but forgets the 0-RTT packets it had sent (their loss-recovery
    state is discarded with the old packet spaces), so that data is never retransmitted and the stream stalls.
    Nothing can have been acknowledged before a Retry, so everything buffered is marked to be sent again.
    """
    original = quic._connect

    def connect(now: float) -> None:
        if quic._retry_count:
            for stream in quic._streams.values():
                sender = stream.sender
                if sender._buffer_stop > sender._buffer_start:
                    sender._pending.add(sender._buffer_start, sender._buffer_stop)
                    sender.buffer_is_empty = False
                if sender._buffer_fin is not None:
                    sender._pending_eof = True
                    sender.buffer_is_empty = False
        original(now=now)

    quic._connect = connect  # type: ignore[method-assign]


class AioquicBackend(QuicBackend):
    name = "aioquic"
    version = aioquic.__version__
    QuicConfiguration = QuicConfiguration
    QuicConnection = QuicConnection
    QuicConnectionProtocol = QuicConnectionProtocol
    serve = staticmethod(serve)
    connect = staticmethod(connect)
    StreamDataReceived = StreamDataReceived
    HandshakeCompleted = HandshakeCompleted
    StreamReset = StreamReset
    ConnectionTerminated = ConnectionTerminated
    congestion_control = True
    ConnectionError = QuicConnectionError

    def prepare(self, quic: Any, *, client_auth: bool) -> None:
        cap_windows(quic)  # aioquic would grow its receive windows without bound
        if client_auth:
            request_client_certificate(quic)
        if quic.configuration.is_client:
            resend_early_data_after_retry(quic)

    def peer_certificates(self, quic: Any) -> tuple[x509.Certificate | None, list[x509.Certificate]]:
        tls = quic.tls
        return tls._peer_certificate, list(tls._peer_certificate_chain)

    def on_resumption(self, quic: Any) -> None:
        quic.tls._request_client_certificate = False  # a PSK handshake has no CertificateRequest

    def unacked_bytes(self, quic: Any, stream_id: int | None) -> int:
        # aioquic's stream writer never pushes back; its sender keeps every byte until it is acknowledged
        streams = quic._streams
        if stream_id is not None:
            s = streams.get(stream_id)
            return 0 if s is None else s.sender._buffer_stop - s.sender._buffer_start
        return sum(s.sender._buffer_stop - s.sender._buffer_start for s in streams.values())

    def remote_address(self, quic: Any) -> Any:
        return quic._network_paths[0].addr if quic._network_paths else None


BACKEND = AioquicBackend()
