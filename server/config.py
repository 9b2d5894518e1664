"""Server configuration: one pydantic model, resolved once at start-up."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from ..common.codec import Encoding, EncodingSpec
from ..common.messages import LoraJobSpec, TrainSpec
from ..transport.settings import TlsFiles, TransportSettings
from .rounds import RoundPolicy


class JobConfig(BaseModel):
    """What every client of the job must agree on, plus the per-round training recipe."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    job_id: str = "fedquic-job"
    init_seed: int = Field(default=0, ge=0)
    federation: Literal["fedalt", "fedavg", "local"] = "fedalt"
    mixer: Literal["fixed", "learned"] = "fixed"
    lora: LoraJobSpec = LoraJobSpec()
    train: TrainSpec = TrainSpec()
    uplink: EncodingSpec = EncodingSpec()
    downlink: EncodingSpec = EncodingSpec()
    # "uniform" is the FedALT paper's mean; "samples" weights by reported sample counts (capped).
    weighting: Literal["uniform", "samples"] = "uniform"
    max_sample_weight: int = Field(default=1_000_000, ge=1)

    @model_validator(mode="after")
    def _dense_downlink(self) -> JobConfig:
        # The aggregate is sent whole each round; a sparse one would need server-side error feedback on
        # per-client deltas, which the server does not keep yet.
        if self.downlink.encoding is Encoding.TOPK:
            raise ValueError(
                "downlink top-k needs per-client downlink error feedback, not supported yet; "
                "use a dense downlink encoding (fp32, fp16, bf16, int8)"
            )
        return self


class ServerConfig(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    host: str = "0.0.0.0"
    port: int = Field(default=4433, ge=0, le=65535)
    tls: TlsFiles
    transport: TransportSettings = TransportSettings()
    policy: RoundPolicy = RoundPolicy()
    job: JobConfig = JobConfig()
    run_dir: Path = Path("runs/server")
    # Written once listening: {"host":..., "port":..., "pid":...}; lets scripts bind to port 0.
    ready_file: Path | None = None
