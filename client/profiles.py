"""Device profiles: how one client runs its local training, chosen by name and overridable field by field.

A profile is about the device only: quantization and compute dtype of the frozen base, gradient checkpointing,
the torch device, and the largest micro-batch the device runs at once. The job's batch size (ROUND_START's
``train.batch_size``) is kept whatever the profile: a smaller micro-batch accumulates gradients over several
forward/backward passes, which gives the same step. LoRA rank, alpha and target modules are job-level (every
client must have the same adapter shapes), so a profile has no such fields and cannot change them.

=========  ============  =======  =============  ======  ===========
profile    quantization  compute  checkpointing  device  micro-batch
=========  ============  =======  =============  ======  ===========
default    nf4           auto     on             cpu     job's batch
edge       nf4           auto     on             cpu     2
gpu        nf4           bfloat16 off            cuda    64
=========  ============  =======  =============  ======  ===========

``auto`` compute is bfloat16 where the device does bf16 maths natively (a CUDA GPU that supports it; a CPU with
AVX512-BF16 or AMX-BF16), float32 elsewhere (CPUs without bf16 units are slow at it). Measured on a Xeon with
AMX (bench/client.py, 340 M parameters in NF4): a training step 3.6 -> 1.75 s and the peak RSS 1420 -> 1166 MiB
against float32 compute (the dequantized weights are half the size). Only the frozen base computes in it: the
LoRA adapters and what is sent stay float32.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from ..common.errors import ConfigError


class DeviceProfile(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    quantization: Literal["nf4", "int8", "none"] = "nf4"
    compute_dtype: Literal["auto", "float32", "bfloat16"] = "auto"
    gradient_checkpointing: bool = True
    device: str = "cpu"
    micro_batch_size: int | None = Field(default=None, ge=1)  # None: the job's batch size in one pass


PROFILES: dict[str, DeviceProfile] = {
    "default": DeviceProfile(),
    # Phones, boards, laptops: 4-bit base, bf16 maths only where the CPU has bf16 units, recompute activations
    # instead of storing them, and two examples per forward pass.
    "edge": DeviceProfile(micro_batch_size=2),
    # A CUDA GPU: bf16 compute, activations kept (memory is there, recomputation costs time), large passes.
    "gpu": DeviceProfile(compute_dtype="bfloat16", gradient_checkpointing=False, device="cuda", micro_batch_size=64),
}


_BF16_CPU_FLAGS = frozenset({"avx512_bf16", "amx_bf16"})


def cpu_has_native_bf16(cpuinfo: str | None = None) -> bool:
    """Whether this CPU does bf16 arithmetic in hardware (Linux: its /proc/cpuinfo flags; elsewhere False)."""
    if cpuinfo is None:
        try:
            with open("/proc/cpuinfo", encoding="utf-8") as f:
                cpuinfo = f.read()
        except OSError:
            return False
    for line in cpuinfo.splitlines():
        if line.startswith(("flags", "Features")):
            return bool(_BF16_CPU_FLAGS & set(line.partition(":")[2].split()))
    return False


def native_compute_dtype(device: str) -> Literal["float32", "bfloat16"]:
    """What ``auto`` means on ``device``: bfloat16 where it is done in hardware, else float32."""
    if device.startswith("cuda"):
        import torch

        return "bfloat16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "float32"
    return "bfloat16" if device == "cpu" and cpu_has_native_bf16() else "float32"


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
        profile = DeviceProfile.model_validate({**base.model_dump(), **given})
    except ValidationError as exc:
        err = exc.errors()[0]
        raise ConfigError(f"device profile {name!r}: {err['loc'][0] if err['loc'] else ''}: {err['msg']}") from None
    if profile.compute_dtype == "auto":  # resolved here: what loads the model gets a concrete dtype
        profile = profile.model_copy(update={"compute_dtype": native_compute_dtype(profile.device)})
    return profile
