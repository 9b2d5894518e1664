"""Client data: synthetic heterogeneous string tasks (one per demo client), JSONL loading, tokenization.

A synthetic example is ``prompt="reverse: abcde="``, ``response="edcba"``; the loss is on the response only.

JSONL records, one per line:

* ``{"prompt", "response"}``: supervised generation (loss on the response; exact-match accuracy on held-out data);
* ``{"text"}``: plain language-model text;
* ``{"prompt", "options": [...], "answer": i}``: multiple choice. Trained as generation of the right option;
  evaluated by comparing the options' log-likelihoods (:mod:`fedquic.client.evaluate`);
* ``{"text", "label": k}``: classification, for sequence-classification models (cross-entropy on the label).
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
    """One example; ``prompt`` may be empty (plain-text LM data).

    Multiple choice: ``options`` and ``answer`` are set and ``response`` is the right option. Classification:
    ``label`` is set, ``prompt`` is the text to classify and ``response`` is empty.
    """

    prompt: str
    response: str
    options: tuple[str, ...] | None = None
    answer: int | None = None
    label: int | None = None

    @property
    def kind(self) -> str:
        """``mc``, ``label``, ``generation`` (a prompt and a response) or ``text``."""
        if self.options is not None:
            return "mc"
        if self.label is not None:
            return "label"
        return "generation" if self.prompt else "text"


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


def make_mc_examples(task: str, n: int, seed: int, num_options: int = 4) -> list[Example]:
    """Multiple-choice versions of :func:`make_examples`: the right answer among other tasks' answers (or random
    strings) for the same input, at a random position. Deterministic in (task, seed, num_options)."""
    if num_options < 2:
        raise ConfigError(f"num_options must be >= 2, got {num_options}")
    rng = random.Random(f"fedquic:mc:{task}:{seed}:{num_options}")
    out = []
    for ex in make_examples(task, n, seed):
        s = ex.prompt[len(task) + 2 : -1]
        wrong = {fn(s) for name, fn in TASKS.items() if name != task} - {ex.response}
        choices = sorted(wrong)
        rng.shuffle(choices)
        while len(choices) < num_options - 1:
            c = "".join(rng.choices(string.ascii_lowercase, k=len(s)))
            if c != ex.response and c not in choices:
                choices.append(c)
        options = choices[: num_options - 1]
        answer = rng.randrange(num_options)
        options.insert(answer, ex.response)
        out.append(Example(ex.prompt, ex.response, options=tuple(options), answer=answer))
    return out


def make_label_examples(n: int, seed: int, num_labels: int = 2) -> list[Example]:
    """Classification examples: random lowercase strings labelled by which ``num_labels``-th of the alphabet
    their first letter falls in (learnable from one token, balanced)."""
    if num_labels < 2:
        raise ConfigError(f"num_labels must be >= 2, got {num_labels}")
    rng = random.Random(f"fedquic:label:{seed}:{num_labels}")
    out = []
    for _ in range(n):
        s = "".join(rng.choices(string.ascii_lowercase, k=rng.randint(MIN_LEN, MAX_LEN)))
        out.append(Example(prompt=s, response="", label=(ord(s[0]) - ord("a")) * num_labels // 26))
    return out


def make_task_examples(task: str, n: int, seed: int) -> list[Example]:
    """Synthetic data by name: a generation task (``reverse``...), its multiple-choice form (``mc-reverse``) or
    ``label`` (two-class classification, :func:`make_label_examples`)."""
    if task == "label":
        return make_label_examples(n, seed)
    if task.startswith("mc-"):
        return make_mc_examples(task[3:], n, seed)
    return make_examples(task, n, seed)


def load_jsonl(path: Path) -> list[Example]:
    """Read JSONL records (see the module docstring for the four kinds), one JSON object a line; skip blank
    lines."""
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
    if "options" in rec:
        prompt, options, answer = rec.get("prompt"), rec.get("options"), rec.get("answer")
        if not isinstance(prompt, str):
            raise ConfigError(f"{where}: 'prompt' must be a string")
        if not isinstance(options, list) or len(options) < 2 or not all(isinstance(o, str) for o in options):
            raise ConfigError(f"{where}: 'options' must be a list of at least two strings")
        if not isinstance(answer, int) or isinstance(answer, bool) or not 0 <= answer < len(options):
            raise ConfigError(f"{where}: 'answer' must be the index of the right option (0..{len(options) - 1})")
        return Example(prompt, options[answer], options=tuple(options), answer=answer)
    if "label" in rec:
        text, label = rec.get("text"), rec.get("label")
        if not isinstance(text, str) or not isinstance(label, int) or isinstance(label, bool) or label < 0:
            raise ConfigError(f"{where}: a classification record is {{'text': str, 'label': int >= 0}}")
        return Example(prompt=text, response="", label=label)
    if "prompt" in rec or "response" in rec:
        prompt, response = rec.get("prompt"), rec.get("response")
        if not isinstance(prompt, str) or not isinstance(response, str):
            raise ConfigError(f"{where}: 'prompt' and 'response' must both be strings")
        return Example(prompt=prompt, response=response)
    text = rec.get("text")
    if isinstance(text, str):
        return Example(prompt="", response=text)
    raise ConfigError(
        f"{where}: expected keys 'prompt'+'response', 'text', 'prompt'+'options'+'answer' or 'text'+'label', "
        f"got {sorted(rec)[:5]}"
    )


# ---------------------------------------------------------------------------------------------------------
# Tokenization
# ---------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Encoded:
    """One tokenized example: ``labels`` is IGNORE_INDEX on the prompt (and bos); ``label``: its class."""

    input_ids: list[int]
    labels: list[int]
    label: int | None = None


@dataclass
class Batch:
    """Right-padded model inputs; ``labels`` are aligned with ``input_ids`` (the model shifts).

    ``class_labels`` (one class per row) makes it a classification batch; ``pixel_values`` go to a
    vision-language model with the ids (which then hold its image tokens).
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    labels: torch.Tensor
    class_labels: torch.Tensor | None = None
    pixel_values: torch.Tensor | None = None

    def __len__(self) -> int:
        return int(self.input_ids.shape[0])

    def to(self, device: torch.device | str) -> Batch:
        return Batch(
            self.input_ids.to(device),
            self.attention_mask.to(device),
            self.labels.to(device),
            None if self.class_labels is None else self.class_labels.to(device),
            None if self.pixel_values is None else self.pixel_values.to(device),
        )

    def target_count(self) -> int:
        """What the summed loss of this batch is over: rows (classification) or labelled tokens."""
        if self.class_labels is not None:
            return len(self)
        return int((self.labels[:, 1:] != IGNORE_INDEX).sum())


def prompt_ids(tokenizer: Any, prompt: str) -> list[int]:
    """The tokens a response is conditioned on: the tokenizer's chat template (a user turn and the assistant
    header) when it has one, else ``[bos] prompt``. Training and evaluation both encode prompts with this."""
    if getattr(tokenizer, "chat_template", None) and prompt:
        ids = tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=True
        )
        if isinstance(ids, dict) or hasattr(ids, "keys"):  # some versions return a BatchEncoding
            ids = ids["input_ids"]
        return [int(i) for i in ids]
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    return [*bos, *(tokenizer(prompt, add_special_tokens=False)["input_ids"] if prompt else [])]


def encode_example(tokenizer: Any, example: Example, max_len: int) -> Encoded:
    """``[bos] prompt response [eos]`` with loss on ``response [eos]``.

    Over ``max_len``, the prompt loses tokens from its start (the end, next to the answer, matters most), then
    the response is cut at the end.
    """
    eos = tokenizer.eos_token_id
    if eos is None:
        raise ConfigError("tokenizer has no eos token")
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    if example.label is not None:  # classification: the text alone (its start kept), scored at its last token
        text = tokenizer(example.prompt, add_special_tokens=False)["input_ids"] if example.prompt else []
        ids = [*bos, *text][:max_len]
        return Encoded(input_ids=ids, labels=[IGNORE_INDEX] * len(ids), label=example.label)
    prompt = prompt_ids(tokenizer, example.prompt)
    # prompt_ids already starts with bos (or the chat template's own start): keep it whole when cutting
    head = 1 if prompt and bos and prompt[0] == bos[0] else 0
    bos, prompt = prompt[:head], prompt[head:]
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
    class_labels = None
    if any(e.label is not None for e in encoded):
        if not all(e.label is not None for e in encoded):
            raise ConfigError("a batch mixes classification examples with others")
        class_labels = torch.tensor([e.label for e in encoded], dtype=torch.long)
    return Batch(input_ids=ids, attention_mask=mask, labels=labels, class_labels=class_labels)


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
