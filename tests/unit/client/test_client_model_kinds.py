"""Beyond causal LMs: a sequence classifier and a vision-language model (tiny LLaVA: CLIP tower + Llama), both
built from transformers configs, loaded from a local path in 4-bit NF4, wrapped in the FedALT layer on the default
targets, and trained one step: gradients reach only the individual LoRA and the mixers."""

from __future__ import annotations

from pathlib import Path

import bitsandbytes as bnb
import numpy as np
import pytest
import torch
from fedquic.client.data import IGNORE_INDEX, Batch, make_label_examples, tokenize_examples
from fedquic.client.fedalt import FedALTModel, LoraSpec
from fedquic.client.model import (
    IMAGE_TOKEN,
    LoadSpec,
    build_tiny_classifier,
    build_tiny_vlm,
    default_target_modules,
    image_token_count,
    load_base_model,
    model_kind,
)
from fedquic.client.trainer import TrainConfig, batch_loss, train_local
from fedquic.common.errors import ConfigError

pytestmark = pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning")


@pytest.fixture(scope="module")
def cls_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_classifier(tmp_path_factory.mktemp("models") / "tiny-cls", num_labels=2, seed=0)


@pytest.fixture(scope="module")
def vlm_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_vlm(tmp_path_factory.mktemp("models") / "tiny-vlm", seed=0)


def nonzero_fedalt(model: torch.nn.Module, seed: int) -> FedALTModel:
    """Learned mixer, nonzero local and RoW adapters: every trainable parameter gets a gradient."""
    fam = FedALTModel(model, LoraSpec(rank=4), init_seed=seed, mixer="learned")
    rng = np.random.default_rng(seed)
    fam.set_local_state(
        {k: 0.2 * rng.standard_normal(v.shape).astype(np.float32) for k, v in fam.local_state().items()}
    )
    fam.set_row_state({k: 0.2 * rng.standard_normal(v.shape).astype(np.float32) for k, v in fam.local_state().items()})
    return fam


def assert_only_trainables_get_gradients(fam: FedALTModel) -> tuple[int, int]:
    trainable = {id(p) for p in fam.trainable_parameters()}
    n_local = n_router = 0
    for name, p in fam.model.named_parameters():
        if id(p) in trainable:
            assert p.grad is not None and float(p.grad.abs().sum()) > 0, name
            n_local += ".local." in name
            n_router += "fedalt_routers" in name
        else:
            assert p.grad is None, name
    return n_local, n_router


def test_kinds_are_detected_from_config(tiny_model_dir: Path, cls_dir: Path, vlm_dir: Path) -> None:
    assert model_kind(tiny_model_dir) == "causal_lm"
    assert model_kind(cls_dir) == "seq_cls"
    assert model_kind(vlm_dir) == "vlm"
    with pytest.raises(ConfigError):
        LoadSpec(kind="diffusion")  # type: ignore[arg-type]


def test_classifier_in_4bit_trains_only_local_lora_and_mixers(cls_dir: Path) -> None:
    model, tok = load_base_model(cls_dir, LoadSpec())  # NF4, checkpointing on
    assert type(model).__name__ == "LlamaForSequenceClassification"
    assert isinstance(model.model.layers[0].self_attn.q_proj, bnb.nn.Linear4bit)
    assert default_target_modules(model) == ["q_proj", "v_proj"]
    fam = nonzero_fedalt(model, seed=1)
    batch = tokenize_examples(tok, make_label_examples(6, seed=0), 32, batch_size=6)[0]
    assert batch.class_labels is not None and batch.class_labels.shape == (6,)
    fam.model.train()
    try:
        loss, n = batch_loss(fam, batch)
        assert n == 6 and torch.isfinite(loss)
        loss.backward()
        assert assert_only_trainables_get_gradients(fam) == (8, 8)  # 4 LoRA layers: A, B; router weight, bias
    finally:
        fam.model.zero_grad(set_to_none=True)
        fam.model.eval()
    # and through the trainer: label data, classification loss, local state moves, the score head does not
    head = model.score.weight.detach().clone() if hasattr(model, "score") else None
    before = fam.local_state()
    res = train_local(fam, make_label_examples(32, seed=1), tok, TrainConfig(steps=2, batch_size=8, max_len=16))
    assert np.isfinite(res.loss_before) and np.isfinite(res.loss_after)
    assert any((before[k] != v).any() for k, v in fam.local_state().items())
    if head is not None:
        torch.testing.assert_close(fam.model.base_model.model.score.weight, head)


def test_vlm_in_4bit_trains_only_local_lora_and_mixers(vlm_dir: Path) -> None:
    model, tok = load_base_model(vlm_dir, LoadSpec())
    assert type(model).__name__ == "LlavaForConditionalGeneration"
    quantized = [n for n, m in model.named_modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert any("vision_tower" in n for n in quantized) and any("language_model" in n for n in quantized)
    targets = default_target_modules(model)
    assert targets and all(
        ".language_model." in f".{t}" and t.rsplit(".", 1)[-1] in ("q_proj", "v_proj") for t in targets
    )
    fam = nonzero_fedalt(model, seed=2)
    assert all("language_model" in name for name in fam.local_state())  # no LoRA on the vision tower

    n_img = image_token_count(model.config)
    image_id = tok.convert_tokens_to_ids(IMAGE_TOKEN)
    text = tok("describe: a red square", add_special_tokens=False)["input_ids"]
    answer = [*tok("red", add_special_tokens=False)["input_ids"], tok.eos_token_id]
    ids = [tok.bos_token_id, *([image_id] * n_img), *text, *answer]
    labels = [IGNORE_INDEX] * (len(ids) - len(answer)) + answer
    size = model.config.vision_config.image_size
    batch = Batch(
        input_ids=torch.tensor([ids, ids]),
        attention_mask=torch.ones(2, len(ids), dtype=torch.long),
        labels=torch.tensor([labels, labels]),
        pixel_values=torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(0)),
    )
    fam.model.train()
    try:
        loss, n = batch_loss(fam, batch)
        assert n == 2 * len(answer) and torch.isfinite(loss)
        loss.backward()
        n_local, n_router = assert_only_trainables_get_gradients(fam)
        assert n_local == 2 * len(targets) and n_router == 2 * len(targets)  # router weight and bias
    finally:
        fam.model.zero_grad(set_to_none=True)
        fam.model.eval()
    # the image matters: other pixels, other loss
    with torch.no_grad():
        other = Batch(
            batch.input_ids, batch.attention_mask, batch.labels, pixel_values=torch.zeros_like(batch.pixel_values)
        )
        assert abs(float(batch_loss(fam, other)[0]) - float(loss)) > 1e-4


@pytest.mark.skipif(not Path("/proc/self/maps").exists(), reason="needs Linux /proc")
def test_quantized_load_releases_the_checkpoint_file_and_counts_quant_state(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    import shutil

    from fedquic.client.model import weight_bytes

    copy = Path(shutil.copytree(tiny_model_dir, tmp_path / "copy"))
    weights = str(copy / "model.safetensors")

    def mapped() -> bool:
        return weights in Path("/proc/self/maps").read_text()

    fp32, _ = load_base_model(copy, LoadSpec(quantization="none"))
    assert mapped()  # unquantized: zero-copy views of the file, by design
    del fp32
    import gc

    gc.collect()
    assert not mapped()
    nf4, _ = load_base_model(copy, LoadSpec())
    assert not mapped()  # quantized: nothing keeps the fp32 file mapped
    params = sum(p.numel() * p.element_size() for p in nf4.parameters())
    q = nf4.model.layers[0].self_attn.q_proj.weight.quant_state
    assert q.nested  # double quantization: a nested state to count too
    assert weight_bytes(nf4) > params  # absmax scales and codebooks on top of the packed weights
    fp32_bytes = sum(p.numel() * 4 for p in load_base_model(copy, LoadSpec(quantization="none"))[0].parameters())
    assert weight_bytes(nf4) < 0.5 * fp32_bytes
