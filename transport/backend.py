"""QUIC implementations behind the sans-I/O core: aioquic (the user named it) and qh3 (measured faster).

Both expose aioquic's API (``QuicConfiguration``, ``QuicConnection``, its events, ``serve``/``connect``), so the
core and the asyncio adapter are written once; what differs is what each needs patched or read from its
internals, and that is here, one :class:`QuicBackend` per implementation (:mod:`.backend_aioquic`,
:mod:`.backend_qh3`). The setting is :attr:`TransportSettings.quic_backend`; ``auto`` takes qh3 when it is
installed, else aioquic, and the environment variable ``FEDQUIC_QUIC_BACKEND`` (aioquic or qh3) changes what
``auto`` means for a whole process tree (the test suite runs the transport tests once per backend with it). The
two interoperate: either side may run either.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
from functools import cache
from typing import TYPE_CHECKING, Any, Literal

from ..common.errors import ConfigError

if TYPE_CHECKING:
    from cryptography import x509

BackendName = Literal["aioquic", "qh3"]
BACKENDS: tuple[BackendName, ...] = ("aioquic", "qh3")
_MODULES = {"aioquic": ".backend_aioquic", "qh3": ".backend_qh3"}
ENV_VAR = "FEDQUIC_QUIC_BACKEND"


class QuicBackend:
    """What the core and the adapter need from one QUIC implementation (subclassed per implementation)."""

    name: str
    version: str
    QuicConfiguration: Any
    QuicConnection: Any
    QuicConnectionProtocol: Any
    serve: Any
    connect: Any
    # the event classes the core tells apart
    StreamDataReceived: Any
    HandshakeCompleted: Any
    StreamReset: Any
    ConnectionTerminated: Any
    # whether QuicConfiguration takes congestion_control_algorithm (qh3's native core has one controller)
    congestion_control: bool = False
    # transmit once per burst of received datagrams rather than after each: measured on loopback, qh3's server
    # control p99 under a 64 MiB transfer fell from 157 to 45 ms at the same throughput; aioquic's pacing relies on
    # the per-datagram transmit (its throughput halved)
    batch_transmit: bool = False
    # what the connection raises when used after it closed (qh3 does; aioquic ignores such calls)
    ConnectionError: type[Exception] = RuntimeError

    def prepare(self, quic: Any, *, client_auth: bool) -> None:
        """Patch a new connection as fedquic needs it (bounded windows, client certificates, ...)."""

    def peer_certificates(self, quic: Any) -> tuple[x509.Certificate | None, list[x509.Certificate]]:
        """The peer's certificate and the rest of its chain, as it sent them."""
        raise NotImplementedError

    def on_resumption(self, quic: Any) -> None:
        """A server connection accepted a session ticket (a PSK handshake carries no certificate)."""

    def unacked_bytes(self, quic: Any, stream_id: int | None) -> int:
        """Bytes written on one stream (or all) and not yet known to have reached the peer.

        Zero means everything written was acknowledged; a positive figure may overstate (qh3 tells in-flight
        bytes per connection only), never understate.
        """
        raise NotImplementedError

    def remote_address(self, quic: Any) -> Any:
        raise NotImplementedError

    def peer_closed(self, quic: Any) -> tuple[int, str] | None:
        """(error code, reason) once the peer's CONNECTION_CLOSE arrived, if the backend reports it only after
        its draining period (qh3); None otherwise (aioquic reports it at once, as an event)."""
        return None


def installed(name: str) -> bool:
    return importlib.util.find_spec(name) is not None


def resolve_name(name: str) -> BackendName:
    """``auto``: ``$FEDQUIC_QUIC_BACKEND`` when set, else qh3 where it is installed (0.32-0.49x aioquic's time
    for a bulk transfer here), else aioquic."""
    if name == "auto":
        name = os.environ.get(ENV_VAR) or ("qh3" if installed("qh3") else "aioquic")
    if name not in BACKENDS:
        raise ConfigError(f"unknown QUIC backend {name!r} (known: auto, {', '.join(BACKENDS)})")
    if not installed(name):
        raise ConfigError(f"QUIC backend {name!r} is not installed (pip install {name})")
    return name  # type: ignore[return-value]


def get_backend(name: str = "auto") -> QuicBackend:
    return _load(resolve_name(name))


@cache
def _load(name: BackendName) -> QuicBackend:
    module = importlib.import_module(_MODULES[name], __package__)
    backend: QuicBackend = module.BACKEND
    return backend


def backend_for(quic: Any) -> QuicBackend:
    """The backend a ``QuicConnection`` object belongs to (tests and tools build connections directly)."""
    root = type(quic).__module__.split(".", 1)[0]
    if root not in _MODULES:
        raise ConfigError(f"{type(quic).__qualname__} is not a QUIC connection of a known backend")
    return _load(root)  # type: ignore[arg-type]
