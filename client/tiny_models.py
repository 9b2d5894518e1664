"""Tiny models built from code, for tests and the demo: a Llama, a sequence classifier and a LLaVA-style
vision-language model, with a character-level tokenizer. Built once per folder (idempotent), never downloaded.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
from fedquic.common.atomic import commit_dir, staged_dir
from fedquic.common.errors import ConfigError

log = logging.getLogger(__name__)

# Files whose presence makes a directory a complete tiny model (weights, config, tokenizer).
_REQUIRED_FILES = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json")
# Special tokens of the code-built tokenizer, in id order (pad=0 so zero-padding is harmless).
_SPECIAL_TOKENS = ("<pad>", "<s>", "</s>", "<unk>")

# ---------------------------------------------------------------------------------------------------------
# Tiny model built from code
# ---------------------------------------------------------------------------------------------------------


def _char_tokenizer() -> Any:
    """A character-level fast tokenizer over printable ASCII + bos/eos/pad/unk, made without any download."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    chars = [chr(i) for i in range(32, 127)]  # printable ASCII, space included
    vocab = {tok: i for i, tok in enumerate([*_SPECIAL_TOKENS, *chars])}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    # An empty-pattern split isolates every character, so each char is one token (spaces included).
    tok.pre_tokenizer = pre_tokenizers.Split(pattern="", behavior="isolated")
    tok.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>"
    )


def _is_complete(out_dir: Path) -> bool:
    return all((out_dir / name).is_file() for name in _REQUIRED_FILES)


def build_tiny_llama(
    out_dir: Path,
    *,
    seed: int = 0,
    hidden_size: int = 64,
    num_layers: int = 2,
    num_heads: int = 4,
    intermediate_size: int = 128,
    max_position: int = 256,
) -> Path:
    """Build a randomly initialised (seeded) LlamaForCausalLM and a char tokenizer into ``out_dir``.

    Idempotent: a directory that already holds a complete model is left as it is. The model is written to a
    sibling temp directory and renamed into place, so a concurrent builder never sees half a model.
    """
    out_dir = Path(out_dir)
    if _is_complete(out_dir):
        log.debug("tiny model already present in %s", out_dir)
        return out_dir
    _check_tiny_sizes(hidden_size, intermediate_size, num_heads, num_layers)
    if max_position <= 0:
        raise ConfigError("max_position must be positive")

    from transformers import LlamaForCausalLM

    tokenizer = _char_tokenizer()
    config = _tiny_llama_config(tokenizer, hidden_size, num_layers, num_heads, intermediate_size, max_position)
    model = _seeded(LlamaForCausalLM, config, seed)
    if not _save_model_dir(model, tokenizer, out_dir):
        return out_dir
    log.info("built tiny llama (hidden %d, %d layers) in %s", hidden_size, num_layers, out_dir)
    return out_dir


def _seeded(model_cls: Any, config: Any, seed: int) -> Any:
    # HF init draws from torch's global RNG: fork it so the seed applies here and the caller's RNG survives.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return model_cls(config)


def _save_model_dir(model: Any, tokenizer: Any, out_dir: Path) -> bool:
    """Save into a sibling temp directory and rename into place; False if another builder won the race."""
    with staged_dir(out_dir) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        if out_dir.exists():
            if _is_complete(out_dir):  # another builder won the race
                return False
            if any(out_dir.iterdir()):
                raise ConfigError(f"{out_dir} exists, is not empty and holds no complete model; refusing to overwrite")
            out_dir.rmdir()
        commit_dir(tmp, out_dir)
    return True


def _check_tiny_sizes(hidden_size: int, intermediate_size: int, num_heads: int, num_layers: int) -> None:
    # bitsandbytes quantizes in blocks of 64 values; keep every Linear's dimensions block-aligned.
    for name, value in (("hidden_size", hidden_size), ("intermediate_size", intermediate_size)):
        if value <= 0 or value % 64:
            raise ConfigError(f"{name} must be a positive multiple of 64 (4-bit blocks), got {value}")
    if num_heads <= 0 or hidden_size % num_heads:
        raise ConfigError(f"hidden_size {hidden_size} is not divisible by num_heads {num_heads}")
    if num_layers <= 0:
        raise ConfigError("num_layers must be positive")


def _tiny_llama_config(
    tokenizer: Any,
    hidden_size: int,
    num_layers: int,
    num_heads: int,
    intermediate_size: int,
    max_position: int,
    **extra: Any,
) -> Any:
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_heads,
        intermediate_size=intermediate_size,
        max_position_embeddings=max_position,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        tie_word_embeddings=False,
        **extra,
    )


def build_tiny_classifier(
    out_dir: Path,
    *,
    num_labels: int = 2,
    seed: int = 0,
    hidden_size: int = 64,
    num_layers: int = 2,
    num_heads: int = 4,
    intermediate_size: int = 128,
    max_position: int = 256,
) -> Path:
    """A randomly initialised (seeded) LlamaForSequenceClassification and the char tokenizer, like
    :func:`build_tiny_llama`. It scores the last non-pad token, so its config carries the pad token id."""
    out_dir = Path(out_dir)
    if _is_complete(out_dir):
        return out_dir
    _check_tiny_sizes(hidden_size, intermediate_size, num_heads, num_layers)
    if num_labels < 2:
        raise ConfigError(f"num_labels must be >= 2, got {num_labels}")
    from transformers import LlamaForSequenceClassification

    tokenizer = _char_tokenizer()
    config = _tiny_llama_config(
        tokenizer, hidden_size, num_layers, num_heads, intermediate_size, max_position, num_labels=num_labels
    )
    model = _seeded(LlamaForSequenceClassification, config, seed)
    _save_model_dir(model, tokenizer, out_dir)
    return out_dir


IMAGE_TOKEN = "<image>"


def build_tiny_vlm(
    out_dir: Path,
    *,
    seed: int = 0,
    hidden_size: int = 64,
    num_layers: int = 2,
    num_heads: int = 4,
    intermediate_size: int = 128,
    image_size: int = 32,
    patch_size: int = 8,
) -> Path:
    """A tiny LLaVA (CLIP vision tower + projector + Llama) from configs alone, with the char tokenizer plus an
    ``<image>`` token. An image takes ``(image_size // patch_size) ** 2`` ``<image>`` tokens in the input ids
    (:func:`image_token_count`); pixel values are ``(batch, 3, image_size, image_size)`` float tensors."""
    out_dir = Path(out_dir)
    if _is_complete(out_dir):
        return out_dir
    _check_tiny_sizes(hidden_size, intermediate_size, num_heads, num_layers)
    if image_size <= 0 or patch_size <= 0 or image_size % patch_size:
        raise ConfigError(f"image_size {image_size} must be a positive multiple of patch_size {patch_size}")
    from transformers import CLIPVisionConfig, LlavaConfig, LlavaForConditionalGeneration

    tokenizer = _char_tokenizer()
    tokenizer.add_special_tokens({"additional_special_tokens": [IMAGE_TOKEN]})
    image_token_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    vision = CLIPVisionConfig(
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        image_size=image_size,
        patch_size=patch_size,
        projection_dim=hidden_size,
    )
    text = _tiny_llama_config(tokenizer, hidden_size, num_layers, num_heads, intermediate_size, 256)
    config = LlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_id=image_token_id,
        image_seq_length=(image_size // patch_size) ** 2,
        vision_feature_layer=-1,
        vision_feature_select_strategy="default",  # drops CLIP's class token: one image token per patch
    )
    model = _seeded(LlavaForConditionalGeneration, config, seed)
    _save_model_dir(model, tokenizer, out_dir)
    return out_dir


def image_token_count(config: Any) -> int:
    """How many ``<image>`` tokens one image takes in a LLaVA-style model's input ids."""
    vc = config.vision_config
    n = (vc.image_size // vc.patch_size) ** 2
    return n + 1 if getattr(config, "vision_feature_select_strategy", "default") == "full" else n
