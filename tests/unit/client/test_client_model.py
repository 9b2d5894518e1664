from __future__ import annotations

import json
import shutil
from pathlib import Path

import bitsandbytes as bnb
import pytest
import torch
from fedquic.client.model import (
    LoadSpec,
    base_model_fingerprint,
    build_tiny_llama,
    default_target_modules,
    load_base_model,
)
from fedquic.common.errors import ConfigError
from torch import nn


def test_build_is_idempotent(tiny_model_dir: Path) -> None:
    mtimes = {p.name: p.stat().st_mtime_ns for p in tiny_model_dir.iterdir()}
    assert build_tiny_llama(tiny_model_dir) == tiny_model_dir
    assert {p.name: p.stat().st_mtime_ns for p in tiny_model_dir.iterdir()} == mtimes
    assert not [p for p in tiny_model_dir.parent.iterdir() if ".tmp-" in p.name]


@pytest.mark.parametrize("kwargs", [{"hidden_size": 48}, {"intermediate_size": 100}, {"num_heads": 3}])
def test_build_rejects_unaligned_sizes(tmp_path: Path, kwargs: dict[str, int]) -> None:
    with pytest.raises(ConfigError):
        build_tiny_llama(tmp_path / "m", **kwargs)


def test_load_is_4bit_frozen_and_checkpointed(load_tiny) -> None:
    model, tok = load_tiny()
    q = model.model.layers[0].self_attn.q_proj
    assert isinstance(q, bnb.nn.Linear4bit)
    assert q.weight.quant_state.quant_type == "nf4"
    assert not any(p.requires_grad for p in model.parameters())
    assert getattr(model, "is_activation_checkpointing", None) or model.is_gradient_checkpointing
    # The code-built tokenizer is character level and round-trips printable text.
    ids = tok("reverse: ab c=", add_special_tokens=False)["input_ids"]
    assert len(ids) == len("reverse: ab c=")
    assert tok.decode(ids) == "reverse: ab c="
    assert tok.pad_token_id is not None and tok.eos_token_id is not None
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([[tok.bos_token_id, *ids]])).logits
    assert logits.shape == (1, len(ids) + 1, len(tok))


def test_load_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        load_base_model(tmp_path / "missing", LoadSpec())
    with pytest.raises(ConfigError, match=r"config\.json"):
        load_base_model(tmp_path, LoadSpec())


@pytest.mark.parametrize(
    "kwargs",
    [{"quantization": "fp8"}, {"compute_dtype": "float16"}, {"device": "not-a-device"}, {"mmap_threshold_mib": 0}],
)
def test_load_spec_validates(kwargs: dict[str, str]) -> None:
    with pytest.raises(ConfigError):
        LoadSpec(**kwargs)  # type: ignore[arg-type]


def test_default_target_modules(load_tiny) -> None:
    model, _ = load_tiny(gradient_checkpointing=False)
    assert default_target_modules(model) == ["q_proj", "v_proj"]

    class Mlp(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc1, self.fc2, self.lm_head = nn.Linear(4, 4), nn.Linear(4, 4), nn.Linear(4, 4)

    assert default_target_modules(Mlp()) == ["fc1", "fc2"]
    with pytest.raises(ConfigError):
        default_target_modules(nn.Sequential(nn.ReLU()))


def test_fingerprint(tiny_model_dir: Path, tmp_path: Path) -> None:
    fp = base_model_fingerprint(tiny_model_dir)
    assert len(fp) == 16 and fp == base_model_fingerprint(tiny_model_dir)

    copy = Path(shutil.copytree(tiny_model_dir, tmp_path / "copy"))
    cfg = json.loads((copy / "config.json").read_text())
    cfg["transformers_version"] = "0.0.0"  # version noise does not change the base
    (copy / "config.json").write_text(json.dumps(cfg, indent=4))
    assert base_model_fingerprint(copy) == fp

    cfg["rms_norm_eps"] = 1e-3
    (copy / "config.json").write_text(json.dumps(cfg))
    assert base_model_fingerprint(copy) != fp
    with pytest.raises(ConfigError):
        base_model_fingerprint(tmp_path / "nowhere")


def test_a_quantized_load_pins_the_mmap_threshold_and_a_plain_one_does_not(
    load_tiny, monkeypatch: pytest.MonkeyPatch
) -> None:
    import fedquic.client.model as model_mod

    pinned: list[int] = []
    monkeypatch.setattr(model_mod, "pin_mmap_threshold", lambda n: pinned.append(n) or True)
    load_tiny(quantization="nf4")
    assert pinned == [8 << 20]  # the default: dequantized weights stop fragmenting the heap
    load_tiny(quantization="nf4", mmap_threshold_mib=2.5)
    load_tiny(quantization="nf4", mmap_threshold_mib=None)
    load_tiny(quantization="none")
    assert pinned == [8 << 20, int(2.5 * (1 << 20))]
