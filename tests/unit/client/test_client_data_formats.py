"""Multiple-choice and classification data: JSONL records, synthetic generators, tokenization and batching."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from fedquic.client.data import (
    IGNORE_INDEX,
    TASKS,
    Example,
    collate,
    encode_example,
    load_jsonl,
    make_label_examples,
    make_mc_examples,
    make_task_examples,
    tokenize_examples,
)
from fedquic.common.errors import ConfigError


@pytest.fixture(scope="module")
def tok(tiny_model_dir):  # type: ignore[no-untyped-def]
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(tiny_model_dir), local_files_only=True)


def test_load_jsonl_all_kinds(tmp_path: Path) -> None:
    recs = [
        {"prompt": "p", "response": "r"},
        {"text": "plain"},
        {"prompt": "2+2=", "options": ["3", "4", "5"], "answer": 1},
        {"text": "great film", "label": 1},
    ]
    path = tmp_path / "d.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in recs) + "\n")
    got = load_jsonl(path)
    assert got == [
        Example("p", "r"),
        Example("", "plain"),
        Example("2+2=", "4", options=("3", "4", "5"), answer=1),
        Example("great film", "", label=1),
    ]
    assert [e.kind for e in got] == ["generation", "text", "mc", "label"]


@pytest.mark.parametrize(
    "bad",
    [
        {"prompt": "q", "options": ["only one"], "answer": 0},
        {"prompt": "q", "options": ["a", "b"], "answer": 2},
        {"prompt": "q", "options": ["a", "b"], "answer": True},
        {"prompt": "q", "options": ["a", 3], "answer": 0},
        {"options": ["a", "b"], "answer": 0},
        {"text": "x", "label": -1},
        {"text": "x", "label": "pos"},
        {"label": 1},
    ],
)
def test_bad_mc_and_label_records_name_the_line(tmp_path: Path, bad: dict) -> None:
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps({"text": "ok"}) + "\n" + json.dumps(bad) + "\n")
    with pytest.raises(ConfigError, match=r"d\.jsonl:2"):
        load_jsonl(path)


def test_mc_generator() -> None:
    examples = make_mc_examples("reverse", 40, seed=0)
    assert examples == make_mc_examples("reverse", 40, seed=0) != make_mc_examples("reverse", 40, seed=1)
    positions = set()
    for ex in examples:
        assert ex.options is not None and ex.answer is not None and len(ex.options) == 4
        s = ex.prompt[len("reverse: ") : -1]
        assert ex.options[ex.answer] == ex.response == s[::-1]
        assert len(set(ex.options)) == 4  # distractors differ from the answer and from each other
        positions.add(ex.answer)
    assert positions == {0, 1, 2, 3}
    assert len(make_mc_examples("copy", 5, 0, num_options=2)[0].options or ()) == 2
    with pytest.raises(ConfigError):
        make_mc_examples("copy", 5, 0, num_options=1)


def test_label_generator_and_task_names() -> None:
    examples = make_label_examples(200, seed=0, num_labels=3)
    assert {ex.label for ex in examples} == {0, 1, 2}
    for ex in examples:
        assert ex.label == (ord(ex.prompt[0]) - ord("a")) * 3 // 26 and ex.response == ""
    assert make_task_examples("label", 5, 0) == make_label_examples(5, 0)
    assert make_task_examples("mc-sort", 5, 0) == make_mc_examples("sort", 5, 0)
    assert make_task_examples("sort", 5, 0)[0].options is None
    assert set(TASKS) >= {"copy", "reverse", "sort"}
    with pytest.raises(ConfigError):
        make_task_examples("mc-nothing", 5, 0)


def test_label_examples_tokenize_into_classification_batches(tok) -> None:  # type: ignore[no-untyped-def]
    enc = encode_example(tok, Example("abcdef", "", label=1), max_len=4)
    assert enc.label == 1 and len(enc.input_ids) == 4 and set(enc.labels) == {IGNORE_INDEX}
    assert enc.input_ids[0] == tok.bos_token_id  # the start is kept
    batch = tokenize_examples(tok, make_label_examples(5, 0), 16, batch_size=5)[0]
    assert batch.class_labels is not None and batch.class_labels.tolist() == [
        e.label for e in make_label_examples(5, 0)
    ]
    assert batch.target_count() == 5
    gen = tokenize_examples(tok, [Example("a=", "bc")], 16)[0]
    assert gen.class_labels is None and gen.target_count() == 3  # "bc" + eos
    with pytest.raises(ConfigError, match="mixes"):
        collate([encode_example(tok, Example("a", "", label=0), 8), encode_example(tok, Example("a=", "b"), 8)], 0)
