"""Task families for the learning-quality benchmark (``bench/federated.py``): one family per client, and a
Dirichlet label-skew split of one classification task.

Every family maps a short random input to a short answer, with the family's name at the start of the prompt
(``"rev: abcde="`` -> ``"edcba"``), so a prompt fits in 40 character tokens. Generation is deterministic in
(family, seed). :func:`split_train_test` draws a training set and a held-out test set that share no prompt.

Families: ``copy``, ``reverse``, ``sort``, ``add`` (two-digit addition), ``kv`` (key-value lookup),
``close`` (bracket matching: the closing sequence of an open bracket prefix), ``swapcase`` and ``count``
(occurrences of a letter).

Label skew (:func:`dirichlet_label_split`): a ``num_labels``-class task (the class of a string is the alphabet
bucket of its first letter, answered as one digit), each client's class proportions drawn from
Dirichlet(alpha): small alpha, few classes per client.
"""

from __future__ import annotations

import random
import string
from collections.abc import Callable

import numpy as np

from ..common.errors import ConfigError
from .data import Example

_LOWER = string.ascii_lowercase
_BRACKETS = {"(": ")", "[": "]", "{": "}", "<": ">"}


def _word(rng: random.Random, lo: int = 3, hi: int = 8, alphabet: str = _LOWER) -> str:
    return "".join(rng.choices(alphabet, k=rng.randint(lo, hi)))


def _copy(rng: random.Random) -> tuple[str, str]:
    s = _word(rng)
    return f"copy: {s}=", s


def _reverse(rng: random.Random) -> tuple[str, str]:
    s = _word(rng)
    return f"rev: {s}=", s[::-1]


def _sort(rng: random.Random) -> tuple[str, str]:
    s = _word(rng)
    return f"sort: {s}=", "".join(sorted(s))


def _add(rng: random.Random) -> tuple[str, str]:
    a, b = rng.randrange(100), rng.randrange(100)
    return f"add: {a}+{b}=", str(a + b)


def _kv(rng: random.Random) -> tuple[str, str]:
    keys = rng.sample(_LOWER, rng.randint(3, 5))
    vals = [str(rng.randrange(10)) for _ in keys]
    q = rng.randrange(len(keys))
    pairs = ",".join(f"{k}{v}" for k, v in zip(keys, vals, strict=True))
    return f"kv: {pairs};{keys[q]}=", vals[q]


def _close(rng: random.Random) -> tuple[str, str]:
    s = "".join(rng.choices(list(_BRACKETS), k=rng.randint(2, 6)))
    return f"close: {s}=", "".join(_BRACKETS[c] for c in reversed(s))


def _swapcase(rng: random.Random) -> tuple[str, str]:
    s = _word(rng, alphabet=_LOWER + string.ascii_uppercase)
    return f"swap: {s}=", s.swapcase()


def _count(rng: random.Random) -> tuple[str, str]:
    s = _word(rng, 4, 9, "abc")
    c = rng.choice("abc")
    return f"count {c}: {s}=", str(s.count(c))


FAMILIES: dict[str, Callable[[random.Random], tuple[str, str]]] = {
    "copy": _copy,
    "reverse": _reverse,
    "sort": _sort,
    "add": _add,
    "kv": _kv,
    "close": _close,
    "swapcase": _swapcase,
    "count": _count,
}


def family_examples(family: str, n: int, seed: int) -> list[Example]:
    """``n`` examples of ``family`` (duplicates possible), deterministic in (family, seed)."""
    fn = FAMILIES.get(family)
    if fn is None:
        raise ConfigError(f"unknown task family {family!r}; known: {', '.join(sorted(FAMILIES))}")
    rng = random.Random(f"fedquic:family:{family}:{seed}")  # str seeds hash with sha512: stable across runs
    return [Example(*fn(rng)) for _ in range(n)]


def split_train_test(
    examples_fn: Callable[[int, int], list[Example]],
    n_train: int,
    n_test: int,
    *,
    train_seed: int,
    test_seed: int = 10_000,
) -> tuple[list[Example], list[Example]]:
    """(train, test): ``n_test`` distinct held-out examples from ``test_seed`` (the same for every train seed),
    and ``n_train`` training examples from ``train_seed`` whose prompts are not in the test set."""
    test: list[Example] = []
    seen: set[str] = set()
    batch = 0
    while len(test) < n_test:
        for ex in examples_fn(4 * n_test, test_seed * 1000 + batch):
            if ex.prompt not in seen:
                seen.add(ex.prompt)
                test.append(ex)
                if len(test) == n_test:
                    break
        batch += 1
        if batch > 50:
            raise ConfigError(f"cannot draw {n_test} distinct test prompts")
    train: list[Example] = []
    batch = 0
    while len(train) < n_train:
        train += [ex for ex in examples_fn(2 * n_train, train_seed * 1000 + batch) if ex.prompt not in seen]
        batch += 1
        if batch > 50:
            raise ConfigError(f"cannot draw {n_train} training prompts outside the test set")
    return train[:n_train], test


# ---------------------------------------------------------------------------------------------------------
# Dirichlet label skew
# ---------------------------------------------------------------------------------------------------------


def label_example(rng: random.Random, num_labels: int, label: int) -> Example:
    """A string whose first letter falls in alphabet bucket ``label`` of ``num_labels``, answered as a digit."""
    letters = [c for i, c in enumerate(_LOWER) if i * num_labels // 26 == label]
    s = rng.choice(letters) + _word(rng, 2, 7)
    return Example(prompt=f"cls: {s}=", response=str(label))


def dirichlet_proportions(num_clients: int, num_labels: int, alpha: float, seed: int) -> np.ndarray:
    """``(num_clients, num_labels)`` class proportions, each row drawn from Dirichlet(alpha · 1)."""
    if alpha <= 0 or num_labels < 2 or num_labels > 10:
        raise ConfigError("alpha must be > 0 and num_labels in 2..10")
    return np.random.default_rng([seed, 0xD1]).dirichlet([alpha] * num_labels, size=num_clients)


def dirichlet_label_split(
    client: int, num_clients: int, n: int, seed: int, *, alpha: float = 0.3, num_labels: int = 10, split_seed: int = 0
) -> list[Example]:
    """``n`` classification examples for ``client``: labels drawn from its Dirichlet(alpha) proportions (fixed by
    ``split_seed``, shared by all clients), inputs from ``seed``. Train and test of one client share proportions."""
    if not 0 <= client < num_clients:
        raise ConfigError(f"client index {client} out of range 0..{num_clients - 1}")
    p = dirichlet_proportions(num_clients, num_labels, alpha, split_seed)[client]
    rng = random.Random(f"fedquic:dirichlet:{client}:{seed}")
    labels = np.random.default_rng([seed, client, 0xD2]).choice(num_labels, size=n, p=p)
    return [label_example(rng, num_labels, int(k)) for k in labels]
