"""Bounds on everything read from the network, checked before any allocation or decompression."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field


class WireLimits(BaseModel):
    """Hard caps a receiver enforces on frames and tensor payloads."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    max_header_bytes: int = Field(default=1 << 20, ge=64, le=1 << 26)
    max_body_bytes: int = Field(default=1 << 30, ge=0, le=1 << 34)
    max_tensors: int = Field(default=65_536, ge=1)
    max_dims: int = Field(default=8, ge=1, le=32)
    max_tensor_elements: int = Field(default=1 << 31, ge=1)
    max_total_elements: int = Field(default=1 << 31, ge=1)
    max_metrics: int = Field(default=256, ge=0)


DEFAULT_LIMITS = WireLimits()
