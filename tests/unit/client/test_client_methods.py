"""Adapter methods (fedquic.client.methods): the built-in LoRA and one registered from outside the package build
the client's adapters, and the schema the server checks follows what the method made."""

from __future__ import annotations

import pytest
from fedquic.client.fedalt import FedALTModel, LoraSpec
from fedquic.client.methods import get_method, method_names, register_method
from fedquic.common.errors import ConfigError

pytestmark = pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning")


class FirstLayerOnly:
    """LoRA on layer 0 only: fewer tensors than the built-in, the same maths."""

    name = "test-lora-first-layer"

    def peft_config(self, lora, targets, task_type):  # type: ignore[no-untyped-def]
        from peft import LoraConfig

        return LoraConfig(
            r=lora.rank, lora_alpha=lora.alpha, target_modules=targets, layers_to_transform=[0], task_type=task_type
        )


def test_lora_is_registered_and_an_unknown_method_is_refused() -> None:
    assert "lora" in method_names() and get_method("lora").name == "lora"
    with pytest.raises(ConfigError, match="unknown adapter method 'dora-someday'"):
        LoraSpec(method="dora-someday")
    with pytest.raises(TypeError, match="not an adapter method"):
        register_method(object())  # type: ignore[arg-type]


def test_an_outside_method_builds_the_adapters_and_the_schema_follows(load_tiny) -> None:  # type: ignore[no-untyped-def]
    register_method(FirstLayerOnly(), replace=True)
    model, _ = load_tiny(gradient_checkpointing=False)
    every = FedALTModel(model, LoraSpec(rank=4), init_seed=0).schema()
    model, _ = load_tiny(gradient_checkpointing=False)
    fam = FedALTModel(model, LoraSpec(rank=4, method=FirstLayerOnly.name), init_seed=0)
    names = [t.name for t in fam.schema().tensors]
    assert names and all(".layers.0." in n for n in names)
    assert any(".layers.1." in t.name for t in every.tensors) and len(names) < len(every.tensors)
    assert set(fam.row_state()) == set(names)  # the Rest-of-World adapter is built by the same method
    assert fam.schema().fingerprint() != every.fingerprint()  # a server would refuse it in a job of plain LoRA
