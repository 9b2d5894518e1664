"""What a local model directory holds and how fedquic trains it: the model kind, its task head, its LoRA targets.

Decided from ``config.json`` and the data's kind before anything is loaded, so that a wrong pairing (a BERT
encoder with prompt/response data, a causal LM without a trained head) fails with a clear message before the
client joins a job, never inside peft while the server waits.

* **Kinds.** ``causal_lm`` (``*ForCausalLM``, ``*LMHeadModel``, bare decoders with tied embeddings),
  ``seq_cls`` (``*ForSequenceClassification``; or any text model when the data are ``{text, label}`` records:
  a classification head is then built) and ``vlm`` (a config with a ``vision_config``). An encoder-only model
  (BERT, RoBERTa, DistilBERT, ...) has no language-model head worth training: it is a classifier or an error.
* **New heads.** A head the checkpoint does not hold (a sentence encoder or a causal LM turned classifier) is
  initialised from the job's seed, identically on every client (:func:`init_new_heads`), kept out of 4-bit
  quantization, and given a LoRA of its own (:func:`head_targets`): it trains and federates with the adapter,
  under the FedALT mixer like every other target. A rank-r LoRA on a head of ``num_labels <= r`` outputs can
  express any change of that head, so this is as expressive as peft's ``modules_to_save`` without a second
  kind of adapter state on the wire. A head the checkpoint already holds (a fine-tuned classifier) stays frozen.
* **Targets.** The attention projections each family names its own way (q/v, query/value, q_lin/v_lin, fused
  qkv), else every linear layer but the heads.
"""

from __future__ import annotations

import logging
import zlib
from collections.abc import Iterable
from typing import Any, Literal

import torch
from fedquic.common.errors import ConfigError
from torch import nn

log = logging.getLogger(__name__)

ModelKind = Literal["causal_lm", "seq_cls", "vlm"]
DataKind = Literal["generation", "text", "mc", "label"]
KINDS: tuple[str, ...] = ("causal_lm", "seq_cls", "vlm")

# Encoder-only families: no causal language-model head (transformers maps some of them to a causal LM class,
# with a random head: that is the trap this module exists to avoid).
ENCODER_TYPES = frozenset(
    {
        "albert", "bert", "big_bird", "camembert", "convbert", "data2vec-text", "deberta", "deberta-v2",
        "distilbert", "electra", "ernie", "flaubert", "funnel", "ibert", "megatron-bert", "mobilebert",
        "modernbert", "mpnet", "nezha", "rembert", "roberta", "roberta-prelayernorm", "roc_bert", "roformer",
        "squeezebert", "xlm", "xlm-roberta", "xlm-roberta-xl", "xmod",
    }
)  # fmt: skip
# Names of task heads: never LoRA targets by default; kept out of 4-bit quantization where they are new.
HEAD_NAMES = frozenset({"lm_head", "score", "classifier", "pre_classifier", "out_proj", "embed_out"})
_HEAD_MODULES = ("classifier", "pre_classifier", "score", "lm_head", "embed_out", "pooler", "sequence_summary")
# LoRA targets by family, first match wins: separate q/v projections, then the fused forms.
_TARGET_PREFERENCES: tuple[tuple[str, ...], ...] = (
    ("q_proj", "v_proj"),  # Llama, Mistral, Qwen2, Gemma, OPT, ...
    ("query", "value"),  # BERT, RoBERTa, ELECTRA
    ("q_lin", "v_lin"),  # DistilBERT
    ("query_key_value",),  # GPT-NeoX, Falcon, BLOOM
    ("qkv_proj",),  # Phi-3
    ("c_attn",),  # GPT-2 (Conv1D)
    ("Wqkv",),  # MPT, ModernBERT
)
NEW_HEADS_ATTR = "fedquic_new_heads"  # on a loaded model: its freshly initialised head modules (full names)


def _archs(config: dict[str, Any]) -> list[str]:
    return [str(a) for a in (config.get("architectures") or [])]


def is_encoder(config: dict[str, Any]) -> bool:
    return str(config.get("model_type", "")) in ENCODER_TYPES and not config.get("is_decoder", False)


def describe(config: dict[str, Any]) -> str:
    archs = _archs(config)
    return archs[0] if archs else str(config.get("model_type", "unknown model"))


def resolve_kind(config: dict[str, Any], *, requested: str = "auto", data_kind: str | None = None) -> ModelKind:
    """The kind a model directory is trained as, from its config and the kind of the client's data.

    ``requested`` (``auto`` or a kind) comes from the user; ``data_kind`` is the kind of the training examples
    (:attr:`fedquic.client.data.Example.kind`), ``label`` for classification data. Raises :class:`ConfigError`
    with the choices when the pairing cannot work.
    """
    name = describe(config)
    archs = _archs(config)
    is_cls = any(a.endswith("ForSequenceClassification") for a in archs)
    if requested not in ("auto", *KINDS):
        raise ConfigError(f"model kind must be auto, {', '.join(KINDS)}; got {requested!r}")
    if "vision_config" in config:
        kind: ModelKind = "vlm"
    elif is_cls or data_kind == "label" or requested == "seq_cls":
        kind = "seq_cls"
    elif is_encoder(config):
        raise ConfigError(
            f"{name} is an encoder ({config.get('model_type')}) without a language-model head, so it cannot "
            "learn prompt/response or text data. Choices: train it as a sequence classifier with "
            '{"text": ..., "label": k} records (a classification head is built from the labels), or use a '
            "causal LM (Llama, Qwen2, Mistral, Phi-3, Gemma-2, GPT-2, GPT-NeoX, ...) for generation data"
        )
    else:
        kind = "causal_lm"
    if requested != "auto" and requested != kind:
        raise ConfigError(f"{name} with {data_kind or 'this'} data is a {kind} model, not {requested}")
    if kind == "seq_cls" and data_kind not in (None, "label"):
        raise ConfigError(
            f'{name} is a sequence classifier: its data must be {{"text": ..., "label": k}} records, '
            f"not {data_kind} examples"
        )
    if kind == "causal_lm" and data_kind == "label":  # unreachable (label data make seq_cls), kept for clarity
        raise ConfigError("classification data need a sequence-classification model")
    return kind


def num_labels_for(config: dict[str, Any], labels: Iterable[int], requested: int | None) -> int:
    """How many classes the head has: ``requested`` (the same on every client), else the checkpoint's own
    head size for a trained classifier, else one more than the largest label in the data."""
    seen = sorted(set(labels))
    need = seen[-1] + 1 if seen else 2
    has_head = any(a.endswith("ForSequenceClassification") for a in _archs(config))
    own = len(config.get("id2label") or {}) or config.get("num_labels")
    if requested is not None:
        if requested < need:
            raise ConfigError(f"--num-labels {requested} is too small: the data hold label {need - 1}")
        if has_head and own and requested != own:
            raise ConfigError(f"{describe(config)} has a trained head of {own} classes, not {requested}")
        return requested
    if has_head and own:
        if need > own:
            raise ConfigError(f"the data hold label {need - 1}, but {describe(config)} has {own} classes")
        return int(own)
    log.warning(
        "the new classification head gets %d classes from the largest label in this client's data (%d distinct "
        "labels); every client of a job must build the same head: set --num-labels if some client's data miss "
        "the top label (a different head is refused at JOIN as a schema mismatch)",
        max(need, 2),
        len(seen),
    )
    return max(need, 2)


def quantization_skip_modules(kind: ModelKind) -> list[str] | None:
    """Modules bitsandbytes must leave in full precision: a classifier's head (new or trained) and the LM head."""
    return list(_HEAD_MODULES) if kind == "seq_cls" else None


def new_head_modules(model: nn.Module, missing_keys: Iterable[str]) -> list[str]:
    """Full names of the linear layers whose weights the checkpoint lacked (freshly initialised heads).

    Only task heads may be missing: a missing weight anywhere else (a renamed key, a partial checkpoint) would
    train on random values without a word, so it is refused."""
    missing = set(missing_keys)
    out, body = [], []
    for name, module in model.named_modules():
        if _is_linear(module) and f"{name}.weight" in missing:
            (out if set(name.split(".")) & set(_HEAD_MODULES) else body).append(name)
    if body:
        raise ConfigError(
            f"the checkpoint lacks the weights of {', '.join(sorted(body)[:5])}{' ...' if len(body) > 5 else ''}: "
            "they are not a task head, so the model would train on random layers; is the folder complete?"
        )
    return sorted(out)


def check_heads(model: nn.Module, kind: ModelKind, new: list[str], where: str) -> None:
    """Refuse a model whose output layer is random where it cannot be trained, and any other missing weight."""
    if kind == "causal_lm" and new:
        raise ConfigError(
            f"{where}: the checkpoint lacks the weights of {', '.join(new)}: its language-model head would be "
            "random. Use a checkpoint with a trained LM head (or tied embeddings), or train it as a classifier"
        )
    for name in new:
        module = model.get_submodule(name)
        if type(module) is not nn.Linear:
            raise ConfigError(
                f"{where}: new head {name} is a {type(module).__name__}, expected a full-precision Linear"
            )


def init_new_heads(model: nn.Module, seed: int) -> list[str]:
    """Re-initialise the freshly built heads from ``seed`` (the job's): identical on every client, whatever
    torch's global RNG did at load time. Weights ~ N(0, initializer_range), biases 0 (BERT's own init)."""
    names = list(getattr(model, NEW_HEADS_ATTR, []) or [])
    config = getattr(model, "config", None)
    std = float(getattr(config, "initializer_range", 0.02) or 0.02)
    with torch.no_grad():
        for name in names:
            module = model.get_submodule(name)
            gen = torch.Generator().manual_seed((seed & 0xFFFFFFFF) * 1_000_003 + zlib.crc32(name.encode()))
            w = torch.empty(module.weight.shape, dtype=torch.float32).normal_(0.0, std, generator=gen)
            module.weight.copy_(w.to(module.weight.dtype))
            if module.bias is not None:
                module.bias.zero_()
    return names


def head_targets(model: nn.Module) -> list[str]:
    """LoRA targets for the new heads (full names: peft matches them by suffix)."""
    return list(getattr(model, NEW_HEADS_ATTR, []) or [])


def _is_linear(module: nn.Module) -> bool:
    # bitsandbytes' Linear4bit/Linear8bitLt subclass nn.Linear; GPT-2's attention and MLP are Conv1D.
    return isinstance(module, nn.Linear) or type(module).__name__ == "Conv1D"


def default_target_modules(model: nn.Module) -> list[str]:
    """LoRA targets: each family's attention projections (see the module docstring), else every linear layer
    but the heads; plus the model's new heads.

    Detected from the module tree rather than ``config.model_type`` so unknown look-alikes work too. In a
    vision-language model (one with a ``language_model`` submodule) only the language model's layers are
    targeted, by their full module names: the vision tower and the projector stay as they are.
    """
    linears = [name for name, m in model.named_modules() if _is_linear(m) and not any(True for _ in m.children())]
    heads = set(head_targets(model))
    in_lm = [n for n in linears if ".language_model." in f".{n}"]
    if in_lm:
        for group in _TARGET_PREFERENCES:
            chosen = [n for n in in_lm if n.rsplit(".", 1)[-1] in group]
            if {n.rsplit(".", 1)[-1] for n in chosen} == set(group):
                return chosen
        return [n for n in in_lm if n.rsplit(".", 1)[-1] not in HEAD_NAMES]
    body = [n for n in linears if n not in heads]
    leaf_names = {name.rsplit(".", 1)[-1] for name in body}
    for group in _TARGET_PREFERENCES:
        if set(group) <= leaf_names:
            return [*group, *sorted(heads)]
    targets = sorted(leaf_names - HEAD_NAMES)
    if not targets and not heads:
        raise ConfigError("the model has no linear layers to put LoRA on; give target_modules explicitly")
    return [*targets, *sorted(heads)]
