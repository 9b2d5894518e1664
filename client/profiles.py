"""Device profiles: how one client runs its local training, chosen by name and overridable field by field.

A profile is about the device only: quantization and compute dtype of the frozen base, gradient checkpointing,
the torch device, and the largest micro-batch the device runs at once. The job's batch size (ROUND_START's
``train.batch_size``) is kept whatever the profile: a smaller micro-batch accumulates gradients over several
forward/backward passes, which gives the same step. LoRA rank, alpha and target modules are job-level (every
client must have the same adapter shapes), so a profile has no such fields and cannot change them.

=========  ============  =======  =============  ======  ===========
profile    quantization  compute  checkpointing  device  micro-batch
=========  ============  =======  =============  ======  ===========
default    nf4           float32  on             cpu     job's batch
edge       nf4           float32  on             cpu     2
gpu        nf4           bfloat16 off            cuda    64
=========  ============  =======  =============  ======  ===========
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from ..common.errors import ConfigError


class DeviceProfile(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    quantization: Literal["nf4", "int8", "none"] = "nf4"
    compute_dtype: Literal["float32", "bfloat16"] = "float32"
    gradient_checkpointing: bool = True
    device: str = "cpu"
    micro_batch_size: int | None = Field(default=None, ge=1)  # None: the job's batch size in one pass


PROFILES: dict[str, DeviceProfile] = {
    "default": DeviceProfile(),
    # Phones, boards, laptops: 4-bit base, fp32 maths (CPUs without bf16 units are slow at it), recompute
    # activations instead of storing them, and two examples per forward pass.
    "edge": DeviceProfile(micro_batch_size=2),
    # A CUDA GPU: bf16 compute, activations kept (memory is there, recomputation costs time), large passes.
    "gpu": DeviceProfile(compute_dtype="bfloat16", gradient_checkpointing=False, device="cuda", micro_batch_size=64),
}


def known_profiles() -> list[str]:
    return sorted(PROFILES)


def resolve_profile(name: str, **overrides: object) -> DeviceProfile:
    """The named profile with every override that is not None applied."""
    base = PROFILES.get(name)
    if base is None:
        raise ConfigError(f"unknown device profile {name!r}; known profiles: {', '.join(known_profiles())}")
    given = {k: v for k, v in overrides.items() if v is not None}
    unknown = sorted(set(given) - set(DeviceProfile.model_fields))
    if unknown:
        raise ConfigError(
            f"a device profile has no field {unknown[0]!r} (LoRA rank and target modules are job-level); "
            f"fields: {', '.join(DeviceProfile.model_fields)}"
        )
    try:
        return DeviceProfile.model_validate({**base.model_dump(), **given})
    except ValidationError as exc:
        err = exc.errors()[0]
        raise ConfigError(f"device profile {name!r}: {err['loc'][0] if err['loc'] else ''}: {err['msg']}") from None
