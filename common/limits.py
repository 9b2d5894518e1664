"""Bounds on everything read from the network, checked before any allocation or decompression."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field


class WireLimits(BaseModel):
    """Hard caps a receiver enforces on frames and tensor payloads."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    # JOIN (the adapter schema), UPDATE and AGGREGATE (tensor manifests) may have headers up to max_header_bytes;
    # every other message's header is a few fields, held to max_control_header_bytes.
    max_header_bytes: int = Field(default=1 << 20, ge=64, le=1 << 26)
    max_control_header_bytes: int = Field(default=1 << 16, ge=64, le=1 << 26)
    max_body_bytes: int = Field(default=1 << 30, ge=0, le=1 << 34)
    max_tensors: int = Field(default=65_536, ge=1)
    max_dims: int = Field(default=8, ge=1, le=32)
    max_tensor_elements: int = Field(default=1 << 31, ge=1)
    max_total_elements: int = Field(default=1 << 31, ge=1)
    # Per connection: incoming bulk streams open at once, bytes held in unfinished frames (counted as they
    # arrive, never as claimed), and how long a bulk stream may take to finish (a peer that opens streams and
    # never completes them is cut off).
    max_open_streams: int = Field(default=16, ge=1)
    max_buffered_bytes: int = Field(default=1 << 31, ge=1 << 16)
    stream_timeout_s: float = Field(default=600.0, gt=0)
    # Across every connection of a server: bytes held in unfinished frames. Over it, a new bulk stream that the
    # server has not reserved room for (an UPLOAD_GRANT reserves it) is refused with LIMIT_EXCEEDED.
    max_total_buffered_bytes: int = Field(default=1 << 32, ge=1 << 16)
    # The control stream must make progress: a partial frame on it that is not completed within this time (a
    # peer dripping a byte every few seconds) is a TIMEOUT.
    control_frame_timeout_s: float = Field(default=30.0, gt=0)


DEFAULT_LIMITS = WireLimits()
