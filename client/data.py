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

import contextlib
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
    return [Example(prompt=f"{task}: {s}=", response=fn(s)) for s in _random_words(rng, n)]


def _random_words(rng: random.Random, n: int) -> list[str]:
    """``n`` random lowercase strings of length MIN_LEN to MAX_LEN (the rng's draws, in order)."""
    return ["".join(rng.choices(string.ascii_lowercase, k=rng.randint(MIN_LEN, MAX_LEN))) for _ in range(n)]


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
    words = _random_words(rng, n)
    return [Example(prompt=s, response="", label=(ord(s[0]) - ord("a")) * num_labels // 26) for s in words]


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
    truncated: bool = False  # max_len cut something (the prompt's content, the response or the text)


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


@dataclass(frozen=True)
class PromptFormat:
    """How a prompt becomes the tokens a response is conditioned on, in training and evaluation alike.

    ``chat_template``: ``None`` uses the tokenizer's chat template when it has one (a user turn, then the
    assistant header), ``False`` never does (``[bos] prompt``), ``True`` requires one. ``system_prompt``:
    ``None`` leaves the template's default system turn as it is (SmolLM2's adds ~20 tokens of its own), ``""``
    sends an empty system turn, any other text replaces it.
    """

    chat_template: bool | None = None
    system_prompt: str | None = None


FORMAT_ATTR = "fedquic_prompt_format"  # on a tokenizer: its PromptFormat (set_prompt_format)


def set_prompt_format(tokenizer: Any, fmt: PromptFormat) -> None:
    """Attach ``fmt`` to ``tokenizer``: every encoder in this package reads it there, so training, held-out
    evaluation and scoring can never disagree on the template."""
    if fmt.chat_template and not getattr(tokenizer, "chat_template", None):
        raise ConfigError("chat_template=True, but this tokenizer has no chat template")
    setattr(tokenizer, FORMAT_ATTR, fmt)


def prompt_format(tokenizer: Any) -> PromptFormat:
    return getattr(tokenizer, FORMAT_ATTR, None) or PromptFormat()


def uses_chat_template(tokenizer: Any) -> bool:
    fmt = prompt_format(tokenizer)
    return fmt.chat_template is not False and bool(getattr(tokenizer, "chat_template", None))


def _text_ids(tokenizer: Any, text: str) -> list[int]:
    return [int(i) for i in tokenizer(text, add_special_tokens=False)["input_ids"]] if text else []


def special_frame(tokenizer: Any) -> tuple[list[int], list[int]]:
    """The special tokens the tokenizer itself puts around a text (BERT: ``[CLS]`` ... ``[SEP]``; Llama:
    ``<s>`` ...); a tokenizer that adds none gets its bos token, if it has one, in front."""
    cached = getattr(tokenizer, "_fedquic_special_frame", None)
    if cached is not None:
        return cached
    probe = "a b"
    plain = _text_ids(tokenizer, probe)
    full = [int(i) for i in tokenizer(probe, add_special_tokens=True)["input_ids"]]
    for i in range(len(full) - len(plain) + 1):
        if full[i : i + len(plain)] == plain:
            pre, post = full[:i], full[i + len(plain) :]
            break
    else:  # specials interleaved with the text: none we can place
        pre, post = [], []
    if not pre and not post and tokenizer.bos_token_id is not None:
        pre = [int(tokenizer.bos_token_id)]
    with contextlib.suppress(AttributeError):  # a tokenizer that takes no attributes is just not cached
        tokenizer._fedquic_special_frame = (pre, post)
    return pre, post


def prompt_ids(tokenizer: Any, prompt: str) -> list[int]:
    """The tokens a response is conditioned on: the chat template (the system turn as :class:`PromptFormat`
    says, a user turn and the assistant header) when it applies, else the tokenizer's leading special tokens
    (its bos) and the prompt. Training and evaluation both encode prompts with this."""
    if uses_chat_template(tokenizer):
        fmt = prompt_format(tokenizer)
        system = [] if fmt.system_prompt is None else [{"role": "system", "content": fmt.system_prompt}]
        try:
            ids = tokenizer.apply_chat_template(
                [*system, {"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=True
            )
        except Exception as exc:  # jinja2's TemplateError: e.g. Gemma's template refuses a system turn
            hint = " (this template may take no system turn: leave --system-prompt unset)" if system else ""
            raise ConfigError(f"the tokenizer's chat template failed: {exc}{hint}") from None
        if isinstance(ids, dict) or hasattr(ids, "keys"):  # some versions return a BatchEncoding
            ids = ids["input_ids"]
        return [int(i) for i in ids]
    return [*special_frame(tokenizer)[0], *_text_ids(tokenizer, prompt)]


def _fit_prompt(tokenizer: Any, prompt: str, budget: int) -> list[int]:
    """``prompt_ids`` of the longest end of ``prompt`` whose encoding takes at most ``budget`` tokens: the
    content is shortened from its start (the end, next to the answer, matters most), never the template."""
    content = _text_ids(tokenizer, prompt)
    keep = len(content)
    while keep > 0:
        text = tokenizer.decode(content[len(content) - keep :])
        ids = prompt_ids(tokenizer, text)
        if len(ids) <= budget:
            return ids
        keep -= max(1, len(ids) - budget)
    return prompt_ids(tokenizer, "")


def encode_example(tokenizer: Any, example: Example, max_len: int) -> Encoded:
    """Generation: ``prompt_ids(prompt) response [eos]`` with loss on ``response [eos]``; plain text:
    ``[bos] text [eos]``; classification: the text inside the tokenizer's own special tokens (``[CLS] text
    [SEP]``), no eos needed.

    Over ``max_len`` the prompt's content is shortened from its start, its template kept whole (a prompt
    template that leaves no room for one answer token is refused with :class:`ConfigError`); then the
    response is cut at its end. ``Encoded.truncated`` says whether anything was cut.
    """
    if example.label is not None:  # classification: the text's start kept, scored at the model's own position
        pre, post = special_frame(tokenizer)
        room = max_len - len(pre) - len(post)
        if room < 1:
            raise ConfigError(f"max_len {max_len} cannot hold the tokenizer's special tokens ({len(pre) + len(post)})")
        text = _text_ids(tokenizer, example.prompt)
        ids = [*pre, *text[:room], *post]
        return Encoded(ids, [IGNORE_INDEX] * len(ids), label=example.label, truncated=len(text) > room)
    eos = tokenizer.eos_token_id
    if eos is None:
        raise ConfigError(
            "this tokenizer has no eos token: generation training needs one to learn where an answer ends"
        )
    response = [*_text_ids(tokenizer, example.response), int(eos)]
    if not example.prompt:  # plain LM text
        bos = special_frame(tokenizer)[0]
        ids = [*bos, *response][:max_len]
        return Encoded(ids, [IGNORE_INDEX] * len(bos) + ids[len(bos) :], truncated=len(bos) + len(response) > max_len)
    prompt = prompt_ids(tokenizer, example.prompt)
    truncated = len(prompt) + len(response) > max_len
    if truncated:
        floor = len(prompt_ids(tokenizer, ""))
        if floor + 1 > max_len:
            raise ConfigError(
                f"max_len {max_len} cannot hold the prompt template ({floor} tokens) and one answer token: "
                "raise --max-len, or shorten the template (--system-prompt '' or --no-chat-template)"
            )
        prompt = _fit_prompt(tokenizer, example.prompt, max(max_len - len(response), floor))
        response = response[: max_len - len(prompt)]
    ids = [*prompt, *response]
    labels = [IGNORE_INDEX] * len(prompt) + response
    return Encoded(input_ids=ids, labels=labels, truncated=truncated)


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
