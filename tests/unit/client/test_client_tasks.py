"""Benchmark task families and the Dirichlet label-skew split (fedquic.client.tasks)."""

from __future__ import annotations

import random

import numpy as np
import pytest
from fedquic.client.tasks import (
    FAMILIES,
    dirichlet_label_split,
    dirichlet_proportions,
    family_examples,
    split_train_test,
)
from fedquic.common.errors import ConfigError


def _inp(prompt: str) -> str:
    return prompt.split(": ", 1)[1][:-1]  # between "name: " and the final "="


def test_eight_families_answer_correctly() -> None:
    assert len(FAMILIES) == 8
    brackets = {"(": ")", "[": "]", "{": "}", "<": ">"}
    for fam in FAMILIES:
        exs = family_examples(fam, 200, seed=1)
        assert exs == family_examples(fam, 200, seed=1)  # deterministic
        assert exs != family_examples(fam, 200, seed=2)
        for ex in exs:
            assert ex.prompt.endswith("=") and ex.response and len(ex.prompt) + len(ex.response) < 40
            s = _inp(ex.prompt)
            if fam == "copy":
                assert ex.response == s
            elif fam == "reverse":
                assert ex.response == s[::-1]
            elif fam == "sort":
                assert ex.response == "".join(sorted(s))
            elif fam == "add":
                a, b = s.split("+")
                assert int(ex.response) == int(a) + int(b)
            elif fam == "kv":
                pairs, key = s.split(";")
                table = {p[0]: p[1] for p in pairs.split(",")}
                assert len(table) == len(pairs.split(","))  # distinct keys
                assert ex.response == table[key]
            elif fam == "close":
                assert ex.response == "".join(brackets[c] for c in reversed(s))
            elif fam == "swapcase":
                assert ex.response == s.swapcase() and ex.response != s
            elif fam == "count":
                letter = ex.prompt.split(" ")[1][0]
                assert ex.response == str(s.count(letter))


def test_unknown_family() -> None:
    with pytest.raises(ConfigError):
        family_examples("nope", 1, 0)


@pytest.mark.parametrize("fam", sorted(FAMILIES))
def test_train_and_test_share_no_prompt(fam: str) -> None:
    gen = lambda n, s: family_examples(fam, n, s)  # noqa: E731
    train, test = split_train_test(gen, 256, 1000, train_seed=0)
    assert len(train) == 256 and len(test) == 1000
    assert len({e.prompt for e in test}) == 1000
    assert not {e.prompt for e in train} & {e.prompt for e in test}
    train1, test1 = split_train_test(gen, 256, 1000, train_seed=1)
    assert test1 == test and train1 != train  # the test set does not depend on the training seed


def test_dirichlet_skew() -> None:
    p = dirichlet_proportions(8, 10, 0.1, seed=0)
    assert p.shape == (8, 10) and np.allclose(p.sum(axis=1), 1)
    assert (p.max(axis=1) > 0.5).mean() >= 0.5  # small alpha: most clients dominated by one class
    flat = dirichlet_proportions(8, 10, 1000.0, seed=0)
    assert flat.max() < 0.2  # large alpha: close to uniform
    exs = dirichlet_label_split(3, 8, 2000, seed=0, alpha=0.1)
    counts = np.bincount([int(e.response) for e in exs], minlength=10) / 2000
    assert np.abs(counts - p[3]).max() < 0.05
    for e in exs[:200]:
        first = _inp(e.prompt)[0]
        assert (ord(first) - ord("a")) * 10 // 26 == int(e.response)
    with pytest.raises(ConfigError):
        dirichlet_label_split(8, 8, 1, seed=0)


def test_words_use_rng() -> None:
    # the generators only draw from the given rng: same seed, same stream
    a = [FAMILIES["kv"](random.Random(5)) for _ in range(3)]
    b = [FAMILIES["kv"](random.Random(5)) for _ in range(3)]
    assert a == b
