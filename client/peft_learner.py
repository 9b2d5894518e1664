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

    model_path: Path = Field(description="local model directory (no hub downloads)")
    task: str | None = Field(
        default=None, description="synthetic task for demos: copy, reverse, sort, mc-<task>, label, ..."
    )
    data_path: Path | None = Field(
        default=None, description="JSONL of {prompt, response}, {text}, {prompt, options, answer}, ..."
    )
    # Held-out data: a file of its own, else a seeded eval_fraction of the training data (never trained on).
    eval_data_path: Path | None = Field(default=None, description="held-out JSONL (the same records as the data)")
    eval_fraction: float = Field(
        default=0.1, ge=0.0, lt=1.0, description="share of the data held out when there is no held-out file"
    )
    num_examples: int = Field(default=256, ge=1, description="synthetic examples to generate")
    data_seed: int = Field(default=0, description="seed of the synthetic data and of the held-out split")
    # Device profile (fedquic.client.profiles) and field-by-field overrides of it; None: the profile's value.
    profile: str = Field(
        default="default",
        description="device profile: default, edge (small micro-batches, checkpointing) or gpu (bf16, cuda); "
        "the flags below override its fields",
    )
    quantization: Literal["nf4", "int8", "none"] | None = Field(default=None, description="base model quantization")
    compute_dtype: Literal["auto", "float32", "bfloat16"] | None = Field(
        default=None, description="compute dtype of the frozen base (auto: bfloat16 where the device has bf16 units)"
    )
    gradient_checkpointing: bool | None = Field(default=None, description="recompute activations in the backward pass")
    device: str | None = Field(default=None, description="torch device, e.g. cpu or cuda:0")
    micro_batch_size: int | None = Field(
        default=None, ge=1, description="split each batch into micro-batches (gradient accumulation)"
    )
    max_len: int = Field(
        default=256,
        ge=2,
        description="max tokens per example; longer prompts lose the start of their content, never the chat template",
    )
    threads: int = Field(default=0, ge=0, description="torch CPU threads, 0 for torch's choice")
    # Scored: loss_eval, acc_exact, acc_mc, acc_cls.
    eval_samples: int = Field(
        default=32,
        ge=0,
        description="held-out items scored after each round's aggregate; the base model before round 1 and the "
        "model after the last round are scored on the whole held-out set; 0: no evaluation",
    )
    eval_casefold: bool = Field(
        default=False, description="acc_exact ignores case and whitespace (greedy generation, slower)"
    )
    # Training examples behind each round's loss_before/loss_after (two extra forward passes over them).
    loss_samples: int = Field(default=32, ge=1)
    # The local objective by name (fedquic.client.objectives: causal-lm, classification, or one registered by
    # the caller); None: the built-in that fits the data.
    objective: str | None = Field(
        default=None,
        min_length=1,
        max_length=64,
        description="local objective: causal-lm, classification, or one registered in fedquic.client.objectives",
    )
    eval_max_new_tokens: int | None = Field(default=None, ge=1)  # casefold generation; None: longest answer + 1
    # Prompt encoding (fedquic.client.data.PromptFormat): None = the tokenizer's chat template if it has one.
    chat_template: bool | None = Field(default=None, description="wrap prompts in the tokenizer's chat template")
    system_prompt: str | None = Field(default=None, description="the chat template's system turn ('' for an empty one)")
    num_labels: int | None = Field(
        default=None, ge=2, description="classes of a new classification head (the same on every client)"
    )
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


def held_out_split(examples: list[Example], fraction: float, seed: int) -> tuple[list[Example], list[Example]]:
    """(train, held-out): ``round(fraction · len)`` examples (at least one when ``fraction > 0``, at most all but
    one) drawn with a seeded permutation are held out, in their original order."""
    if not 0.0 <= fraction < 1.0:
        raise ConfigError(f"eval fraction must be in [0, 1), got {fraction}")
    k = min(max(round(fraction * len(examples)), 1 if fraction > 0 else 0), len(examples) - 1)
    if k <= 0:
        return list(examples), []
    order = np.random.default_rng([seed, 0xE7A1]).permutation(len(examples))
    held = set(order[:k].tolist())
    return [ex for i, ex in enumerate(examples) if i not in held], [examples[i] for i in sorted(held)]


def _data_kind(examples: list[Example]) -> str:
    """The kind of a client's data (classification data cannot be mixed with other kinds)."""
    kinds = {ex.kind for ex in examples}
    if "label" in kinds and len(kinds) > 1:
        raise ConfigError("the data mix classification records ({text, label}) with other kinds")
    return "label" if "label" in kinds else min(kinds, key=("generation", "mc", "text").index)


class PeftLearner:
    def __init__(self, cfg: PeftLearnerConfig) -> None:
        import torch

        from .data import PromptFormat, load_jsonl, make_task_examples, set_prompt_format
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
        if cfg.eval_samples == 0:
            self.examples, self.eval_examples = list(examples), []
        elif cfg.eval_data_path is not None:
            self.examples, self.eval_examples = list(examples), load_jsonl(cfg.eval_data_path)
        else:
            self.examples, self.eval_examples = held_out_split(examples, cfg.eval_fraction, cfg.data_seed)
        data_kind = _data_kind([*self.examples, *self.eval_examples])
        self._fingerprint = base_model_fingerprint(cfg.model_path)
        spec = LoadSpec(
            quantization=self.profile.quantization,
            compute_dtype=self.profile.compute_dtype,
            gradient_checkpointing=self.profile.gradient_checkpointing,
            device=self.profile.device,
        )
        self.base_model, self.tokenizer = load_base_model(
            cfg.model_path,
            spec,
            data_kind=data_kind,
            labels=[ex.label for ex in [*self.examples, *self.eval_examples] if ex.label is not None],
            num_labels=cfg.num_labels,
            progress=cfg.progress,
        )
        set_prompt_format(
            self.tokenizer, PromptFormat(chat_template=cfg.chat_template, system_prompt=cfg.system_prompt)
        )
        self._warn_truncated()
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
        lora = LoraSpec.from_job(job.lora)
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

    def _warn_truncated(self) -> None:
        from .data import encode_example

        for what, items in (("training", self.examples), ("held-out", self.eval_examples)):
            enc = [encode_example(self.tokenizer, ex, self.cfg.max_len) for ex in items]
            cut = [e for e in enc if e.truncated]
            if cut:
                log.warning(
                    "%d of %d %s examples are longer than --max-len %d tokens: their prompts lose the start of "
                    "their content (the template stays whole); held-out ones that are cut count as wrong",
                    len(cut),
                    len(items),
                    what,
                    self.cfg.max_len,
                )

    def evaluate(self, final: bool = False) -> dict[str, float]:
        """Held-out metrics of the model as it is now (see :func:`fedquic.client.evaluate.evaluate`), with
        ``eval_n`` (items scored) and ``eval_s``; on the first ``eval_samples`` held-out items, or all of them
        when ``final`` (the base model before round 1, the model after the last round). Empty without
        held-out data."""
        from .evaluate import evaluate

        if not self.eval_examples:
            return {}
        items = self.eval_examples if final else self.eval_examples[: self.cfg.eval_samples]
        t0 = time.perf_counter()
        out = evaluate(
            self._model(),
            self.tokenizer,
            items,
            max_len=self.cfg.max_len,
            batch_size=self.profile.micro_batch_size or 8,
            max_new_tokens=self.cfg.eval_max_new_tokens,
            casefold=self.cfg.eval_casefold,
        )
        out["eval_n"] = float(len(items))
        out["eval_s"] = time.perf_counter() - t0
        return out

    def train(self, round_: int, spec: TrainSpec) -> dict[str, float]:
        """One round of local training; training metrics only (the app evaluates when the round's aggregate is
        installed: :meth:`evaluate`)."""
        from .data import tokenize_examples
        from .progress import TrainProgress
        from .trainer import TrainConfig, evaluate_loss, train_local

        fam = self._model()
        if spec.local_steps == 0 and spec.local_epochs is None:
            batches = tokenize_examples(self.tokenizer, self.examples[:32], self.cfg.max_len)
            loss = evaluate_loss(fam, batches, self.cfg.objective)
            return {"loss_before": loss, "loss_after": loss, "train_s": 0.0, "steps": 0.0}
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
            eval_samples=self.cfg.loss_samples,
            objective=self.cfg.objective,
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
        }

    def save(self, out_dir: Path) -> None:
        """Write the trained adapters: a peft directory of the individual LoRA (``peft/local``) and the full
        FedALT model (``fedalt``: both LoRAs and the mixers)."""
        from .export import export_peft_adapter, save_fedalt

        fam = self._model()
        peft_dir = export_peft_adapter(fam, Path(out_dir) / "peft")
        save_fedalt(fam, Path(out_dir) / "fedalt")
        if fam.federation == "fedalt":
            log.info(
                "saved adapters: %s is the client's own LoRA only (a plain peft adapter, without the Rest-of-World "
                "LoRA and the mixers); %s is the whole FedALT model the held-out figures were measured on "
                "(load it with fedquic.client.export.load_fedalt)",
                peft_dir,
                Path(out_dir) / "fedalt",
            )
        else:
            log.info(
                "saved adapters: peft %s (the whole trained adapter), fedalt %s", peft_dir, Path(out_dir) / "fedalt"
            )
