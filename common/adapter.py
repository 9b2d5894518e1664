"""Adapter schemas and the job-level deterministic LoRA initialisation.

Every client and the server must agree on the starting adapter so that averaging LoRA factors is
meaningful. The init is computed here, in numpy, from the job seed and the schema alone: the server
(which has no torch) reconstructs every client's adapter from it, and a CPU client and a GPU client
get bit-identical starting points (torch's RNG streams differ between devices).
"""

from __future__ import annotations

import hashlib
import json
import math
import zlib
from collections.abc import Mapping
from typing import Annotated

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, model_validator

from .codec import Manifest
from .errors import SchemaMismatchError

TensorDict = dict[str, np.ndarray]

MAX_TENSOR_NAME = 512
MAX_DIMS = 8


class TensorSpec(BaseModel):
    """Name, shape and dtype of one adapter tensor."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str = Field(min_length=1, max_length=MAX_TENSOR_NAME)
    # A zero dimension is an empty tensor (harmless); a negative one would make numel and every size check lie.
    shape: tuple[Annotated[int, Field(ge=0, le=1 << 31)], ...] = Field(min_length=1, max_length=MAX_DIMS)
    dtype: str = Field(default="float32", min_length=1, max_length=16)

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


class AdapterSchema(BaseModel):
    """The ordered list of tensors in an adapter; all clients of a job share one schema."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    tensors: tuple[TensorSpec, ...] = Field(max_length=1 << 16)

    @model_validator(mode="after")
    def _names_are_unique(self) -> AdapterSchema:
        names = [t.name for t in self.tensors]
        if len(set(names)) != len(names):
            dup = sorted({n for n in names if names.count(n) > 1})[:3]
            raise ValueError(f"tensor names must be unique (repeated: {', '.join(dup)})")
        return self

    @classmethod
    def from_state(cls, state: Mapping[str, np.ndarray]) -> AdapterSchema:
        return cls(
            tensors=tuple(
                TensorSpec(name=k, shape=tuple(int(d) for d in v.shape), dtype=str(v.dtype))
                for k, v in sorted(state.items())
            )
        )

    @property
    def numel(self) -> int:
        return sum(t.numel for t in self.tensors)

    def fingerprint(self) -> str:
        """A short stable hash of names, shapes and dtypes (order-independent)."""
        canon = json.dumps(sorted((t.name, list(t.shape), t.dtype) for t in self.tensors), separators=(",", ":"))
        return hashlib.sha256(canon.encode()).hexdigest()[:16]

    def by_name(self) -> dict[str, TensorSpec]:
        return {t.name: t for t in self.tensors}

    def check_state(self, state: Mapping[str, np.ndarray], *, what: str = "adapter") -> None:
        """Raise :class:`SchemaMismatchError` unless ``state`` has exactly this schema."""
        self._check_shapes({k: tuple(v.shape) for k, v in state.items()}, what)

    def check_manifest(self, manifest: Manifest, *, what: str = "payload", subset: bool = False) -> None:
        """The same check on a payload's manifest, before anything is decompressed or allocated. ``subset``: the
        payload may carry some of the schema's tensors only (a routed UPDATE), at least one, none unknown."""
        self._check_shapes({t.name: t.shape for t in manifest.tensors}, what, subset=subset)

    def _check_shapes(self, shapes: Mapping[str, tuple[int, ...]], what: str, *, subset: bool = False) -> None:
        specs = self.by_name()
        # a routed update carries some of the tensors, at least one; anything else carries them all
        names_ok = bool(shapes) and set(shapes) <= set(specs) if subset else set(shapes) == set(specs)
        if not names_ok:
            missing = sorted(set(specs) - set(shapes))[:3]
            extra = sorted(set(shapes) - set(specs))[:3]
            raise SchemaMismatchError(f"{what}: tensor names differ (missing {missing}, unexpected {extra})")
        for name, shape in shapes.items():
            if tuple(shape) != specs[name].shape:
                raise SchemaMismatchError(f"{what}: {name} has shape {tuple(shape)}, expected {specs[name].shape}")


def _tensor_rng(seed: int, name: str) -> np.random.Generator:
    # One stream per tensor, keyed by name: independent of tensor order and of the other tensors.
    return np.random.default_rng([seed & 0xFFFFFFFF, zlib.crc32(name.encode())])


def is_lora_a(name: str) -> bool:
    return ".lora_A." in name or name.endswith("lora_A.weight")


def is_lora_b(name: str) -> bool:
    return ".lora_B." in name or name.endswith("lora_B.weight")


def init_lora_state(schema: AdapterSchema, seed: int) -> TensorDict:
    """The job's starting adapter: A ~ U(-1/sqrt(in), 1/sqrt(in)), B = 0.

    This is the distribution peft's default init draws from (kaiming-uniform with a=sqrt(5) gives a
    bound of 1/sqrt(fan_in)), so B·A = 0 at the start and the model is unchanged.
    """
    state: TensorDict = {}
    for spec in schema.tensors:
        if is_lora_a(spec.name):
            fan_in = spec.shape[-1]
            bound = 1.0 / math.sqrt(fan_in)
            arr = _tensor_rng(seed, spec.name).uniform(-bound, bound, size=spec.shape)
            state[spec.name] = arr.astype(np.float32)
        else:
            state[spec.name] = np.zeros(spec.shape, dtype=np.float32)
    return state


def zeros_state(schema: AdapterSchema) -> TensorDict:
    return {t.name: np.zeros(t.shape, dtype=np.float32) for t in schema.tensors}


def initial_held(kind: str, schema: AdapterSchema, init: Mapping[str, np.ndarray]) -> TensorDict:
    """What a client holds of an aggregate ``kind`` before the first one arrives, on both sides of the wire: the
    Rest-of-World contributes nothing yet (zeros); the global adapter is the job's shared initialisation."""
    if kind == "row":
        return zeros_state(schema)
    if kind == "global":
        return {k: np.array(v, dtype=np.float32, copy=True) for k, v in init.items()}
    raise ValueError(f"no initial state for adapter kind {kind!r}")


def state_hash(state: Mapping[str, np.ndarray]) -> str:
    """Content hash of a tensor dict (names, shapes, bytes), for versioning and idempotency."""
    h = hashlib.sha256()
    for name in sorted(state):
        arr = np.ascontiguousarray(state[name], dtype=np.float32)
        h.update(name.encode())
        h.update(repr(arr.shape).encode())
        h.update(arr.reshape(-1).view(np.uint8).data)  # the bytes in place: tobytes() would copy them first
    return h.hexdigest()[:32]
