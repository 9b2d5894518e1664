"""The client's network loop: join a job, train each round, upload deltas, install aggregates.

Uplink error feedback: each round the client sends C(Δ + e) with Δ its adapter's change since the last
sync and e the residual of earlier rounds (:class:`~fedquic.common.feedback.ErrorFeedback`), and tracks
``view``, its adapter exactly as the server reconstructed it: in FedALT mode ``view + e == local``.
"""

from __future__ import annotations

import asyncio
import json
import logging
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field

from ..common.adapter import AdapterSchema, TensorDict, init_lora_state, state_hash, zeros_state
from ..common.codec import decode_tensors, fp32_nbytes
from ..common.errors import ConfigError, ErrorCode, ProtocolError, RemoteError, SchemaMismatchError, TransportError
from ..common.feedback import ErrorFeedback
from ..common.logs import client_id_var, round_var
from ..common.messages import (
    SUPPORTED_VERSIONS,
    Ack,
    Aggregate,
    Bye,
    Error,
    Header,
    Hello,
    Join,
    Message,
    Metrics,
    MsgType,
    RoundStart,
    Update,
    Welcome,
)
from ..transport.aio import Peer, connect_peer
from ..transport.framing import frame_size
from ..transport.settings import TlsFiles, TransportSettings
from .learner import Learner

log = logging.getLogger(__name__)


class ClientConfig(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    client_id: str = Field(min_length=1, max_length=128, pattern=r"^[A-Za-z0-9][A-Za-z0-9_.\-]*$")
    host: str = "127.0.0.1"
    port: int = Field(default=4433, ge=1, le=65535)
    server_name: str | None = None
    tls: TlsFiles
    transport: TransportSettings = TransportSettings()
    run_dir: Path = Path("runs/client")
    message_timeout_s: float = Field(default=3600.0, gt=0)
    # Connecting (before the job is joined) is retried with exponential backoff and jitter, so clients may
    # start before the server; a refused certificate or identity is not retried.
    connect_attempts: int = Field(default=8, ge=1)
    backoff_initial_s: float = Field(default=0.5, gt=0)
    backoff_max_s: float = Field(default=30.0, gt=0)


@dataclass
class RoundRecord:
    round: int
    metrics: dict[str, float]
    bytes_up: int = 0
    bytes_down: int = 0
    fp32_up: int = 0
    fp32_down: int = 0


@dataclass
class ClientResult:
    job_id: str
    rounds: list[RoundRecord] = field(default_factory=list)
    bye_reason: str = ""


class FederatedClient:
    def __init__(self, cfg: ClientConfig, learner: Learner) -> None:
        self.cfg = cfg
        self.learner = learner
        # view: our individual adapter exactly as the server reconstructed it (its hash versions the state);
        # synced: our adapter when we last synced; ef: what compression has not delivered yet.
        self.view: TensorDict = {}
        self.view_hash = ""
        self.synced: TensorDict = {}
        self.ef = ErrorFeedback()
        self.schema: AdapterSchema | None = None
        self.held: dict[str, TensorDict] = {}
        self.joined = False
        self.rows_received: dict[int, TensorDict] = {}  # last RoW per round, for inspection and tests
        self.keep_rows = False

    async def run(self) -> ClientResult:
        client_id_var.set(self.cfg.client_id)
        cfg = self.cfg
        delay = cfg.backoff_initial_s
        for attempt in range(1, cfg.connect_attempts + 1):
            try:
                return await self._run_once()
            except TransportError as exc:
                final = exc.code in (ErrorCode.CERTIFICATE, ErrorCode.IDENTITY_MISMATCH)
                if self.joined or final or attempt == cfg.connect_attempts:
                    raise
                wait = delay * (1.0 + 0.5 * random.random())  # jitter: clients do not retry in lockstep
                log.warning("connection attempt %d failed (%s); retrying in %.1f s", attempt, exc, wait)
                await asyncio.sleep(wait)
                delay = min(delay * 2, cfg.backoff_max_s)
        raise AssertionError("unreachable")

    async def _run_once(self) -> ClientResult:
        cfg = self.cfg
        async with connect_peer(cfg.host, cfg.port, cfg.transport, cfg.tls, cfg.server_name) as peer:
            log.info("connected to %s:%d%s", cfg.host, cfg.port, " (resumed)" if peer.session_resumed else "")
            job = await self._join(peer)
            self.joined = True
            result = ClientResult(job_id=job.job_id)
            while True:
                msg = await self._recv(peer)
                h = msg.header
                if isinstance(h, RoundStart):
                    result.rounds.append(await self._round(peer, h))
                elif isinstance(h, Aggregate):
                    self._install(peer, h, msg.body, result)
                elif isinstance(h, Bye):
                    result.bye_reason = h.reason
                    log.info("server said bye: %s", h.reason)
                    break
                elif msg.type is not MsgType.HEARTBEAT:
                    raise ProtocolError(
                        f"unexpected {msg.type.name} from the server", code=ErrorCode.UNEXPECTED_MESSAGE
                    )
            self._save(result)
            save = getattr(self.learner, "save", None)
            if save is not None:
                await asyncio.to_thread(save, self.cfg.run_dir / "adapters")
            await peer.aclose(0, "bye")
            return result

    async def _recv(self, peer: Peer) -> Message:
        msg = await peer.recv(timeout=self.cfg.message_timeout_s)
        if isinstance(msg.header, Error):
            code = ErrorCode(msg.header.code) if msg.header.code in ErrorCode._value2member_map_ else None
            raise RemoteError(f"server refused: {msg.header.message}", code=code)
        return msg

    async def _expect(self, peer: Peer, kind: type[Header]) -> Message:
        msg = await self._recv(peer)
        if not isinstance(msg.header, kind):
            raise ProtocolError(f"expected {kind.__name__}, got {msg.type.name}", code=ErrorCode.UNEXPECTED_MESSAGE)
        return msg

    async def _join(self, peer: Peer) -> Welcome:
        learner = self.learner
        peer.send(
            Hello(
                versions=SUPPORTED_VERSIONS,
                client_id=self.cfg.client_id,
                base_fingerprint=learner.base_fingerprint(),
                num_samples=learner.num_samples(),
            )
        )
        job = (await self._expect(peer, Welcome)).header
        assert isinstance(job, Welcome)
        schema = self.schema = await asyncio.to_thread(learner.attach, job)
        self.view = init_lora_state(schema, job.init_seed)
        self.view_hash = state_hash(self.view)
        self.synced = {k: v.copy() for k, v in self.view.items()}
        # what we hold of each kind of aggregate: the RoW starts at zero, the global at the shared init
        self.held = {"row": zeros_state(schema), "global": {k: v.copy() for k, v in self.view.items()}}
        if state_hash(learner.local_state()) != self.view_hash:
            # Averaging LoRA factors is only meaningful from a shared starting point.
            raise ConfigError(
                "the learner's adapter does not start from the job's initialisation "
                "(init_lora_state(schema, init_seed))"
            )
        peer.send(Join(adapter=schema))
        ack = (await self._expect(peer, Ack)).header
        assert isinstance(ack, Ack)
        if ack.state_hash != self.view_hash:
            raise SchemaMismatchError("server and client disagree on the initial adapter")
        log.info(
            "joined job %s: %s, %d rounds, %d adapter parameters",
            job.job_id,
            job.federation,
            job.rounds,
            schema.numel,
        )
        return job

    async def _round(self, peer: Peer, rs: RoundStart) -> RoundRecord:
        round_var.set(rs.round)
        t0 = time.perf_counter()
        metrics = await asyncio.to_thread(self.learner.train, rs.round, rs.train)
        local = self.learner.local_state()
        delta = {k: local[k] - self.synced[k] for k in self.synced}
        payload = await asyncio.to_thread(self.ef.compress, delta, rs.uplink)
        manifest, body = payload.manifest, payload.body
        new_view = {k: self.view[k] + payload.decoded[k] for k in self.view}
        metrics = {
            **metrics,
            "round_s": time.perf_counter() - t0,
            "ef_residual_norm": self.ef.residual_norm(),
        }
        peer.send(Metrics(round=rs.round, values=metrics))
        header = Update(
            round=rs.round,
            client_id=self.cfg.client_id,
            num_samples=self.learner.num_samples(),
            base_hash=self.view_hash,
            manifest=manifest,
        )
        n = await peer.send_bulk(header, body)
        ack = (await self._expect(peer, Ack)).header
        assert isinstance(ack, Ack)
        self.view, self.view_hash = new_view, state_hash(new_view)
        self.synced = local
        if ack.ref is not MsgType.UPDATE or ack.state_hash != self.view_hash:
            raise ProtocolError("server acknowledged a different adapter state", code=ErrorCode.CONFLICTING_UPDATE)
        log.info(
            "round %d: loss %.4f -> %.4f, sent %d bytes (%.1fx smaller than fp32)",
            rs.round,
            metrics.get("loss_before", float("nan")),
            metrics.get("loss_after", float("nan")),
            n,
            fp32_nbytes(manifest) / max(n, 1),
        )
        return RoundRecord(rs.round, metrics, bytes_up=n, fp32_up=fp32_nbytes(manifest))

    def _install(self, peer: Peer, h: Aggregate, body: bytes, result: ClientResult) -> None:
        round_var.set(h.round)
        assert self.schema is not None
        self.schema.check_manifest(h.manifest, what=f"{h.kind} adapter for round {h.round}")
        decoded = decode_tensors(h.manifest, body, self.cfg.transport.limits)
        if h.delta:  # downlink error feedback: add the change to what we hold
            base = self.held[h.kind]
            state = {k: base[k] + decoded[k] for k in base}
        else:
            state = decoded
        self.held[h.kind] = state
        if h.kind == "row":
            self.learner.set_row_state(state)
        else:  # fedavg: the global adapter replaces the local one, and is what the server now holds
            self.learner.set_local_state(state)
            self.view, self.view_hash = state, state_hash(state)
            self.synced = state
        if self.keep_rows:
            self.rows_received[h.round] = state
        peer.send(Ack(ref=MsgType.AGGREGATE, round=h.round, state_hash=state_hash(state)))
        for rec in result.rounds:
            if rec.round == h.round:
                rec.fp32_down = fp32_nbytes(h.manifest)
                rec.bytes_down = frame_size(h, len(body))
        log.info("installed %s adapter for round %d (%d contributors)", h.kind, h.round, h.contributors)

    def _save(self, result: ClientResult) -> None:
        self.cfg.run_dir.mkdir(parents=True, exist_ok=True)
        with (self.cfg.run_dir / "rounds.jsonl").open("w") as f:
            for rec in result.rounds:
                f.write(json.dumps(asdict(rec)) + "\n")


async def run_client(cfg: ClientConfig, learner: Learner) -> ClientResult:
    return await FederatedClient(cfg, learner).run()
