"""Typed protocol messages. Each message is a pydantic header (JSON on the wire) plus an optional body.

The frame layout that carries them is in ``fedquic.transport.framing``; the byte-level spec is
``docs/protocol.md``. Headers forbid unknown fields and bound every string, list and number, so a
parsed header is safe to use.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import IntEnum
from typing import Annotated, Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from .adapter import AdapterSchema, is_lora_a, is_lora_b
from .codec import AnyManifest, Encoding, EncodingSpec
from .names import MIXER_INIT, AdapterKind, Federation, Mixer

PROTOCOL_VERSION = 1
SUPPORTED_VERSIONS: tuple[int, ...] = (1,)

Id = Field(min_length=1, max_length=128, pattern=r"^[A-Za-z0-9][A-Za-z0-9_.\-]*$")
Hash = Field(min_length=1, max_length=128, pattern=r"^[0-9a-f]+$")


class MsgType(IntEnum):
    HELLO = 1
    WELCOME = 2
    JOIN = 3
    ROUND_START = 4
    UPDATE = 5
    AGGREGATE = 6
    ACK = 7
    ERROR = 8
    HEARTBEAT = 9
    METRICS = 10
    BYE = 11
    UPLOAD_REQUEST = 12
    UPLOAD_GRANT = 13


class Header(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")
    msg_type: ClassVar[MsgType]
    has_body: ClassVar[bool] = False


class LoraJobSpec(BaseModel):
    """Job-level adapter settings: every client must build the same shapes."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    rank: int = Field(default=8, ge=1, le=1024, description="LoRA rank (job-level: every client builds it)")
    alpha: float = Field(default=16.0, gt=0, le=1e6, description="LoRA alpha (the update is scaled by alpha/rank)")
    dropout: float = Field(default=0.0, ge=0, lt=1)
    target_modules: tuple[str, ...] | None = Field(
        default=None, max_length=64, description="comma-separated module names the adapters wrap"
    )
    # FFA-LoRA (Sun et al., ICLR 2024): A stays at the job's seeded init on every client, so averaging B alone is
    # the exact mean of the products B·A, and only B crosses the uplink.
    freeze_a: bool = Field(
        default=False,
        description="FFA-LoRA: keep every LoRA A at the job's shared init, train and send only B (exact averaging, "
        "about half the uplink)",
    )
    # FedSA-LoRA (Guo et al., ICLR 2025): A learns what clients share and is averaged; B stays on each client.
    local_b: bool = Field(
        default=False,
        description="FedSA-LoRA: send and average only the LoRA A factors; each client keeps its own B",
    )

    @model_validator(mode="after")
    def _something_is_shared(self) -> LoraJobSpec:
        if self.freeze_a and self.local_b:
            raise ValueError("freeze_a and local_b together would share nothing: pick one")
        return self

    def shares(self, name: str) -> bool:
        """Whether tensor ``name`` of the adapter crosses the wire: not a frozen A, not a local B."""
        return not ((self.freeze_a and is_lora_a(name)) or (self.local_b and is_lora_b(name)))


class TrainSpec(BaseModel):
    """Per-round local training settings the server hands out."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    local_steps: int = Field(default=10, ge=0, le=1_000_000, description="local training steps per round")
    lr: float = Field(default=3e-3, gt=0, le=10, description="client learning rate")
    batch_size: int = Field(default=8, ge=1, le=65_536, description="examples per training step")
    prox_mu: float = Field(
        default=0.0, ge=0, le=1e6, description="FedProx proximal coefficient mu sent to clients, 0 for off"
    )
    local_epochs: float | None = Field(
        default=None,
        gt=0,
        le=1000,
        description="epochs over each client's data per round, instead of steps (steps = ceil(epochs·n/batch))",
    )
    lr_schedule: Literal["constant", "linear", "cosine"] = Field(
        default="constant", description="learning-rate decay over each round's steps"
    )
    warmup_steps: int = Field(
        default=0, ge=0, le=1_000_000, description="linear learning-rate warm-up steps at each round's start"
    )


class Hello(Header):
    """Client -> server, first message on the control stream."""

    msg_type = MsgType.HELLO
    versions: tuple[int, ...] = Field(min_length=1, max_length=16)
    client_id: str = Id
    base_fingerprint: str = Hash
    num_samples: int = Field(ge=0, le=1 << 40)
    encodings: tuple[Encoding, ...] = Field(default=(Encoding.FP32, Encoding.INT8), max_length=16)


Seed = Annotated[int, Field(ge=0, le=2**63 - 1)]


class JobTerms(BaseModel):
    """What every client of a job must agree on, declared once: the server's ``JobConfig`` extends it, WELCOME
    carries it (:class:`Welcome` is one), and the client builds its adapters from it."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    init_seed: Seed = Field(description="job seed of the shared initial adapter")
    federation: Federation = Field(
        default="fedalt",
        description="fedalt: own LoRA + Rest-of-World + mixer; fedavg: one shared LoRA; local: no aggregation",
    )
    mixer: Mixer = Field(
        default="fixed",
        description="FedALT mixer: a fixed 0.5/0.5 mix, a learned per-token one (linear in the layer input) or rff "
        "(linear in random Fourier features of it, CA-PFL)",
    )
    mixer_init: float = Field(
        default=MIXER_INIT,
        gt=0,
        lt=1,
        description="the learned mixer's starting weight on each client's own adapter, in (0, 1), the "
        "Rest-of-World getting the rest: high for clients whose tasks differ; 0.5, the FedALT paper's neutral "
        "start, when they share one",
    )
    lora: LoraJobSpec = LoraJobSpec()
    # Uplink error feedback (EF-SGD): what compression drops is carried into the client's next update. A job-level
    # choice like the encoding itself; off only to measure what it buys (dropped values are then lost for good).
    uplink_error_feedback: bool = True
    # Layerwise routing (FedMosaic-Adaptive): each round a client sends whole blocks (a module's A and B together),
    # those with the most pending change per value, up to this fraction of its adapter's values; the rest wait in
    # its uplink residual (common/routing.py).
    uplink_routing: float | None = Field(
        default=None,
        gt=0,
        lt=1,
        description="share of its adapter's values a client sends each round, in whole blocks (per module), the "
        "most changed first; unset: every block",
    )

    @model_validator(mode="after")
    def _routing_keeps_what_it_skips(self) -> JobTerms:
        if self.uplink_routing is not None and not self.uplink_error_feedback:
            raise ValueError("uplink_routing needs uplink_error_feedback: the blocks not sent wait in the residual")
        if self.lora.local_b and self.federation != "fedavg":
            raise ValueError("lora.local_b (FedSA-LoRA) personalises through each client's B: use federation fedavg")
        return self

    def job_terms(self) -> dict[str, Any]:
        """The fields of :class:`JobTerms` only (what a server puts in WELCOME from its job config)."""
        return {name: getattr(self, name) for name in JobTerms.model_fields}


class Welcome(Header, JobTerms):
    """Server -> client: the negotiated version and the job the client joins (its :class:`JobTerms`)."""

    msg_type = MsgType.WELCOME
    version: int = Field(ge=1, le=255)
    job_id: str = Id
    rounds: int = Field(ge=1, le=1_000_000)


class SyncState(BaseModel):
    """What a rejoining client holds, as of its last acknowledged sync (restored from its checkpoint)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    round: int = Field(ge=0, le=1_000_000)  # the last round whose UPDATE or AGGREGATE was acknowledged
    view_hash: str = Hash  # hash of its individual LoRA as the server reconstructed it
    held: dict[AdapterKind, str] = Field(default_factory=dict, max_length=2)  # kind -> state hash


class Join(Header):
    """Client -> server: the adapter the client built for the job; checked against the others.

    ``resume`` is set by a client restarting from its checkpoint. The server answers ACK(JOIN) with its own
    view hash; where that or a held aggregate differs, it first sends dense AGGREGATEs (``delta=False``,
    kind ``local`` for the individual LoRA) and waits for their ACKs before the client takes part in a round.
    """

    msg_type = MsgType.JOIN
    adapter: AdapterSchema
    resume: SyncState | None = None


class RoundStart(Header):
    msg_type = MsgType.ROUND_START
    round: int = Field(ge=1, le=1_000_000)
    train: TrainSpec = TrainSpec()
    uplink: EncodingSpec = EncodingSpec()
    deadline_s: float = Field(gt=0, le=7 * 24 * 3600)


class Update(Header):
    """Client -> server on its own stream: the delta of the individual LoRA since the last sync."""

    msg_type = MsgType.UPDATE
    has_body = True
    round: int = Field(ge=1, le=1_000_000)
    client_id: str = Id
    num_samples: int = Field(ge=0, le=1 << 40)
    base_hash: str = Hash  # hash of the server-side view this delta applies to
    # Compact (schema-referenced) when the sender has the job's schema, which is always after JOIN; the full
    # form stays accepted. Receivers expand it with their schema (codec.expand) before anything else.
    manifest: AnyManifest


class Aggregate(Header):
    """Server -> client on its own stream: the client's new Rest-of-World (or global) adapter.

    Kind ``local`` is only sent on a (re)join whose state differs from the server's: the client's individual
    LoRA as the server holds it, always dense. The client replaces its adapter, view and sync point with it
    and clears its uplink error-feedback residual.
    """

    msg_type = MsgType.AGGREGATE
    has_body = True
    round: int = Field(ge=0, le=1_000_000)
    kind: AdapterKind | Literal["local"] = "row"  # `local`: the server's dense copy of the client's own adapter
    # True: the payload is a change to add to the adapter of this kind the client holds (downlink error
    # feedback); False: the payload is the whole adapter (first contact, or a reset).
    delta: bool = False
    contributors: int = Field(ge=0, le=1 << 20)
    manifest: AnyManifest  # compact or full, as in Update


class Ack(Header):
    msg_type = MsgType.ACK
    ref: MsgType
    round: int = Field(ge=0, le=1_000_000)
    state_hash: str | None = Field(default=None, max_length=128)


class Error(Header):
    msg_type = MsgType.ERROR
    code: int = Field(ge=0, le=65_535)
    message: str = Field(max_length=4096)


class Heartbeat(Header):
    msg_type = MsgType.HEARTBEAT
    seq: int = Field(ge=0, le=2**63 - 1)


class Metrics(Header):
    msg_type = MsgType.METRICS
    round: int = Field(ge=0, le=1_000_000)
    values: dict[str, float] = Field(default_factory=dict, max_length=256)


class Bye(Header):
    msg_type = MsgType.BYE
    reason: str = Field(default="", max_length=1024)


class UploadRequest(Header):
    """Client -> server: an UPDATE of ``nbytes`` for ``round`` is ready; the client sends it once granted."""

    msg_type = MsgType.UPLOAD_REQUEST
    round: int = Field(ge=1, le=1_000_000)
    nbytes: int = Field(ge=0, le=1 << 40)


class UploadGrant(Header):
    """Server -> client: an upload slot for ``round`` is the client's; it is held until the UPDATE is handled
    or ``expires_s`` pass. Slots bound how many uploads (and bytes in flight) the server takes at once."""

    msg_type = MsgType.UPLOAD_GRANT
    round: int = Field(ge=1, le=1_000_000)
    expires_s: float = Field(gt=0, le=7 * 24 * 3600)


HEADER_TYPES: dict[MsgType, type[Header]] = {
    cls.msg_type: cls
    for cls in (
        Hello,
        Welcome,
        Join,
        RoundStart,
        Update,
        Aggregate,
        Ack,
        Error,
        Heartbeat,
        Metrics,
        Bye,
        UploadRequest,
        UploadGrant,
    )
}


@dataclass(frozen=True)
class Message:
    """A decoded message: typed header plus body bytes (empty for control messages).

    A plain dataclass: the body is handed over as received (a bytearray for bulk frames), never copied.
    """

    header: Header
    body: bytes | bytearray = b""

    @property
    def type(self) -> MsgType:
        return self.header.msg_type
