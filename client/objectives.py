"""Local objectives: the extension point for what a client minimises on a batch.

An objective is an object with a ``name``, ``count(batch)`` (what its loss sums over: labelled tokens, rows,
pairs) and ``loss(fam, batch) -> (summed loss, count)``, so the trainer can normalise a step accumulated over
micro-batches exactly (``grad_accum = k`` equals a k-times batch). Objectives are registered by name; a
learner picks one with ``PeftLearnerConfig.objective`` or, by default, from its data (:func:`objective_for`).
The built-ins are registered below exactly as an outside one would be::

    from fedquic.client.objectives import register_objective

    class LabelSmoothedLM:
        name = "lm-smoothed"
        def count(self, batch):
            return int((batch.labels[:, 1:] != -100).sum())
        def loss(self, fam, batch):
            ...  # the same logits as causal-lm, F.cross_entropy(..., label_smoothing=0.1)

    register_objective(LabelSmoothedLM())

What stays outside every objective, in the trainer: the optimiser, the learning-rate schedule, gradient
clipping, FedProx's proximal term (``prox_mu``) and gradient accumulation.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol, runtime_checkable

import torch
import torch.nn.functional as F
from fedquic.common.errors import ConfigError
from fedquic.common.registry import Registry

from .data import IGNORE_INDEX, Batch

if TYPE_CHECKING:
    from .fedalt import FedALTModel


@runtime_checkable
class Objective(Protocol):
    name: str

    def count(self, batch: Batch) -> int:
        """What ``loss`` sums over in ``batch``, known before the forward pass (the trainer normalises a step
        by the count of all its micro-batches before the first backward)."""
        ...

    def loss(self, fam: FedALTModel, batch: Batch) -> tuple[torch.Tensor, int]: ...


_OBJECTIVES: Registry[Objective] = Registry("local objective", Objective, "name, count, loss")


def register_objective(objective: Objective, *, replace: bool = False) -> Objective:
    return _OBJECTIVES.register(objective, replace=replace)


def get_objective(name: str) -> Objective:
    return _OBJECTIVES.get(name)


def objective_names() -> list[str]:
    return _OBJECTIVES.names()


def _logits(fam: FedALTModel, batch: Batch) -> torch.Tensor:
    extra = {} if batch.pixel_values is None else {"pixel_values": batch.pixel_values}
    return fam.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, **extra).logits


class CausalLM:
    """Supervised fine-tuning: next-token cross-entropy over the labelled (response) positions; counts tokens.
    Vision-language batches pass their ``pixel_values``."""

    name = "causal-lm"

    def count(self, batch: Batch) -> int:
        return int((batch.labels[:, 1:] != IGNORE_INDEX).sum())

    def loss(self, fam: FedALTModel, batch: Batch) -> tuple[torch.Tensor, int]:
        if batch.class_labels is not None:
            raise ConfigError("causal-lm needs prompt/response examples, not class labels")
        logits = _logits(fam, batch)
        targets = batch.labels[:, 1:]
        n = int((targets != IGNORE_INDEX).sum())
        loss = F.cross_entropy(
            logits[:, :-1].reshape(-1, logits.shape[-1]).float(),
            targets.reshape(-1),
            ignore_index=IGNORE_INDEX,
            reduction="sum",
        )
        return loss, n


class Classification:
    """Cross-entropy of each row's class for a sequence-classification model; counts rows."""

    name = "classification"

    def count(self, batch: Batch) -> int:
        return len(batch)

    def loss(self, fam: FedALTModel, batch: Batch) -> tuple[torch.Tensor, int]:
        if batch.class_labels is None:
            raise ConfigError("classification needs labelled examples (text, label)")
        logits = _logits(fam, batch)
        if logits.dim() != 2:
            raise ConfigError("classification examples need a sequence-classification model")
        return F.cross_entropy(logits.float(), batch.class_labels, reduction="sum"), len(batch)


for _objective in (CausalLM(), Classification()):
    register_objective(_objective)


def objective_for(batch: Batch, name: str | None = None) -> Objective:
    """The named objective, or the built-in that fits the batch: classification for class labels, else
    causal-lm."""
    if name is not None:
        return get_objective(name)
    return get_objective("classification" if batch.class_labels is not None else "causal-lm")


__all__ = ["Objective", "get_objective", "objective_for", "objective_names", "register_objective"]
