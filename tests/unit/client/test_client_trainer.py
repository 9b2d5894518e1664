from __future__ import annotations

import asyncio
import math

import numpy as np
import pytest
import torch
from fedquic.client.data import make_examples, tokenize_examples
from fedquic.client.fedalt import FedALTModel, LoraSpec
from fedquic.client.trainer import TrainConfig, TrainResult, evaluate_loss, train_local
from fedquic.common.errors import ConfigError
from fedquic.common.messages import LoraJobSpec

# peft still calls transformers' deprecated `is_gradient_checkpointing`; not ours to fix.
pytestmark = pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning")


def test_train_local_lowers_the_loss_on_nf4(load_tiny) -> None:
    model, tok = load_tiny()  # NF4, gradient checkpointing on
    fam = FedALTModel(model, LoraSpec(), init_seed=0, mixer="learned")
    before = fam.local_state()
    seen: list[tuple[int, int, float]] = []
    res = train_local(
        fam,
        make_examples("reverse", 128, seed=0),
        tok,
        TrainConfig(steps=20, lr=3e-3, batch_size=8),
        progress=lambda step, total, loss: seen.append((step, total, loss)),
    )
    assert isinstance(res, TrainResult)
    assert res.loss_after < res.loss_before - 0.05, res
    assert res.steps == 20 and res.samples == 160 and res.seconds > 0
    assert [s[:2] for s in seen] == [(i, 20) for i in range(1, 21)]
    assert all(math.isfinite(s[2]) for s in seen)
    assert any((before[k] != v).any() for k, v in fam.local_state().items())
    assert all(not v.any() for v in fam.row_state().values())  # RoW untouched by training
    assert not fam.model.training


async def test_train_local_runs_in_a_worker_thread(load_tiny) -> None:
    model, tok = load_tiny(gradient_checkpointing=False)
    fam = FedALTModel(model, LoraSpec(rank=4), init_seed=0, federation="fedavg")
    cfg = TrainConfig(steps=3, batch_size=4, grad_accum=2)
    res = await asyncio.to_thread(train_local, fam, make_examples("sort", 16, 0), tok, cfg)
    assert res.samples == 3 * 4 * 2 and math.isfinite(res.loss_after)


def test_evaluate_loss_is_side_effect_free(load_tiny) -> None:
    model, tok = load_tiny(gradient_checkpointing=False)
    fam = FedALTModel(model, LoraSpec(rank=4), init_seed=0, federation="local")
    batches = tokenize_examples(tok, make_examples("copy", 10, 0), 48, batch_size=4)
    fam.model.train()
    first = evaluate_loss(fam, batches)
    assert fam.model.training
    assert first == evaluate_loss(fam, batches)
    assert math.isclose(first, math.log(len(tok)), rel_tol=0.1)  # random init: about uniform
    assert all(p.grad is None for p in fam.trainable_parameters())
    assert torch.is_grad_enabled()


@pytest.mark.parametrize("kwargs", [{"steps": 0}, {"lr": 0.0}, {"batch_size": -1}, {"max_len": 1}])
def test_train_config_validates(kwargs: dict[str, float]) -> None:
    with pytest.raises(ConfigError):
        TrainConfig(**kwargs)  # type: ignore[arg-type]


def test_train_local_needs_examples(load_tiny) -> None:
    model, tok = load_tiny(gradient_checkpointing=False)
    fam = FedALTModel(model, LoraSpec(rank=4), init_seed=0)
    with pytest.raises(ConfigError):
        train_local(fam, [], tok, TrainConfig())


def test_fedprox_term_keeps_parameters_closer_to_the_round_start(load_tiny) -> None:
    def drift(mu: float) -> float:
        model, tok = load_tiny(gradient_checkpointing=False)
        fam = FedALTModel(model, LoraSpec(rank=4), init_seed=0, federation="fedavg")
        start = fam.local_state()
        train_local(
            fam,
            make_examples("reverse", 32, 0),
            tok,
            TrainConfig(steps=15, lr=1e-2, batch_size=4, max_grad_norm=0, prox_mu=mu),
        )
        end = fam.local_state()
        return float(sum(np.square(end[k] - start[k]).sum() for k in start))

    assert drift(200.0) < 0.5 * drift(0.0)


def test_lr_schedules_by_hand() -> None:
    import math

    from fedquic.client.trainer import TrainConfig, lr_factor

    const = TrainConfig(steps=4)
    assert [lr_factor(const, i) for i in range(4)] == [1.0, 1.0, 1.0, 1.0]
    lin = TrainConfig(steps=5, schedule="linear", warmup_steps=1)
    assert [lr_factor(lin, i) for i in range(5)] == [0.5, 1.0, 0.75, 0.5, 0.25]
    cos = TrainConfig(steps=4, schedule="cosine")
    assert [round(lr_factor(cos, i), 6) for i in range(4)] == [
        1.0,
        round(0.5 * (1 + math.cos(math.pi / 4)), 6),
        0.5,
        round(0.5 * (1 + math.cos(3 * math.pi / 4)), 6),
    ]
    with pytest.raises(ConfigError):
        TrainConfig(schedule="exponential")


def test_local_epochs_set_the_step_count_from_the_data_size() -> None:
    from fedquic.client.peft_learner import round_steps
    from fedquic.common.messages import TrainSpec

    assert round_steps(TrainSpec(local_steps=7), 1000) == 7
    assert round_steps(TrainSpec(local_epochs=1, batch_size=8), 100) == 13  # ceil(100 / 8)
    assert round_steps(TrainSpec(local_epochs=0.5, batch_size=8), 100) == 7
    assert round_steps(TrainSpec(local_epochs=0.01, batch_size=8), 10) == 1


def test_ffa_lora_trains_b_and_leaves_a_at_the_shared_init(load_tiny) -> None:
    """FFA-LoRA (``LoraSpec.freeze_a``, the job's ``lora.freeze_a``): training on the 4-bit model moves every B
    and no A, which stays at the job's seeded init, the same on every client."""
    model, tok = load_tiny(gradient_checkpointing=False)
    fam = FedALTModel(model, LoraSpec(rank=4, freeze_a=True), init_seed=3, federation="fedavg")
    before = fam.local_state()
    assert len(fam.trainable_parameters()) == len(before) // 2  # the B factors only
    res = train_local(fam, make_examples("sort", 16, 0), tok, TrainConfig(steps=3, batch_size=4, lr=1e-2))
    after = fam.local_state()
    assert math.isfinite(res.loss_after)
    for name, value in after.items():
        if ".lora_A." in name:
            np.testing.assert_array_equal(value, before[name])
        else:
            assert not np.array_equal(value, before[name]), name
    # the job's setting reaches the model: WELCOME's lora -> LoraSpec
    assert LoraSpec.from_job(LoraJobSpec(**LoraSpec(freeze_a=True).job_fields())).freeze_a
