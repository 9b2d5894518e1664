"""Teacher-forced accuracy equals greedy exact match (case-sensitive), checked against real greedy decoding."""

from __future__ import annotations

import random
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from fedquic.client.data import Example
from fedquic.client.evaluate import greedy_generate, teacher_forced_accuracy, teacher_forced_correct
from torch import nn


class Bigram(nn.Module):
    def __init__(self, table: torch.Tensor) -> None:
        super().__init__()
        self.table = nn.Parameter(table)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, **_: Any) -> Any:
        return SimpleNamespace(logits=self.table[input_ids])


@pytest.fixture(scope="module")
def tok(tiny_model_dir):  # type: ignore[no-untyped-def]
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(tiny_model_dir), local_files_only=True)


def test_teacher_forced_matches_greedy_decoding(tok) -> None:  # type: ignore[no-untyped-def]
    vocab = len(tok)
    gen = torch.Generator().manual_seed(0)
    table = torch.randn(vocab, vocab, generator=gen)
    letters = [tok.convert_tokens_to_ids(c) for c in "abcdefghijklmnopqrstuvwxyzABCDEFGHIJ"]
    others = [i for i in range(vocab) if i not in letters]
    table[:, others] -= 20.0  # generations stay within the letters...
    for t in letters[::3]:  # ...and a third of the letters end one
        table[t, tok.eos_token_id] = 10.0
    model = Bigram(table)
    rng = random.Random(0)
    prompts = [f"p: {''.join(rng.choices('abcdefghij', k=rng.randint(1, 5)))}=" for _ in range(60)]
    outs = greedy_generate(model, tok, prompts, max_new_tokens=12)
    examples = []
    for p, o in zip(prompts, outs, strict=True):
        variants = [o, o[:-1], o + "a", (o[:-1] + ("Z" if o[-1:] != "Z" else "Y")) if o else "a", o.upper()]
        examples += [Example(p, v) for v in variants if v]
    got = teacher_forced_correct(model, tok, examples, max_len=48, batch_size=7)
    want = []
    for ex in examples:
        n = len(tok(ex.response, add_special_tokens=False)["input_ids"])
        (g,) = greedy_generate(model, tok, [ex.prompt], max_new_tokens=n + 1)
        want.append(g == ex.response)  # stopped by eos exactly after the response, case-sensitive
    assert got == want
    assert 0 < sum(got) < len(got)  # both outcomes occur
    assert teacher_forced_accuracy(model, tok, examples) == pytest.approx(sum(want) / len(want))


def test_cut_examples_count_as_wrong(tok) -> None:  # type: ignore[no-untyped-def]
    vocab = len(tok)
    table = torch.full((vocab, vocab), -5.0)
    a = tok.convert_tokens_to_ids("a")
    table[:, a] = 5.0  # always "a"
    table[a, tok.eos_token_id] = 0.0
    model = Bigram(table)
    ex = Example("x=", "aaaa")
    assert teacher_forced_correct(model, tok, [ex], max_len=48) == [False]  # never stops: no eos
    table[a, tok.eos_token_id] = 10.0
    assert teacher_forced_correct(model, tok, [Example("x=", "a")], max_len=48) == [True]
    assert teacher_forced_correct(model, tok, [Example("x=", "a")], max_len=3) == [False]  # eos cut off
