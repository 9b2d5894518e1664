from __future__ import annotations

import json
from pathlib import Path

import pytest
from fedquic.client.data import (
    IGNORE_INDEX,
    Example,
    encode_example,
    known_tasks,
    load_jsonl,
    make_examples,
    tokenize_examples,
)
from fedquic.common.errors import ConfigError


def test_generators_are_deterministic_and_task_specific() -> None:
    assert set(known_tasks()) >= {"copy", "reverse", "sort", "upper", "count"}
    for task in known_tasks():
        assert make_examples(task, 20, seed=1) == make_examples(task, 20, seed=1)
        assert make_examples(task, 20, seed=1) != make_examples(task, 20, seed=2)
    words = {task: [ex.prompt.split(": ", 1)[1] for ex in make_examples(task, 20, 1)] for task in known_tasks()}
    assert len({tuple(w) for w in words.values()}) == len(words)  # different strings per task too


@pytest.mark.parametrize(
    ("task", "fn"),
    [
        ("copy", lambda s: s),
        ("reverse", lambda s: s[::-1]),
        ("sort", lambda s: "".join(sorted(s))),
        ("upper", str.upper),
        ("count", lambda s: str(len(s))),
    ],
)
def test_generator_semantics(task: str, fn) -> None:
    for ex in make_examples(task, 50, seed=0):
        assert ex.prompt.startswith(f"{task}: ") and ex.prompt.endswith("=")
        s = ex.prompt[len(task) + 2 : -1]
        assert 3 <= len(s) <= 8 and s.isalpha() and s.islower()
        assert ex.response == fn(s)


def test_unknown_task_lists_known() -> None:
    with pytest.raises(ConfigError, match="reverse"):
        make_examples("translate", 3, 0)


def test_load_jsonl(tmp_path: Path) -> None:
    path = tmp_path / "d.jsonl"
    recs = [{"prompt": "p1", "response": "r1"}, {"text": "hello"}]
    path.write_text(json.dumps(recs[0]) + "\n\n" + json.dumps(recs[1]) + "\n")
    assert load_jsonl(path) == [Example("p1", "r1"), Example("", "hello")]


@pytest.mark.parametrize(
    "bad", ["{not json", "[1, 2]", '{"prompt": "only"}', '{"foo": 1}', '{"prompt": 1, "response": "x"}']
)
def test_load_jsonl_names_the_bad_line(tmp_path: Path, bad: str) -> None:
    path = tmp_path / "d.jsonl"
    path.write_text('{"text": "a"}\n\n' + bad + "\n")
    with pytest.raises(ConfigError, match=r"d\.jsonl:3"):
        load_jsonl(path)


def test_load_jsonl_missing_or_empty(tmp_path: Path) -> None:
    with pytest.raises(ConfigError):
        load_jsonl(tmp_path / "none.jsonl")
    (tmp_path / "e.jsonl").write_text("\n")
    with pytest.raises(ConfigError):
        load_jsonl(tmp_path / "e.jsonl")


@pytest.fixture(scope="module")
def tok(load_tiny):
    return load_tiny(quantization="none", gradient_checkpointing=False)[1]


def test_labels_cover_only_response_and_eos(tok) -> None:
    examples = [Example("reverse: abc=", "cba"), Example("copy: abcdefgh=", "abcdefgh")]
    (batch,) = tokenize_examples(tok, examples, max_len=48)
    assert batch.input_ids.shape == (2, 1 + len("copy: abcdefgh=") + 8 + 1)
    row = batch.labels[0].tolist()
    n = 1 + len("reverse: abc=")
    assert row[:n] == [IGNORE_INDEX] * n
    assert tok.decode(row[n : n + 3]) == "cba"
    assert row[n + 3] == tok.eos_token_id
    assert set(row[n + 4 :]) == {IGNORE_INDEX}  # padding
    assert batch.attention_mask[0].sum() == n + 4
    assert batch.input_ids[0, 0] == tok.bos_token_id
    assert (batch.input_ids[0, n + 4 :] == tok.pad_token_id).all()


def test_truncation_keeps_the_response(tok) -> None:
    enc = encode_example(tok, Example("x" * 40, "answer"), max_len=12)
    assert len(enc.input_ids) == 12
    assert tok.decode([t for t in enc.labels if t != IGNORE_INDEX][:-1]) == "answer"
    assert enc.input_ids[-1] == tok.eos_token_id


def test_batching(tok) -> None:
    batches = tokenize_examples(tok, make_examples("sort", 10, 0), max_len=48, batch_size=4)
    assert [len(b) for b in batches] == [4, 4, 2]
    with pytest.raises(ConfigError):
        tokenize_examples(tok, [], max_len=1)


def test_chat_template_formats_prompts_the_same_in_training_and_evaluation(tok) -> None:
    import copy

    from fedquic.client.data import prompt_ids
    from fedquic.client.evaluate import _prefix

    chat = copy.deepcopy(tok)
    chat.chat_template = (
        "{{ bos_token }}{% for m in messages %}<u>{{ m['content'] }}</u>{% endfor %}"
        "{% if add_generation_prompt %}<a>{% endif %}"
    )
    enc = encode_example(chat, Example("abc", "cba"), max_len=48)
    n_prompt = sum(1 for t in enc.labels if t == IGNORE_INDEX)
    assert chat.decode(enc.input_ids[1:n_prompt]) == "<u>abc</u><a>"  # the template wraps the user turn
    assert enc.input_ids[0] == chat.bos_token_id
    assert chat.decode([t for t in enc.labels if t != IGNORE_INDEX][:-1]) == "cba"
    assert _prefix(chat, "abc") == prompt_ids(chat, "abc") == enc.input_ids[:n_prompt]
    plain = encode_example(tok, Example("abc", "cba"), max_len=48)  # no template: [bos] prompt response eos
    assert tok.decode(plain.input_ids[1:4]) == "abc"
