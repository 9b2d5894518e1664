from __future__ import annotations

import numpy as np
import pytest
import torch
from fedquic.client.data import make_examples, tokenize_examples
from fedquic.client.export import export_peft_adapter, load_fedalt, save_fedalt
from fedquic.client.fedalt import FedALTModel, LoraSpec
from fedquic.client.trainer import TrainConfig, train_local

pytestmark = pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning")


def logits(model: torch.nn.Module, batch) -> torch.Tensor:  # type: ignore[no-untyped-def]
    with torch.no_grad():
        return model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits


def trained(load_tiny, federation: str, mixer: str = "fixed") -> tuple[FedALTModel, object]:  # type: ignore[no-untyped-def]
    model, tok = load_tiny(gradient_checkpointing=False)
    fam = FedALTModel(model, LoraSpec(rank=4), init_seed=1, mixer=mixer, federation=federation)  # type: ignore[arg-type]
    train_local(fam, make_examples("reverse", 32, 0), tok, TrainConfig(steps=5, lr=2e-2, batch_size=4))
    if federation == "fedalt":  # a non-trivial RoW, as after a round
        rng = np.random.default_rng(0)
        fam.set_row_state({k: rng.normal(size=v.shape).astype(np.float32) * 0.05 for k, v in fam.row_state().items()})
    return fam, tok


def test_peft_export_loads_with_peft_and_gives_the_same_logits(load_tiny, tmp_path) -> None:  # type: ignore[no-untyped-def]
    from peft import PeftModel

    fam, tok = trained(load_tiny, "local")
    batch = tokenize_examples(tok, make_examples("reverse", 4, 9), 48, batch_size=4)[0]
    path = export_peft_adapter(fam, tmp_path / "peft")
    assert (path / "adapter_config.json").exists() and (path / "adapter_model.safetensors").exists()
    base, _ = load_tiny(gradient_checkpointing=False)
    reloaded = PeftModel.from_pretrained(base, str(path))
    torch.testing.assert_close(logits(reloaded, batch), logits(fam.model, batch), rtol=1e-4, atol=1e-4)


def test_fedalt_save_and_load_give_the_same_logits(load_tiny, tmp_path) -> None:  # type: ignore[no-untyped-def]
    fam, tok = trained(load_tiny, "fedalt", mixer="learned")
    batch = tokenize_examples(tok, make_examples("reverse", 4, 9), 48, batch_size=4)[0]
    save_fedalt(fam, tmp_path / "fedalt")
    base, _ = load_tiny(gradient_checkpointing=False)
    again = load_fedalt(base, tmp_path / "fedalt")
    torch.testing.assert_close(logits(again.model, batch), logits(fam.model, batch), rtol=1e-5, atol=1e-5)
    assert all(np.array_equal(again.mixer_state()[k], v) for k, v in fam.mixer_state().items())
    assert not list((tmp_path / "fedalt").glob("*.pkl")) and not list((tmp_path / "fedalt").glob("*.bin"))


def test_merge_into_an_unquantized_base_matches_the_adapter(load_tiny, tiny_model_dir, tmp_path) -> None:  # type: ignore[no-untyped-def]
    from fedquic.client.export import merge_into_base
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    fam, tok = trained(load_tiny, "fedavg")
    batch = tokenize_examples(tok, make_examples("reverse", 4, 9), 48, batch_size=4)[0]
    adapter = export_peft_adapter(fam, tmp_path / "peft")
    merged_dir = merge_into_base(tiny_model_dir, adapter, tmp_path / "merged")
    merged = AutoModelForCausalLM.from_pretrained(str(merged_dir), local_files_only=True)
    full_base, _ = load_tiny(quantization="none", gradient_checkpointing=False)
    with_adapter = PeftModel.from_pretrained(full_base, str(adapter))
    torch.testing.assert_close(logits(merged, batch), logits(with_adapter, batch), rtol=1e-4, atol=1e-4)
    assert not any("lora" in name for name, _ in merged.named_parameters())
