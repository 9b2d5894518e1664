"""Transport settings: one pydantic model for everything QUIC-related."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from ..common.limits import WireLimits

ALPN = "fedquic/1"


class TlsFiles(BaseModel):
    """Paths of the PEM files a peer uses. The CA verifies the other side."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    ca: Path = Field(description="CA that signed the other side's certificate")
    cert: Path | None = Field(default=None, description="this side's certificate (mutual TLS)")
    key: Path | None = Field(default=None, description="its private key")
    revoked: Path | None = None  # server: serials of revoked client certificates, hex, one per line


class TransportSettings(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    alpn: str = ALPN
    quic_backend: Literal["auto", "aioquic", "qh3"] = Field(
        default="auto",
        description="QUIC implementation: qh3 (native core, faster) or aioquic; auto takes qh3 when installed",
    )
    # 1350 fits a 1400-byte path MTU (Docker's bridge here) with IP/UDP headers; raise it on loopback
    # or jumbo-frame networks (aioquic breaks above ~16 kB).
    max_datagram_size: int = Field(
        default=1350, ge=1200, le=16_000, description="QUIC datagram size in bytes (up to 16000 on loopback)"
    )
    # DPLPMTUD-style (RFC 8899): the client starts at 1200 bytes and probes up to what the route's interface
    # allows (the kernel's IP_MTU for the server's address, capped at 16000), keeping a size only once a probe of
    # it is acknowledged: loopback and jumbo-frame LANs get large datagrams, a path with a smaller MTU somewhere
    # keeps what works. qh3 only (aioquic cannot probe: it sends max_datagram_size throughout); the server's
    # datagrams stay at most 1472 bytes (qh3 clients advertise that, and a server does not probe).
    path_mtu_probing: bool = Field(
        default=True,
        description="qh3 client: probe datagram sizes up to the route's MTU (off: max_datagram_size throughout)",
    )
    idle_timeout_s: float = Field(default=120.0, gt=0)
    # QUIC PING cadence, below common NAT UDP timeouts (30 s): a client training for an hour stays reachable.
    keepalive_s: float = Field(default=15.0, gt=0, le=25.0)
    max_data: int = Field(default=16 << 20, ge=1 << 16)
    max_stream_data: int = Field(default=8 << 20, ge=1 << 16)
    congestion_control: str = "reno"  # aioquic only: qh3's native core has its own controller
    socket_buffer_bytes: int = Field(default=4 << 20, ge=1 << 16)
    connect_timeout_s: float = Field(default=10.0, gt=0)
    # Backpressure: a bulk writer waits while more than this is written but not acknowledged by the peer.
    max_unacked_per_stream: int = Field(default=4 << 20, ge=1 << 16)
    max_unacked_per_connection: int = Field(default=16 << 20, ge=1 << 16)
    bulk_chunk_bytes: int = Field(default=256 << 10, ge=1 << 12)
    # Server: QUIC Retry validates a client's address before any handshake state is kept (anti-spoofing, costs
    # one round trip per new connection).
    retry: bool = True
    # Server: every client must present a certificate chaining to the CA (mutual TLS).
    require_client_cert: bool = True
    # Server: connections held at once, in total and per verified client identity. Past the total a new
    # connection is refused (LIMIT_EXCEEDED, which a client retries later); past the per-identity bound the
    # oldest connection of that identity is closed (the newest replaces it, as a reconnecting client expects).
    max_connections: int = Field(default=4096, ge=1)
    max_connections_per_identity: int = Field(default=2, ge=1)
    # Server: a connection must send HELLO within this time of its handshake, or it is closed with TIMEOUT.
    hello_timeout_s: float = Field(default=30.0, gt=0)
    limits: WireLimits = WireLimits()
