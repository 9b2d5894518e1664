"""A ~1.1B-parameter Llama (TinyLlama-1.1B's shapes, random weights) from a local path in 4-bit NF4: one federated
round step on CPU (a training step, then the uplink delta through error feedback and the INT8 codec)."""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("torch")
pytest.importorskip("bitsandbytes")

pytestmark = [
    pytest.mark.slow,
    pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning"),
]

SHAPE = {
    "hidden_size": 2048,
    "intermediate_size": 5632,
    "num_hidden_layers": 22,
    "num_attention_heads": 32,
    "num_key_value_heads": 4,
    "vocab_size": 32000,
}


def write_random_llama(out: Path, seed: int = 0, layers_per_shard: int = 4) -> int:
    """Write config, tokenizer and bf16 safetensors shards (with their index) one shard at a time, so the whole
    model is never in memory. Returns the number of parameters."""
    import torch
    from fedquic.client.model import _char_tokenizer
    from safetensors.torch import save_file
    from transformers import LlamaConfig

    out.mkdir(parents=True)
    tok = _char_tokenizer()  # 99 tokens: ids stay far below the 32000-entry vocabulary
    config = LlamaConfig(
        **SHAPE,
        max_position_embeddings=2048,
        tie_word_embeddings=False,
        pad_token_id=tok.pad_token_id,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
    )
    config.save_pretrained(out)
    tok.save_pretrained(out)
    h, m, v = SHAPE["hidden_size"], SHAPE["intermediate_size"], SHAPE["vocab_size"]
    kv = h // SHAPE["num_attention_heads"] * SHAPE["num_key_value_heads"]
    gen = torch.Generator().manual_seed(seed)

    def rnd(*shape: int) -> torch.Tensor:
        return (torch.randn(*shape, generator=gen) * 0.02).to(torch.bfloat16)

    def ones() -> torch.Tensor:
        return torch.ones(h, dtype=torch.bfloat16)

    def layer(i: int) -> dict[str, torch.Tensor]:
        p = f"model.layers.{i}."
        return {
            p + "self_attn.q_proj.weight": rnd(h, h),
            p + "self_attn.k_proj.weight": rnd(kv, h),
            p + "self_attn.v_proj.weight": rnd(kv, h),
            p + "self_attn.o_proj.weight": rnd(h, h),
            p + "mlp.gate_proj.weight": rnd(m, h),
            p + "mlp.up_proj.weight": rnd(m, h),
            p + "mlp.down_proj.weight": rnd(h, m),
            p + "input_layernorm.weight": ones(),
            p + "post_attention_layernorm.weight": ones(),
        }

    n_layers = SHAPE["num_hidden_layers"]
    groups = [range(lo, min(lo + layers_per_shard, n_layers)) for lo in range(0, n_layers, layers_per_shard)]
    makers = [
        lambda: {"model.embed_tokens.weight": rnd(v, h)},
        *[(lambda g=g: {k: t for i in g for k, t in layer(i).items()}) for g in groups],
        lambda: {"model.norm.weight": ones(), "lm_head.weight": rnd(v, h)},
    ]
    weight_map: dict[str, str] = {}
    n_params = 0
    for idx, make in enumerate(makers, start=1):
        name = f"model-{idx:05d}-of-{len(makers):05d}.safetensors"
        shard = make()
        save_file(shard, str(out / name), metadata={"format": "pt"})
        for k, t in shard.items():
            weight_map[k] = name
            n_params += t.numel()
        del shard
    index = {"metadata": {"total_size": 2 * n_params}, "weight_map": weight_map}
    (out / "model.safetensors.index.json").write_text(json.dumps(index))
    return n_params


def test_1b_llama_in_nf4_runs_a_federated_round_step(tmp_path: Path) -> None:
    import torch
    from fedquic.client.data import make_examples
    from fedquic.client.fedalt import FedALTModel, LoraSpec
    from fedquic.client.model import LoadSpec, base_model_fingerprint, load_base_model, weight_bytes
    from fedquic.client.trainer import TrainConfig, train_local
    from fedquic.common.adapter import init_lora_state, state_hash
    from fedquic.common.codec import EncodingSpec, decode_tensors
    from fedquic.common.feedback import ErrorFeedback

    t0 = time.perf_counter()
    n_params = write_random_llama(tmp_path / "llama-1b")
    t_write = time.perf_counter() - t0
    assert 1.0e9 < n_params < 1.2e9
    assert len(base_model_fingerprint(tmp_path / "llama-1b")) == 16

    model, tok = load_base_model(tmp_path / "llama-1b", LoadSpec(quantization="nf4", gradient_checkpointing=True))
    t_load = time.perf_counter() - t0 - t_write
    import bitsandbytes as bnb

    assert isinstance(model.model.layers[21].mlp.down_proj, bnb.nn.Linear4bit)
    wb = weight_bytes(model)
    # 4-bit linear layers (~0.97 B values, ~0.53 byte each with scales) + fp32 embeddings and head (2 x 65.5 M)
    assert wb < 0.3 * 4 * n_params, wb

    fam = FedALTModel(model, LoraSpec(rank=8), init_seed=5, mixer="learned")
    schema = fam.schema()
    assert len(schema.tensors) == 22 * 2 * 2  # q and v, A and B, every layer
    start = fam.local_state()
    assert state_hash(start) == state_hash(init_lora_state(schema, 5))  # the job's shared init
    examples = make_examples("reverse", 4, seed=0)
    res = train_local(fam, examples, tok, TrainConfig(steps=1, batch_size=1, max_len=16, eval_samples=1, lr=1e-2))
    t_train = time.perf_counter() - t0 - t_write - t_load
    assert np.isfinite(res.loss_before) and np.isfinite(res.loss_after)
    local = fam.local_state()
    delta = {k: local[k] - start[k] for k in start}
    assert any(np.abs(d).max() > 0 for d in delta.values())  # the step moved the adapter

    ef = ErrorFeedback()
    payload = ef.compress(delta, EncodingSpec.parse("int8"))
    decoded = decode_tensors(payload.manifest, payload.body)
    fp32 = sum(d.size * 4 for d in delta.values())
    assert len(payload.body) < fp32 / 3.5  # INT8 + scales
    for k, d in delta.items():  # what the server reconstructs + what error feedback keeps == the delta
        np.testing.assert_allclose(decoded[k] + ef.residual[k], d, rtol=0, atol=1e-6)
    print(
        f"\n1B NF4: {n_params / 1e9:.2f} B params, weights {wb / 2**30:.2f} GiB; write {t_write:.0f} s, "
        f"load {t_load:.0f} s, round step {t_train:.0f} s; uplink {len(payload.body) / 2**20:.2f} MiB "
        f"({fp32 / len(payload.body):.1f}x smaller than fp32); torch threads {torch.get_num_threads()}"
    )
