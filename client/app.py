"""The old home of the client loop, kept so that every ``from fedquic.client.app import ...`` keeps working.

The loop is now three modules: :mod:`fedquic.client.session` (the protocol, sans-I/O), :mod:`fedquic.client.sync`
(the synchronized adapter state) and :mod:`fedquic.client.runner` (the asyncio driver, :class:`FederatedClient`).
"""

from __future__ import annotations

from .config import ClientConfig
from .connector import Connector, MessagePeer, quic_connector
from .reconnect import LATE_CODES, is_retryable, remote_error
from .results import ClientResult, RoundRecord, finite_metrics
from .runner import FederatedClient, run_client
from .sync import RoundStartState, SyncedAdapter

__all__ = [
    "LATE_CODES",
    "ClientConfig",
    "ClientResult",
    "Connector",
    "FederatedClient",
    "MessagePeer",
    "RoundRecord",
    "RoundStartState",
    "SyncedAdapter",
    "finite_metrics",
    "is_retryable",
    "quic_connector",
    "remote_error",
    "run_client",
]
