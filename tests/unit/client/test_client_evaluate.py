"""Evaluation: exact match of greedy generations, multiple choice by option log-likelihood, classification.

Two kinds of check: a bigram "model" whose answers are known in closed form (so the expected accuracy is
forced), and a real 4-bit tiny Llama with a non-trivial adapter whose batched, right-padded scores must equal
brute-force one-sequence-at-a-time forward passes.
"""

from __future__ import annotations

import math
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
import torch
from fedquic.client.data import Example, make_label_examples, make_mc_examples
from fedquic.client.evaluate import (
    classification_accuracy,
    evaluate,
    exact_match_accuracy,
    greedy_generate,
    multiple_choice_accuracy,
    normalize_answer,
    option_logprobs,
    score_options,
)
from fedquic.client.fedalt import FedALTModel, LoraSpec
from fedquic.common.adapter import init_lora_state
from torch import nn

pytestmark = pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning")


class Bigram(nn.Module):
    """logits[b, t] = table[input_ids[b, t]]: the next token depends on the current one only."""

    def __init__(self, table: torch.Tensor) -> None:
        super().__init__()
        self.table = nn.Parameter(table)
        self.calls = 0

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, **_: Any) -> Any:
        self.calls += 1
        return SimpleNamespace(logits=self.table[input_ids])


@pytest.fixture(scope="module")
def tok(tiny_model_dir):  # type: ignore[no-untyped-def]
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(tiny_model_dir), local_files_only=True)


def tid(tok: Any, ch: str) -> int:
    (i,) = tok(ch, add_special_tokens=False)["input_ids"]
    return int(i)


def bigram(tok: Any) -> Bigram:
    """After '=' comes 'a', after 'a' 'b', after 'b' eos; after 'z' 'z' forever; everything else: eos."""
    v = len(tok)
    table = torch.zeros(v, v)
    table[:, tok.eos_token_id] = 5.0
    table[tid(tok, "="), tid(tok, "a")] = 10.0
    table[tid(tok, "a"), tid(tok, "b")] = 10.0
    table[tid(tok, "z"), tid(tok, "z")] = 10.0
    return Bigram(table)


def test_normalize_answer() -> None:
    assert normalize_answer("  Hello \t  World\n") == "hello world"
    assert normalize_answer("ABC") == normalize_answer("abc") != normalize_answer("ab c")


def test_greedy_generation_and_exact_match_on_a_known_model(tok) -> None:  # type: ignore[no-untyped-def]
    model = bigram(tok)
    outs = greedy_generate(model, tok, ["copy: xy=", "q=", "zz", "no"], max_new_tokens=5, batch_size=3)
    assert outs == ["ab", "ab", "zzzzz", ""]  # stops at eos, or at max_new_tokens
    examples = [Example("x=", "ab"), Example("long prompt=", " AB "), Example("y=", "ba"), Example("zz", "z")]
    # "ab", normalised " AB ", wrong order, and "zz" generating z's past the one-token reference
    assert exact_match_accuracy(model, tok, examples) == pytest.approx(0.5)
    assert exact_match_accuracy(model, tok, examples[:2]) == 1.0
    assert exact_match_accuracy(model, tok, examples[2:]) == 0.0
    assert math.isnan(exact_match_accuracy(model, tok, []))


def test_option_logprobs_on_a_known_model(tok) -> None:  # type: ignore[no-untyped-def]
    rng = np.random.default_rng(0)
    v = len(tok)
    table = torch.tensor(rng.standard_normal((v, v)), dtype=torch.float32)
    model = Bigram(table)
    logp = torch.log_softmax(table, dim=-1).numpy()

    def by_hand(prompt: str, option: str) -> float:
        seq = [tok.bos_token_id, *[tid(tok, c) for c in prompt], *[tid(tok, c) for c in option]]
        start = 1 + len(prompt)
        return float(sum(logp[seq[t - 1], seq[t]] for t in range(start, len(seq))))

    prompt, options = "sort: cab=", ["abc", "ba", "cabcab", "x"]
    got = option_logprobs(model, tok, prompt, options, batch_size=3)
    assert got == pytest.approx([by_hand(prompt, o) for o in options], abs=1e-4)
    # accuracy = argmax of those; mark the argmax right in one example and wrong in the other
    best = int(np.argmax(got))
    examples = [
        Example(prompt, options[best], options=tuple(options), answer=best),
        Example(prompt, options[(best + 1) % 4], options=tuple(options), answer=(best + 1) % 4),
    ]
    assert multiple_choice_accuracy(model, tok, examples) == 0.5


@pytest.fixture
def trained_fam(load_tiny) -> FedALTModel:  # type: ignore[no-untyped-def]
    """A 4-bit tiny Llama with a FedALT adapter whose B is not zero (so the adapter changes every logit)."""
    model, _ = load_tiny(gradient_checkpointing=False)
    fam = FedALTModel(model, LoraSpec(rank=4), init_seed=3, mixer="learned")
    state = init_lora_state(fam.schema(), 3)
    rng = np.random.default_rng(1)
    fam.set_local_state({k: v + 0.3 * rng.standard_normal(v.shape).astype(np.float32) for k, v in state.items()})
    fam.set_row_state({k: 0.3 * rng.standard_normal(v.shape).astype(np.float32) for k, v in state.items()})
    fam.set_mixer_state({k: rng.standard_normal(v.shape).astype(np.float32) for k, v in fam.mixer_state().items()})
    return fam


def brute_force_logprob(fam: FedALTModel, tok: Any, prompt: str, option: str) -> float:
    """Sum of log p(option token j | prefix + option[:j]), one unpadded forward pass per token."""
    prefix = [tok.bos_token_id, *tok(prompt, add_special_tokens=False)["input_ids"]]
    opt = tok(option, add_special_tokens=False)["input_ids"]
    total = 0.0
    with torch.no_grad():
        for j, t in enumerate(opt):
            ids = torch.tensor([prefix + opt[:j]])
            logits = fam.model(input_ids=ids).logits[0, -1].float()
            total += float(torch.log_softmax(logits, dim=-1)[t])
    return total


def test_batched_option_scores_equal_brute_force_on_a_real_model(trained_fam: FedALTModel, tok) -> None:  # type: ignore[no-untyped-def]
    items = [("reverse: abc=", ["cba", "abc", "bcaxyz"]), ("count: hello world=", ["11", "5"])]
    batched = score_options(trained_fam, tok, items, batch_size=4)  # rows of different lengths share batches
    for (prompt, options), scores in zip(items, batched, strict=True):
        expected = [brute_force_logprob(trained_fam, tok, prompt, o) for o in options]
        assert scores == pytest.approx(expected, abs=2e-3)
    # Forced: the answer is the brute-force argmax in every example, then its worst option in every example.
    mc = make_mc_examples("reverse", 6, seed=0)
    best = [
        int(np.argmax([brute_force_logprob(trained_fam, tok, ex.prompt, o) for o in ex.options or ()])) for ex in mc
    ]
    right = [Example(ex.prompt, "", options=ex.options, answer=b) for ex, b in zip(mc, best, strict=True)]
    wrong = [Example(ex.prompt, "", options=ex.options, answer=(b + 1) % 4) for ex, b in zip(mc, best, strict=True)]
    assert multiple_choice_accuracy(trained_fam, tok, right) == 1.0
    assert multiple_choice_accuracy(trained_fam, tok, wrong) == 0.0


def test_batched_greedy_generation_equals_one_at_a_time(trained_fam: FedALTModel, tok) -> None:  # type: ignore[no-untyped-def]
    prompts = ["reverse: abcdef=", "sort: ba=", "copy: qwertyu=", "x"]
    batched = greedy_generate(trained_fam, tok, prompts, max_new_tokens=6, batch_size=4)
    alone = [greedy_generate(trained_fam, tok, [p], max_new_tokens=6, batch_size=1)[0] for p in prompts]
    assert batched == alone
    # and by hand, for the first prompt: argmax of the last position, appended, six times (or until eos)
    ids = [tok.bos_token_id, *tok(prompts[0], add_special_tokens=False)["input_ids"]]
    new: list[int] = []
    with torch.no_grad():
        for _ in range(6):
            nxt = int(trained_fam.model(input_ids=torch.tensor([ids])).logits[0, -1].argmax())
            if nxt == tok.eos_token_id:
                break
            ids.append(nxt)
            new.append(nxt)
    assert batched[0] == tok.decode(new, skip_special_tokens=True)


def test_evaluate_reports_what_applies(trained_fam: FedALTModel, tok) -> None:  # type: ignore[no-untyped-def]
    gen = [Example("copy: ab=", "ab"), Example("copy: cd=", "cd")]
    mc = make_mc_examples("sort", 3, seed=1)
    trained_fam.model.train()
    out = evaluate(trained_fam, tok, [*gen, *mc], max_len=48, batch_size=2)
    assert trained_fam.model.training  # mode restored
    assert set(out) == {"loss_eval", "acc_exact", "acc_mc"}
    assert out["acc_exact"] == exact_match_accuracy(trained_fam, tok, gen)
    assert out["acc_mc"] == multiple_choice_accuracy(trained_fam, tok, mc)
    assert 0 < out["loss_eval"] < 50
    assert set(evaluate(trained_fam, tok, [Example("", "plain text")])) == {"loss_eval"}
    assert evaluate(trained_fam, tok, []) == {}


def test_classification_accuracy_matches_the_argmax(tmp_path) -> None:  # type: ignore[no-untyped-def]
    from fedquic.client.model import LoadSpec, build_tiny_classifier, load_base_model

    path = build_tiny_classifier(tmp_path / "cls", num_labels=3, seed=1)
    model, tok = load_base_model(path, LoadSpec(gradient_checkpointing=False))
    examples = make_label_examples(12, seed=0, num_labels=3)
    preds = []
    with torch.no_grad():
        for ex in examples:  # one at a time, unpadded
            ids = torch.tensor([[tok.bos_token_id, *tok(ex.prompt, add_special_tokens=False)["input_ids"]]])
            preds.append(int(model(input_ids=ids).logits[0].argmax()))
    forced = [Example(ex.prompt, "", label=p) for ex, p in zip(examples, preds, strict=True)]
    assert classification_accuracy(model, tok, forced, batch_size=5) == 1.0
    shifted = [Example(ex.prompt, "", label=(p + 1) % 3) for ex, p in zip(examples, preds, strict=True)]
    assert classification_accuracy(model, tok, shifted, batch_size=5) == 0.0
    out = evaluate(model, tok, forced, batch_size=5)
    assert set(out) == {"loss_eval", "acc_cls"} and out["acc_cls"] == 1.0
