"""Server configuration: one pydantic model, resolved once at start-up."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from ..common.codec import EncodingSpec
from ..common.messages import JobTerms, Seed, TrainSpec
from ..transport.settings import TlsFiles, TransportSettings
from .rounds import RoundPolicy


class JobConfig(JobTerms):
    """The job: what every client must agree on (:class:`JobTerms`, sent in WELCOME: federation, mixer,
    mixer_init, lora, uplink_error_feedback, init_seed) plus the server's own settings and the per-round
    training recipe (sent in ROUND_START)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    job_id: str = Field(default="fedquic-job", description="job name; the run directory's state must belong to it")
    init_seed: Seed = Field(default=0, description="job seed of the shared initial adapter")
    train: TrainSpec = TrainSpec()
    uplink: EncodingSpec = Field(
        default=EncodingSpec(),
        description="client->server encoding: fp32, fp16, bf16, int8[-row|-column|-tensor|-blockN], "
        "topkP[-fp32|-fp16] (P percent kept, with error feedback), each optionally +nolz4",
    )
    downlink: EncodingSpec = Field(
        default=EncodingSpec(), description="server->client encoding of the aggregate, the same forms as uplink"
    )
    # Downlink error feedback: each client is sent C(target − what it holds), so what compression drops reaches
    # it in a later round (uplink_error_feedback, sent in WELCOME, is a JobTerms field). Off only to measure.
    downlink_error_feedback: bool = True
    # Rest-of-World construction: "factor-mean" averages A and B separately (the FedALT paper); "exact" takes
    # the mean of the products B·A and re-factors it to rank r by truncated SVD.
    row_mode: Literal["factor-mean", "exact"] = Field(
        default="factor-mean",
        description="Rest-of-World: average A and B separately (the FedALT paper) or the exact mean of the "
        "products B·A re-factored to rank r by SVD",
    )
    # None: fedavg for federation=fedavg, loo-<row_mode> for fedalt.
    aggregation: str | None = Field(
        default=None,
        min_length=1,
        max_length=64,
        description="aggregation rule by name (fedquic.server.rules): fedavg, fedprox, fedavg-aligned, "
        "loo-factor-mean, loo-exact, loo-aligned, loo-simgrad, loo-mosaic, or one a plugin registers",
    )
    # Settings of the aggregation rule, which it reads and checks (e.g. loo-simgrad's temperature and floor).
    rule_options: dict[str, float] = Field(
        default_factory=dict,
        max_length=16,
        description="settings the aggregation rule reads, e.g. temperature=0.2,floor=0.5 for loo-simgrad",
    )
    # Robust aggregation: scaled down to this global L2 norm before averaging. None: no clipping.
    clip_norm: float | None = Field(
        default=None,
        gt=0,
        description="clip each client's contribution (adapter minus the shared init) to this L2 norm",
    )
    # "uniform" is the FedALT paper's mean; "samples" weights by reported sample counts (capped).
    weighting: Literal["uniform", "samples"] = "uniform"
    # Privacy floor on reported sample counts used as weights.
    max_sample_weight: int = Field(default=1_000_000, ge=1)
    # Privacy floor: no Rest-of-World adapter is sent unless at least this many clients contributed
    # (with 2, leave-one-out hands each client the other's adapter).
    min_row_contributors: int = Field(default=2, ge=2)


class MetricsSettings(BaseModel):
    """The Prometheus endpoint (``/metrics``, ``/status``, ``/healthz``); localhost only unless told otherwise."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    enabled: bool = True
    host: str = "127.0.0.1"
    port: int = Field(
        default=9464, ge=0, le=65535, description="Prometheus /metrics port on localhost, 0 for any free one"
    )


class ServerConfig(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    host: str = Field(default="0.0.0.0", description="address to listen on")
    port: int = Field(default=4433, ge=0, le=65535, description="UDP port, 0 picks a free one")
    tls: TlsFiles
    transport: TransportSettings = TransportSettings()
    policy: RoundPolicy = RoundPolicy()
    job: JobConfig = JobConfig()
    metrics: MetricsSettings = MetricsSettings()
    # Admission control: at most this many clients upload at once (UPLOAD_REQUEST -> UPLOAD_GRANT, FIFO); the
    # server's memory for uploads in flight is bounded by slots x the largest update. A slot is released when
    # the update is handled, the client leaves, or upload_slot_timeout_s pass.
    upload_slots: int = Field(default=8, ge=1, le=100_000, description="clients allowed to upload at once")
    upload_slot_timeout_s: float = Field(default=300.0, gt=0)
    # Aggregates prepared and sent at once when a round closes (each holds a few copies of the adapter while
    # in flight): bounds the close's peak memory; the sends share one CPU anyway.
    downlink_slots: int = Field(default=8, ge=1, le=100_000)
    # The largest adapter a job takes (parameters, fp32 on the server): the first JOIN fixes the schema, and the
    # server builds the shared initial adapter from it, so a schema claiming more is refused before any allocation.
    max_adapter_parameters: int = Field(default=1 << 28, ge=1)
    # History (history.jsonl) and durable state (state/): restarting with the same run_dir resumes the job.
    run_dir: Path = Field(
        default=Path("runs/server"), description="history and durable state; reuse it to resume the job"
    )
    # Lets scripts bind to port 0.
    ready_file: Path | None = Field(
        default=None, description="write {host, port, pid, metrics_port} as JSON here once listening"
    )
    # A run directory whose job has finished: "exit" says so and exits 0 (nothing to resume); "restart" moves the
    # finished job's state aside to state.finished-TIME/ (its history.jsonl inside) and starts a new job there.
    # A job that did not finish is always resumed.
    on_finished: Literal["exit", "restart"] = Field(
        default="exit",
        description="when the run directory holds a finished job: exit 0 saying so, or move its state aside "
        "(state.finished-TIME/) and start a new job (the demo and the compose cluster, run again in one folder); "
        "a job that did not finish is always resumed",
    )
    # Python modules imported before the job is checked, to register extensions (aggregation rules:
    # fedquic.server.rules.register_rule), e.g. plugins = ["mylab.median_rule"].
    plugins: tuple[str, ...] = Field(
        default=(),
        max_length=64,
        description="Python module to import at start, e.g. one that registers an aggregation rule (repeatable)",
    )
