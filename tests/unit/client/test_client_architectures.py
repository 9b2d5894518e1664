"""Which kind a model folder is trained as, with which head, on which LoRA targets; and how prompts and texts
are framed with each tokenizer's own special tokens and chat template, truncated without cutting the template."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import pytest
import torch
from fedquic.client.architectures import default_target_modules, num_labels_for, resolve_kind
from fedquic.client.data import (
    Example,
    PromptFormat,
    encode_example,
    prompt_ids,
    set_prompt_format,
    special_frame,
)
from fedquic.client.evaluate import evaluate
from fedquic.common.errors import ConfigError
from torch import nn

BERT = {"architectures": ["BertModel"], "model_type": "bert"}
LLAMA = {"architectures": ["LlamaForCausalLM"], "model_type": "llama"}
GPT2 = {"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2"}
CLS = {"architectures": ["RobertaForSequenceClassification"], "model_type": "roberta", "id2label": {"0": "a", "1": "b"}}
LLAVA = {"architectures": ["LlavaForConditionalGeneration"], "model_type": "llava", "vision_config": {}}


def test_an_encoder_is_a_classifier_or_a_clear_error() -> None:
    assert resolve_kind(BERT, data_kind="label") == "seq_cls"
    with pytest.raises(ConfigError) as err:
        resolve_kind(BERT, data_kind="generation")
    msg = str(err.value)
    assert "encoder" in msg and '"label"' in msg and "causal LM" in msg  # the choices are named
    with pytest.raises(ConfigError):
        resolve_kind(BERT)  # no data kind known: still never a causal LM


def test_kinds_from_config_and_data() -> None:
    assert resolve_kind(LLAMA) == resolve_kind(LLAMA, data_kind="generation") == "causal_lm"
    assert resolve_kind(GPT2, data_kind="text") == "causal_lm"
    assert resolve_kind(LLAMA, data_kind="label") == "seq_cls"  # a decoder turned classifier (new score head)
    assert resolve_kind(CLS, data_kind="label") == "seq_cls"
    assert resolve_kind(LLAVA, data_kind="generation") == "vlm"
    with pytest.raises(ConfigError, match="must be"):
        resolve_kind(CLS, data_kind="generation")
    with pytest.raises(ConfigError, match="not causal_lm"):
        resolve_kind(CLS, requested="causal_lm")
    with pytest.raises(ConfigError, match="model kind"):
        resolve_kind(LLAMA, requested="diffusion")


def test_head_size_is_explicit_or_from_the_labels() -> None:
    assert num_labels_for(BERT, [0, 3, 1], None) == 4
    assert num_labels_for(BERT, [0, 0], None) == 2  # a head has at least two classes
    assert num_labels_for(BERT, [0, 1], 5) == 5
    with pytest.raises(ConfigError, match="too small"):
        num_labels_for(BERT, [0, 4], 3)
    assert num_labels_for(CLS, [0], None) == 2  # a trained head keeps its own size
    with pytest.raises(ConfigError, match="2 classes"):
        num_labels_for(CLS, [0, 2], None)
    with pytest.raises(ConfigError, match="trained head"):
        num_labels_for(CLS, [0], 3)


class _Attn(nn.Module):
    def __init__(self, names: tuple[str, ...]) -> None:
        super().__init__()
        for n in names:
            self.add_module(n, nn.Linear(8, 8))


@pytest.mark.parametrize(
    ("names", "expected"),
    [
        (("q_proj", "k_proj", "v_proj", "o_proj"), ["q_proj", "v_proj"]),
        (("query", "key", "value", "dense"), ["query", "value"]),
        (("q_lin", "k_lin", "v_lin", "out_lin"), ["q_lin", "v_lin"]),
        (("query_key_value", "dense"), ["query_key_value"]),
        (("qkv_proj", "o_proj"), ["qkv_proj"]),
        (("fc1", "fc2", "lm_head"), ["fc1", "fc2"]),
    ],
)
def test_default_targets_follow_each_family(names: tuple[str, ...], expected: list[str]) -> None:
    model = nn.Sequential(_Attn(names))
    assert default_target_modules(model) == expected


def test_new_heads_are_targets() -> None:
    model = nn.Sequential(_Attn(("query", "value")))
    model.add_module("classifier", nn.Linear(8, 2))
    model.fedquic_new_heads = ["classifier"]
    assert default_target_modules(model) == ["query", "value", "classifier"]


# -- framing ----------------------------------------------------------------------------------------------


@pytest.fixture
def encoder_tok() -> Any:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {t: i for i, t in enumerate(["[PAD]", "[CLS]", "[SEP]", "[UNK]", *(chr(c) for c in range(32, 127))])}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Split(pattern="", behavior="isolated")
    tok.decoder = decoders.Fuse()
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", special_tokens=[("[CLS]", 1), ("[SEP]", 2)]
    )
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]", cls_token="[CLS]", sep_token="[SEP]")


def test_classification_text_gets_the_tokenizers_own_frame_and_needs_no_eos(encoder_tok: Any) -> None:
    assert encoder_tok.eos_token_id is None
    assert special_frame(encoder_tok) == ([1], [2])
    enc = encode_example(encoder_tok, Example("abcdef", "", label=1), max_len=6)
    assert enc.input_ids[0] == 1 and enc.input_ids[-1] == 2 and len(enc.input_ids) == 6  # [CLS] abcd [SEP]
    assert enc.truncated and enc.label == 1
    assert not encode_example(encoder_tok, Example("ab", "", label=0), max_len=6).truncated
    with pytest.raises(ConfigError, match="eos"):
        encode_example(encoder_tok, Example("ab", "c"), max_len=6)  # generation does need one


@pytest.fixture
def chat_tok(tiny_model_dir: Any) -> Any:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tiny_model_dir), local_files_only=True)
    tok.chat_template = (
        "{% if messages[0]['role'] != 'system' %}<s>system: be helpful</s>{% endif %}"
        "{% for m in messages %}<s>{{ m['role'] }}: {{ m['content'] }}</s>{% endfor %}"
        "{% if add_generation_prompt %}<s>assistant: {% endif %}"
    )
    return tok


def test_prompt_format_sets_template_and_system_turn(chat_tok: Any) -> None:
    default = chat_tok.decode(prompt_ids(chat_tok, "hi"))
    assert "be helpful" in default and default.endswith("assistant: ")
    set_prompt_format(chat_tok, PromptFormat(system_prompt=""))
    assert "be helpful" not in chat_tok.decode(prompt_ids(chat_tok, "hi"))
    set_prompt_format(chat_tok, PromptFormat(system_prompt="be brief"))
    assert "system: be brief" in chat_tok.decode(prompt_ids(chat_tok, "hi"))
    set_prompt_format(chat_tok, PromptFormat(chat_template=False))
    assert prompt_ids(chat_tok, "hi") == [chat_tok.bos_token_id, *chat_tok("hi", add_special_tokens=False)["input_ids"]]


def test_truncation_shortens_the_content_never_the_template(chat_tok: Any) -> None:
    long = "0123456789" * 10 + "END"
    enc = encode_example(chat_tok, Example(long, "ok"), max_len=60)
    text = chat_tok.decode(enc.input_ids)
    assert enc.truncated and len(enc.input_ids) <= 60
    assert text.startswith("<s>system: be helpful</s><s>user: ")  # the template's opening is whole
    assert "END</s><s>assistant: ok" in text  # the end of the content, next to the answer, is kept
    with pytest.raises(ConfigError, match="template"):
        encode_example(chat_tok, Example(long, "ok"), max_len=20)  # not even the template fits


class _Shouter(nn.Module):
    """A bigram "model": after '=' it says 'A', then 'B', then eos: the answer "AB" to every prompt."""

    def __init__(self, tok: Any) -> None:
        super().__init__()
        v = len(tok)
        table = torch.zeros(v, v)
        table[:, tok.eos_token_id] = 5.0
        for a, b in (("=", "A"), ("A", "B")):
            table[tok.convert_tokens_to_ids(a), tok.convert_tokens_to_ids(b)] = 10.0
        self.table = nn.Parameter(table)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, **_: Any) -> Any:
        return SimpleNamespace(logits=self.table[input_ids])


def test_acc_exact_is_strict_unless_casefold_is_asked(tiny_model_dir: Any) -> None:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tiny_model_dir), local_files_only=True)
    model = _Shouter(tok)
    lower, upper = [Example("x=", "ab")], [Example("x=", "AB")]
    assert evaluate(model, tok, upper, max_len=16)["acc_exact"] == 1.0
    assert evaluate(model, tok, lower, max_len=16)["acc_exact"] == 0.0  # strict: case counts
    assert evaluate(model, tok, lower, max_len=16, casefold=True)["acc_exact"] == 1.0


def test_only_task_heads_may_be_missing_from_a_checkpoint() -> None:
    from fedquic.client.architectures import new_head_modules

    model = nn.Sequential()
    model.add_module("encoder", _Attn(("query", "value")))
    model.add_module("classifier", nn.Linear(8, 2))
    assert new_head_modules(model, ["classifier.weight", "classifier.bias"]) == ["classifier"]
    assert new_head_modules(model, []) == []
    with pytest.raises(ConfigError, match=r"encoder\.query"):
        new_head_modules(model, ["encoder.query.weight", "classifier.weight"])
