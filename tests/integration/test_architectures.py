"""The architecture matrix: every family fedquic claims, as a tiny model built from its transformers config.

Per family: loaded from a local folder in 4-bit NF4, wrapped in the FedALT layer (learned mixer) on its default
targets, one federated round between two clients over real loopback QUIC, and the exported peft adapter loads
on a freshly loaded base with plain peft and changes its logits. Causal LMs: Llama, Qwen2 (with a chat
template), Mistral, Phi-3, Gemma-2, GPT-2, GPT-NeoX; sequence classifiers from bare encoder checkpoints (BERT,
RoBERTa, DistilBERT), whose heads are built from the data's labels; and a vision-language model (LLaVA).
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from fedquic.client.data import make_examples, make_label_examples
from fedquic.client.model import _char_tokenizer, build_tiny_vlm
from fedquic.server.history import read_history_dicts

pytest.importorskip("bitsandbytes")
pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning")

H, LAYERS, HEADS, FF = 64, 2, 4, 128
CHAT_TEMPLATE = (
    "{% for m in messages %}<s>{{ m['role'] }}: {{ m['content'] }}</s>{% endfor %}"
    "{% if add_generation_prompt %}<s>assistant: {% endif %}"
)


def _encoder_tokenizer() -> Any:
    """A char tokenizer that frames every text as ``[CLS] text [SEP]``, as BERT-style tokenizers do."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    specials = ["[PAD]", "[CLS]", "[SEP]", "[UNK]"]
    vocab = {t: i for i, t in enumerate([*specials, *(chr(c) for c in range(32, 127))])}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Split(pattern="", behavior="isolated")
    tok.decoder = decoders.Fuse()
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", special_tokens=[("[CLS]", 1), ("[SEP]", 2)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="[PAD]", cls_token="[CLS]", sep_token="[SEP]", unk_token="[UNK]"
    )


def _causal(config_fn: Callable[[Any], Any], model_cls: str, *, chat: bool = False) -> Callable[[Path], Path]:
    def build(out: Path) -> Path:
        import transformers

        tok = _char_tokenizer()
        if chat:
            tok.chat_template = CHAT_TEMPLATE
        config = config_fn(tok)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            model = getattr(transformers, model_cls)(config)
        model.save_pretrained(out)
        tok.save_pretrained(out)
        return out

    return build


def _encoder(config_fn: Callable[[Any], Any], model_cls: str) -> Callable[[Path], Path]:
    """A bare encoder checkpoint (``BertModel``...): no head; the client builds one from the labels."""

    def build(out: Path) -> Path:
        import transformers

        tok = _encoder_tokenizer()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            model = getattr(transformers, model_cls)(config_fn(tok))
        model.save_pretrained(out)
        tok.save_pretrained(out)
        return out

    return build


def _ids(tok: Any) -> dict[str, Any]:
    return {"vocab_size": len(tok), "bos_token_id": tok.bos_token_id, "eos_token_id": tok.eos_token_id}


def _llama(tok: Any) -> Any:
    from transformers import LlamaConfig

    return LlamaConfig(
        hidden_size=H, num_hidden_layers=LAYERS, num_attention_heads=HEADS, intermediate_size=FF,
        pad_token_id=tok.pad_token_id, **_ids(tok),
    )  # fmt: skip


def _qwen2(tok: Any) -> Any:
    from transformers import Qwen2Config

    return Qwen2Config(
        hidden_size=H, num_hidden_layers=LAYERS, num_attention_heads=HEADS, num_key_value_heads=HEADS,
        intermediate_size=FF, tie_word_embeddings=True, **_ids(tok),
    )  # fmt: skip


def _mistral(tok: Any) -> Any:
    from transformers import MistralConfig

    return MistralConfig(
        hidden_size=H, num_hidden_layers=LAYERS, num_attention_heads=HEADS, num_key_value_heads=HEADS,
        intermediate_size=FF, **_ids(tok),
    )  # fmt: skip


def _phi3(tok: Any) -> Any:
    from transformers import Phi3Config

    return Phi3Config(
        hidden_size=H, num_hidden_layers=LAYERS, num_attention_heads=HEADS, num_key_value_heads=HEADS,
        intermediate_size=FF, pad_token_id=tok.pad_token_id, **_ids(tok),
    )  # fmt: skip


def _gemma2(tok: Any) -> Any:
    from transformers import Gemma2Config

    return Gemma2Config(
        hidden_size=H, num_hidden_layers=LAYERS, num_attention_heads=HEADS, num_key_value_heads=HEADS,
        head_dim=H // HEADS, intermediate_size=FF, pad_token_id=tok.pad_token_id, **_ids(tok),
    )  # fmt: skip


def _gpt2(tok: Any) -> Any:
    from transformers import GPT2Config

    return GPT2Config(n_embd=H, n_layer=LAYERS, n_head=HEADS, n_positions=256, **_ids(tok))


def _neox(tok: Any) -> Any:
    from transformers import GPTNeoXConfig

    return GPTNeoXConfig(
        hidden_size=H, num_hidden_layers=LAYERS, num_attention_heads=HEADS, intermediate_size=FF,
        max_position_embeddings=256, **_ids(tok),
    )  # fmt: skip


def _bert(tok: Any) -> Any:
    from transformers import BertConfig

    return BertConfig(
        vocab_size=len(tok), hidden_size=H, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
        intermediate_size=FF, max_position_embeddings=256, pad_token_id=tok.pad_token_id,
    )  # fmt: skip


def _roberta(tok: Any) -> Any:
    from transformers import RobertaConfig

    return RobertaConfig(
        vocab_size=len(tok), hidden_size=H, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
        intermediate_size=FF, max_position_embeddings=260, pad_token_id=tok.pad_token_id,
        bos_token_id=tok.cls_token_id, eos_token_id=tok.sep_token_id,
    )  # fmt: skip


def _distilbert(tok: Any) -> Any:
    from transformers import DistilBertConfig

    return DistilBertConfig(
        vocab_size=len(tok), dim=H, n_layers=LAYERS, n_heads=HEADS, hidden_dim=FF, max_position_embeddings=256,
        pad_token_id=tok.pad_token_id,
    )  # fmt: skip


# family -> (builder, data kind, the head type or the first default LoRA target expected)
FAMILIES: dict[str, tuple[Callable[[Path], Path], str, str]] = {
    "llama": (_causal(_llama, "LlamaForCausalLM"), "generation", "q_proj"),
    "qwen2": (_causal(_qwen2, "Qwen2ForCausalLM", chat=True), "generation", "q_proj"),
    "mistral": (_causal(_mistral, "MistralForCausalLM"), "generation", "q_proj"),
    "phi3": (_causal(_phi3, "Phi3ForCausalLM"), "generation", "qkv_proj"),
    "gemma2": (_causal(_gemma2, "Gemma2ForCausalLM"), "generation", "q_proj"),
    "gpt2": (_causal(_gpt2, "GPT2LMHeadModel"), "generation", "c_attn"),
    "gpt_neox": (_causal(_neox, "GPTNeoXForCausalLM"), "generation", "query_key_value"),
    "bert": (_encoder(_bert, "BertModel"), "label", "query"),
    "roberta": (_encoder(_roberta, "RobertaModel"), "label", "query"),
    "distilbert": (_encoder(_distilbert, "DistilBertModel"), "label", "q_lin"),
    "llava": (lambda out: build_tiny_vlm(out, seed=0), "generation", "q_proj"),
}


def _write_data(path: Path, kind: str, seed: int) -> Path:
    if kind == "label":
        rows = [{"text": ex.prompt, "label": ex.label} for ex in make_label_examples(24, seed)]
    else:
        rows = [{"prompt": ex.prompt, "response": ex.response} for ex in make_examples("reverse", 24, seed)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.mark.slow
@pytest.mark.parametrize("family", sorted(FAMILIES))
async def test_family_trains_federates_and_exports(family: str, one_round: Any, tmp_path: Path) -> None:
    from fedquic.client.model import LoadSpec, load_base_model
    from peft import PeftModel

    build, kind, expected = FAMILIES[family]
    model_dir = await asyncio.to_thread(build, tmp_path / family)
    data = [_write_data(tmp_path / f"data{i}.jsonl", kind, seed=i) for i in range(2)]
    learners = await one_round(model_dir, data, tmp_path)

    fam = learners[0].fam
    targets = fam.model.peft_config["local"].target_modules
    assert any(t == expected or t.endswith("." + expected) for t in targets), targets
    if kind == "label":
        assert fam.new_heads, "the encoder's head is built for the job"
        assert type(fam.model.get_base_model()).__name__.endswith("ForSequenceClassification")
        # Identical on every client: the head starts from the job seed, not from torch's global RNG.
        h0, h1 = (lr.fam.model.get_submodule("base_model.model." + fam.new_heads[-1]) for lr in learners)
        assert torch.equal(h0.base_layer.weight, h1.base_layer.weight)
    first = learners[0].tokenizer(learners[0].examples[0].prompt, return_tensors="pt")
    if kind == "label":  # the tokenizer's own framing reaches the model
        assert first["input_ids"][0, 0].item() == learners[0].tokenizer.cls_token_id

    adapter = tmp_path / "c0" / "adapters" / "peft" / "local"
    assert (adapter / "adapter_config.json").exists()
    base, tok = await asyncio.to_thread(
        load_base_model,
        model_dir,
        LoadSpec(quantization="none"),
        data_kind=kind,
        num_labels=2 if kind == "label" else None,
    )
    ids = tok("abcab", return_tensors="pt")
    with torch.no_grad():
        before = base(**ids).logits.clone()
        after = PeftModel.from_pretrained(base, str(adapter))(**ids).logits
    assert after.shape == before.shape and not torch.allclose(before, after, atol=1e-6)


async def test_local_mode_shares_no_tensors_and_measures_what_it_trained(
    tiny_model_dir: Path, one_round: Any, tmp_path: Path
) -> None:
    data = [_write_data(tmp_path / f"data{i}.jsonl", "generation", seed=i) for i in range(2)]
    learners = await one_round(tiny_model_dir, data, tmp_path, job={"federation": "local"})
    row = read_history_dicts(tmp_path / "server" / "history.jsonl")[0]
    for cid in ("c0", "c1"):
        stats = row["clients"][cid]
        assert stats["fp32_up"] == 0 and stats["bytes_up"] < 1024, stats  # a header, no tensors
        assert "bytes_down" not in stats or stats["bytes_down"] == 0
    # the client's own adapter trained (it is not the job's initial state), and the server never saw it
    local = learners[0].local_state()
    assert any(abs(v).sum() > 0 for k, v in local.items() if "lora_B" in k)
