from __future__ import annotations

import bitsandbytes as bnb
import numpy as np
import pytest
import torch
from fedquic.client.data import make_examples, tokenize_examples
from fedquic.client.fedalt import FedALTModel, LoraSpec
from fedquic.common.adapter import init_lora_state
from fedquic.common.errors import CodecError, ConfigError, SchemaMismatchError
from peft import get_peft_model_state_dict

# peft still calls transformers' deprecated `is_gradient_checkpointing`; not ours to fix.
pytestmark = pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning")

SEED = 7
LAYER = "base_model.model.model.layers.0.self_attn.q_proj"


def _random_state(fam: FedALTModel, seed: int, scale: float = 0.2) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {k: (rng.standard_normal(v.shape) * scale).astype(np.float32) for k, v in fam.local_state().items()}


@pytest.fixture(scope="module")
def fam(load_tiny) -> FedALTModel:
    """Learned mixer, nonzero local, RoW and router weights."""
    model, _ = load_tiny()
    fam = FedALTModel(model, LoraSpec(rank=4, alpha=8.0), init_seed=SEED, mixer="learned")
    fam.set_local_state(_random_state(fam, 1))
    fam.set_row_state(_random_state(fam, 2))
    rng = np.random.default_rng(3)
    fam.set_mixer_state({k: rng.standard_normal(v.shape).astype(np.float32) for k, v in fam.mixer_state().items()})
    return fam


@pytest.fixture(scope="module")
def tok(load_tiny):
    return load_tiny(gradient_checkpointing=False)[1]


def _layer(fam: FedALTModel) -> torch.nn.Module:
    return dict(fam.model.named_modules())[LAYER]


def test_base_is_really_nf4(fam: FedALTModel) -> None:
    base = _layer(fam).base_layer
    assert isinstance(base, bnb.nn.Linear4bit)
    assert base.weight.quant_state.quant_type == "nf4"


def _by_hand(fam: FedALTModel, x: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
    base = _layer(fam).base_layer
    w = bnb.functional.dequantize_4bit(base.weight.data, base.weight.quant_state).float()
    s = fam.lora.scaling
    loc, row = fam.local_state(), fam.row_state()
    a_l, b_l = (torch.from_numpy(loc[f"{LAYER}.lora_{k}.weight"]) for k in "AB")
    a_r, b_r = (torch.from_numpy(row[f"{LAYER}.lora_{k}.weight"]) for k in "AB")
    return x @ w.T + gate[..., :1] * (x @ a_l.T @ b_l.T) * s + gate[..., 1:] * (x @ a_r.T @ b_r.T) * s


def test_layer_output_matches_formula(fam: FedALTModel) -> None:
    x = torch.randn(2, 5, 64, generator=torch.Generator().manual_seed(0))
    mixer = fam.mixer_state()
    router, bias = (torch.from_numpy(mixer[f"{LAYER}.router.{k}"]) for k in ("weight", "bias"))
    gate = torch.softmax(x @ router.T + bias, dim=-1)
    assert float(gate.std()) > 0.05  # the gate really varies per token
    with torch.no_grad():
        y = _layer(fam)(x)
    torch.testing.assert_close(y, _by_hand(fam, x, gate), rtol=1e-5, atol=1e-5)


def test_fixed_mixer_is_half_half(load_tiny) -> None:
    model, _ = load_tiny(gradient_checkpointing=False)
    fam = FedALTModel(model, LoraSpec(rank=4, alpha=8.0), init_seed=SEED, mixer="fixed")
    fam.set_local_state(_random_state(fam, 1))
    fam.set_row_state(_random_state(fam, 2))
    assert fam.mixer_state() == {}
    x = torch.randn(3, 64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        y = _layer(fam)(x)
    torch.testing.assert_close(y, _by_hand(fam, x, torch.full((3, 2), 0.5)), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("mixer_init", [0.9, 0.5, 0.2])
def test_learned_mixer_starts_at_mixer_init(load_tiny, mixer_init: float) -> None:
    model, _ = load_tiny(gradient_checkpointing=False)
    fam = FedALTModel(model, LoraSpec(rank=4, alpha=8.0), init_seed=SEED, mixer="learned", mixer_init=mixer_init)
    fam.set_local_state(_random_state(fam, 1))
    fam.set_row_state(_random_state(fam, 2))
    x = torch.randn(3, 64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        y = _layer(fam)(x)
    gate = torch.tensor([[mixer_init, 1 - mixer_init]]).expand(3, 2)
    torch.testing.assert_close(y, _by_hand(fam, x, gate), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("mixer_init", [0.0, 1.0, -0.1, 2.0])
def test_mixer_init_out_of_range_is_refused(load_tiny, mixer_init: float) -> None:
    model, _ = load_tiny(gradient_checkpointing=False)
    with pytest.raises(ConfigError, match="mixer_init"):
        FedALTModel(model, LoraSpec(rank=4), init_seed=SEED, mixer="learned", mixer_init=mixer_init)


def test_gradients_reach_only_local_lora_and_routers(fam: FedALTModel, tok) -> None:
    batch = tokenize_examples(tok, make_examples("reverse", 4, 0), 32)[0]
    # An eval-mode no-grad pass first: bitsandbytes' CPU weight repacking used to kill gradients after one.
    fam.model.eval()
    with torch.no_grad():
        fam.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask)
    fam.model.train()
    try:
        out = fam.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, labels=batch.labels)
        out.loss.backward()
        trainable = {id(p) for p in fam.trainable_parameters()}
        n_local = n_router = 0
        for name, p in fam.model.named_parameters():
            if id(p) in trainable:
                assert p.grad is not None and float(p.grad.abs().sum()) > 0, name
                n_local += ".local." in name
                n_router += "fedalt_routers" in name
            else:
                assert p.grad is None, name
        assert n_local == 8 and n_router == 8  # 2 layers x (q, v) x (A, B); a router (weight, bias) per layer
    finally:
        fam.model.zero_grad(set_to_none=True)
        fam.model.eval()


def test_row_stays_frozen(fam: FedALTModel) -> None:
    row = [p for n, p in fam.model.named_parameters() if ".row." in n]
    assert len(row) == 8 and not any(p.requires_grad for p in row)
    assert fam.model.base_model.active_adapters == ["local", "row"]


def test_init_is_the_shared_numpy_init(load_tiny) -> None:
    a = FedALTModel(load_tiny(gradient_checkpointing=False)[0], LoraSpec(), init_seed=SEED)
    b = FedALTModel(load_tiny(gradient_checkpointing=False)[0], LoraSpec(), init_seed=SEED)
    expected = init_lora_state(a.schema(), SEED)
    for fam in (a, b):
        state = fam.local_state()
        assert state.keys() == expected.keys()
        for k in expected:
            assert state[k].dtype == np.float32
            np.testing.assert_array_equal(state[k], expected[k])
        assert all(not v.any() for v in fam.row_state().values())  # round 1: RoW is zero
    # Keys are exactly peft's own adapter state-dict keys.
    assert set(get_peft_model_state_dict(a.model, adapter_name="local")) == set(a.local_state())
    assert a.schema().fingerprint() == b.schema().fingerprint()
    other = init_lora_state(a.schema(), SEED + 1)
    assert any(not np.array_equal(other[k], expected[k]) for k in expected)


def test_state_round_trips_and_validation(fam: FedALTModel) -> None:
    row = _random_state(fam, 11)
    fam.set_row_state(row)
    got = fam.row_state()
    for k in row:
        np.testing.assert_array_equal(got[k], row[k])
    got[next(iter(got))][...] = 123.0  # returned arrays are copies, not views of the parameters
    np.testing.assert_array_equal(fam.row_state()[next(iter(got))], row[next(iter(got))])

    key = next(k for k in row if ".lora_A." in k)
    bad_shape = {**row, key: np.zeros((row[key].shape[0] + 1, row[key].shape[1]), np.float32)}
    with pytest.raises(SchemaMismatchError):
        fam.set_row_state(bad_shape)
    with pytest.raises(SchemaMismatchError):
        fam.set_local_state({k: v for k, v in row.items() if k != key})
    with pytest.raises(SchemaMismatchError):
        fam.set_row_state({**row, "extra.lora_A.weight": row[key]})
    nan = {k: v.copy() for k, v in row.items()}
    nan[key][0, 0] = np.nan
    with pytest.raises(CodecError):
        fam.set_row_state(nan)
    # A refused state leaves the model untouched.
    for k in row:
        np.testing.assert_array_equal(fam.row_state()[k], row[k])


def test_mixer_state_round_trip(fam: FedALTModel) -> None:
    mix = fam.mixer_state()
    weights = {k: v for k, v in mix.items() if k.endswith(".router.weight")}
    biases = {k: v for k, v in mix.items() if k.endswith(".router.bias")}
    assert len(weights) == len(biases) == 4 and len(mix) == 8
    assert all(v.shape == (2, 64) for v in weights.values()) and all(v.shape == (2,) for v in biases.values())
    fam.set_mixer_state(mix)
    with pytest.raises(SchemaMismatchError):
        fam.set_mixer_state({k: v[:1] for k, v in mix.items()})


@pytest.mark.parametrize("federation", ["fedavg", "local"])
def test_single_adapter_modes(load_tiny, federation: str) -> None:
    fam = FedALTModel(load_tiny(gradient_checkpointing=False)[0], LoraSpec(), init_seed=SEED, federation=federation)
    assert list(fam.model.peft_config) == ["local"]
    assert fam.mixer_state() == {}
    assert len(fam.trainable_parameters()) == len(fam.local_state()) == 8
    with pytest.raises(ConfigError):
        fam.set_row_state(fam.local_state())
    with pytest.raises(ConfigError):
        fam.row_state()


def test_bad_arguments(load_tiny) -> None:
    model, _ = load_tiny(gradient_checkpointing=False)
    with pytest.raises(ConfigError):
        LoraSpec(rank=0)
    with pytest.raises(ConfigError):
        FedALTModel(model, LoraSpec(), init_seed=0, mixer="soft")  # type: ignore[arg-type]
    with pytest.raises(ConfigError):
        FedALTModel(model, LoraSpec(target_modules=["nope"]), init_seed=0)


def test_bf16_compute_keeps_lora_in_fp32(load_tiny, tok) -> None:
    model, _ = load_tiny(compute_dtype="bfloat16")
    fam = FedALTModel(model, LoraSpec(rank=4), init_seed=SEED, mixer="learned")
    assert all(p.dtype == torch.float32 for p in fam.trainable_parameters())
    assert all(p.dtype == torch.float32 for n, p in fam.model.named_parameters() if ".row." in n)
    expected = init_lora_state(fam.schema(), SEED)
    assert all(np.array_equal(v, expected[k]) for k, v in fam.local_state().items())
    batch = tokenize_examples(tok, make_examples("upper", 2, 0), 32)[0]
    fam.model.train()
    out = fam.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, labels=batch.labels)
    out.loss.backward()
    assert all(p.grad is not None for p in fam.trainable_parameters())
    fam.model.eval()


def test_rff_mixer_starts_at_mixer_init_and_gates_by_fourier_features(load_tiny, tok) -> None:
    """``mixer = "rff"`` (CA-PFL's RFF personalization): the router is linear in seeded random Fourier features
    of the layer input; it starts at mixer_init for every token like the linear one, its state has the same
    keys (a 2 x 128 weight), its projection is the same in a rebuilt model, and training moves the gate."""
    from fedquic.client.fedalt import RFF_FEATURES
    from fedquic.client.trainer import TrainConfig, train_local

    def build() -> FedALTModel:
        return FedALTModel(load_tiny(gradient_checkpointing=False)[0], LoraSpec(rank=4), init_seed=SEED, mixer="rff")

    fam = build()
    fam.set_local_state(_random_state(fam, 1))
    fam.set_row_state(_random_state(fam, 2))
    x = torch.randn(3, 64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        y = _layer(fam)(x)
    gate = torch.tensor([[0.9, 0.1]]).expand(3, 2)  # the default mixer_init
    torch.testing.assert_close(y, _by_hand(fam, x, gate), rtol=1e-5, atol=1e-5)
    mix = fam.mixer_state()
    weights = {k: v for k, v in mix.items() if k.endswith(".router.weight")}
    assert len(mix) == 8 and all(v.shape == (2, 2 * RFF_FEATURES) for v in weights.values())
    assert not any("omega" in k or "phase" in k for k in fam.model.state_dict())  # re-derived, never stored
    train_local(fam, make_examples("reverse", 16, 0), tok, TrainConfig(steps=3, batch_size=4, lr=5e-2))
    trained = fam.mixer_state()
    assert any(not np.array_equal(trained[k], mix[k]) for k in weights)
    again = build()  # a restart: the same features, so the trained router means the same thing
    again.set_local_state(fam.local_state())
    again.set_row_state(fam.row_state())
    again.set_mixer_state(trained)
    with torch.no_grad():
        torch.testing.assert_close(_layer(again)(x), _layer(fam)(x), rtol=1e-5, atol=1e-5)
