"""qh3 2.1 as fedquic's QUIC backend: aioquic's API over a native (Rust) packet core.

Measured here (bench/transport.py, docs/benchmarks.md): a bulk transfer in 0.32-0.49x aioquic's time, with UDP
GSO/GRO batching on the client side and path MTU probing built in. Its receive windows slide at a fixed size (no
cap needed) and it replays 0-RTT data after a Retry itself; its TLS server lacks client authentication, which
:mod:`.qh3_tls` adds. Tied to the pinned ``qh3==2.1.*``.
"""

from __future__ import annotations

import asyncio
import socket
from typing import Any

import qh3
from cryptography import x509
from qh3.asyncio import QuicConnectionProtocol, connect
from qh3.asyncio._transport import create_optimized_datagram_transport
from qh3.asyncio.server import QuicServer
from qh3.quic.configuration import QuicConfiguration
from qh3.quic.connection import QuicConnection, QuicConnectionError
from qh3.quic.events import ConnectionTerminated, HandshakeCompleted, StreamDataReceived, StreamReset

from .backend import QuicBackend
from .qh3_tls import peer_certificates_der, request_client_certificate


async def serve(host: str, port: int, *, configuration: Any, create_protocol: Any, retry: bool) -> QuicServer:
    """qh3's ``serve`` on its batching UDP transport (UDP GSO for what the server sends, GRO for what it receives,
    where the kernel has them), which qh3 itself only gives its clients."""
    loop = asyncio.get_running_loop()
    family, kind, proto, _, addr = (await loop.getaddrinfo(host, port, type=socket.SOCK_DGRAM))[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.bind(addr)
    except OSError:
        sock.close()
        raise
    _, server = await create_optimized_datagram_transport(
        loop, lambda: QuicServer(configuration=configuration, create_protocol=create_protocol, retry=retry), sock=sock
    )
    assert isinstance(server, QuicServer)
    return server


class Qh3Backend(QuicBackend):
    name = "qh3"
    version = qh3.__version__
    QuicConfiguration = QuicConfiguration
    QuicConnection = QuicConnection
    QuicConnectionProtocol = QuicConnectionProtocol
    serve = staticmethod(serve)
    connect = staticmethod(connect)
    StreamDataReceived = StreamDataReceived
    HandshakeCompleted = HandshakeCompleted
    StreamReset = StreamReset
    ConnectionTerminated = ConnectionTerminated
    ConnectionError = QuicConnectionError
    batch_transmit = True

    def prepare(self, quic: Any, *, client_auth: bool) -> None:
        if client_auth:
            request_client_certificate(quic)

    def peer_certificates(self, quic: Any) -> tuple[x509.Certificate | None, list[x509.Certificate]]:
        leaf, chain = peer_certificates_der(quic)
        if leaf is None:
            return None, []
        return x509.load_der_x509_certificate(leaf), [x509.load_der_x509_certificate(c) for c in chain]

    def unacked_bytes(self, quic: Any, stream_id: int | None) -> int:
        # qh3 tells bytes not yet sent per stream, and bytes in flight (sent, not acknowledged) per connection only
        queued = quic.get_send_buffer_size(stream_id)
        core = quic._core
        in_flight = 0 if core is None else core.bytes_in_flight
        return queued + in_flight

    def remote_address(self, quic: Any) -> Any:
        return quic._remote_addr

    def peer_closed(self, quic: Any) -> tuple[int, str] | None:
        # qh3 queues ConnectionTerminated only when draining ends (3 PTOs later); the close itself is recorded
        event = quic._close_event
        return None if event is None else (event.error_code, event.reason_phrase)


BACKEND = Qh3Backend()
