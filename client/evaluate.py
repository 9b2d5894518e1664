"""Held-out evaluation: loss, exact-match accuracy of greedy generations, multiple-choice accuracy by option
log-likelihood (the "logits method"), and classification accuracy.

Every function takes a :class:`~fedquic.client.fedalt.FedALTModel` or a bare model (anything that maps
``input_ids``/``attention_mask`` to an output with ``.logits``), runs without gradients in eval mode, and
restores the model's train/eval mode afterwards. Sequences are right-padded and scored at each row's own
positions; with a causal mask, padding after a row's last token changes none of its logits, so batched
results equal one-at-a-time forward passes.

Prompts are encoded as in training (:func:`fedquic.client.data.encode_example`): ``[bos] prompt``, then the
response or option tokens, tokenized separately.
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Iterator, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from fedquic.common.errors import ConfigError
from torch import nn

from .data import IGNORE_INDEX, Example, _text_ids, pad_id, prompt_ids, tokenize_examples

log = logging.getLogger(__name__)


def _module(model: Any) -> nn.Module:
    from .fedalt import FedALTModel

    return model.model if isinstance(model, FedALTModel) else model


@contextlib.contextmanager
def _eval_mode(module: nn.Module) -> Iterator[None]:
    was_training = module.training
    module.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        module.train(was_training)


def _device(module: nn.Module) -> torch.device:
    for p in module.parameters():
        return p.device
    return torch.device("cpu")


def _prefix(tokenizer: Any, prompt: str) -> list[int]:
    return prompt_ids(tokenizer, prompt)  # as in training, chat template included


def _right_pad(rows: Sequence[Sequence[int]], pad: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = torch.tensor(list(r), dtype=torch.long)
        mask[i, : len(r)] = 1
    return ids.to(device), mask.to(device)


def normalize_answer(text: str) -> str:
    """Case-folded, surrounding whitespace removed, inner whitespace runs collapsed to one space."""
    return " ".join(text.casefold().split())


def greedy_generate(
    model: Any, tokenizer: Any, prompts: Sequence[str], *, max_new_tokens: int = 32, batch_size: int = 8
) -> list[str]:
    """Greedy continuation of each ``[bos] prompt`` until eos or ``max_new_tokens``; the decoded new text.

    No KV cache: every step re-runs the (short) sequences, which keeps right padding exact for any model.
    """
    if max_new_tokens <= 0 or batch_size <= 0:
        raise ConfigError("max_new_tokens and batch_size must be positive")
    module = _module(model)
    eos, pad = tokenizer.eos_token_id, pad_id(tokenizer)
    device = _device(module)
    outputs: list[str] = []
    with _eval_mode(module):
        for lo in range(0, len(prompts), batch_size):
            seqs = [_prefix(tokenizer, p) for p in prompts[lo : lo + batch_size]]
            new: list[list[int]] = [[] for _ in seqs]
            active = list(range(len(seqs)))
            for _ in range(max_new_tokens):
                if not active:
                    break
                ids, mask = _right_pad([seqs[i] for i in active], pad, device)
                logits = module(input_ids=ids, attention_mask=mask).logits
                last = mask.sum(dim=1) - 1
                nxt = logits[torch.arange(len(active), device=device), last].argmax(dim=-1).tolist()
                still = []
                for i, tok in zip(active, nxt, strict=True):
                    if tok == eos:
                        continue
                    seqs[i].append(int(tok))
                    new[i].append(int(tok))
                    still.append(i)
                active = still
            outputs.extend(tokenizer.decode(n, skip_special_tokens=True) for n in new)
    return outputs


def exact_match_accuracy(
    model: Any,
    tokenizer: Any,
    examples: Sequence[Example],
    *,
    max_new_tokens: int | None = None,
    batch_size: int = 8,
) -> float:
    """Share of examples whose greedy generation equals the response after :func:`normalize_answer`.

    ``max_new_tokens`` defaults to the longest reference response (in tokens) plus one for eos: a generation
    that has not stopped by then cannot match.
    """
    if not examples:
        return float("nan")
    if max_new_tokens is None:
        max_new_tokens = max(len(_text_ids(tokenizer, ex.response)) for ex in examples) + 1
    outs = greedy_generate(
        model, tokenizer, [ex.prompt for ex in examples], max_new_tokens=max_new_tokens, batch_size=batch_size
    )
    hits = sum(normalize_answer(o) == normalize_answer(ex.response) for o, ex in zip(outs, examples, strict=True))
    return hits / len(examples)


def teacher_forced_correct(
    model: Any, tokenizer: Any, examples: Sequence[Example], *, max_len: int = 48, batch_size: int = 32
) -> list[bool]:
    """Per example: whether every response token *and* the eos after it is the argmax given the true prefix.

    This is exactly greedy exact match (no normalisation: case counts): greedy decoding reproduces
    ``response + eos`` iff at each of those positions the argmax is the next reference token, and a greedy run
    that stops early or continues differs at the first position where it deviates. One forward pass per batch
    instead of one per generated token. Examples are encoded as in training (:func:`encode_example`); one that
    ``max_len`` cuts (prompt or response) counts as wrong.
    """
    from .data import collate, encode_example

    module = _module(model)
    device = _device(module)
    pad = pad_id(tokenizer)
    every = [encode_example(tokenizer, ex, max_len) for ex in examples]
    # Batches of similar length: a batch is padded to its longest item, and with prompts of mixed lengths an
    # unsorted batch spends a large share of its compute on padding. Results go back in the caller's order.
    order = sorted(range(len(every)), key=lambda i: len(every[i].input_ids))
    out: list[bool] = [False] * len(every)
    with _eval_mode(module):
        prefix = _SharedPrefix.build(module, every, device)
        for lo in range(0, len(order), batch_size):
            idx = order[lo : lo + batch_size]
            encoded = [every[i] for i in idx]
            batch = collate(encoded, pad).to(device)
            # Only the positions that predict a response token need logits: with a real vocabulary (49k for
            # SmolLM2) the full [batch, seq, vocab] tensor is most of the memory and a fifth of the compute.
            width = batch.input_ids.shape[1]
            labelled = (batch.labels != IGNORE_INDEX).any(dim=0).nonzero()
            keep = width - max(int(labelled[0]) - 1, 0) if len(labelled) else width
            logits = None if prefix is None else prefix.tail_logits(module, batch.input_ids, batch.attention_mask, keep)
            if logits is None:
                prefix = None  # the model took no cache: every batch runs whole
                logits = _tail_logits(module, batch.input_ids, batch.attention_mask, keep)
            pred = logits[:, :-1].argmax(dim=-1)  # prediction for position t+1
            target = batch.labels[:, width - keep + 1 :]
            scored = target != IGNORE_INDEX
            ok = ((pred == target) | ~scored).all(dim=1)
            for i, e, good in zip(idx, encoded, ok.tolist(), strict=True):
                out[i] = bool(good) and not e.truncated  # cut by max_len: not the item asked, so not right
    return out


class _SharedPrefix:
    """The key/value cache of the tokens every item starts with, computed once and reused by every batch.

    With a chat template the items of one task share their opening tokens (the template's system and user
    headers, often the instruction too): for the benchmark's short prompts that is a third to a half of each
    sequence. A causal model's states at those positions do not depend on what follows, so running them once
    (batch 1) and the rest against the cache gives the same logits for a fraction of the compute. Only tokens
    before every item's first scored position are shared, so each scored logit still comes from the batch pass.
    """

    MIN_TOKENS = 4  # below this the copy of the cache costs about what it saves

    def __init__(self, ids: torch.Tensor, cache: Any) -> None:
        self.ids = ids
        self.cache = cache
        # transformers 5 names the argument ``cache`` (``past_key_values`` is deprecated); older releases and
        # some models know only ``past_key_values``. The first batch finds out which this model takes.
        self.names = ["cache", "past_key_values"]

    @classmethod
    def build(cls, module: nn.Module, encoded: Sequence[Any], device: torch.device) -> _SharedPrefix | None:
        if len(encoded) < 2:
            return None
        first = encoded[0].input_ids
        n = min(_first_label(e) for e in encoded) - 1  # the position that predicts the first label stays out
        for e in encoded[1:]:
            n = _common(e.input_ids, first, min(n, len(e.input_ids)))
        if n < cls.MIN_TOKENS:
            return None
        ids = torch.tensor([first[:n]], dtype=torch.long, device=device)
        try:
            out = module(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=True)
        except (TypeError, ValueError, NotImplementedError) as exc:
            log.debug("no shared-prefix cache: %s", exc)
            return None
        cache = getattr(out, "cache", None) or getattr(out, "past_key_values", None)
        if not (hasattr(cache, "batch_repeat_interleave") and hasattr(cache, "get_seq_length")):
            return None
        if cache.get_seq_length() != n:
            return None
        return cls(ids, cache)

    def tail_logits(self, module: nn.Module, ids: torch.Tensor, mask: torch.Tensor, keep: int) -> torch.Tensor | None:
        """Logits of the last ``keep`` positions of ``ids`` (which start with the prefix), or None where the
        model takes no cache."""
        import copy

        n = self.ids.shape[1]
        while self.names:
            cache = copy.deepcopy(self.cache)
            cache.batch_repeat_interleave(ids.shape[0])
            args = {self.names[0]: cache, "use_cache": True, "logits_to_keep": keep}
            try:
                logits = module(input_ids=ids[:, n:], attention_mask=mask, **args).logits
            except (TypeError, ValueError, NotImplementedError) as exc:
                log.debug("shared-prefix cache refused as %s: %s", self.names[0], exc)
                logits = None
            # A model that takes any keyword may have ignored the cache: it then grew by nothing, and its logits
            # (without the prefix as context) are not the ones wanted.
            if logits is not None and cache.get_seq_length() == ids.shape[1]:
                del self.names[1:]  # this name works: keep only it
                return logits[:, logits.shape[1] - keep :]
            self.names.pop(0)
        return None


def _first_label(e: Any) -> int:
    return next((i for i, lab in enumerate(e.labels) if lab != IGNORE_INDEX), len(e.labels))


def _common(a: Sequence[int], b: Sequence[int], n: int) -> int:
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


def _tail_logits(module: nn.Module, ids: torch.Tensor, mask: torch.Tensor, keep: int) -> torch.Tensor:
    """Logits of the last ``keep`` positions: transformers' ``logits_to_keep`` where the model takes it (the head
    then runs on those positions only), else the full logits sliced."""
    if keep < ids.shape[1]:
        try:
            logits = module(input_ids=ids, attention_mask=mask, logits_to_keep=keep).logits
        except TypeError:  # a model without the argument
            pass
        else:  # a model that takes any keyword may have ignored it: slice what came back
            return logits[:, logits.shape[1] - keep :]
    return module(input_ids=ids, attention_mask=mask).logits[:, ids.shape[1] - keep :]


def teacher_forced_accuracy(
    model: Any, tokenizer: Any, examples: Sequence[Example], *, max_len: int = 48, batch_size: int = 64
) -> float:
    """Share of examples :func:`teacher_forced_correct` accepts (nan without examples)."""
    if not examples:
        return float("nan")
    hits = teacher_forced_correct(model, tokenizer, examples, max_len=max_len, batch_size=batch_size)
    return sum(hits) / len(hits)


def option_logprobs(
    model: Any, tokenizer: Any, prompt: str, options: Sequence[str], *, batch_size: int = 16
) -> list[float]:
    """For each option, the sum over its tokens of log p(token | [bos] prompt, earlier option tokens)."""
    return score_options(model, tokenizer, [(prompt, list(options))], batch_size=batch_size)[0]


def score_options(
    model: Any, tokenizer: Any, items: Sequence[tuple[str, Sequence[str]]], *, batch_size: int = 16
) -> list[list[float]]:
    """:func:`option_logprobs` for many (prompt, options) pairs, every (prompt, option) sequence batched."""
    module = _module(model)
    device = _device(module)
    pad = pad_id(tokenizer)
    rows: list[tuple[int, list[int], int]] = []  # (item, ids, where the option starts)
    for i, (prompt, options) in enumerate(items):
        prefix = _prefix(tokenizer, prompt)
        if not prefix:
            raise ConfigError("multiple-choice scoring needs a prompt or a bos token to condition on")
        for opt in options:
            opt_ids = _text_ids(tokenizer, opt)
            if not opt_ids:
                raise ConfigError(f"option {opt!r} has no tokens")
            rows.append((i, [*prefix, *opt_ids], len(prefix)))
    scores: list[float] = []
    with _eval_mode(module):
        for lo in range(0, len(rows), batch_size):
            chunk = rows[lo : lo + batch_size]
            ids, mask = _right_pad([r[1] for r in chunk], pad, device)
            logp = F.log_softmax(module(input_ids=ids, attention_mask=mask).logits[:, :-1].float(), dim=-1)
            token_logp = logp.gather(-1, ids[:, 1:].unsqueeze(-1)).squeeze(-1)  # [b, L-1]: log p(ids[t+1] | ..t)
            for j, (_, seq, start) in enumerate(chunk):
                scores.append(float(token_logp[j, start - 1 : len(seq) - 1].sum()))
    out: list[list[float]] = [[] for _ in items]
    for (i, _, _), s in zip(rows, scores, strict=True):
        out[i].append(s)
    return out


def multiple_choice_accuracy(model: Any, tokenizer: Any, examples: Sequence[Example], *, batch_size: int = 16) -> float:
    """Share of examples whose highest-likelihood option (ties: the first) is the answer."""
    mc = [ex for ex in examples if ex.options is not None]
    if not mc:
        return float("nan")
    scores = score_options(model, tokenizer, [(ex.prompt, ex.options or ()) for ex in mc], batch_size=batch_size)
    hits = sum(max(range(len(s)), key=s.__getitem__) == ex.answer for s, ex in zip(scores, mc, strict=True))
    return hits / len(mc)


def classification_accuracy(
    model: Any, tokenizer: Any, examples: Sequence[Example], *, max_len: int = 256, batch_size: int = 16
) -> float:
    """Share of labelled examples a sequence-classification model assigns to their label."""
    labelled = [ex for ex in examples if ex.label is not None]
    if not labelled:
        return float("nan")
    module = _module(model)
    device = _device(module)
    hits = 0
    with _eval_mode(module):
        for batch in tokenize_examples(tokenizer, labelled, max_len, batch_size=batch_size):
            b = batch.to(device)
            logits = module(input_ids=b.input_ids, attention_mask=b.attention_mask).logits
            if logits.dim() != 2:
                raise ConfigError("classification accuracy needs a sequence-classification model")
            assert b.class_labels is not None
            hits += int((logits.argmax(dim=-1) == b.class_labels).sum())
    return hits / len(labelled)


def evaluate(
    model: Any,
    tokenizer: Any,
    examples: Sequence[Example],
    *,
    max_len: int = 48,
    batch_size: int = 8,
    max_new_tokens: int | None = None,
    casefold: bool = False,
) -> dict[str, float]:
    """Every metric that applies to ``examples``: ``loss_eval`` always (for a causal LM: per response token;
    for a classifier: per example), ``acc_exact`` on prompt/response examples, ``acc_mc`` on multiple-choice ones
    and ``acc_cls`` on labelled ones. Metrics that do not apply are left out.

    ``acc_exact`` is strict by default: the greedy answer is the reference token for token, then eos (computed
    teacher-forced, :func:`teacher_forced_correct`: one forward pass per batch, no generation). With
    ``casefold`` the model generates greedily and answers are compared after :func:`normalize_answer` (case and
    whitespace ignored), which is more lenient and much slower."""
    from .fedalt import FedALTModel
    from .trainer import batch_loss

    if not examples:
        return {}
    module = _module(model)
    kinds = {ex.kind for ex in examples}
    out: dict[str, float] = {}
    fam = model if isinstance(model, FedALTModel) else _Bare(module)
    device = _device(module)
    total, count = 0.0, 0
    with _eval_mode(module):
        for kind in sorted(kinds):  # a batch never mixes classification with token targets
            subset = [ex for ex in examples if ex.kind == kind]
            for batch in tokenize_examples(tokenizer, subset, max_len, batch_size=batch_size):
                loss, n = batch_loss(fam, batch.to(device))  # type: ignore[arg-type]
                total, count = total + float(loss), count + n
    out["loss_eval"] = total / count if count else float("nan")
    generation = [ex for ex in examples if ex.kind == "generation"]
    if generation and casefold:
        out["acc_exact"] = exact_match_accuracy(
            model, tokenizer, generation, max_new_tokens=max_new_tokens, batch_size=batch_size
        )
    elif generation:
        out["acc_exact"] = teacher_forced_accuracy(model, tokenizer, generation, max_len=max_len, batch_size=batch_size)
    if "mc" in kinds:
        out["acc_mc"] = multiple_choice_accuracy(model, tokenizer, examples, batch_size=batch_size)
    if "label" in kinds:
        out["acc_cls"] = classification_accuracy(model, tokenizer, examples, max_len=max_len, batch_size=batch_size)
    return {k: v for k, v in out.items() if not math.isnan(v)}


class _Bare:
    """Duck-types the ``.model`` attribute that :func:`fedquic.client.trainer.batch_loss` reads."""

    def __init__(self, module: nn.Module) -> None:
        self.model = module
