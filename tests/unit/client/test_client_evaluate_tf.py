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


def _tiny_causal(family: str, vocab: int) -> Any:
    import transformers

    common = {"vocab_size": vocab, "num_hidden_layers": 2, "num_attention_heads": 4, "intermediate_size": 64}
    configs = {
        "llama": lambda: transformers.LlamaConfig(hidden_size=32, **common),
        "gemma2": lambda: transformers.Gemma2Config(hidden_size=32, head_dim=8, num_key_value_heads=4, **common),
        "phi3": lambda: transformers.Phi3Config(hidden_size=32, num_key_value_heads=4, pad_token_id=0, **common),
        "gpt_neox": lambda: transformers.GPTNeoXConfig(hidden_size=32, max_position_embeddings=128, **common),
        "gpt2": lambda: transformers.GPT2Config(vocab_size=vocab, n_embd=32, n_layer=2, n_head=4, n_positions=128),
    }
    torch.manual_seed(0)
    return transformers.AutoModelForCausalLM.from_config(configs[family]()).eval()


@pytest.mark.parametrize("family", ["llama", "gemma2", "phi3", "gpt_neox", "gpt2"])
def test_shared_prefix_cache_gives_the_full_forward_logits(tok, family: str) -> None:  # type: ignore[no-untyped-def]
    from fedquic.client.data import collate, encode_example, pad_id
    from fedquic.client.evaluate import _SharedPrefix, _tail_logits

    model = _tiny_causal(family, len(tok))
    rng = random.Random(1)
    examples = [
        Example(f"Reverse the word: {''.join(rng.choices('abcdefgh', k=rng.randint(1, 9)))}=", "ab" * rng.randint(1, 3))
        for _ in range(9)
    ]
    encoded = [encode_example(tok, ex, 64) for ex in examples]
    with torch.no_grad():
        prefix = _SharedPrefix.build(model, encoded, torch.device("cpu"))
        assert prefix is not None
        n = prefix.ids.shape[1]
        assert n >= len(tok("Reverse the word: ", add_special_tokens=False)["input_ids"])
        first_label = min(next(i for i, lab in enumerate(e.labels) if lab != -100) for e in encoded)
        assert n <= first_label - 1  # the position predicting the first answer token is never in the cache
        batch = collate(encoded, pad_id(tok))
        keep = batch.input_ids.shape[1] - (first_label - 1)
        want = _tail_logits(model, batch.input_ids, batch.attention_mask, keep)
        got = prefix.tail_logits(model, batch.input_ids, batch.attention_mask, keep)
        again = prefix.tail_logits(model, batch.input_ids, batch.attention_mask, keep)  # the cache is not consumed
    assert got is not None and got.shape == want.shape
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(again, want, atol=1e-4, rtol=1e-4)


def test_no_shared_prefix_without_common_tokens(tok) -> None:  # type: ignore[no-untyped-def]
    from fedquic.client.data import encode_example
    from fedquic.client.evaluate import _SharedPrefix

    model = _tiny_causal("llama", len(tok))
    encoded = [encode_example(tok, Example(p, "x"), 64) for p in ("abcdefgh=", "zyxwvuts=")]
    shared = 1 if tok.bos_token_id is not None else 0  # at most the bos: below MIN_TOKENS
    assert shared < _SharedPrefix.MIN_TOKENS
    assert _SharedPrefix.build(model, encoded, torch.device("cpu")) is None
