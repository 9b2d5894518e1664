"""Exporting trained adapters.

* :func:`export_peft_adapter`: the individual LoRA as a standard peft directory (``adapter_config.json`` +
  ``adapter_model.safetensors``) that ``PeftModel.from_pretrained(base, path)`` loads. In ``fedavg``/``local``
  mode that *is* the whole model; in ``fedalt`` mode it is the personal half only.
* :func:`save_fedalt` / :func:`load_fedalt`: the full FedALT model (both LoRAs and the per-token mixers), which
  peft cannot express and which cannot be merged into the base weights (the mix depends on each token), as
  safetensors files plus a JSON description. No pickle anywhere.
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
from safetensors.numpy import load_file, save_file

from ..common.atomic import atomic_write_text, atomic_write_with
from ..common.errors import ConfigError
from .fedalt import LOCAL, ROW, FedALTModel, LoraSpec

FORMAT = "fedquic-fedalt/1"


def export_peft_adapter(fam: FedALTModel, out_dir: Path) -> Path:
    """Write the individual LoRA as a peft adapter directory; returns the directory to load.

    A head the checkpoint lacked (a classifier built for the job) is not in the base model anyone else loads:
    its weights there would be random. It is exported whole instead, as peft's ``modules_to_save`` (its
    job-seeded initial weights with the client's LoRA merged in), so ``PeftModel.from_pretrained(base, path)``
    on a freshly loaded base gives the trained classifier.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    fam.model.save_pretrained(str(out_dir), selected_adapters=[LOCAL])
    # peft writes a non-default adapter into a sub-directory named after it.
    path = out_dir / LOCAL if (out_dir / LOCAL / "adapter_config.json").exists() else out_dir
    if fam.new_heads:
        _heads_as_modules_to_save(fam, path)
    return path


def _heads_as_modules_to_save(fam: FedALTModel, path: Path) -> None:
    import torch
    from safetensors.torch import load_file as load_torch
    from safetensors.torch import save_file as save_torch

    heads = fam.new_heads
    weights_path = path / "adapter_model.safetensors"
    tensors = load_torch(str(weights_path))
    prefix = "base_model.model."
    for head in heads:
        layer = fam.model.get_submodule(prefix + head)
        for kind in ("lora_A", "lora_B"):
            tensors.pop(f"{prefix}{head}.{kind}.weight", None)
        with torch.no_grad():
            base = layer.base_layer
            delta = layer.lora_B[LOCAL].weight.float() @ layer.lora_A[LOCAL].weight.float() * layer.scaling[LOCAL]
            tensors[f"{prefix}{head}.weight"] = (base.weight.float() + delta).to(base.weight.dtype).contiguous()
            if base.bias is not None:
                tensors[f"{prefix}{head}.bias"] = base.bias.detach().clone().contiguous()
    atomic_write_with(weights_path, lambda tmp: save_torch(tensors, str(tmp), metadata={"format": "pt"}))
    config_path = path / "adapter_config.json"
    config = json.loads(config_path.read_text())
    targets = config.get("target_modules") or []
    config["target_modules"] = sorted(t for t in targets if t not in heads)
    config["modules_to_save"] = sorted({*(config.get("modules_to_save") or []), *heads})
    atomic_write_text(config_path, json.dumps(config, indent=2, sort_keys=True) + "\n")


def _atomic_save(tensors: dict[str, np.ndarray], path: Path) -> None:
    arrays = {k: np.ascontiguousarray(v) for k, v in tensors.items()}
    atomic_write_with(path, lambda tmp: save_file(arrays, str(tmp)))


def save_fedalt(fam: FedALTModel, out_dir: Path) -> Path:
    """Save both adapters, the mixers and the settings needed to rebuild the model."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    _atomic_save(fam.local_state(), out_dir / "local.safetensors")
    if fam.federation == "fedalt":
        _atomic_save(fam.row_state(), out_dir / "row.safetensors")
        mixers = fam.mixer_state()
        if mixers:
            _atomic_save(mixers, out_dir / "mixer.safetensors")
    meta = {
        "format": FORMAT,
        "lora": asdict(fam.lora),
        "init_seed": fam.init_seed,
        "mixer": fam.mixer,
        "federation": fam.federation,
    }
    atomic_write_text(out_dir / "fedalt.json", json.dumps(meta, indent=2))
    return out_dir


def load_fedalt(base_model: Any, in_dir: Path) -> FedALTModel:
    """Rebuild a saved FedALT model on a freshly loaded base model (same base as at training time)."""
    in_dir = Path(in_dir)
    try:
        meta = json.loads((in_dir / "fedalt.json").read_text())
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{in_dir} is not a saved FedALT model: {exc}") from None
    if meta.get("format") != FORMAT:
        raise ConfigError(f"{in_dir}: unknown format {meta.get('format')!r}, expected {FORMAT}")
    fam = FedALTModel(
        base_model,
        LoraSpec(**meta["lora"]),
        init_seed=meta["init_seed"],
        mixer=meta["mixer"],
        federation=meta["federation"],
    )
    fam.set_local_state(load_file(str(in_dir / "local.safetensors")))
    if fam.federation == "fedalt":
        fam.set_row_state(load_file(str(in_dir / f"{ROW}.safetensors")))
        if (in_dir / "mixer.safetensors").exists():
            fam.set_mixer_state(load_file(str(in_dir / "mixer.safetensors")))
    return fam


def exported_head_classes(adapter_dir: Path) -> int | None:
    """The class count of a classification head exported whole (``modules_to_save``), None if there is none."""
    from safetensors import safe_open

    try:
        config = json.loads((adapter_dir / "adapter_config.json").read_text())
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{adapter_dir} is not a peft adapter directory: {exc}") from None
    heads = config.get("modules_to_save") or []
    if not heads:
        return None
    with safe_open(str(adapter_dir / "adapter_model.safetensors"), framework="np") as f:
        shapes = {k: f.get_slice(k).get_shape() for k in f.keys()}  # noqa: SIM118 (safe_open has no iterator)
    outs = [shapes[k][0] for k in shapes for h in heads if k.endswith(f".{h}.weight") and len(shapes[k]) == 2]
    return int(min(outs)) if outs else None


def merge_into_base(base_path: Path, adapter_dir: Path, out_dir: Path) -> Path:
    """``fedavg``/``local`` mode: fold an exported peft adapter into a full-precision copy of the base model
    (W + B·A·s) and save it as a plain transformers model directory. A 4-bit base cannot take the merge without
    re-quantizing, so the base is loaded unquantized here."""
    from peft import PeftModel

    from .model import LoadSpec, load_base_model

    spec = LoadSpec(quantization="none", gradient_checkpointing=False)
    num_labels = exported_head_classes(Path(adapter_dir))
    if num_labels is None:
        base, tokenizer = load_base_model(Path(base_path), spec)
    else:  # a classifier whose head was built for the job: load the same kind of model, the same head size
        base, tokenizer = load_base_model(Path(base_path), spec, data_kind="label", num_labels=num_labels)
    merged = PeftModel.from_pretrained(base, str(adapter_dir)).merge_and_unload()
    out_dir = Path(out_dir)
    merged.save_pretrained(str(out_dir))
    tokenizer.save_pretrained(str(out_dir))
    return out_dir
