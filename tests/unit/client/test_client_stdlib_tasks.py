"""The real-text instruction tasks of the real-LM benchmark: deterministic, disjoint splits, labels that are the
data's own (unicodedata properties, a docstring's module, an ast node type)."""

from __future__ import annotations

import ast
import unicodedata

import pytest
from fedquic.client import stdlib_tasks as st

BENCH = ("uni_script", "uni_case", "uni_category", "uni_bidi", "doc_module", "doc_kind", "src_stmt", "src_module")


@pytest.mark.parametrize("name", BENCH)
def test_tasks_are_deterministic_and_split_disjointly(name: str) -> None:
    a = st.task_examples(name, 40, seed=3)
    assert a == st.task_examples(name, 40, seed=3) and a != st.task_examples(name, 40, seed=4)
    train, test = st.split_examples(name, 150, 300, seed=0)
    assert len(train) == 150 and len(test) == 300
    assert not {p for p, _ in train} & {p for p, _ in test}
    assert all(0 < len(ans) <= 20 and len(prompt) < 200 for prompt, ans in train)
    assert len({ans for _, ans in test}) >= 4  # a task, not a constant


def test_labels_are_the_datas_own() -> None:
    names = {unicodedata.name(chr(c), ""): chr(c) for c in range(0x20, 0x2C00)}
    for prompt, ans in st.task_examples("uni_category", 50, seed=0):
        assert unicodedata.category(names[prompt.removeprefix("Unicode category of ").removesuffix("?")]) == ans
    for prompt, ans in st.task_examples("uni_bidi", 50, seed=0):
        assert unicodedata.bidirectional(names[prompt.removeprefix("Bidi class of ").removesuffix("?")]) == ans
    for prompt, ans in st.task_examples("src_stmt", 50, seed=0):
        line = prompt.removeprefix("Statement type of: ")
        if not line.endswith(":"):  # a simple statement parses on its own
            assert type(ast.parse(line).body[0]).__name__ == ans


def test_too_many_items_is_an_error() -> None:
    with pytest.raises(ValueError, match="only"):
        st.task_examples("doc_module", 10**6, seed=0)
