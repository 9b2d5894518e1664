"""TLS session tickets: resumption and 0-RTT, with the client identity bound to each ticket.

A resumed (PSK) TLS 1.3 handshake carries no client certificate, and aioquic keeps no client identity in its
tickets. So the server keeps its own store: each ticket it issues is recorded with the identity verified on
the connection that earned it, and is **single-use** (fetching it removes it), which also makes a replayed
0-RTT ClientHello fall back to a full handshake. A resumed connection takes the identity from the ticket (and
is refused if that certificate has since been revoked). The client keeps the tickets it receives in a
:class:`TicketJar` (in memory, per server name) and uses each once.

0-RTT data is replayable by a network attacker, so the server accepts only HELLO and HEARTBEAT before the
handshake completes (:mod:`fedquic.transport.connection` enforces it) and the client sends nothing else early.

Tied to the pinned ``aioquic==1.7.*``: it sets the per-connection ticket callbacks and, for a resumed
handshake, clears the private certificate-request flag that :mod:`fedquic.transport.mtls` sets (TLS 1.3 has no
CertificateRequest in a PSK handshake).
"""

from __future__ import annotations

import logging
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import TYPE_CHECKING

from aioquic.quic.connection import QuicConnection
from aioquic.tls import SessionTicket

from .mtls import CertificateError, ClientCertVerifier, ClientIdentity

if TYPE_CHECKING:
    from collections.abc import Callable

log = logging.getLogger(__name__)


@dataclass
class _Entry:
    ticket: SessionTicket
    identity: ClientIdentity
    expires: float


class TicketStore:
    """Server side: issued tickets, bounded in number and lifetime, each bound to a client identity."""

    def __init__(
        self, max_tickets: int = 10_000, lifetime_s: float = 86_400.0, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self._entries: OrderedDict[bytes, _Entry] = OrderedDict()
        self.max_tickets = max_tickets
        self.lifetime_s = lifetime_s
        self._clock = clock

    def __len__(self) -> int:
        return len(self._entries)

    def add(self, ticket: SessionTicket, identity: ClientIdentity) -> None:
        self._entries[ticket.ticket] = _Entry(ticket, identity, self._clock() + self.lifetime_s)
        while len(self._entries) > self.max_tickets:
            self._entries.popitem(last=False)  # the oldest goes first

    def pop(self, label: bytes) -> tuple[SessionTicket, ClientIdentity] | None:
        entry = self._entries.pop(label, None)  # single use
        if entry is None or entry.expires < self._clock():
            return None
        return entry.ticket, entry.identity


class TicketJar:
    """Client side: the latest ticket per server name, used once."""

    def __init__(self) -> None:
        self._tickets: dict[str, SessionTicket] = {}

    def __len__(self) -> int:
        return len(self._tickets)

    def store(self, ticket: SessionTicket) -> None:
        if ticket.server_name:
            self._tickets[ticket.server_name] = ticket

    def take(self, server_name: str) -> SessionTicket | None:
        return self._tickets.pop(server_name, None)


class ServerTickets:
    """Per server connection: issue tickets bound to its verified identity, accept a ticket once."""

    def __init__(self, quic: QuicConnection, store: TicketStore, verifier: ClientCertVerifier) -> None:
        self.quic = quic
        self.store = store
        self.verifier = verifier
        self.resumed_identity: ClientIdentity | None = None
        quic._session_ticket_fetcher = self._fetch
        quic._session_ticket_handler = self._issue

    def _fetch(self, label: bytes) -> SessionTicket | None:
        found = self.store.pop(label)
        if found is None:
            return None
        ticket, self.resumed_identity = found
        self.quic.tls._request_client_certificate = False  # a PSK handshake has no CertificateRequest
        return ticket

    def _issue(self, ticket: SessionTicket) -> None:
        identity = self.resumed_identity
        if identity is None:
            try:
                identity = self.verifier.verify_connection(self.quic)
            except CertificateError:
                return  # the connection is refused anyway; no ticket for it
        self.store.add(ticket, identity)

    def identity(self) -> ClientIdentity:
        """The identity of a resumed connection, re-checked against the revocation list."""
        identity = self.resumed_identity
        if identity is None:
            raise CertificateError("resumed session without a known client identity")
        if identity.serial in self.verifier.revoked:
            raise CertificateError(f"client certificate {identity.serial:x} is revoked")
        return identity


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
