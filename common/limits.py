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
    # Per connection: incoming bulk streams open at once, bytes buffered in unfinished frames, and how long a
    # bulk stream may take to finish (a peer that opens streams and never completes them is cut off).
    max_open_streams: int = Field(default=16, ge=1)
    max_buffered_bytes: int = Field(default=1 << 31, ge=1 << 16)
    stream_timeout_s: float = Field(default=600.0, gt=0)


DEFAULT_LIMITS = WireLimits()
