"""Base-model loading: a tiny Llama built from code for tests/demos, 4-bit (NF4) loading, fingerprints.

Everything here works from a local directory only; nothing ever reaches a model hub.
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import hashlib
import json
import logging
import os
import shutil
import sys
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from fedquic.common.errors import ConfigError
from torch import nn

from .architectures import (
    NEW_HEADS_ATTR,
    ModelKind,
    check_heads,
    default_target_modules,  # noqa: F401  (re-exported: it was defined here)
    new_head_modules,
    num_labels_for,
    quantization_skip_modules,
    resolve_kind,
)

log = logging.getLogger(__name__)

Quantization = Literal["nf4", "int8", "none"]
ComputeDtype = Literal["float32", "bfloat16"]

_QUANTIZATIONS: tuple[str, ...] = ("nf4", "int8", "none")
_COMPUTE_DTYPES: dict[str, torch.dtype] = {"float32": torch.float32, "bfloat16": torch.bfloat16}

# Files whose presence makes a directory a complete tiny model (weights, config, tokenizer).
_REQUIRED_FILES = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json")
# Special tokens of the code-built tokenizer, in id order (pad=0 so zero-padding is harmless).
_SPECIAL_TOKENS = ("<pad>", "<s>", "</s>", "<unk>")
# Config keys that differ between transformers versions / load settings but not between base models.
_VOLATILE_CONFIG_KEYS = frozenset(
    {"transformers_version", "_name_or_path", "torch_dtype", "dtype", "quantization_config", "use_cache"}
)
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf")
_WEIGHT_INDEX_SUFFIX = ".index.json"


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
    # HF init draws from torch's global RNG: fork it so the seed applies here and the caller's RNG survives.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    if not _save_model_dir(model, tokenizer, out_dir):
        return out_dir
    log.info("built tiny llama (hidden %d, %d layers) in %s", hidden_size, num_layers, out_dir)
    return out_dir


def _save_model_dir(model: Any, tokenizer: Any, out_dir: Path) -> bool:
    """Save into a sibling temp directory and rename into place; False if another builder won the race."""
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_dir.with_name(f".{out_dir.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        if out_dir.exists():
            if _is_complete(out_dir):  # another builder won the race
                return False
            if any(out_dir.iterdir()):
                raise ConfigError(f"{out_dir} exists, is not empty and holds no complete model; refusing to overwrite")
            out_dir.rmdir()
        os.replace(tmp, out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
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
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForSequenceClassification(config)
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
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlavaForConditionalGeneration(config)
    _save_model_dir(model, tokenizer, out_dir)
    return out_dir


def image_token_count(config: Any) -> int:
    """How many ``<image>`` tokens one image takes in a LLaVA-style model's input ids."""
    vc = config.vision_config
    n = (vc.image_size // vc.patch_size) ** 2
    return n + 1 if getattr(config, "vision_feature_select_strategy", "default") == "full" else n


# ---------------------------------------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LoadSpec:
    """How to load the frozen base model."""

    quantization: Quantization = "nf4"
    compute_dtype: ComputeDtype = "float32"
    double_quant: bool = True
    gradient_checkpointing: bool = True
    device: str = "cpu"
    kind: ModelKind | Literal["auto"] = "auto"  # auto: from config.json (see model_kind)

    def __post_init__(self) -> None:
        if self.kind not in ("auto", "causal_lm", "seq_cls", "vlm"):
            raise ConfigError(f"kind must be auto, causal_lm, seq_cls or vlm, got {self.kind!r}")
        if self.quantization not in _QUANTIZATIONS:
            raise ConfigError(f"quantization must be one of {list(_QUANTIZATIONS)}, got {self.quantization!r}")
        if self.compute_dtype not in _COMPUTE_DTYPES:
            raise ConfigError(f"compute_dtype must be one of {list(_COMPUTE_DTYPES)}, got {self.compute_dtype!r}")
        try:
            torch.device(self.device)
        except (RuntimeError, TypeError) as exc:
            raise ConfigError(f"invalid device {self.device!r}: {exc}") from None

    @property
    def torch_dtype(self) -> torch.dtype:
        return _COMPUTE_DTYPES[self.compute_dtype]


def _check_model_dir(path: Path) -> Path:
    path = Path(path).expanduser()
    if not path.is_dir():
        raise ConfigError(f"base model directory {path} does not exist (only local model directories are supported)")
    if not (path / "config.json").is_file():
        raise ConfigError(f"{path} holds no config.json; is it a saved transformers model directory?")
    return path


def _quantization_config(spec: LoadSpec, kind: ModelKind) -> Any:
    from transformers import BitsAndBytesConfig

    skip = {} if (mods := quantization_skip_modules(kind)) is None else {"llm_int8_skip_modules": mods}
    if spec.quantization == "nf4":
        return BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=spec.double_quant,
            bnb_4bit_compute_dtype=spec.torch_dtype,
            **skip,
        )
    if spec.quantization == "int8":
        return BitsAndBytesConfig(load_in_8bit=True, **skip)
    return None


def _read_config(path: Path) -> dict[str, Any]:
    try:
        config = json.loads((path / "config.json").read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise ConfigError(f"cannot read {path / 'config.json'}: {exc}") from exc
    if not isinstance(config, dict):
        raise ConfigError(f"{path / 'config.json'} is not a JSON object")
    return config


def model_kind(path: Path, *, data_kind: str | None = None, requested: str = "auto") -> ModelKind:
    """What a local model directory is trained as with data of ``data_kind`` (see
    :func:`fedquic.client.architectures.resolve_kind`): ``seq_cls``, ``vlm`` or ``causal_lm``; a clear
    :class:`ConfigError` for a pairing that cannot work (an encoder with generation data)."""
    return resolve_kind(_read_config(_check_model_dir(path)), requested=requested, data_kind=data_kind)


def _auto_class(kind: ModelKind) -> Any:
    import transformers

    return {
        "causal_lm": transformers.AutoModelForCausalLM,
        "seq_cls": transformers.AutoModelForSequenceClassification,
        "vlm": transformers.AutoModelForImageTextToText,
    }[kind]


def load_base_model(
    path: Path,
    spec: LoadSpec | None = None,
    *,
    data_kind: str | None = None,
    labels: Sequence[int] = (),
    num_labels: int | None = None,
    progress: bool = True,
) -> tuple[Any, Any]:
    """Load a frozen (optionally 4-bit NF4) model and its tokenizer from a local directory.

    The kind (causal LM, sequence classifier, vision-language model) comes from ``spec.kind`` or, by default,
    from config.json and ``data_kind``, the kind of the client's examples (:mod:`fedquic.client.architectures`):
    an encoder with ``label`` data, or a causal LM with ``label`` data, becomes a sequence classifier whose head
    has ``num_labels`` classes (default: from ``labels``). A head the checkpoint lacks is left in full
    precision and listed on the model (``NEW_HEADS_ATTR``) for :class:`~fedquic.client.fedalt.FedALTModel` to
    initialise from the job's seed and train; a causal LM whose LM head the checkpoint lacks is refused.
    ``progress=False`` silences transformers' own loading bar.

    We do the useful part of peft's ``prepare_model_for_kbit_training`` ourselves: freeze everything and
    turn on non-reentrant gradient checkpointing. We skip its upcast of every non-quantized parameter to
    fp32, which costs gigabytes of RAM for large vocabularies and is unneeded for fp32/bf16 compute; with
    ``use_reentrant=False`` the inputs also need no ``requires_grad`` hook.
    """
    from transformers import AutoTokenizer

    spec = spec or LoadSpec()
    path = _check_model_dir(path)
    config = _read_config(path)
    kind = resolve_kind(config, requested=spec.kind, data_kind=data_kind)
    device = torch.device(spec.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device {spec.device!r} requested but CUDA is not available")

    kwargs: dict[str, Any] = {
        "dtype": spec.torch_dtype,
        "local_files_only": True,
        "device_map": {"": str(device)},
        "output_loading_info": True,
    }
    if kind == "seq_cls":
        kwargs["num_labels"] = num_labels_for(config, labels, num_labels)
    qcfg = _quantization_config(spec, kind)
    if qcfg is not None:
        kwargs["quantization_config"] = qcfg
    try:
        with _quiet_transformers(not progress):
            model, info = _auto_class(kind).from_pretrained(str(path), **kwargs)
            tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    except (OSError, ValueError, KeyError) as exc:
        raise ConfigError(f"cannot load base model from {path}: {exc}") from exc
    new = new_head_modules(model, info.get("missing_keys") or ())
    check_heads(model, kind, new, str(path))
    setattr(model, NEW_HEADS_ATTR, new)
    if new:
        log.info("%s: new %s head %s (initialised from the job seed, trained with the adapter)", path.name, kind, new)

    keep_4bit_differentiable(model)
    if qcfg is not None:
        release_checkpoint_memory(model)
    if tokenizer.pad_token_id is None:  # many causal LMs ship without a pad token
        tokenizer.pad_token = tokenizer.eos_token
    if kind == "seq_cls" and getattr(model.config, "pad_token_id", None) is None:
        model.config.pad_token_id = tokenizer.pad_token_id  # classifiers find the last token by the pad id
    for param in model.parameters():
        param.requires_grad_(False)
    if spec.gradient_checkpointing:
        model.config.use_cache = False  # the KV cache is useless in training and conflicts with checkpointing
        if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.x renamed it
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.eval()
    log.info(
        "loaded base model %s (%s as %s, %s, compute %s, checkpointing=%s) on %s",
        path.name,
        type(model).__name__,
        kind,
        spec.quantization,
        spec.compute_dtype,
        spec.gradient_checkpointing,
        device,
    )
    return model, tokenizer


@contextlib.contextmanager
def _quiet_transformers(quiet: bool) -> Iterator[None]:
    """transformers' "Loading weights" bar and its load-time warnings go to every client log otherwise."""
    if not quiet:
        yield
        return
    import warnings

    from transformers.utils import logging as hf_logging

    was_enabled = hf_logging.is_progress_bar_enabled()
    verbosity = hf_logging.get_verbosity()
    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()  # its load report (new heads) is logged by us in one line
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if was_enabled:
            hf_logging.enable_progress_bar()


def release_checkpoint_memory(model: nn.Module) -> int:
    """Copy the non-quantized parameters of a quantized model out of the checkpoint's memory map; return bytes.

    transformers loads safetensors zero-copy: embeddings, norms and the head stay views of the mapped file, which
    keeps the whole file mapped, and every page the quantizer read stays in the process's RSS. Measured on a
    100 M-parameter model in NF4: 490 MiB of file pages for 51 MiB of weights. After the copy the mapping goes
    away; freed heap is handed back to the OS where glibc allows it.
    """
    copied = 0
    with torch.no_grad():
        for p in model.parameters():  # each shared (tied) parameter once: ties survive
            if hasattr(p, "quant_state") or hasattr(p, "SCB") or p.dtype in (torch.uint8, torch.int8):
                continue
            p.data = p.data.clone()
            copied += p.numel() * p.element_size()
    gc.collect()
    if sys.platform.startswith("linux"):
        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL("libc.so.6").malloc_trim(0)
    return copied


def keep_4bit_differentiable(model: nn.Module) -> int:
    """Stop bitsandbytes from repacking 4-bit weights into its CPU inference layout; undo it where done.

    bitsandbytes 0.50 on CPUs with AVX512-BF16: the first eval-mode, no-grad forward of a ``Linear4bit``
    repacks its weight for a fast kernel (``gemv_4bit``) and keeps it so. That op has no autograd, so every
    later *training* forward back-propagates nothing through the base layers: LoRA gradients come out
    silently zero (torch only warns "an autograd kernel was not registered"). Evaluate-then-train is exactly
    our round loop. Returns the number of layers that had to be unpacked.
    """
    bnb = sys.modules.get("bitsandbytes")
    if bnb is None:  # not imported: no Linear4bit can exist
        return 0
    try:
        from bitsandbytes.functional import _convert_weight_packed_for_cpu_inverse as unpack
    except ImportError:  # a bitsandbytes without the CPU packing path
        unpack = None
    unpacked = 0
    for module in model.modules():
        if not isinstance(module, bnb.nn.Linear4bit):
            continue
        module.support_avx512bf16_for_cpu = False
        state = getattr(module.weight, "quant_state", None)
        if unpack is not None and state is not None and getattr(state, "packing_format_for_cpu", False):
            module.weight.data, module.weight.quant_state = unpack(module.weight.data, state)
            unpacked += 1
    return unpacked


def weight_bytes(model: nn.Module) -> int:
    """Bytes held by a model's weights: every parameter and buffer, plus bitsandbytes' quantization state
    (absmax scales, codebooks, offsets, and the nested state of double quantization). Shared tensors count once."""
    seen: set[tuple[int, int]] = set()
    total = 0

    def add(t: Any) -> None:
        nonlocal total
        if not isinstance(t, torch.Tensor):
            return
        key = (t.data_ptr(), t.numel())
        if key in seen:
            return
        seen.add(key)
        total += t.numel() * t.element_size()

    def add_state(qs: Any) -> None:
        while qs is not None:
            for name in ("absmax", "code", "offset"):
                add(getattr(qs, name, None))
            qs = getattr(qs, "state2", None)

    for p in model.parameters():
        add(p)
        add_state(getattr(p, "quant_state", None))
        add(getattr(p, "SCB", None))  # 8-bit: per-row scales
    for b in model.buffers():
        add(b)
    return total


# ---------------------------------------------------------------------------------------------------------
# Targets and fingerprint
# ---------------------------------------------------------------------------------------------------------


def base_model_fingerprint(path: Path) -> str:
    """A short hash identifying a base model: canonical config.json + names and sizes of the weight files.

    Cheap by design (never reads weights). Version-dependent config keys are dropped so that clients on
    different transformers releases still agree.
    """
    path = _check_model_dir(path)
    config = _read_config(path)
    config = {k: v for k, v in config.items() if k not in _VOLATILE_CONFIG_KEYS}
    weights = sorted(
        (p.name, p.stat().st_size)
        for p in path.iterdir()
        if p.is_file() and (p.name.endswith(_WEIGHT_SUFFIXES) or p.name.endswith(_WEIGHT_INDEX_SUFFIX))
    )
    if not weights:
        raise ConfigError(f"{path} holds no weight files")
    canon = json.dumps({"config": config, "weights": weights}, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canon.encode()).hexdigest()[:16]
