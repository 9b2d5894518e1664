"""How the client loop reaches a server: the peer interface it needs and the real QUIC connector."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Callable
from typing import TYPE_CHECKING, Any, Protocol

from ..common.messages import Header, Hello, Message
from ..transport.aio import connect_peer
from ..transport.tickets import TicketJar

if TYPE_CHECKING:
    from .config import ClientConfig


class MessagePeer(Protocol):
    """What the loop needs from a connection (:class:`fedquic.transport.aio.Peer` is the real one)."""

    session_resumed: bool

    def send(self, header: Header, body: bytes = b"") -> int: ...

    async def send_bulk(self, header: Header, body: bytes) -> int: ...

    async def recv(self, timeout: float | None = None) -> Message: ...

    async def aclose(self, code: int = 0, reason: str = "") -> None: ...


Connector = Callable[["ClientConfig"], contextlib.AbstractAsyncContextManager[Any]]


@contextlib.asynccontextmanager
async def quic_connector(
    cfg: ClientConfig, *, tickets: TicketJar | None = None, hello: Hello | None = None
) -> AsyncIterator[MessagePeer]:
    """Connect over QUIC; with a ticket from an earlier connection the session resumes and ``hello`` rides in
    0-RTT data (HELLO is idempotent, so a replay of it changes nothing)."""
    early = [hello] if hello is not None else []
    async with connect_peer(
        cfg.host, cfg.port, cfg.transport, cfg.tls, cfg.server_name, tickets=tickets, early=early
    ) as peer:
        peer.hello_sent = hello is not None  # type: ignore[attr-defined]
        yield peer


__all__ = ["Connector", "MessagePeer", "quic_connector"]
