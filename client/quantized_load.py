"""Quantized (NF4 / 8-bit) loading that never holds the full-precision model: one checkpoint tensor at a time.

Measured on a 103 M-parameter fp32 Llama (bench/client.py), transformers' own NF4 load from the model directory
peaked at 2.6x the RSS of the fp32 load, for two reasons:

* it opens the safetensors files memory-mapped; each tensor it reads to quantize faults the file's pages into
  the process, and they stay resident (and counted in RSS) until the file is closed at the end of the load: the
  whole fp32 checkpoint (+400 MB of ``RssFile``) sat beside the 4-bit model it was turned into;
* glibc keeps the freed full-precision buffers: after the first multi-megabyte block is freed it raises its mmap
  threshold, later tensors come from the heap, and the holes left between the small long-lived 4-bit results
  are not returned to the OS (+180 MB of ``RssAnon``, of which 54 MB was the 4-bit model; the rest went back
  to the OS with ``malloc_trim``).

transformers itself already materialises and quantizes one tensor at a time when it quantizes on the fly, so we
keep its loading code (key renames and conversions, tied weights, skipped modules, missing-key report, dtype
rules: the same numbers bit for bit) and only change where the tensors come from: the checkpoint's safetensors
files opened with safetensors' ``pread`` backend (every read is a copy into a fresh buffer, no mapping), handed
to ``from_pretrained`` as its ``state_dict`` of lazy slices, and the heap trimmed before each read. At most one
full-precision tensor and its quantization temporaries exist at once.
"""

from __future__ import annotations

import contextlib
import gc
import json
import logging
from pathlib import Path
from typing import Any

from ..common.errors import ConfigError
from ..common.heap import trim

log = logging.getLogger(__name__)

SAFETENSORS_FILE = "model.safetensors"
SAFETENSORS_INDEX = "model.safetensors.index.json"


def safetensors_files(path: Path) -> list[Path] | None:
    """The safetensors files that hold a model directory's weights, in the index's order; ``None`` when the
    directory has none (a ``.bin`` checkpoint: loaded by transformers as before). A sharded index that is not
    readable, or that names a shard the directory lacks, is a :class:`ConfigError`."""
    single = path / SAFETENSORS_FILE
    index = path / SAFETENSORS_INDEX
    if single.is_file():  # transformers prefers the single file too when both exist
        return [single]
    if not index.is_file():
        return None
    try:
        weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        names = list(dict.fromkeys(str(name) for name in weight_map.values()))
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        raise ConfigError(f"cannot read the shard index {index}: {exc}") from exc
    files = [path / name for name in names]
    if not files:
        raise ConfigError(f"the shard index {index} names no weight files")
    missing = [f.name for f in files if not f.is_file()]
    if missing:
        raise ConfigError(f"{path} lacks the checkpoint shards {', '.join(missing)} named in {index.name}")
    return files


class _TrimmedSlice:
    """A safetensors slice that hands freed heap back to the OS before it is read.

    transformers reads each slice (``slice[...]``) right before converting and quantizing that one tensor, after
    the previous tensor's full-precision buffer was freed: trimming here is trimming between tensors. It asks
    only ``get_dtype``/``get_shape`` of a slice otherwise, which are passed through.
    """

    __slots__ = ("_slice",)

    def __init__(self, pslice: Any) -> None:
        self._slice = pslice

    def __getitem__(self, index: Any) -> Any:
        trim()
        return self._slice[index]

    def get_dtype(self) -> str:
        return self._slice.get_dtype()

    def get_shape(self) -> list[int]:
        return self._slice.get_shape()


def _open_shards(files: list[Path], stack: contextlib.ExitStack) -> dict[str, _TrimmedSlice]:
    """Every tensor of the checkpoint as a lazy slice (nothing is read yet); a clear error for a bad file."""
    from safetensors import SafetensorError, safe_open

    state: dict[str, _TrimmedSlice] = {}
    for file in files:
        try:
            handle = stack.enter_context(safe_open(str(file), framework="pt", device="cpu", backend="pread"))
            for key in handle.keys():  # noqa: SIM118  (a safe_open handle is not a mapping)
                if key in state:
                    raise ConfigError(f"tensor {key} is in more than one checkpoint shard ({file.name})")
                state[key] = _TrimmedSlice(handle.get_slice(key))
        except (OSError, SafetensorError) as exc:
            raise ConfigError(f"cannot read checkpoint file {file}: {exc}") from exc
    return state


def _model_class(auto_class: Any, config: Any) -> Any:
    """The concrete class ``auto_class.from_pretrained`` would pick: loading from a state dict needs it, since
    the auto classes insist on a model path."""
    from transformers.models.auto.auto_factory import _get_model_class

    try:
        return _get_model_class(config, auto_class._model_mapping)
    except (KeyError, ValueError) as exc:
        raise ConfigError(f"{type(config).__name__} has no {auto_class.__name__} class: {exc}") from exc


def load_streaming(path: Path, auto_class: Any, kwargs: dict[str, Any], files: list[Path]) -> tuple[Any, dict]:
    """``auto_class.from_pretrained(path, **kwargs)`` (with ``output_loading_info``) reading ``files`` one tensor
    at a time without memory-mapping them; see the module docstring. Returns the model and the loading info."""
    from transformers import AutoConfig, GenerationConfig

    kwargs = dict(kwargs)
    kwargs.pop("local_files_only", None)
    # Config attributes given to from_pretrained with a path (num_labels) go into the config; with a config
    # object they would go to the model's __init__ instead: apply them here, as transformers would.
    config_kwargs = {k: kwargs.pop(k) for k in ("num_labels",) if k in kwargs}
    config = AutoConfig.from_pretrained(str(path), local_files_only=True, **config_kwargs)
    model_cls = _model_class(auto_class, config)
    from safetensors import SafetensorError

    with contextlib.ExitStack() as stack:
        state = _open_shards(files, stack)
        try:
            model, info = model_cls.from_pretrained(None, config=config, state_dict=state, **kwargs)
        except SafetensorError as exc:  # a shard cut short: its header promised more bytes than it holds
            raise ConfigError(f"cannot read the checkpoint in {path}: {exc}") from exc
        del state
    # From a path, transformers records it and reads generation_config.json; from a state dict it cannot.
    model.name_or_path = str(path)
    model.config._name_or_path = str(path)
    if model.can_generate() and (path / "generation_config.json").is_file():
        try:
            model.generation_config = GenerationConfig.from_pretrained(str(path), local_files_only=True)
        except (OSError, ValueError) as exc:
            log.warning("%s: generation_config.json ignored: %s", path.name, exc)
    gc.collect()
    trim()
    log.debug("%s: streamed %d checkpoint file(s) into a quantized model", path.name, len(files))
    return model, info
