"""Local training of a :class:`FedALTModel` for one round (causal LM, classification or vision-language batches).

Stateless between calls (the optimizer is re-created each round) and free of global state besides torch's own,
so it can run in a worker thread via ``asyncio.to_thread``.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from fedquic.common.errors import ConfigError
from fedquic.common.messages import TrainSpec
from pydantic import ValidationError

from .data import Batch, Example, collate, encode_example, pad_id, tokenize_examples
from .fedalt import FedALTModel
from .model import keep_4bit_differentiable
from .objectives import get_objective, objective_for

log = logging.getLogger(__name__)

Progress = Callable[[int, int, float], None]


_SPEC = TrainSpec()


@dataclass
class TrainConfig:
    # The per-round recipe's defaults are the server's (TrainSpec, sent in ROUND_START), not declared again.
    steps: int = _SPEC.local_steps
    lr: float = _SPEC.lr
    batch_size: int = _SPEC.batch_size
    max_len: int = 48
    weight_decay: float = 0.0
    grad_accum: int = 1
    seed: int = 0
    eval_samples: int = 32  # size of the fixed subset behind loss_before/loss_after
    max_grad_norm: float = 1.0  # 0 disables clipping
    prox_mu: float = _SPEC.prox_mu  # FedProx: adds mu/2·‖w − w_round_start‖² over the trainable parameters
    # At most this many examples per forward/backward (memory); each step still uses batch_size x grad_accum
    # examples and gives the same gradient. None: batch_size.
    micro_batch_size: int | None = None
    schedule: str = _SPEC.lr_schedule  # constant, linear or cosine decay to 0 over the round's steps
    warmup_steps: int = _SPEC.warmup_steps  # linear warm-up from 0 before the schedule
    objective: str | None = None  # a registered local objective (fedquic.client.objectives); None: by the data

    def __post_init__(self) -> None:
        # What the server's TrainSpec declares (lr, batch size, mu, schedule, warm-up) is checked by it: one
        # source for those bounds. The rest is the trainer's own.
        try:
            TrainSpec(
                local_steps=self.steps,
                lr=self.lr,
                batch_size=self.batch_size,
                prox_mu=self.prox_mu,
                lr_schedule=self.schedule,  # type: ignore[arg-type]
                warmup_steps=self.warmup_steps,
            )
        except ValidationError as exc:
            err = exc.errors()[0]
            raise ConfigError(f"training settings: {'.'.join(map(str, err['loc']))}: {err['msg']}") from None
        for name in ("steps", "grad_accum", "eval_samples"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{name} must be positive, got {getattr(self, name)}")
        if self.micro_batch_size is not None and self.micro_batch_size <= 0:
            raise ConfigError(f"micro_batch_size must be positive, got {self.micro_batch_size}")
        if self.max_len < 2:
            raise ConfigError(f"max_len must be >= 2, got {self.max_len}")
        if self.weight_decay < 0 or self.max_grad_norm < 0:
            raise ConfigError("weight_decay and max_grad_norm must be >= 0")

    @property
    def forward_batch(self) -> int:
        return min(self.batch_size, self.micro_batch_size or self.batch_size)


@dataclass
class TrainResult:
    loss_before: float
    loss_after: float
    steps: int
    seconds: float  # wall time of the optimisation steps (the two evaluations excluded)
    samples: int  # examples consumed by the steps (with repetition)


def _device(fam: FedALTModel) -> torch.device:
    return fam.trainable_parameters()[0].device


def batch_loss(fam: FedALTModel, batch: Batch, objective: str | None = None) -> tuple[torch.Tensor, int]:
    """Summed loss of a batch and what it sums over, by the named local objective
    (:mod:`fedquic.client.objectives`) or the built-in that fits the batch: next-token cross-entropy over the
    labelled positions, or for a classification batch (``class_labels``) the cross-entropy of each row's class."""
    return objective_for(batch, objective).loss(fam, batch)


def evaluate_loss(fam: FedALTModel, batches: Sequence[Batch], objective: str | None = None) -> float:
    """Token-weighted mean loss over ``batches`` (no grad, eval mode)."""
    was_training = fam.model.training
    fam.model.eval()
    device = _device(fam)
    total, count = 0.0, 0
    try:
        with torch.no_grad():
            for batch in batches:
                loss, n = batch_loss(fam, batch.to(device), objective)
                total += float(loss)
                count += n
    finally:
        fam.model.train(was_training)
    return total / count if count else float("nan")


def _eval_subset(examples: Sequence[Example], k: int) -> list[Example]:
    # Evenly spaced and seed-independent, so the same examples are scored every round.
    stride = max(1, len(examples) // k)
    return list(examples[::stride][:k])


def lr_factor(cfg: TrainConfig, step: int) -> float:
    """Learning-rate multiplier for optimizer step ``step`` (0-based): warm-up, then the schedule's decay."""
    if step < cfg.warmup_steps:
        return (step + 1) / (cfg.warmup_steps + 1)
    if cfg.schedule == "constant":
        return 1.0
    span = max(cfg.steps - cfg.warmup_steps, 1)
    frac = min((step - cfg.warmup_steps) / span, 1.0)
    if cfg.schedule == "linear":
        return 1.0 - frac
    return 0.5 * (1.0 + math.cos(math.pi * frac))


def _step_chunks(cfg: TrainConfig, n: int, rng: np.random.Generator, order: list[int]) -> list[list[int]]:
    """The example indices of one optimizer step, in micro-batches of at most ``cfg.forward_batch``: epochs of
    shuffled indices (``order`` carries the rest of the current epoch between steps), no example twice an epoch."""
    chunks = []
    for _ in range(cfg.grad_accum):
        idx = []
        while len(idx) < cfg.batch_size:
            if not order:
                order.extend(rng.permutation(n).tolist())
            idx.append(order.pop())
        chunks += [idx[lo : lo + cfg.forward_batch] for lo in range(0, len(idx), cfg.forward_batch)]
    return chunks


def _add_prox_grad(params: Sequence[torch.Tensor], anchors: Sequence[torch.Tensor], mu: float) -> None:
    """FedProx: the gradient of mu/2·‖w − w0‖², added directly to each parameter's gradient (no graph needed)."""
    if not anchors:
        return
    with torch.no_grad():
        for p, a in zip(params, anchors, strict=True):
            if p.grad is not None:
                p.grad.add_(p - a, alpha=mu)


def train_local(
    fam: FedALTModel,
    examples: Sequence[Example],
    tokenizer: Any,
    cfg: TrainConfig,
    progress: Progress | None = None,
) -> TrainResult:
    """Run ``cfg.steps`` AdamW steps on the trainable parameters (local LoRA + routers) of ``fam``."""
    if not examples:
        raise ConfigError("no training examples")
    if keep_4bit_differentiable(fam.model):
        log.warning("4-bit weights had been repacked for CPU inference; unpacked them so gradients flow")
    params = fam.trainable_parameters()
    device = _device(fam)
    pad = pad_id(tokenizer)
    encoded = [encode_example(tokenizer, ex, cfg.max_len) for ex in examples]
    eval_batches = tokenize_examples(
        tokenizer, _eval_subset(examples, cfg.eval_samples), cfg.max_len, batch_size=cfg.forward_batch
    )
    if cfg.objective is not None:
        get_objective(cfg.objective)  # an unknown name fails before any work, listing the registered ones
    loss_before = evaluate_loss(fam, eval_batches, cfg.objective)
    rng = np.random.default_rng(cfg.seed)  # local generator: no shared RNG state between threads
    order: list[int] = []
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda i: lr_factor(cfg, i))
    anchors = [p.detach().clone() for p in params] if cfg.prox_mu > 0 else []
    fam.model.train()
    start = time.perf_counter()
    try:
        for step in range(1, cfg.steps + 1):
            optimizer.zero_grad(set_to_none=True)
            step_loss = 0.0
            micro = [
                collate([encoded[i] for i in chunk], pad).to(device)
                for chunk in _step_chunks(cfg, len(encoded), rng, order)
            ]
            # Normalise by the tokens of the whole accumulated step, so grad_accum=k equals a k-times batch.
            total_tokens = sum(objective_for(b, cfg.objective).count(b) for b in micro)
            for batch in micro:
                loss, _ = batch_loss(fam, batch, cfg.objective)
                (loss / max(total_tokens, 1)).backward()
                step_loss += float(loss.detach())
            _add_prox_grad(params, anchors, cfg.prox_mu)
            if cfg.max_grad_norm > 0:
                torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
            optimizer.step()
            scheduler.step()
            mean = step_loss / max(total_tokens, 1)
            if not math.isfinite(mean):
                log.warning("non-finite training loss at step %d", step)
            if progress is not None:
                progress(step, cfg.steps, mean)
    finally:
        fam.model.eval()
        optimizer.zero_grad(set_to_none=True)
    seconds = time.perf_counter() - start
    loss_after = evaluate_loss(fam, eval_batches, cfg.objective)
    samples = cfg.steps * cfg.grad_accum * cfg.batch_size
    log.info(
        "trained %d steps (%d samples) in %.2fs: loss %.4f -> %.4f",
        cfg.steps,
        samples,
        seconds,
        loss_before,
        loss_after,
    )
    return TrainResult(
        loss_before=loss_before, loss_after=loss_after, steps=cfg.steps, seconds=seconds, samples=samples
    )
