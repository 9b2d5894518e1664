"""The aggregation server daemon: connection handling, round driving, aggregation, durable state, history.

The round logic is the pure :class:`~fedquic.server.rounds.RoundMachine`; this module carries its actions
out over the network and keeps each client's adapter as the server reconstructed it, in memory while the
client is connected and always on disk (:class:`~fedquic.server.store.ServerStore`). An UPDATE is
acknowledged only once it is on disk; a killed server restarts into the same round.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from ..common.adapter import AdapterSchema, TensorDict, init_lora_state, state_hash, zeros_state
from ..common.atomic import atomic_write_bytes
from ..common.codec import (
    CompactManifest,
    Encoding,
    EncodingSpec,
    Manifest,
    Payload,
    decode_tensors,
    encode_payload,
    expand,
    fp32_nbytes,
    max_body_nbytes,
    to_compact,
)
from ..common.errors import (
    ConfigError,
    ErrorCode,
    FedQuicError,
    JobError,
    ProtocolError,
    SchemaMismatchError,
    TransportError,
)
from ..common.logs import client_id_var, round_var
from ..common.messages import (
    SUPPORTED_VERSIONS,
    Ack,
    Aggregate,
    Bye,
    Error,
    Hello,
    Join,
    Message,
    Metrics,
    MsgType,
    RoundStart,
    Update,
    UploadGrant,
    UploadRequest,
    Welcome,
)
from ..common.names import ADAPTER_KINDS
from ..transport.aio import FedQuicServer, Peer
from ..transport.connection import BulkPermit
from ..transport.framing import frame_size
from .admission import UploadAdmission
from .config import ServerConfig
from .downlink import downlink_change
from .history import append_history, history_row
from .memory import pin_mmap_threshold, trim
from .metrics import MetricsEndpoint, ServerMetrics, render_prometheus
from .rounds import Action, CloseRound, Fail, Finish, Phase, ResumeRound, RoundMachine, StartRound
from .rules import RoundInputs, Target, job_rule, load_plugins, round_targets
from .store import ClientRecordOnDisk, JobRecord, Kind, ServerStore
from .uploads import UploadDesk

log = logging.getLogger(__name__)

JOIN_TIMEOUT_S = 300.0  # after WELCOME the client builds its adapters (a real model loads first)
RESET_ACK_TIMEOUT_S = 300.0
DENSE = EncodingSpec.parse("fp32")
KINDS: tuple[Kind, ...] = ADAPTER_KINDS  # type: ignore[assignment]


@dataclass
class ClientRecord:
    """A known client: its durable record, its tensors while loaded, and its connection if it has one."""

    client_id: str
    disk: ClientRecordOnDisk
    peer: Peer | None = None
    view: TensorDict | None = None  # the client's individual LoRA as the server reconstructed it
    # Downlink: per kind, the adapter exactly as the client holds it (it acknowledges its hash).
    held: dict[str, TensorDict] | None = None
    # Only with downlink_error_feedback off (a measurement switch): the target last sent, per kind.
    last_target: dict[str, TensorDict] = field(default_factory=dict)
    stats: dict[int, dict[str, float]] = field(default_factory=dict)  # per round, measured here
    reported: dict[int, dict[str, float]] = field(default_factory=dict)  # per round, the client's METRICS
    aggregate_acks: dict[int, asyncio.Future[None]] = field(default_factory=dict)
    held_hash_pending: dict[int, tuple[str, str]] = field(default_factory=dict)  # round -> (kind, hash to ACK)
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)  # one durable commit at a time per client
    upload_done: dict[int, asyncio.Event] = field(default_factory=dict)  # round -> set when its slot frees

    @property
    def view_hash(self) -> str:
        return self.disk.view_hash

    @property
    def loaded(self) -> bool:
        return self.view is not None

    def unload(self) -> None:
        self.view, self.held = None, None
        self.last_target = {}


@dataclass
class JobResult:
    ok: bool
    rounds_completed: int
    reason: str = ""
    stopped: bool = False  # stopped by a signal with its state saved: a restart resumes it


class AggregationServer(UploadDesk):
    def __init__(self, cfg: ServerConfig, clock: Callable[[], float] = time.monotonic) -> None:
        self.cfg = cfg
        self.clock = clock
        self.machine = RoundMachine(cfg.policy, started_at=clock())
        self.records: dict[str, ClientRecord] = {}  # every client the job knows (on disk)
        self.clients: dict[str, ClientRecord] = {}  # the connected ones
        self.schema: AdapterSchema | None = None
        self.base_fingerprint: str | None = None
        self._init_state: TensorDict | None = None
        load_plugins(cfg.plugins)
        self.rule = job_rule(cfg.job)  # None: a local job aggregates nothing
        self.store = ServerStore(cfg.run_dir / "state")
        self.metrics = ServerMetrics()
        self._endpoint = MetricsEndpoint(self._metrics_text, self.status)
        self.metrics_port: int | None = None
        self._transport = FedQuicServer(cfg.transport, cfg.tls, self._on_connect)
        self._done: asyncio.Future[JobResult] | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._stopping = False
        self.admission = UploadAdmission(cfg.upload_slots, cfg.upload_slot_timeout_s, self._transport.budget)
        self._admission_timer: asyncio.Future[None] | None = None
        self._closing = False  # close() has begun: no new grants, no new admission clock
        self._granted_peers: dict[tuple[str, int], Peer] = {}  # (client, round) -> the connection granted
        self._downlink_slots = asyncio.Semaphore(cfg.downlink_slots)
        self.port: int = 0
        self.history_path = cfg.run_dir / "history.jsonl"

    # -- lifecycle ---------------------------------------------------------------------------------

    def _restore(self) -> list[Action]:
        """Load the job's durable state, if this run directory has one; return the actions to resume."""
        job = self.store.load_job()
        if job is not None and job.round.phase is Phase.FINISHED:
            if self.cfg.on_finished == "restart":
                self._archive_finished(job)
                job = None
            else:
                log.warning(
                    "job %s in %s already finished (%d rounds): nothing to resume. Start a new job with "
                    "--on-finished restart (the finished one is kept beside it), or use another run directory",
                    job.job_id,
                    self.cfg.run_dir,
                    job.round.round,
                )
        if job is None:
            self.store.save_job(JobRecord(job_id=self.cfg.job.job_id))
            return []
        if job.job_id != self.cfg.job.job_id:
            raise ConfigError(
                f"{self.store.root} holds the state of job {job.job_id!r}, not {self.cfg.job.job_id!r}: "
                "use another run directory (or the same job id to resume it)"
            )
        self.base_fingerprint = job.base_fingerprint
        if job.adapter is not None:
            self._set_schema(job.adapter)
        for cid in self.store.client_ids():
            disk = self.store.load_client(cid)
            assert disk is not None
            self.records[cid] = ClientRecord(
                cid,
                disk,
                stats={r: dict(v) for r, v in disk.stats.items()},
                reported={r: dict(v) for r, v in disk.reported.items()},
            )
        snap = job.round
        received = {cid: snap.round for cid, r in self.records.items() if snap.round in r.disk.updates}
        self.machine, actions = RoundMachine.restore(self.cfg.policy, snap, received, self.clock())
        log.info(
            "resumed job %s from %s: round %d (%s), %d known clients, %d updates of this round on disk",
            job.job_id,
            self.store.root,
            snap.round,
            snap.phase.value,
            len(self.records),
            len(received),
        )
        return actions

    def _archive_finished(self, job: JobRecord) -> None:
        """Move a finished job's state and history aside, so this run directory starts a new job."""
        stamp = time.strftime("%Y%m%d-%H%M%S")
        root = self.store.root
        dest = root.with_name(f"{root.name}.finished-{stamp}")
        n = 1
        while dest.exists():  # two restarts within a second
            n += 1
            dest = root.with_name(f"{root.name}.finished-{stamp}-{n}")
        os.replace(root, dest)
        if self.history_path.exists():
            os.replace(self.history_path, dest / "history.jsonl")
        log.info("job %s had finished (%d rounds): moved to %s; starting a new job", job.job_id, job.round.round, dest)
        self.store = ServerStore(root)

    def _save_job(self) -> None:
        self.store.save_job(
            JobRecord(
                job_id=self.cfg.job.job_id,
                adapter=self.schema,
                base_fingerprint=self.base_fingerprint,
                round=self.machine.snapshot(),
            )
        )

    async def start(self) -> int:
        pin_mmap_threshold()
        self.cfg.run_dir.mkdir(parents=True, exist_ok=True)
        self._done = asyncio.get_running_loop().create_future()
        resume = self._restore()
        self.port = await self._transport.start(self.cfg.host, self.cfg.port)
        mcfg = self.cfg.metrics
        if mcfg.enabled:
            try:
                self.metrics_port = await self._endpoint.start(mcfg.host, mcfg.port)
            except OSError as exc:  # metrics are not worth refusing to run the job for
                log.warning("metrics endpoint not started on %s:%d: %s", mcfg.host, mcfg.port, exc)
        if self.cfg.ready_file is not None:
            ready = {"host": self.cfg.host, "port": self.port, "pid": os.getpid(), "metrics_port": self.metrics_port}
            atomic_write_bytes(self.cfg.ready_file, json.dumps(ready).encode())
        self._spawn(self._ticker())
        log.info(
            "job %s: listening on %s:%d for %d clients, %d rounds, federation=%s",
            self.cfg.job.job_id,
            self.cfg.host,
            self.port,
            self.cfg.policy.min_clients,
            self.cfg.policy.rounds,
            self.cfg.job.federation,
        )
        self._apply(resume)
        return self.port

    async def run(self) -> JobResult:
        if self._done is None:
            await self.start()
        assert self._done is not None
        try:
            return await self._done
        finally:
            await self.close()

    def request_stop(self, reason: str = "stopped by signal") -> None:
        """Graceful stop (SIGTERM): every acknowledged update is already on disk; save the round and go.

        Connections are closed with SHUTTING_DOWN (not BYE), so clients keep their state and reconnect to the
        restarted server.
        """
        if self._is_done():
            return
        self._stopping = True  # from here on, disconnects are not departures and nothing new starts
        with contextlib.suppress(OSError):
            self._save_job()
        log.info("%s: state saved in %s; restart with the same run directory to resume", reason, self.store.root)
        self._finish(JobResult(False, self._rounds_completed(), reason, stopped=True))

    def _rounds_completed(self) -> int:
        return self.machine.round if self.machine.phase is Phase.FINISHED else max(self.machine.round - 1, 0)

    async def close(self, bye_grace_s: float = 10.0) -> None:
        self._closing = True
        ended = self._is_done() and not self._stopping  # the job ended: every client was sent a BYE
        if ended:
            # A QUIC close discards unsent stream data: let the BYEs reach the clients first (on a lossy path they
            # may need retransmissions), or a client would take the close for a crash and try to reconnect.
            deadline = time.monotonic() + bye_grace_s
            while time.monotonic() < deadline and any(
                rec.peer is not None and rec.peer.core.unacked_bytes(rec.peer.core.control_stream_id) > 0
                for rec in self.clients.values()
            ):
                await asyncio.sleep(0.05)
        code, reason = (
            (0x100 + int(ErrorCode.JOB_ENDED), "job ended")
            if ended
            else (0x100 + int(ErrorCode.SHUTTING_DOWN), "server shutting down")
        )
        for rec in list(self.clients.values()):
            if rec.peer is not None:
                with contextlib.suppress(Exception):
                    await rec.peer.aclose(code, reason)
        for t in list(self._tasks):
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self._transport.close(code, reason)  # also reaches clients still registering
        await self._endpoint.close()

    def status(self) -> dict[str, object]:
        """What ``fedquic status`` shows (served as JSON on ``/status``)."""
        m = self.metrics
        return {
            "job_id": self.cfg.job.job_id,
            "healthy": not self._is_done() or bool(self._done and self._done.result().ok),
            "phase": self.machine.phase.value,
            "round": self.machine.round,
            "rounds": self.cfg.policy.rounds,
            "rounds_completed": m.rounds_completed,
            "clients_connected": sorted(self.clients),
            "clients_known": len(self.records),
            "updates_accepted": m.updates_accepted,
            "bytes_in": m.bytes_in,
            "bytes_out": m.bytes_out,
            "aggregate_seconds": round(m.aggregate_seconds, 6),
            "rejected": dict(m.rejected),
            "uploads_in_flight_max": m.uploads_in_flight_max,
            # hardening: connections open, refused over max_connections, replaced over the per-identity bound, and
            # the server-wide buffer budget (bytes held in unfinished frames, room reserved by upload grants)
            "connections": self._transport.connections,
            "connections_refused": self._transport.refused_connections,
            "connections_replaced": self._transport.replaced_connections,
            "buffered_bytes": self._transport.budget.held,
            "reserved_bytes": self._transport.budget.reserved,
        }

    def _metrics_text(self) -> str:
        return render_prometheus(
            self.metrics, connected=len(self.clients), known=len(self.records), phase=self.machine.phase.value
        )

    def _spawn(self, coro: object) -> None:
        task = asyncio.ensure_future(coro)  # type: ignore[arg-type]
        self._tasks.add(task)
        task.add_done_callback(self._task_done)

    def _task_done(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            exc = task.exception()
            log.error("server task failed: %r", exc, exc_info=exc)
            self._finish(JobResult(False, self._rounds_completed(), f"internal error: {exc!r}"))

    def _finish(self, result: JobResult) -> None:
        if self._done is not None and not self._done.done():
            self._done.set_result(result)

    def _is_done(self) -> bool:
        return self._done is not None and self._done.done()

    async def _ticker(self) -> None:
        while True:
            await asyncio.sleep(0.25)
            self._apply(self.machine.on_tick(self.clock()))

    # -- connections -------------------------------------------------------------------------------

    async def _on_connect(self, peer: Peer) -> None:
        rec: ClientRecord | None = None
        try:
            rec = await self._register(peer)
            client_id_var.set(rec.client_id)
            while True:
                msg = await peer.recv()
                self.metrics.bytes_in += frame_size(msg.header, len(msg.body))
                try:
                    await self._handle(rec, msg)
                except ProtocolError as exc:
                    log.warning("refused %s: %s", msg.type.name, exc)
                    self.metrics.reject(exc.code)
                    peer.send_error(exc)
        except FedQuicError as exc:
            if not isinstance(exc, TransportError):
                log.warning("closing connection from %s: %s", peer.remote_address, exc)
                self.metrics.reject(exc.code)
                peer.send_error(exc)
                await peer.aclose(0x100 + int(exc.code), str(exc)[:200])
            elif peer.refused_with is not None:  # a transport-level violation (frame limits, stream flood, ...)
                self.metrics.reject(peer.refused_with)
            elif not peer.closed.is_set():  # our own deadline passed (a HELLO or JOIN that never came)
                log.warning("closing connection from %s: %s", peer.remote_address, exc)
                self.metrics.reject(exc.code)
                await peer.aclose(0x100 + int(exc.code), str(exc)[:200])
            elif rec is not None and not self._is_done():
                log.info("client disconnected: %s", exc)
        finally:
            if rec is not None and self.clients.get(rec.client_id) is rec and rec.peer is peer:
                self._detach(rec)

    def _detach(self, rec: ClientRecord) -> None:
        """The client's connection is gone: forget the connection, keep its state (on disk)."""
        del self.clients[rec.client_id]
        rec.peer = None
        for fut in rec.aggregate_acks.values():
            if not fut.done():
                fut.set_result(None)
        rec.aggregate_acks.clear()
        for done in rec.upload_done.values():
            done.set()  # its slots go to the next clients
        if not rec.lock.locked():
            rec.unload()  # its state is on disk; a round close loads what it needs
        if not self._stopping:  # a graceful stop closes every connection: those are not departures
            self._apply(self.machine.on_leave(rec.client_id, self.clock()))

    def _set_schema(self, schema: AdapterSchema) -> None:
        self.schema = schema
        self._init_state = init_lora_state(schema, self.cfg.job.init_seed)

    def _default_held(self, kind: str) -> TensorDict:
        assert self.schema is not None and self._init_state is not None
        return zeros_state(self.schema) if kind == "row" else {k: v.copy() for k, v in self._init_state.items()}

    def _load(self, rec: ClientRecord) -> None:
        """Bring a client's tensors into memory from disk (or from the job's init for a new client)."""
        if rec.loaded:
            return
        assert self._init_state is not None
        d = rec.disk
        view = self.store.read_tensors(d.client_id, d.view_file) if d.view_file else dict(self._init_state)
        held = {
            kind: self.store.read_tensors(d.client_id, d.held_files[kind])
            if kind in d.held_files
            else self._default_held(kind)
            for kind in KINDS
        }
        rec.view, rec.held = view, held

    async def _register(self, peer: Peer) -> ClientRecord:
        deadline = self.clock() + self.cfg.transport.hello_timeout_s
        msg = await peer.recv(timeout=self.cfg.transport.hello_timeout_s)
        while msg.type is MsgType.HEARTBEAT:  # may ride in 0-RTT data beside HELLO; the deadline still holds
            msg = await peer.recv(timeout=max(deadline - self.clock(), 0.001))
        hello = msg.header
        if not isinstance(hello, Hello):
            raise ProtocolError(f"expected HELLO, got {msg.type.name}", code=ErrorCode.UNEXPECTED_MESSAGE)
        if self._is_done() and not self._stopping:
            # Said at once, so a client that comes back after the end does not retry into timeouts.
            raise ProtocolError(f"job {self.cfg.job.job_id!r} has ended", code=ErrorCode.JOB_ENDED)
        common = set(hello.versions) & set(SUPPORTED_VERSIONS)
        if not common:
            raise ProtocolError(
                f"no common protocol version (client {hello.versions}, server {SUPPORTED_VERSIONS})",
                code=ErrorCode.UNSUPPORTED_VERSION,
            )
        cid = hello.client_id
        if peer.identity is not None and peer.identity.client_id != cid:
            raise ProtocolError(
                f"HELLO claims client id {cid!r} but the certificate is {peer.identity.client_id!r}",
                code=ErrorCode.IDENTITY_MISMATCH,
            )
        if self._stopping:
            raise ProtocolError("the server is shutting down", code=ErrorCode.SHUTTING_DOWN)
        missing = sorted(e.value for e in self._required_encodings() if e not in hello.encodings)
        if missing:
            raise ProtocolError(
                f"the job sends {', '.join(missing)} (downlink {self.cfg.job.downlink.encoding.value}, dense "
                f"resets fp32); HELLO lists only {', '.join(e.value for e in hello.encodings)}",
                code=ErrorCode.UNSUPPORTED_ENCODING,
            )
        stale = self.clients.get(cid)
        if stale is not None:
            if peer.identity is None:  # without a verified certificate, an id alone cannot take a session over
                raise ProtocolError(f"client id {cid!r} is already connected", code=ErrorCode.IDENTITY_MISMATCH)
            # The same certificate again: the old connection is dead on the client's side (its network changed
            # or dropped before our idle timeout noticed). The new one replaces it.
            log.info("client %s reconnected: replacing its previous connection", cid)
            old_peer = stale.peer
            self._detach(stale)
            if old_peer is not None:
                with contextlib.suppress(Exception):
                    await old_peer.aclose(0x100 + int(ErrorCode.IDENTITY_MISMATCH), "replaced by a new connection")
        # The first client to JOIN fixes the job's base model (with its adapter schema, below); a HELLO alone does
        # not, so a misconfigured client that never joins cannot lock the job to its model.
        if self.base_fingerprint is not None and hello.base_fingerprint != self.base_fingerprint:
            raise SchemaMismatchError(
                f"{cid}: base model fingerprint {hello.base_fingerprint} differs from the job's {self.base_fingerprint}"
            )
        job = self.cfg.job
        peer.send(
            Welcome(
                version=max(common),
                job_id=job.job_id,
                rounds=self.cfg.policy.rounds,
                **job.job_terms(),
            )
        )
        msg = await peer.recv(timeout=JOIN_TIMEOUT_S)  # the client builds its adapters first
        join = msg.header
        if not isinstance(join, Join):
            raise ProtocolError(f"expected JOIN, got {msg.type.name}", code=ErrorCode.UNEXPECTED_MESSAGE)
        if self.base_fingerprint is not None and hello.base_fingerprint != self.base_fingerprint:
            raise SchemaMismatchError(  # another client joined first while this one was building its adapters
                f"{cid}: base model fingerprint {hello.base_fingerprint} differs from the job's {self.base_fingerprint}"
            )
        if self.schema is None:
            if join.adapter.numel > self.cfg.max_adapter_parameters:
                raise ProtocolError(
                    f"{cid}: an adapter of {join.adapter.numel} parameters is over the server's "
                    f"max_adapter_parameters ({self.cfg.max_adapter_parameters})",
                    code=ErrorCode.LIMIT_EXCEEDED,
                )
            self.base_fingerprint = hello.base_fingerprint
            self._set_schema(join.adapter)
            self._save_job()
            log.info(
                "adapter schema %s: %d tensors, %d parameters",
                join.adapter.fingerprint(),
                len(join.adapter.tensors),
                join.adapter.numel,
            )
        elif join.adapter.fingerprint() != self.schema.fingerprint():
            raise SchemaMismatchError(
                f"{cid}: adapter schema {join.adapter.fingerprint()} differs from the "
                f"job's {self.schema.fingerprint()} (rank and target modules are job-level)"
            )
        assert self._init_state is not None
        init_hash = state_hash(self._init_state)
        rec = self.records.get(cid)
        if rec is None:
            disk = ClientRecordOnDisk(client_id=cid, num_samples=hello.num_samples, view_hash=init_hash)
            rec = ClientRecord(cid, disk)
            await asyncio.to_thread(self.store.commit, disk, {}, None)
            self.records[cid] = rec
        async with rec.lock:
            await asyncio.to_thread(self._load, rec)
        rec.peer = peer
        self.clients[cid] = rec
        peer.core.permit(MsgType.METRICS, BulkPermit(max_body=0))  # telemetry streams, headers only
        peer.send(Ack(ref=MsgType.JOIN, round=self.machine.round, state_hash=rec.view_hash))
        await self._reset_if_needed(rec, join, init_hash)
        log.info("client %s joined (%d samples)%s", cid, hello.num_samples, " (resumed)" if join.resume else "")
        if self._is_done() and not self._stopping:  # it registered while the job ended: it missed the BYE
            peer.send(Bye(reason="job already ended"))
        self._apply(self.machine.on_join(cid, self.clock()))
        return rec

    def _required_encodings(self) -> set[Encoding]:
        """What every client must decode: the job's downlink, and fp32 for dense resets."""
        job = self.cfg.job
        return {Encoding.FP32} if job.federation == "local" else {Encoding.FP32, job.downlink.encoding}

    def _max_update_body(self) -> int:
        """The largest UPDATE body the job's schema and uplink encoding allow (refused above it, before a byte)."""
        assert self.schema is not None
        return max_body_nbytes([t.shape for t in self.schema.tensors], self.cfg.job.uplink)

    async def _reset_if_needed(self, rec: ClientRecord, join: Join, init_hash: str) -> None:
        """Send dense state wherever the client's differs from ours; wait for its ACKs before any round."""
        assert rec.view is not None and rec.held is not None
        peer = rec.peer
        assert peer is not None
        theirs_view = join.resume.view_hash if join.resume else init_hash
        theirs_held = dict(join.resume.held) if join.resume else {}
        sends: list[tuple[str, TensorDict]] = []
        if theirs_view != rec.view_hash:
            sends.append(("local", rec.view))
        for kind in KINDS:
            ours = state_hash(rec.held[kind])
            if theirs_held.get(kind, state_hash(self._default_held(kind))) != ours:
                sends.append((kind, rec.held[kind]))
        if not sends:
            return
        log.info(
            "client %s: state differs from the server's, sending a dense reset of %s",
            rec.client_id,
            ", ".join(k for k, _ in sends),
        )
        expected = {state_hash(state) for _, state in sends}
        for kind, state in sends:
            payload = await asyncio.to_thread(encode_payload, state, DENSE)
            header = Aggregate(
                round=self.machine.round, kind=kind, delta=False, contributors=0, manifest=self._wire(payload)
            )
            self.metrics.bytes_out += await peer.send_bulk(header, payload.body)
        deadline = self.clock() + RESET_ACK_TIMEOUT_S
        while expected:
            msg = await peer.recv(timeout=max(deadline - self.clock(), 0.001))
            h = msg.header
            if isinstance(h, Ack) and h.ref is MsgType.AGGREGATE:
                if h.state_hash not in expected:
                    raise ProtocolError(
                        "the client acknowledged a reset with a different state", code=ErrorCode.CONFLICTING_UPDATE
                    )
                expected.discard(h.state_hash)
            elif not isinstance(h, (Metrics,)) and msg.type is not MsgType.HEARTBEAT:
                raise ProtocolError(
                    f"expected the ACK of a reset, got {msg.type.name}", code=ErrorCode.UNEXPECTED_MESSAGE
                )

    # -- messages ----------------------------------------------------------------------------------

    async def _handle(self, rec: ClientRecord, msg: Message) -> None:
        h = msg.header
        if isinstance(h, Update):
            try:
                await self._on_update(rec, h, msg.body)
            finally:
                done = rec.upload_done.get(h.round)
                if done is not None:
                    done.set()  # accepted or refused, the slot is free
        elif isinstance(h, UploadRequest):
            self._on_upload_request(rec, h)
        elif isinstance(h, Metrics):
            rec.reported.setdefault(h.round, {}).update(h.values)  # kept apart from the server's figures
        elif isinstance(h, Ack) and h.ref is MsgType.AGGREGATE:
            expected = rec.held_hash_pending.pop(h.round, None)
            fut = rec.aggregate_acks.get(h.round)
            if fut is not None and not fut.done():
                fut.set_result(None)
            if expected is not None and h.state_hash != expected[1]:
                await self._resync(rec, h.round, expected[0], h.state_hash)
        elif isinstance(h, Bye):
            log.info("client said bye: %s", h.reason)
        elif isinstance(h, Error):
            log.warning("client reported error %d: %s", h.code, h.message)
        elif msg.type is not MsgType.HEARTBEAT:
            raise ProtocolError(f"unexpected {msg.type.name} from a client", code=ErrorCode.UNEXPECTED_MESSAGE)

    async def _resync(self, rec: ClientRecord, round_: int, kind: str, theirs: str | None) -> None:
        """The client installed something other than what we sent it: make it rejoin for a dense reset.

        Its held adapter is no longer what every later delta is computed against, so each further round would
        widen the gap. Closing with CONFLICTING_UPDATE (no ERROR: a client takes that close as retryable) makes
        it reconnect; its JOIN reports what it holds, and the rejoin sends the dense copy of the server's record
        before the client takes part in another round (docs/protocol.md, "Rejoining").
        """
        log.error(
            "round %d: the client acknowledged %s adapter %s, the server sent it %s: closing for a dense reset",
            round_,
            kind,
            theirs,
            rec.disk.held_hash.get(kind),  # type: ignore[call-overload]
        )
        self.metrics.reject(ErrorCode.CONFLICTING_UPDATE)
        assert rec.peer is not None
        await rec.peer.aclose(
            0x100 + int(ErrorCode.CONFLICTING_UPDATE), f"held {kind} adapter differs: rejoin for a dense reset"
        )

    def _on_upload_request(self, rec: ClientRecord, h: UploadRequest) -> None:
        limit = min(self.cfg.transport.limits.max_body_bytes, self._max_update_body(), self._transport.budget.limit)
        if h.nbytes > limit:
            raise ProtocolError(
                f"an update of {h.nbytes} bytes exceeds {limit}, the most the job's adapter takes in "
                f"{self.cfg.job.uplink.encoding.value}",
                code=ErrorCode.LIMIT_EXCEEDED,
            )
        assert rec.peer is not None
        if h.round in rec.disk.updates:  # a resend after a lost ACK: answered from disk, it needs no slot
            if self._transport.budget.try_reserve(h.nbytes):
                rec.peer.core.permit(MsgType.UPDATE, BulkPermit(max_body=h.nbytes, count=1, reserved=True))
            else:
                rec.peer.core.permit(MsgType.UPDATE, BulkPermit(max_body=h.nbytes, count=1))
            rec.peer.send(UploadGrant(round=h.round, expires_s=self.cfg.upload_slot_timeout_s))
            return
        self.machine.check_update(rec.client_id, h.round)  # refuse late or unknown rounds before any wait
        if h.round in rec.upload_done:
            return  # already queued or granted
        rec.upload_done[h.round] = asyncio.Event()
        task = asyncio.ensure_future(self._grant(rec, h.round, h.nbytes))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _on_update(self, rec: ClientRecord, h: Update, body: bytes) -> None:
        round_var.set(h.round)
        peer = rec.peer
        assert peer is not None
        if h.client_id != rec.client_id:
            raise ProtocolError(
                f"UPDATE names client {h.client_id!r} on {rec.client_id!r}'s connection",
                code=ErrorCode.IDENTITY_MISMATCH,
            )
        digest = hashlib.sha256(body).hexdigest()[:32]
        prior = rec.disk.updates.get(h.round)
        if prior is not None:
            if prior != digest:
                raise ProtocolError(
                    f"a different update for round {h.round} was already accepted",
                    code=ErrorCode.CONFLICTING_UPDATE,
                )
            peer.send(Ack(ref=MsgType.UPDATE, round=h.round, state_hash=rec.view_hash))  # lost-ACK resend
            return
        if h.base_hash != rec.view_hash:
            raise ProtocolError(
                f"update applies to state {h.base_hash}, server holds {rec.view_hash}",
                code=ErrorCode.CONFLICTING_UPDATE,
            )
        self.machine.check_update(rec.client_id, h.round)
        assert self.schema is not None
        manifest = expand(h.manifest, self.schema, self.cfg.transport.limits)  # a compact one names no tensors
        if not (self.cfg.job.federation == "local" and not manifest.tensors):
            # In a `local` job an UPDATE without tensors is a client's "round done": it shares nothing.
            self.schema.check_manifest(manifest, what=f"update from {rec.client_id}")
        t0 = time.perf_counter()
        delta = await asyncio.to_thread(decode_tensors, manifest, body, self.cfg.transport.limits)
        t1 = time.perf_counter()
        async with rec.lock:
            await asyncio.to_thread(self._load, rec)
            assert rec.view is not None
            view = {k: rec.view[k] + delta[k] if k in delta else rec.view[k] for k in rec.view}
            vhash = state_hash(view)
            name = f"view-u{h.round}.safetensors"
            st = rec.stats.setdefault(h.round, {})
            st["bytes_up"] = float(frame_size(h, len(body)))
            st["fp32_up"] = float(fp32_nbytes(manifest))
            st["decode_s"] = t1 - t0
            st["accepted_at"] = time.time()
            disk = rec.disk.model_copy(
                update={
                    "view_hash": vhash,
                    "view_file": name,
                    "num_samples": h.num_samples,
                    "updates": {**rec.disk.updates, h.round: digest},
                    # This round's figures (the client's METRICS, bytes, timings) go to disk with the update, so a
                    # restart still writes them to history; rounds before the last are already in history.
                    "stats": {r: dict(v) for r, v in rec.stats.items() if r >= h.round - 1},
                    "reported": {r: dict(v) for r, v in rec.reported.items() if r >= h.round - 1},
                }
            )
            # Acknowledged only once it is on disk: a crash after the ACK loses nothing.
            await asyncio.to_thread(self.store.commit, disk, {name: view}, rec.disk)
            rec.disk, rec.view = disk, view
        st["persist_s"] = time.perf_counter() - t1  # apply + write + fsync before the ACK (memory only)
        self.metrics.updates_accepted += 1
        if rec.peer is not None:
            rec.peer.send(Ack(ref=MsgType.UPDATE, round=h.round, state_hash=vhash))
        log.info(
            "update accepted: %d bytes on the wire (%.1fx smaller than fp32)",
            st["bytes_up"],
            st["fp32_up"] / max(st["bytes_up"], 1.0),
        )
        try:
            self._apply(self.machine.on_update(rec.client_id, h.round, self.clock()))
        except ProtocolError as exc:
            # The round moved on while the update was written: it is on disk and in the client's view, so it
            # reaches the next aggregate through the view.
            log.info("update for round %d stored after the round moved on: %s", h.round, exc)

    # -- actions -----------------------------------------------------------------------------------

    def _apply(self, actions: list[Action]) -> None:
        if not actions or self._stopping:
            return
        for act in actions:
            if isinstance(act, StartRound):
                self._start_round(act)
            elif isinstance(act, ResumeRound):
                self._send_round_start(act.client_id, act.round, act.deadline)
            elif isinstance(act, CloseRound):
                self._spawn(self._close_round(act))
            elif isinstance(act, Finish):
                self.metrics.rounds_completed = act.rounds_completed
                self._say_bye(f"job complete after {act.rounds_completed} rounds")
                self._finish(JobResult(True, act.rounds_completed))
            elif isinstance(act, Fail):
                log.error("job failed: %s", act.reason)
                self._say_bye(f"job failed: {act.reason}")
                self._finish(JobResult(False, self._rounds_completed(), act.reason))
        self._save_job()

    def _start_round(self, act: StartRound) -> None:
        round_var.set(act.round)
        for cid in act.participants:
            self._send_round_start(cid, act.round, act.deadline)
        self.metrics.round = act.round
        log.info("round %d started with %d clients", act.round, len(act.participants))

    def _send_round_start(self, cid: str, round_: int, deadline: float) -> None:
        rec = self.clients.get(cid)
        if rec is None or rec.peer is None:
            return
        job = self.cfg.job
        with contextlib.suppress(TransportError):
            rec.peer.send(
                RoundStart(
                    round=round_,
                    train=job.train,
                    uplink=job.uplink,
                    deadline_s=max(deadline - self.clock(), 0.001),
                )
            )

    async def _close_round(self, act: CloseRound) -> None:
        round_var.set(act.round)
        t0 = time.perf_counter()
        contributors = [c for c in act.contributors if c in self.records]
        recs = [self.records[c] for c in contributors]
        for rec in recs:
            async with rec.lock:
                await asyncio.to_thread(self._load, rec)
        # Snapshot the views: a late (folded) update may replace a client's view while we aggregate.
        states = [dict(r.view) for r in recs if r.view is not None]
        weights = [self._weight(r) for r in recs]
        # No free-riding: a client that missed its rounds (inactive) is sent nothing until it contributes again.
        listeners = [c for c in self.clients if c not in contributors and self.machine.receives_aggregate(c)]
        inputs = RoundInputs(contributors, states, weights, listeners)
        targets = await asyncio.to_thread(self._aggregate, inputs, frozenset(self.records))
        agg_s = time.perf_counter() - t0
        self.metrics.aggregate_seconds += agg_s
        # Every client's payload is encoded, persisted and sent concurrently: one slow receiver does not hold up
        # the others. A client whose aggregate for this round is already on disk (a close redone after a crash)
        # is skipped; it gets a dense reset when it rejoins.
        sent = await asyncio.gather(
            *(self._send_aggregate(act.round, cid, t.make, t.kind, t.contributors) for cid, t in targets.items())
        )
        waits = [fut for fut in sent if fut is not None]
        if waits:
            # Delivery is the client's ACK, not our write returning.
            done, _ = await asyncio.wait(waits, timeout=self.cfg.policy.round_timeout_s)
            if len(done) < len(waits):
                log.warning("%d clients did not acknowledge their aggregate", len(waits) - len(done))
        for rec in recs:
            if rec.peer is None and not rec.lock.locked():
                rec.unload()
        trim()  # this round's payloads and rows are gone: give their pages back
        self._write_history(act.round, contributors, agg_s, time.perf_counter() - t0)
        self.metrics.rounds_completed = act.round
        self._apply(self.machine.on_aggregated(act.round, self.clock()))

    def _weight(self, rec: ClientRecord) -> float:
        job = self.cfg.job
        if job.weighting == "samples":
            return float(min(max(rec.disk.num_samples, 1), job.max_sample_weight))
        return 1.0

    async def _send_aggregate(
        self, round_: int, cid: str, make_state: Callable[[], TensorDict], kind: str, n_contrib: int
    ) -> asyncio.Future[None] | None:
        """Encode, persist and send one client's aggregate; returns the future its ACK resolves (None: no wait)."""
        # At most downlink_slots payloads are prepared and in flight at once: each holds a few copies of the
        # adapter (target, delta, encoded body, what the client will hold), so the round's peak memory is bounded
        # by the slots, not the number of clients.
        async with self._downlink_slots:
            return await self._send_aggregate_now(round_, cid, make_state, kind, n_contrib)

    async def _send_aggregate_now(
        self, round_: int, cid: str, make_state: Callable[[], TensorDict], kind: str, n_contrib: int
    ) -> asyncio.Future[None] | None:
        rec = self.records[cid]
        async with rec.lock:
            if rec.disk.closed_round >= round_:
                return None
            await asyncio.to_thread(self._load, rec)
            # The target (e.g. this client's leave-one-out row) is computed here, one client at a time.
            t0 = time.perf_counter()
            payload, held = await asyncio.to_thread(lambda: self._downlink_payload(rec, kind, make_state()))
            encode_s = time.perf_counter() - t0
            await asyncio.to_thread(self._commit_downlink, rec, round_, kind, held)
        peer = rec.peer
        if peer is None:
            return None
        header = Aggregate(round=round_, kind=kind, delta=True, contributors=n_contrib, manifest=self._wire(payload))
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        rec.aggregate_acks[round_] = fut
        rec.held_hash_pending[round_] = (kind, rec.disk.held_hash[kind])  # type: ignore[index]
        try:
            n = await peer.send_bulk(header, payload.body)
        except TransportError:
            fut.set_result(None)
            return None
        self.metrics.bytes_out += n
        st = rec.stats.setdefault(round_, {})
        st["downlink_encode_s"] = encode_s
        st["bytes_down"] = float(n)
        st["fp32_down"] = float(fp32_nbytes(payload.manifest))
        return fut

    def _wire(self, payload: Payload) -> Manifest | CompactManifest:
        """The manifest as sent: compact (schema-referenced) when it can be, else the full form."""
        assert self.schema is not None
        return to_compact(payload.manifest, self.schema) or payload.manifest

    def _commit_downlink(self, rec: ClientRecord, round_: int, kind: str, held: TensorDict) -> None:
        """Persist what the client will hold after this round (and its residual) before it is sent."""
        assert rec.held is not None
        files: dict[str, TensorDict] = {f"{kind}-r{round_}.safetensors": held}
        update: dict[str, object] = {
            "closed_round": round_,
            "held_hash": {**rec.disk.held_hash, kind: state_hash(held)},
            "held_files": {**rec.disk.held_files, kind: f"{kind}-r{round_}.safetensors"},
            "ef_file": None,  # no downlink residual (server/downlink.py); a state written before keeps none either
        }
        if kind == "global":  # the global replaces the client's own adapter: that is now our view of it
            files[f"view-g{round_}.safetensors"] = held
            update["view_file"] = f"view-g{round_}.safetensors"
            update["view_hash"] = state_hash(held)
        disk = rec.disk.model_copy(update=update)
        self.store.commit(disk, files, rec.disk)
        rec.disk = disk
        rec.held[kind] = held
        if kind == "global":
            rec.view = {k: v.copy() for k, v in held.items()}

    def _downlink_payload(self, rec: ClientRecord, kind: str, target: TensorDict) -> tuple[Payload, TensorDict]:
        """Encode (target − what the client holds): see :mod:`fedquic.server.downlink` for why no residual.

        Returns the payload and the adapter the client will hold once it adds the decoded payload.
        """
        assert rec.held is not None
        reference = None
        if not self.cfg.job.downlink_error_feedback:
            reference = rec.last_target.get(kind)
            rec.last_target[kind] = target
        change = downlink_change(rec.held[kind], target, self.cfg.job.downlink, reference=reference)
        return change.payload, change.held_after

    def _aggregate(self, inputs: RoundInputs, known: frozenset[str]) -> dict[str, Target]:
        """Per recipient: its target (computed on demand), from the job's rule (:func:`rules.round_targets`).
        Runs in a worker thread: everything it reads of the server's state is passed in."""
        return round_targets(self.rule, self.cfg.job, inputs, self._init_state, known=known)

    def _write_history(self, round_: int, contributors: list[str], agg_s: float, close_s: float) -> None:
        recs = sorted(self.records.items())
        append_history(
            self.history_path,
            history_row(
                round_, self.cfg.job, contributors, agg_s, close_s,
                clients={cid: rec.stats.get(round_, {}) for cid, rec in recs},
                reported={cid: rec.reported[round_] for cid, rec in recs if round_ in rec.reported},
            ),
        )  # fmt: skip

    def _say_bye(self, reason: str) -> None:
        for rec in list(self.clients.values()):
            if rec.peer is not None:
                with contextlib.suppress(TransportError):
                    rec.peer.send(Bye(reason=reason))


__all__ = ["AggregationServer", "JobError", "JobResult"]
