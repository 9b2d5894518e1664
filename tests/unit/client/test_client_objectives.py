"""Local objectives are an extension point: a registered one is what the trainer minimises."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from fedquic.client.data import IGNORE_INDEX, Batch, make_examples
from fedquic.client.fedalt import FedALTModel, LoraSpec
from fedquic.client.objectives import get_objective, objective_names, register_objective
from fedquic.client.trainer import TrainConfig, train_local
from fedquic.common.errors import ConfigError

pytestmark = pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning")


class LastTokenOnly:
    """Cross-entropy of each row's last response token only: counts rows, and records what it was given."""

    name = "test-last-token"

    def __init__(self) -> None:
        self.batches = 0

    def count(self, batch: Batch) -> int:
        return len(batch)

    def loss(self, fam: FedALTModel, batch: Batch) -> tuple[torch.Tensor, int]:
        self.batches += 1
        logits = fam.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
        labelled = batch.labels != IGNORE_INDEX
        last = labelled.shape[1] - 1 - labelled.flip(1).int().argmax(dim=1)  # each row's last labelled position
        rows = torch.arange(len(batch))
        pred = logits[rows, last - 1].float()
        return F.cross_entropy(pred, batch.labels[rows, last], reduction="sum"), len(batch)


def test_builtins_and_unknown_names() -> None:
    assert {"causal-lm", "classification"} <= set(objective_names())
    with pytest.raises(ConfigError, match=r"unknown local objective 'nope'; registered: \[.*'causal-lm'"):
        get_objective("nope")
    with pytest.raises(ConfigError, match="already registered"):
        register_objective(get_objective("causal-lm"))
    with pytest.raises(TypeError, match="not a local objective"):
        register_objective(object())  # type: ignore[arg-type]


def test_a_registered_objective_is_what_training_minimises(load_tiny) -> None:  # type: ignore[no-untyped-def]
    try:
        obj = get_objective(LastTokenOnly.name)
    except ConfigError:
        obj = register_objective(LastTokenOnly())
    obj.batches = 0  # type: ignore[attr-defined]
    model, tok = load_tiny()
    fam = FedALTModel(model, LoraSpec(), init_seed=0)
    examples = make_examples("reverse", 64, seed=0)
    res = train_local(fam, examples, tok, TrainConfig(steps=3, batch_size=4, eval_samples=4, objective=obj.name))
    # 3 steps of one micro-batch each, plus the loss before and after (one batch of 4 each)
    assert obj.batches == 5  # type: ignore[attr-defined]
    assert res.loss_after < res.loss_before
    with pytest.raises(ConfigError, match="unknown local objective"):
        train_local(fam, examples, tok, TrainConfig(steps=1, objective="nope"))
