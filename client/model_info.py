"""``fedquic model info``: what a model folder holds and how a client would train it, without loading weights."""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Any

from fedquic.common.errors import ConfigError

from .architectures import describe, is_encoder, resolve_kind
from .model import _check_model_dir, _read_config, base_model_fingerprint


def _safetensors_parameters(path: Path) -> int:
    """Parameter count from the safetensors headers (8-byte length, then JSON): no tensor is read."""
    total = 0
    for f in sorted(path.glob("*.safetensors")):
        with f.open("rb") as fh:
            (n,) = struct.unpack("<Q", fh.read(8))
            if n > 100 << 20:
                raise ConfigError(f"{f}: implausible safetensors header of {n} bytes")
            header = json.loads(fh.read(n))
        for name, meta in header.items():
            if name != "__metadata__":
                count = 1
                for d in meta.get("shape", []):
                    count *= int(d)
                total += count
    return total


def model_info(model_dir: Path, *, data: Path | None = None) -> dict[str, Any]:
    """A flat description of ``model_dir``; with ``data`` the kind is decided as a client with it would."""
    from transformers import AutoTokenizer

    from .data import load_jsonl, special_frame, uses_chat_template
    from .peft_learner import _data_kind

    path = _check_model_dir(model_dir)
    config = _read_config(path)
    data_kind = _data_kind(load_jsonl(data)) if data is not None else None
    out: dict[str, Any] = {
        "model": str(path),
        "architecture": describe(config),
        "model_type": config.get("model_type"),
        "encoder_only": is_encoder(config),
        "parameters": _safetensors_parameters(path),
        "fingerprint": base_model_fingerprint(path),
    }
    try:
        out["trained_as"] = resolve_kind(config, data_kind=data_kind)
    except ConfigError as exc:
        out["trained_as"] = f"refused: {exc.args[0]}"
    if data_kind is not None:
        out["data_kind"] = data_kind
    try:
        tok = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    except (OSError, ValueError) as exc:
        out["tokenizer"] = f"cannot load: {exc}"
        return out
    pre, post = special_frame(tok)
    out["tokenizer"] = type(tok).__name__
    out["special_tokens"] = f"{tok.convert_ids_to_tokens(pre)} text {tok.convert_ids_to_tokens(post)}"
    out["eos_token"] = tok.eos_token
    out["chat_template"] = "yes (used for prompts by default)" if uses_chat_template(tok) else "no"
    record = path / "fedquic-import.json"
    if record.exists():
        out["imported_from"] = json.loads(record.read_text()).get("source")
    return out
