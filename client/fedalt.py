"""The FedALT layer, built on two peft LoRA adapters and a per-token softmax gate.

Per target linear layer::

    y = W x + a_loc(x) · B_loc A_loc x · s + a_row(x) · B_row A_row x · s,   s = alpha / r
    (a_loc, a_row) = softmax(router(x)),   router = Linear(in_features, 2)

The router's weight starts at zero and its bias at (logit(p), 0), p = ``mixer_init`` (default 0.9): the mixer
starts as a per-layer constant p/(1-p) in favour of the client's own adapter and learns per token from there.
The reference code (jmbian/FedALT) has no bias and a random weight, so it starts near 0.5/0.5, which halves
the individual LoRA's output scale against local-only training while the RoW is still zero (round 1) or
mostly another task's (see docs/benchmarks.md, learning quality); ``mixer_init=0.5`` reproduces that start.

"local" is the trainable individual LoRA, "row" the frozen Rest-of-World LoRA replaced every round. peft sums
the outputs of active adapters, so both stay ordinary peft adapters (standard parameter names, standard
``get_peft_model_state_dict``). The gate is a scalar per token, hence g·B(Ax) = B(g·Ax): we compute it once
per layer call in a forward pre-hook on the ``LoraLayer`` and scale each adapter's rank-r code in a forward
hook on its ``lora_A[name]``. peft does not let outside code register tuner types; hooks keep us on stock
peft.

``federation="fedavg"`` and ``"local"`` use the same code with the "local" adapter only (no RoW, no gate).
"""

from __future__ import annotations

import logging
import math
import zlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from fedquic.common.adapter import AdapterSchema, TensorDict, init_lora_state, is_lora_a, zeros_state
from fedquic.common.errors import CodecError, ConfigError, ErrorCode
from fedquic.common.messages import LoraJobSpec
from fedquic.common.names import FEDERATIONS, MIXER_INIT, MIXERS, Federation, Mixer
from pydantic import ValidationError
from torch import nn

from .architectures import default_target_modules, head_targets, init_new_heads
from .methods import get_method
from .model import keep_4bit_differentiable

log = logging.getLogger(__name__)


LOCAL = "local"
ROW = "row"
ROUTERS_ATTR = "fedalt_routers"  # on the outer PeftModel, outside every tuner layer
_FIXED_GATE = 0.5


_JOB_LORA = LoraJobSpec()


@dataclass
class LoraSpec:
    """LoRA hyper-parameters shared by every client of a job (they define the adapter schema)."""

    # The job's defaults (LoraJobSpec, sent in WELCOME), not declared again.
    rank: int = _JOB_LORA.rank
    alpha: float = _JOB_LORA.alpha
    dropout: float = _JOB_LORA.dropout
    target_modules: list[str] | None = None
    method: str = "lora"  # the adapter method (fedquic.client.methods) that builds the peft config
    freeze_a: bool = False  # FFA-LoRA: A stays at the shared init (LoraJobSpec.freeze_a)

    def __post_init__(self) -> None:
        get_method(self.method)  # an unknown one is a ConfigError naming the registered ones
        if self.target_modules is not None and not self.target_modules:
            raise ConfigError("target_modules must be None (auto) or a non-empty list")
        try:  # the bounds are the job's (LoraJobSpec, sent in WELCOME): declared once
            LoraJobSpec(**self.job_fields())
        except ValidationError as exc:
            err = exc.errors()[0]
            raise ConfigError(f"LoRA {'.'.join(map(str, err['loc']))}: {err['msg']}") from None

    def job_fields(self) -> dict[str, object]:
        tm = tuple(self.target_modules) if self.target_modules else None
        return {
            "rank": self.rank,
            "alpha": self.alpha,
            "dropout": self.dropout,
            "target_modules": tm,
            "freeze_a": self.freeze_a,
        }

    @classmethod
    def from_job(cls, spec: LoraJobSpec) -> LoraSpec:
        """The job's adapter settings (WELCOME's ``lora``) as the model builds them."""
        tm = list(spec.target_modules) if spec.target_modules else None
        return cls(rank=spec.rank, alpha=spec.alpha, dropout=spec.dropout, target_modules=tm, freeze_a=spec.freeze_a)

    @property
    def scaling(self) -> float:
        return self.alpha / self.rank


RFF_FEATURES = 64  # random Fourier projections per RFF router (2 x that many features: cos and sin)


class _RffRouter(nn.Module):
    """CA-PFL's RFF personalization as a FedALT router: logits = W·z + c over random Fourier features of the layer
    input, z = sqrt(2/D)·[cos(ωᵀh + b), sin(ωᵀh + b)], ω ~ N(0, 1/in) and b ~ U(0, 2π) fixed and seeded by the job
    and the layer (the same on every restart; not state, never sent), W and c trained. A kernel machine over the
    hidden state where the linear router is a hyperplane: it can gate by where a token lies, not only by which way.
    ``weight``/``bias`` are the trained linear's, so the mixer's state has the linear router's keys."""

    def __init__(self, in_features: int, seed: int, device: torch.device) -> None:
        super().__init__()
        gen = torch.Generator().manual_seed(seed)
        omega = torch.randn(in_features, RFF_FEATURES, generator=gen) / math.sqrt(in_features)
        phase = torch.rand(RFF_FEATURES, generator=gen) * (2 * math.pi)
        # plain attributes, not buffers: nothing of the model's state dict or checkpoint (they are re-derived)
        self.omega, self.phase = omega.to(device), phase.to(device)
        self.linear = nn.Linear(2 * RFF_FEATURES, 2, bias=True, device=device, dtype=torch.float32)

    @property
    def weight(self) -> nn.Parameter:
        return self.linear.weight

    @property
    def bias(self) -> nn.Parameter:
        return self.linear.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = x @ self.omega + self.phase
        feats = torch.cat([torch.cos(z), torch.sin(z)], dim=-1) * math.sqrt(2.0 / RFF_FEATURES)
        return self.linear(feats)


class _Gate:
    """One LoRA layer's gate: computed once per layer call, applied to each adapter's rank-r code.

    Holds the per-call value itself, not on the module: peft 0.21 treats everything attached to a tuner layer
    (except ``base_layer``) as adapter state, so nothing of ours may live there. One forward at a time per
    model (as for any torch training loop).
    """

    def __init__(self, router: nn.Linear | _RffRouter | None) -> None:
        self.router = router  # None: fixed 0.5/0.5 mixer
        self.value: torch.Tensor | None = None

    def compute(self, layer: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        # From the layer input itself (before LoRA dropout), in the router's fp32.
        assert self.router is not None
        x = args[0] if args else kwargs["x"]
        self.value = torch.softmax(self.router(x.to(self.router.weight.dtype)), dim=-1)

    def clear(self, layer: nn.Module, args: tuple[Any, ...], output: Any) -> None:
        self.value = None  # do not keep activations alive between calls

    def scaler(self, column: int) -> Callable[[nn.Module, tuple[Any, ...], torch.Tensor], torch.Tensor]:
        def scale(module: nn.Module, args: tuple[Any, ...], output: torch.Tensor) -> torch.Tensor:
            if self.router is None:
                return output * _FIXED_GATE
            if self.value is None:
                raise RuntimeError("FedALT gate missing: lora_A was called outside its LoraLayer's forward")
            return output * self.value[..., column : column + 1].to(output.dtype)

        return scale


def _peft_task_type(model: nn.Module) -> str | None:
    """CAUSAL_LM for causal LMs (GPT-2's ``*LMHeadModel`` included). Other models (classifiers, vision-language
    models) get peft's generic PeftModel: peft's SEQ_CLS type would add a full trainable copy of the head
    (``modules_to_save``), a second kind of adapter state beside the LoRA tensors. A new head trains through a
    LoRA of its own instead (:mod:`fedquic.client.architectures`); a trained head stays frozen."""
    name = type(model).__name__
    return "CAUSAL_LM" if name.endswith(("ForCausalLM", "LMHeadModel")) else None


def _to_numpy(t: torch.Tensor) -> np.ndarray:
    # clone() so the array never aliases a live parameter.
    return t.detach().to("cpu", torch.float32).clone().numpy()


def _lora_targets(lora: LoraSpec, base_model: nn.Module, heads: list[str]) -> list[str]:
    """The job's target modules plus any head the checkpoint lacked, else the family's defaults (which include
    new heads)."""
    if lora.target_modules:
        return [*lora.target_modules, *(h for h in heads if h not in lora.target_modules)]
    return default_target_modules(base_model)


def _check_args(base_model: nn.Module, mixer: str, federation: str, mixer_init: float) -> None:
    if mixer not in MIXERS:
        raise ConfigError(f"mixer must be one of {list(MIXERS)}, got {mixer!r}")
    if not 0.0 < mixer_init < 1.0:
        raise ConfigError(f"mixer_init (the local adapter's initial gate) must be in (0, 1), got {mixer_init}")
    if federation not in FEDERATIONS:
        raise ConfigError(f"federation must be one of {list(FEDERATIONS)}, got {federation!r}")
    if hasattr(base_model, "peft_config"):
        raise ConfigError("base model already carries peft adapters; load a fresh base model per FedALTModel")
    if federation != "fedalt" and mixer != "fixed":
        log.info("mixer=%r ignored: federation=%r has a single adapter", mixer, federation)


class FedALTModel:
    """A base model wrapped with the "local" (+ "row" + gate, for FedALT) LoRA adapters."""

    def __init__(
        self,
        base_model: nn.Module,
        lora: LoraSpec,
        *,
        init_seed: int,
        mixer: Mixer = "fixed",
        federation: Federation = "fedalt",
        mixer_init: float = MIXER_INIT,
    ) -> None:
        from peft import get_peft_model
        from peft.tuners.lora import LoraLayer

        _check_args(base_model, mixer, federation, mixer_init)
        keep_4bit_differentiable(base_model)  # in case the caller loaded the model without load_base_model
        self.lora = lora
        self.federation: Federation = federation
        self.mixer: Mixer = mixer
        self.mixer_init = mixer_init
        self.init_seed = init_seed

        # A head the checkpoint lacked starts from the job seed on every client, and trains through its own LoRA.
        targets = _lora_targets(lora, base_model, init_new_heads(base_model, init_seed))
        config = get_method(lora.method).peft_config(lora, targets, _peft_task_type(base_model))
        try:
            self.model: nn.Module = get_peft_model(base_model, config, adapter_name=LOCAL)
        except ValueError as exc:  # peft: "Target modules {...} not found in the base model"
            raise ConfigError(f"cannot put LoRA on {targets}: {exc}") from exc
        self._layers: dict[str, nn.Module] = {
            name: m for name, m in self.model.named_modules() if isinstance(m, LoraLayer)
        }
        self._hooks: list[torch.utils.hooks.RemovableHandle] = []
        self._routers: dict[str, nn.Parameter] = {}  # "<layer>.router.weight|bias" -> parameter

        adapters = [LOCAL]
        if federation == "fedalt":
            self.model.add_adapter(ROW, config)
            adapters.append(ROW)
            # peft's set_adapter marks every active adapter trainable, RoW included: we re-freeze below.
            self.model.base_model.set_adapter(adapters)
            self._install_gate()

        # LoRA maths in fp32 whatever the compute dtype (peft casts x to lora_A's dtype and back).
        for layer in self._layers.values():
            for adapter in adapters:
                layer.lora_A[adapter].to(torch.float32)
                layer.lora_B[adapter].to(torch.float32)

        self._params: dict[str, dict[str, nn.Parameter]] = {a: self._adapter_params(a) for a in adapters}
        self._schema = AdapterSchema.from_state({k: _to_numpy(p) for k, p in self._params[LOCAL].items()})
        self._check_names_match_peft()
        self._freeze()

        self.set_local_state(init_lora_state(self._schema, init_seed))
        if federation == "fedalt":
            self.set_row_state(zeros_state(self._schema))  # round 1: RoW contributes nothing
        routers = sum(p.numel() for p in self._routers.values())
        shown = mixer if federation == "fedalt" else "-"
        log.info(
            "FedALT model: federation=%s mixer=%s targets=%s rank=%d, %d adapter values, %d router values",
            *(federation, shown, targets, lora.rank, self._schema.numel, routers),
        )

    # -- construction helpers --------------------------------------------------------------------------

    def _install_gate(self) -> None:
        routers = nn.ModuleDict()
        for name, layer in self._layers.items():
            router: nn.Linear | _RffRouter | None = None
            if self.mixer in ("learned", "rff"):
                device = layer.lora_A[LOCAL].weight.device
                if self.mixer == "rff":
                    seed = zlib.crc32(f"{self.init_seed}:{name}".encode())
                    router = _RffRouter(layer.in_features, seed, device)
                else:
                    router = nn.Linear(layer.in_features, 2, bias=True, device=device, dtype=torch.float32)
                nn.init.zeros_(router.weight)
                with torch.no_grad():  # softmax((logit p, 0)) = (p, 1 - p) for every token at the start
                    router.bias.copy_(torch.tensor([math.log(self.mixer_init / (1 - self.mixer_init)), 0.0]))
                routers[name.replace(".", "__")] = router  # ModuleDict keys may not contain dots
                self._routers[f"{name}.router.weight"] = router.weight
                self._routers[f"{name}.router.bias"] = router.bias
            gate = _Gate(router)
            if router is not None:
                self._hooks.append(layer.register_forward_pre_hook(gate.compute, with_kwargs=True))
                self._hooks.append(layer.register_forward_hook(gate.clear))
            for column, adapter in enumerate((LOCAL, ROW)):
                self._hooks.append(layer.lora_A[adapter].register_forward_hook(gate.scaler(column)))
        if self._routers:
            # Registered on the model so .to()/.parameters() see them; outside the tuner layers so peft's
            # adapter state dicts do not.
            self.model.add_module(ROUTERS_ATTR, routers)

    def _adapter_params(self, adapter: str) -> dict[str, nn.Parameter]:
        """Our key (peft's state-dict key, adapter name removed) -> the live parameter."""
        out: dict[str, nn.Parameter] = {}
        for name, layer in self._layers.items():
            for kind in ("lora_A", "lora_B"):
                out[f"{name}.{kind}.weight"] = getattr(layer, kind)[adapter].weight
        return out

    def _check_names_match_peft(self) -> None:
        # Guards the key convention promised to the network code against peft changing its naming.
        from peft import get_peft_model_state_dict

        ref = get_peft_model_state_dict(self.model, adapter_name=LOCAL, save_embedding_layers=False)
        if set(ref) != set(self._params[LOCAL]):
            raise RuntimeError(
                f"peft adapter keys differ from ours: e.g. {sorted(set(ref) ^ set(self._params[LOCAL]))[:3]}"
            )

    def _freeze(self) -> None:
        """Only the local LoRA and the routers train; base, RoW and everything else stay frozen."""
        trainable = {id(p) for p in self.trainable_parameters()}
        for p in self.model.parameters():
            p.requires_grad_(id(p) in trainable)

    # -- public API ------------------------------------------------------------------------------------

    def __call__(self, **inputs: Any) -> Any:
        """The forward pass: ``fam(input_ids=..., attention_mask=..., [pixel_values=...])`` runs the wrapped peft
        model and returns its output (``.logits``: ``[batch, seq, vocab]`` for a causal LM, ``[batch,
        num_labels]`` for a classifier). Every target layer computes ``W x + g_loc(x)·B_loc A_loc x·s +
        g_row(x)·B_row A_row x·s`` (module docstring); gradients reach the local LoRA and the mixers only."""
        return self.model(**inputs)

    @property
    def new_heads(self) -> list[str]:
        """Heads the checkpoint lacked (initialised from ``init_seed``, trained through their LoRA)."""
        return head_targets(self.model.get_base_model())

    def schema(self) -> AdapterSchema:
        """Schema of the local adapter (identical for RoW); the unit of aggregation."""
        return self._schema

    def local_state(self) -> TensorDict:
        return {k: _to_numpy(p) for k, p in self._params[LOCAL].items()}

    def set_local_state(self, state: Mapping[str, np.ndarray]) -> None:
        self._load(LOCAL, state, what="local adapter")

    def row_state(self) -> TensorDict:
        self._require_row()
        return {k: _to_numpy(p) for k, p in self._params[ROW].items()}

    def set_row_state(self, state: Mapping[str, np.ndarray]) -> None:
        self._require_row()
        self._load(ROW, state, what="RoW adapter")

    def mixer_state(self) -> TensorDict:
        """Router weights and biases (personal: kept by the client, never aggregated); empty without a learned
        mixer."""
        return {k: _to_numpy(p) for k, p in self._routers.items()}

    def set_mixer_state(self, state: Mapping[str, np.ndarray]) -> None:
        if not self._routers:
            if state:
                raise ConfigError("this model has no learned mixer to load router weights into")
            return
        AdapterSchema.from_state(self.mixer_state()).check_state(state, what="mixer")
        self._copy_into(self._routers, state, what="mixer")

    def trainable_parameters(self) -> list[nn.Parameter]:
        local = self._params[LOCAL].items()
        own = [p for k, p in local if not (self.lora.freeze_a and is_lora_a(k))]  # FFA-LoRA: A stays at the init
        return [*own, *self._routers.values()]

    # -- internals -------------------------------------------------------------------------------------

    def _require_row(self) -> None:
        if self.federation != "fedalt":
            raise ConfigError(f"federation={self.federation!r} has no RoW adapter")

    def _load(self, adapter: str, state: Mapping[str, np.ndarray], *, what: str) -> None:
        self._schema.check_state(state, what=what)
        self._copy_into(self._params[adapter], state, what=what)

    @staticmethod
    def _copy_into(params: Mapping[str, nn.Parameter], state: Mapping[str, np.ndarray], *, what: str) -> None:
        # Validate everything first so a bad tensor never leaves the model half-updated.
        arrays: dict[str, np.ndarray] = {}
        for key, value in state.items():
            arr = np.asarray(value)
            if not np.issubdtype(arr.dtype, np.floating):
                raise CodecError(f"{what}: {key} has non-float dtype {arr.dtype}")
            if not np.isfinite(arr).all():
                raise CodecError(f"{what}: {key} holds NaN/inf", code=ErrorCode.NON_FINITE)
            arrays[key] = arr
        with torch.no_grad():
            for key, arr in arrays.items():
                p = params[key]
                p.copy_(torch.from_numpy(np.ascontiguousarray(arr, dtype=np.float32)).to(p.device, p.dtype))
