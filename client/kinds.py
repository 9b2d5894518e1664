"""Adapter kinds the client installs: what holding an aggregate of each kind means for the learner.

An AGGREGATE names its ``kind`` (docs/protocol.md): a ``row`` one is the Rest-of-World adapter FedALT keeps beside
the client's own; a ``global`` one is FedAvg's shared adapter, which replaces the client's own (and so becomes the
view the server holds of it). The kinds that exist are one list (:data:`fedquic.common.names.ADAPTER_KINDS`),
shared with the server's aggregation rules; this registry says how the client installs each, and the built-ins
are registered below as an outside one would be. (``local``, the server's dense copy of the client's own adapter
after a rejoin, is a reset, not a held kind: :meth:`~fedquic.client.sync.SyncedAdapter.install` handles it.)
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol, runtime_checkable

from ..common.adapter import TensorDict, state_hash
from ..common.errors import ConfigError
from ..common.names import ADAPTER_KINDS
from ..common.registry import Registry

if TYPE_CHECKING:
    from .sync import SyncedAdapter


@runtime_checkable
class AdapterKindHandler(Protocol):
    name: str

    def install(self, sync: SyncedAdapter, state: TensorDict) -> None:
        """The client now holds ``state`` of this kind (already in ``sync.held``): give it to the learner."""
        ...


def _check(handler: AdapterKindHandler) -> None:
    if handler.name not in ADAPTER_KINDS:
        raise ConfigError(
            f"adapter kind {handler.name!r} is not one the protocol carries ({list(ADAPTER_KINDS)}): add it to "
            "fedquic.common.names.AdapterKind (and a rule that sends it) first"
        )


_KINDS: Registry[AdapterKindHandler] = Registry("adapter kind", AdapterKindHandler, "name, install", _check)


def register_kind(handler: AdapterKindHandler, *, replace: bool = False) -> AdapterKindHandler:
    return _KINDS.register(handler, replace=replace)


def get_kind(name: str) -> AdapterKindHandler:
    return _KINDS.get(name)


def kind_names() -> list[str]:
    return _KINDS.names()


class RestOfWorld:
    """FedALT: the frozen Rest-of-World LoRA beside the client's own."""

    name = "row"

    def install(self, sync: SyncedAdapter, state: TensorDict) -> None:
        sync.learner.set_row_state(state)


class Global:
    """FedAvg: the shared adapter replaces the client's own, and is what the server now holds of it."""

    name = "global"

    def install(self, sync: SyncedAdapter, state: TensorDict) -> None:
        local = sync.keep_unshared(state)  # FedSA-LoRA: the client's own B stays
        sync.learner.set_local_state(local)
        sync.unacked = None
        sync.view, sync.view_hash = state, state_hash(state)  # the server's copy: the aggregate, B at the init
        sync.synced = local
        sync.local_is_synced = True  # the learner's adapter is ``state`` now


for _handler in (RestOfWorld(), Global()):
    register_kind(_handler)

__all__ = ["AdapterKindHandler", "Global", "RestOfWorld", "get_kind", "kind_names", "register_kind"]
