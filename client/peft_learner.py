"""The built-in :class:`~fedquic.client.learner.Learner`: a local 4-bit base model with peft LoRA adapters
and the FedALT mixer, trained on the client's own data."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from ..common.adapter import AdapterSchema, TensorDict
from ..common.errors import ConfigError
from ..common.messages import TrainSpec, Welcome

log = logging.getLogger(__name__)


class PeftLearnerConfig(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    model_path: Path
    task: str | None = None
    data_path: Path | None = None
    num_examples: int = Field(default=256, ge=1)
    data_seed: int = 0
    quantization: Literal["nf4", "int8", "none"] = "nf4"
    compute_dtype: Literal["float32", "bfloat16"] = "float32"
    gradient_checkpointing: bool = True
    max_len: int = Field(default=48, ge=2)
    threads: int = Field(default=0, ge=0)
    device: str = "cpu"

    @model_validator(mode="after")
    def _one_data_source(self) -> PeftLearnerConfig:
        if (self.task is None) == (self.data_path is None):
            raise ValueError("give exactly one of task (synthetic data) or data_path (JSONL)")
        return self


class PeftLearner:
    def __init__(self, cfg: PeftLearnerConfig) -> None:
        import torch

        from .data import load_jsonl, make_examples
        from .model import LoadSpec, base_model_fingerprint, load_base_model

        self.cfg = cfg
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        if cfg.task is not None:
            self.examples = make_examples(cfg.task, cfg.num_examples, cfg.data_seed)
        else:
            assert cfg.data_path is not None
            self.examples = load_jsonl(cfg.data_path)
        if not self.examples:
            raise ConfigError("the client has no training examples")
        self._fingerprint = base_model_fingerprint(cfg.model_path)
        spec = LoadSpec(
            quantization=cfg.quantization,
            compute_dtype=cfg.compute_dtype,
            gradient_checkpointing=cfg.gradient_checkpointing,
            device=cfg.device,
        )
        self.base_model, self.tokenizer = load_base_model(cfg.model_path, spec)
        self.fam = None  # the FedALTModel, built once the job's LoRA settings are known
        log.info("loaded %s (%s), %d examples", cfg.model_path, cfg.quantization, len(self.examples))

    def base_fingerprint(self) -> str:
        return self._fingerprint

    def num_samples(self) -> int:
        return len(self.examples)

    def attach(self, job: Welcome) -> AdapterSchema:
        from .fedalt import FedALTModel, LoraSpec

        key = (job.lora, job.init_seed, job.mixer, job.federation)
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
            self.base_model, lora, init_seed=job.init_seed, mixer=job.mixer, federation=job.federation
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

    def train(self, round_: int, spec: TrainSpec) -> dict[str, float]:
        from .data import tokenize_examples
        from .trainer import TrainConfig, evaluate_loss, train_local

        fam = self._model()
        if spec.local_steps == 0:
            batches = tokenize_examples(self.tokenizer, self.examples[:32], self.cfg.max_len)
            loss = evaluate_loss(fam, batches)
            return {"loss_before": loss, "loss_after": loss, "train_s": 0.0, "steps": 0.0}
        cfg = TrainConfig(
            steps=spec.local_steps,
            lr=spec.lr,
            batch_size=spec.batch_size,
            max_len=self.cfg.max_len,
            seed=self.cfg.data_seed * 100_003 + round_,
            prox_mu=spec.prox_mu,
        )
        every = max(1, spec.local_steps // 4)

        def progress(step: int, total: int, loss: float) -> None:
            if step % every == 0 or step == total:
                log.info("round %d: step %d/%d loss %.4f", round_, step, total, loss)

        res = train_local(fam, self.examples, self.tokenizer, cfg, progress=progress)
        return {
            "loss_before": res.loss_before,
            "loss_after": res.loss_after,
            "train_s": res.seconds,
            "steps": float(res.steps),
            "samples": float(res.samples),
        }

    def save(self, out_dir: Path) -> None:
        """Write the trained adapters: a peft directory of the individual LoRA and the full FedALT model."""
        from .export import export_peft_adapter, save_fedalt

        fam = self._model()
        peft_dir = export_peft_adapter(fam, Path(out_dir) / "peft")
        save_fedalt(fam, Path(out_dir) / "fedalt")
        log.info("saved adapters: peft %s, fedalt %s", peft_dir, Path(out_dir) / "fedalt")
