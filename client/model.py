"""Base-model loading: 4-bit (NF4) loading from a local directory, fingerprints; the tiny models built from code
for tests and demos are :mod:`fedquic.client.tiny_models` (re-exported here).

Everything here works from a local directory only; nothing ever reaches a model hub.
"""

from __future__ import annotations

import contextlib
import gc
import hashlib
import json
import logging
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from fedquic.common.errors import ConfigError
from torch import nn

from ..common.heap import pin_mmap_threshold, trim
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
from .quantized_load import load_streaming, safetensors_files
from .tiny_models import (  # noqa: F401  (re-exported: they were defined here)
    IMAGE_TOKEN,
    _char_tokenizer,
    _save_model_dir,
    _tiny_llama_config,
    build_tiny_classifier,
    build_tiny_llama,
    build_tiny_vlm,
    image_token_count,
)

log = logging.getLogger(__name__)

Quantization = Literal["nf4", "int8", "none"]
ComputeDtype = Literal["float32", "bfloat16"]

_QUANTIZATIONS: tuple[str, ...] = ("nf4", "int8", "none")
_COMPUTE_DTYPES: dict[str, torch.dtype] = {"float32": torch.float32, "bfloat16": torch.bfloat16}

# Config keys that differ between transformers versions / load settings but not between base models.
_VOLATILE_CONFIG_KEYS = frozenset(
    {"transformers_version", "_name_or_path", "torch_dtype", "dtype", "quantization_config", "use_cache"}
)
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf")
_WEIGHT_INDEX_SUFFIX = ".index.json"


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
    # A quantized model dequantizes each weight into a fresh buffer at every use (forward, the recomputed forward
    # of checkpointing, backward): with glibc's dynamic mmap threshold those buffers end up in heap arenas that
    # fragment, and the training peak was up to 0.6 GB of free heap on a 340 M model. Loading a quantized model
    # pins the threshold at this size for the process (common/heap.py); None leaves glibc's own.
    mmap_threshold_mib: float | None = 8.0

    def __post_init__(self) -> None:
        if self.kind not in ("auto", "causal_lm", "seq_cls", "vlm"):
            raise ConfigError(f"kind must be auto, causal_lm, seq_cls or vlm, got {self.kind!r}")
        if self.quantization not in _QUANTIZATIONS:
            raise ConfigError(f"quantization must be one of {list(_QUANTIZATIONS)}, got {self.quantization!r}")
        if self.mmap_threshold_mib is not None and not self.mmap_threshold_mib > 0:
            raise ConfigError(f"mmap_threshold_mib must be positive (or None), got {self.mmap_threshold_mib!r}")
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

    A quantized load from safetensors files streams them (:mod:`fedquic.client.quantized_load`): one tensor in
    full precision at a time, never the whole checkpoint; the result is the same as transformers' own load.

    We do the useful part of peft's ``prepare_model_for_kbit_training`` ourselves: freeze everything and
    turn on non-reentrant gradient checkpointing. We skip its upcast of every non-quantized parameter to
    fp32, which costs gigabytes of RAM for large vocabularies and is unneeded for fp32/bf16 compute; with
    ``use_reentrant=False`` the inputs also need no ``requires_grad`` hook.
    """

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
        if spec.mmap_threshold_mib is not None:
            pin_mmap_threshold(int(spec.mmap_threshold_mib * (1 << 20)))
    model, tokenizer = _from_pretrained(path, kind, kwargs, progress)
    _freeze_for_training(model, tokenizer, spec, kind)
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


def _from_pretrained(path: Path, kind: ModelKind, kwargs: dict[str, Any], progress: bool) -> tuple[Any, Any]:
    """The model and tokenizer from disk; a head the checkpoint lacks is listed on the model (NEW_HEADS_ATTR)."""
    from transformers import AutoTokenizer

    # Quantizing from safetensors streams the checkpoint (client/quantized_load.py); unquantized loads and other
    # checkpoint formats keep transformers' memory-mapped path, whose zero-copy views cost nothing for fp32.
    files = safetensors_files(path) if "quantization_config" in kwargs else None
    try:
        with _quiet_transformers(not progress):
            if files is not None:
                model, info = load_streaming(path, _auto_class(kind), kwargs, files)
            else:
                model, info = _auto_class(kind).from_pretrained(str(path), **kwargs)
                if "quantization_config" in kwargs:
                    release_checkpoint_memory(model)
            tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    except (OSError, ValueError, KeyError) as exc:
        raise ConfigError(f"cannot load base model from {path}: {exc}") from exc
    new = new_head_modules(model, info.get("missing_keys") or ())
    check_heads(model, kind, new, str(path))
    setattr(model, NEW_HEADS_ATTR, new)
    if new:
        log.info("%s: new %s head %s (initialised from the job seed, trained with the adapter)", path.name, kind, new)
    return model, tokenizer


def _freeze_for_training(model: Any, tokenizer: Any, spec: LoadSpec, kind: ModelKind) -> None:
    """Frozen, padded, checkpointed and in eval mode: what peft's prepare_model_for_kbit_training does that we
    need (see :func:`load_base_model`)."""
    keep_4bit_differentiable(model)
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

    Needed after transformers' own (memory-mapped) quantized load, the path a checkpoint without safetensors
    files still takes; the streamed load (:mod:`fedquic.client.quantized_load`) maps nothing. transformers loads
    safetensors zero-copy: embeddings, norms and the head stay views of the mapped file, which
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
    trim()
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
