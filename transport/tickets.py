"""TLS session tickets: resumption and 0-RTT, with the client identity bound to each ticket.

A resumed (PSK) TLS 1.3 handshake carries no client certificate, and aioquic keeps no client identity in its
tickets. So the server keeps its own store: each ticket it issues is recorded with the identity verified on
the connection that earned it, and is **single-use** (fetching it removes it), which also makes a replayed
0-RTT ClientHello fall back to a full handshake. A resumed connection takes the identity from the ticket (and
is refused if that certificate has since been revoked). The client keeps the tickets it receives in a
:class:`TicketJar` (in memory, per server name) and uses each once.

0-RTT data is replayable by a network attacker, so the server accepts only HELLO and HEARTBEAT before the
handshake completes (:mod:`fedquic.transport.connection` enforces it) and the client sends nothing else early.

It sets the per-connection ticket callbacks, which both backends (aioquic 1.7, qh3 2.1) keep under the same
private names, and tells the backend when a handshake resumes (aioquic must then not request a certificate:
TLS 1.3 has no CertificateRequest in a PSK handshake). A ticket object is the backend's own ``SessionTicket``.
"""

from __future__ import annotations

import logging
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from .backend import backend_for
from .mtls import CertificateError, ClientCertVerifier, ClientIdentity

if TYPE_CHECKING:
    from collections.abc import Callable

log = logging.getLogger(__name__)


@dataclass
class _Entry:
    ticket: Any
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

    def add(self, ticket: Any, identity: ClientIdentity) -> None:
        self._entries[ticket.ticket] = _Entry(ticket, identity, self._clock() + self.lifetime_s)
        while len(self._entries) > self.max_tickets:
            self._entries.popitem(last=False)  # the oldest goes first

    def pop(self, label: bytes) -> tuple[Any, ClientIdentity] | None:
        entry = self._entries.pop(label, None)  # single use
        if entry is None or entry.expires < self._clock():
            return None
        return entry.ticket, entry.identity


class TicketJar:
    """Client side: the latest ticket per server name, used once."""

    def __init__(self) -> None:
        self._tickets: dict[str, Any] = {}

    def __len__(self) -> int:
        return len(self._tickets)

    def store(self, ticket: Any) -> None:
        if ticket.server_name:
            self._tickets[ticket.server_name] = ticket

    def take(self, server_name: str) -> Any | None:
        return self._tickets.pop(server_name, None)


class ServerTickets:
    """Per server connection: issue tickets bound to its verified identity, accept a ticket once."""

    def __init__(self, quic: Any, store: TicketStore, verifier: ClientCertVerifier) -> None:
        self.quic = quic
        self.store = store
        self.verifier = verifier
        self.resumed_identity: ClientIdentity | None = None
        quic._session_ticket_fetcher = self._fetch
        quic._session_ticket_handler = self._issue

    def _fetch(self, label: bytes) -> Any | None:
        found = self.store.pop(label)
        if found is None:
            return None
        ticket, self.resumed_identity = found
        backend_for(self.quic).on_resumption(self.quic)
        return ticket

    def _issue(self, ticket: Any) -> None:
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
