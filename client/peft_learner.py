"""The built-in :class:`~fedquic.client.learner.Learner`: a local 4-bit base model with peft LoRA adapters
and the FedALT mixer, trained on the client's own data, evaluated on a held-out part of it each round, run
according to a device profile (:mod:`fedquic.client.profiles`)."""

from __future__ import annotations

import logging
import math
import time
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, model_validator

from ..common.adapter import AdapterSchema, TensorDict
from ..common.errors import ConfigError
from ..common.messages import TrainSpec, Welcome
from .profiles import DeviceProfile, resolve_profile

if TYPE_CHECKING:
    from .data import Example

log = logging.getLogger(__name__)


class PeftLearnerConfig(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    model_path: Path
    task: str | None = None  # synthetic data: a task of fedquic.client.data (e.g. "reverse", "mc-reverse", "label")
    data_path: Path | None = None
    num_examples: int = Field(default=256, ge=1)
    data_seed: int = 0
    # Device profile (fedquic.client.profiles) and field-by-field overrides of it; None: the profile's value.
    profile: str = "default"
    quantization: Literal["nf4", "int8", "none"] | None = None
    compute_dtype: Literal["float32", "bfloat16"] | None = None
    gradient_checkpointing: bool | None = None
    device: str | None = None
    micro_batch_size: int | None = Field(default=None, ge=1)
    max_len: int = Field(default=48, ge=2)
    threads: int = Field(default=0, ge=0)
    # Held out from training and evaluated after each round (loss_eval, acc_exact, acc_mc, acc_cls): at most
    # this many examples and at most a tenth of the data; 0 turns it off.
    eval_samples: int = Field(default=32, ge=0)
    eval_max_new_tokens: int | None = Field(default=None, ge=1)  # None: longest reference answer + 1
    progress: bool = True  # a progress bar over each round's steps, when stderr is a terminal

    @model_validator(mode="after")
    def _one_data_source(self) -> PeftLearnerConfig:
        if (self.task is None) == (self.data_path is None):
            raise ValueError("give exactly one of task (synthetic data) or data_path (JSONL)")
        return self

    def device_profile(self) -> DeviceProfile:
        return resolve_profile(
            self.profile,
            quantization=self.quantization,
            compute_dtype=self.compute_dtype,
            gradient_checkpointing=self.gradient_checkpointing,
            device=self.device,
            micro_batch_size=self.micro_batch_size,
        )


def round_steps(spec: TrainSpec, n_examples: int) -> int:
    """Optimizer steps this round: ``local_steps``, or ``ceil(local_epochs · n / batch_size)`` when epochs are set
    (clients with more data then take more steps, as in FedAvg's E local epochs)."""
    if spec.local_epochs is not None:
        return max(1, math.ceil(spec.local_epochs * n_examples / spec.batch_size))
    return spec.local_steps


def held_out_split(examples: list[Example], k: int, seed: int) -> tuple[list[Example], list[Example]]:
    """(train, held-out): ``min(k, len // 10)`` examples drawn with a seeded permutation are held out."""
    k = min(k, len(examples) // 10)
    if k <= 0:
        return list(examples), []
    order = np.random.default_rng([seed, 0xE7A1]).permutation(len(examples))
    held = set(order[:k].tolist())
    return [ex for i, ex in enumerate(examples) if i not in held], [examples[i] for i in sorted(held)]


class PeftLearner:
    def __init__(self, cfg: PeftLearnerConfig) -> None:
        import torch

        from .data import load_jsonl, make_task_examples
        from .model import LoadSpec, base_model_fingerprint, load_base_model

        self.cfg = cfg
        self.profile = cfg.device_profile()
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        if cfg.task is not None:
            examples = make_task_examples(cfg.task, cfg.num_examples, cfg.data_seed)
        else:
            assert cfg.data_path is not None
            examples = load_jsonl(cfg.data_path)
        if not examples:
            raise ConfigError("the client has no training examples")
        self.examples, self.eval_examples = held_out_split(examples, cfg.eval_samples, cfg.data_seed)
        self._fingerprint = base_model_fingerprint(cfg.model_path)
        spec = LoadSpec(
            quantization=self.profile.quantization,
            compute_dtype=self.profile.compute_dtype,
            gradient_checkpointing=self.profile.gradient_checkpointing,
            device=self.profile.device,
        )
        self.base_model, self.tokenizer = load_base_model(cfg.model_path, spec)
        self.fam = None  # the FedALTModel, built once the job's LoRA settings are known
        log.info(
            "loaded %s (profile %s: %s), %d training and %d held-out examples",
            cfg.model_path,
            cfg.profile,
            self.profile.model_dump(),
            len(self.examples),
            len(self.eval_examples),
        )

    def base_fingerprint(self) -> str:
        return self._fingerprint

    def num_samples(self) -> int:
        return len(self.examples)

    def attach(self, job: Welcome) -> AdapterSchema:
        from .fedalt import FedALTModel, LoraSpec

        self._rounds = job.rounds  # for the progress display ("round 3/10")
        key = (job.lora, job.init_seed, job.mixer, job.mixer_init, job.federation)
        if self.fam is not None:  # a reconnect to the same job (e.g. after a failed first attempt)
            if key != self._job_key:
                raise ConfigError("this learner is attached to a job with other adapter settings")
            return self.fam.schema()
        self._job_key = key
        lora = LoraSpec(
            rank=job.lora.rank,
            alpha=job.lora.alpha,
            dropout=job.lora.dropout,
            target_modules=list(job.lora.target_modules) if job.lora.target_modules else None,
        )
        self.fam = FedALTModel(
            self.base_model,
            lora,
            init_seed=job.init_seed,
            mixer=job.mixer,
            mixer_init=job.mixer_init,
            federation=job.federation,
        )
        return self.fam.schema()

    def _model(self):  # type: ignore[no-untyped-def]
        if self.fam is None:
            raise ConfigError("attach() must be called before training")
        return self.fam

    def local_state(self) -> TensorDict:
        return self._model().local_state()

    def set_local_state(self, state: TensorDict) -> None:
        self._model().set_local_state(state)

    def set_row_state(self, state: TensorDict) -> None:
        self._model().set_row_state(state)

    def extra_state(self) -> TensorDict:
        """The learned mixers (router weights): personal, never aggregated, but part of the client checkpoint.

        The built-in trainer re-creates its optimizer every round, so there is no optimizer state to add."""
        return self._model().mixer_state()

    def load_extra_state(self, state: TensorDict) -> None:
        if state:
            self._model().set_mixer_state(state)

    def evaluate(self) -> dict[str, float]:
        """Held-out metrics (see :func:`fedquic.client.evaluate.evaluate`); empty without held-out data."""
        from .evaluate import evaluate

        if not self.eval_examples:
            return {}
        t0 = time.perf_counter()
        out = evaluate(
            self._model(),
            self.tokenizer,
            self.eval_examples,
            max_len=self.cfg.max_len,
            batch_size=self.profile.micro_batch_size or 8,
            max_new_tokens=self.cfg.eval_max_new_tokens,
        )
        out["eval_s"] = time.perf_counter() - t0
        return out

    def train(self, round_: int, spec: TrainSpec) -> dict[str, float]:
        from .data import tokenize_examples
        from .progress import TrainProgress
        from .trainer import TrainConfig, evaluate_loss, train_local

        fam = self._model()
        if spec.local_steps == 0 and spec.local_epochs is None:
            batches = tokenize_examples(self.tokenizer, self.examples[:32], self.cfg.max_len)
            loss = evaluate_loss(fam, batches)
            return {"loss_before": loss, "loss_after": loss, "train_s": 0.0, "steps": 0.0, **self.evaluate()}
        steps = round_steps(spec, len(self.examples))
        cfg = TrainConfig(
            steps=steps,
            lr=spec.lr,
            batch_size=spec.batch_size,
            max_len=self.cfg.max_len,
            seed=self.cfg.data_seed * 100_003 + round_,
            prox_mu=spec.prox_mu,
            micro_batch_size=self.profile.micro_batch_size,
            schedule=spec.lr_schedule,
            warmup_steps=spec.warmup_steps,
        )
        every = max(1, steps // 4)
        label = f"round {round_}/{self._rounds}" if getattr(self, "_rounds", None) else f"round {round_}"
        with TrainProgress(label, steps, enabled=self.cfg.progress) as bar:

            def progress(step: int, total: int, loss: float) -> None:
                bar.update(step, total, loss)
                if step % every == 0 or step == total:
                    log.info("round %d: step %d/%d loss %.4f", round_, step, total, loss)

            res = train_local(fam, self.examples, self.tokenizer, cfg, progress=progress)
        return {
            "loss_before": res.loss_before,
            "loss_after": res.loss_after,
            "train_s": res.seconds,
            "steps": float(res.steps),
            "samples": float(res.samples),
            **self.evaluate(),
        }

    def save(self, out_dir: Path) -> None:
        """Write the trained adapters: a peft directory of the individual LoRA and the full FedALT model."""
        from .export import export_peft_adapter, save_fedalt

        fam = self._model()
        peft_dir = export_peft_adapter(fam, Path(out_dir) / "peft")
        save_fedalt(fam, Path(out_dir) / "fedalt")
        log.info("saved adapters: peft %s, fedalt %s", peft_dir, Path(out_dir) / "fedalt")
