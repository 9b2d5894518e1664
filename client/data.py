"""Client data: synthetic heterogeneous string tasks (one per demo client), JSONL loading, tokenization.

A synthetic example is ``prompt="reverse: abcde="``, ``response="edcba"``; the loss is on the response only.
"""

from __future__ import annotations

import json
import logging
import random
import string
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from fedquic.common.errors import ConfigError

log = logging.getLogger(__name__)

IGNORE_INDEX = -100  # label value torch's cross_entropy skips
MIN_LEN = 3
MAX_LEN = 8


@dataclass(frozen=True)
class Example:
    """One supervised example; ``prompt`` may be empty (plain-text LM data)."""

    prompt: str
    response: str


def _count(s: str) -> str:
    return str(len(s))


TASKS: dict[str, Callable[[str], str]] = {
    "copy": lambda s: s,
    "reverse": lambda s: s[::-1],
    "sort": lambda s: "".join(sorted(s)),
    "upper": str.upper,
    "count": _count,
}


def known_tasks() -> list[str]:
    return sorted(TASKS)


def make_examples(task: str, n: int, seed: int) -> list[Example]:
    """``n`` examples of ``task`` on random lowercase strings of length 3-8, deterministic in (task, seed)."""
    fn = TASKS.get(task)
    if fn is None:
        raise ConfigError(f"unknown task {task!r}; known tasks: {', '.join(known_tasks())}")
    if n < 0:
        raise ConfigError(f"number of examples must be >= 0, got {n}")
    # str seeds are hashed with sha512 by `random`, so this is stable across runs and PYTHONHASHSEED.
    rng = random.Random(f"fedquic:{task}:{seed}")
    out = []
    for _ in range(n):
        s = "".join(rng.choices(string.ascii_lowercase, k=rng.randint(MIN_LEN, MAX_LEN)))
        out.append(Example(prompt=f"{task}: {s}=", response=fn(s)))
    return out


def load_jsonl(path: Path) -> list[Example]:
    """Read ``{"prompt", "response"}`` or ``{"text"}`` records, one JSON object a line; skip blank lines."""
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read {path}: {exc}") from exc
    out: list[Example] = []
    for lineno, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as exc:
            raise ConfigError(f"{path}:{lineno}: invalid JSON: {exc.msg}") from None
        out.append(_record_to_example(rec, where=f"{path}:{lineno}"))
    if not out:
        raise ConfigError(f"{path}: no examples")
    return out


def _record_to_example(rec: Any, *, where: str) -> Example:
    if not isinstance(rec, dict):
        raise ConfigError(f"{where}: expected a JSON object, got {type(rec).__name__}")
    if "prompt" in rec or "response" in rec:
        prompt, response = rec.get("prompt"), rec.get("response")
        if not isinstance(prompt, str) or not isinstance(response, str):
            raise ConfigError(f"{where}: 'prompt' and 'response' must both be strings")
        return Example(prompt=prompt, response=response)
    text = rec.get("text")
    if isinstance(text, str):
        return Example(prompt="", response=text)
    raise ConfigError(f"{where}: expected keys 'prompt'+'response' or 'text', got {sorted(rec)[:5]}")


# ---------------------------------------------------------------------------------------------------------
# Tokenization
# ---------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Encoded:
    """One tokenized example: ``labels`` is IGNORE_INDEX on the prompt (and bos)."""

    input_ids: list[int]
    labels: list[int]


@dataclass
class Batch:
    """Right-padded causal-LM inputs; ``labels`` are aligned with ``input_ids`` (the model shifts)."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    labels: torch.Tensor

    def __len__(self) -> int:
        return int(self.input_ids.shape[0])

    def to(self, device: torch.device | str) -> Batch:
        return Batch(self.input_ids.to(device), self.attention_mask.to(device), self.labels.to(device))


def encode_example(tokenizer: Any, example: Example, max_len: int) -> Encoded:
    """``[bos] prompt response [eos]`` with loss on ``response [eos]``.

    Over ``max_len``, the prompt loses tokens from its start (the end, next to the answer, matters most), then
    the response is cut at the end.
    """
    eos = tokenizer.eos_token_id
    if eos is None:
        raise ConfigError("tokenizer has no eos token")
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    prompt = tokenizer(example.prompt, add_special_tokens=False)["input_ids"] if example.prompt else []
    response = [*tokenizer(example.response, add_special_tokens=False)["input_ids"], eos]
    overflow = len(bos) + len(prompt) + len(response) - max_len
    if overflow > 0:
        cut = min(overflow, len(prompt))
        prompt = prompt[cut:]
        overflow -= cut
        if overflow > 0:
            response = response[: len(response) - overflow]
    ids = [*bos, *prompt, *response]
    labels = [IGNORE_INDEX] * (len(bos) + len(prompt)) + response
    return Encoded(input_ids=ids, labels=labels)


def collate(encoded: Sequence[Encoded], pad: int) -> Batch:
    width = max(len(e.input_ids) for e in encoded)
    ids = torch.full((len(encoded), width), pad, dtype=torch.long)
    labels = torch.full((len(encoded), width), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(encoded), width), dtype=torch.long)
    for i, e in enumerate(encoded):
        n = len(e.input_ids)
        ids[i, :n] = torch.tensor(e.input_ids)
        labels[i, :n] = torch.tensor(e.labels)
        mask[i, :n] = 1
    return Batch(input_ids=ids, attention_mask=mask, labels=labels)


def pad_id(tokenizer: Any) -> int:
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if pad is None:
        raise ConfigError("tokenizer has neither a pad nor an eos token")
    return int(pad)


def tokenize_examples(tokenizer: Any, examples: Sequence[Example], max_len: int, *, batch_size: int = 8) -> list[Batch]:
    """Encode ``examples`` in order into right-padded batches (padded to the longest in each batch)."""
    if max_len < 2:
        raise ConfigError(f"max_len must be >= 2, got {max_len}")
    if batch_size <= 0:
        raise ConfigError(f"batch_size must be positive, got {batch_size}")
    pad = pad_id(tokenizer)
    encoded = [encode_example(tokenizer, ex, max_len) for ex in examples]
    return [collate(encoded[i : i + batch_size], pad) for i in range(0, len(encoded), batch_size)]
