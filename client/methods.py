"""Adapter methods: the extension point that turns a job's adapter settings into the peft config each client
builds (LoRA today; DoRA, AdaLoRA and others next).

A method is a small object with a ``name`` and ``peft_config(lora, targets, task_type)``, returning the peft
config of one adapter. :class:`~fedquic.client.fedalt.FedALTModel` builds the client's own adapter (and, for
FedALT, the Rest-of-World one) from it, then reads the tensors peft created into the adapter schema, which the
server checks at JOIN: a method whose tensors differ from a job's is refused there, not mid-round. Every client
of a job must use the same method. Registered by name; the built-in is registered below exactly as an outside
method would be::

    from fedquic.client.methods import register_method

    class LoraEveryOtherLayer:
        name = "lora-even-layers"
        def peft_config(self, lora, targets, task_type):
            from peft import LoraConfig
            return LoraConfig(r=lora.rank, lora_alpha=lora.alpha, target_modules=targets,
                              layers_to_transform=[0, 2, 4], task_type=task_type)

    register_method(LoraEveryOtherLayer())
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

from fedquic.common.registry import Registry

if TYPE_CHECKING:
    from .fedalt import LoraSpec


@runtime_checkable
class AdapterMethod(Protocol):
    name: str

    def peft_config(self, lora: LoraSpec, targets: list[str], task_type: str | None) -> Any: ...


_METHODS: Registry[AdapterMethod] = Registry("adapter method", AdapterMethod, "name, peft_config")


def register_method(method: AdapterMethod, *, replace: bool = False) -> AdapterMethod:
    """Make ``method`` available as ``LoraSpec(method=method.name)``; a taken name is an error unless ``replace``."""
    return _METHODS.register(method, replace=replace)


def get_method(name: str) -> AdapterMethod:
    return _METHODS.get(name)


def method_names() -> list[str]:
    return _METHODS.names()


class Lora:
    """LoRA (Hu et al., 2021): W + (alpha/r)·B·A on the target modules, A and B trained."""

    name = "lora"

    def peft_config(self, lora: LoraSpec, targets: list[str], task_type: str | None) -> Any:
        from peft import LoraConfig

        return LoraConfig(
            r=lora.rank,
            lora_alpha=lora.alpha,
            lora_dropout=lora.dropout,
            target_modules=targets,
            bias="none",
            task_type=task_type,
        )


register_method(Lora())

__all__ = ["AdapterMethod", "Lora", "get_method", "method_names", "register_method"]
