"""The aggregation server daemon: connection handling, round driving, aggregation, history.

The round logic is the pure :class:`~fedquic.server.rounds.RoundMachine`; this module only carries
its actions out over the network and keeps each client's adapter as the server reconstructed it.
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
from pathlib import Path

from ..common.adapter import AdapterSchema, TensorDict, init_lora_state, state_hash, zeros_state
from ..common.codec import Payload, decode_tensors, fp32_nbytes
from ..common.errors import (
    ErrorCode,
    FedQuicError,
    JobError,
    ProtocolError,
    SchemaMismatchError,
    TransportError,
)
from ..common.feedback import ErrorFeedback
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
    Welcome,
)
from ..transport.aio import FedQuicServer, Peer
from ..transport.framing import frame_size
from .aggregation import clip_deviation, exact_mean, fedavg, leave_one_out, leave_one_out_exact
from .config import ServerConfig
from .rounds import Action, CloseRound, Fail, Finish, RoundMachine, StartRound

log = logging.getLogger(__name__)

HANDSHAKE_TIMEOUT_S = 30.0


@dataclass
class ClientRecord:
    client_id: str
    peer: Peer
    num_samples: int
    view: TensorDict  # the client's individual LoRA as the server reconstructed it
    view_hash: str
    updates: dict[int, str] = field(default_factory=dict)  # round -> hash of the accepted payload
    stats: dict[int, dict[str, float]] = field(default_factory=dict)
    aggregate_acks: dict[int, asyncio.Future[None]] = field(default_factory=dict)
    # Downlink: per kind ("row", "global"), the adapter exactly as the client holds it, and the error-feedback
    # residual of what compression has not delivered yet.
    held: dict[str, TensorDict] = field(default_factory=dict)
    held_hash: dict[int, str] = field(default_factory=dict)  # round -> hash the client must acknowledge
    downlink_ef: ErrorFeedback = field(default_factory=ErrorFeedback)


@dataclass
class JobResult:
    ok: bool
    rounds_completed: int
    reason: str = ""


class AggregationServer:
    def __init__(self, cfg: ServerConfig, clock: Callable[[], float] = time.monotonic) -> None:
        self.cfg = cfg
        self.clock = clock
        self.machine = RoundMachine(cfg.policy, started_at=clock())
        self.clients: dict[str, ClientRecord] = {}
        self.schema: AdapterSchema | None = None
        self.base_fingerprint: str | None = None
        self._init_state: TensorDict | None = None
        self._transport = FedQuicServer(cfg.transport, cfg.tls, self._on_connect)
        self._done: asyncio.Future[JobResult] | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self.port: int = 0
        self.history_path = cfg.run_dir / "history.jsonl"

    # -- lifecycle ---------------------------------------------------------------------------------

    async def start(self) -> int:
        self.cfg.run_dir.mkdir(parents=True, exist_ok=True)
        self._done = asyncio.get_running_loop().create_future()
        self.port = await self._transport.start(self.cfg.host, self.cfg.port)
        if self.cfg.ready_file is not None:
            _atomic_write(
                self.cfg.ready_file,
                json.dumps({"host": self.cfg.host, "port": self.port, "pid": os.getpid()}),
            )
        self._spawn(self._ticker())
        log.info(
            "job %s: waiting for %d clients, %d rounds, federation=%s",
            self.cfg.job.job_id,
            self.cfg.policy.min_clients,
            self.cfg.policy.rounds,
            self.cfg.job.federation,
        )
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
        self._finish(JobResult(False, max(self.machine.round - 1, 0), reason))

    async def close(self) -> None:
        for rec in list(self.clients.values()):
            with contextlib.suppress(Exception):
                await rec.peer.aclose(0, "server shutting down")
        for t in list(self._tasks):
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self._transport.close()

    def _spawn(self, coro: object) -> None:
        task = asyncio.ensure_future(coro)  # type: ignore[arg-type]
        self._tasks.add(task)
        task.add_done_callback(self._task_done)

    def _task_done(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            exc = task.exception()
            log.error("server task failed: %r", exc, exc_info=exc)
            self._finish(JobResult(False, max(self.machine.round - 1, 0), f"internal error: {exc!r}"))

    def _finish(self, result: JobResult) -> None:
        if self._done is not None and not self._done.done():
            self._done.set_result(result)

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
                try:
                    self._handle(rec, msg)
                except ProtocolError as exc:
                    log.warning("refused %s: %s", msg.type.name, exc)
                    peer.send_error(exc)
        except FedQuicError as exc:
            if not isinstance(exc, TransportError):
                log.warning("closing connection from %s: %s", peer.remote_address, exc)
                peer.send_error(exc)
                await peer.aclose(0x100 + int(exc.code), str(exc)[:200])
            elif rec is not None and not self._is_done():
                log.info("client disconnected: %s", exc)
        finally:
            if rec is not None and self.clients.get(rec.client_id) is rec:
                del self.clients[rec.client_id]
                for fut in rec.aggregate_acks.values():
                    if not fut.done():
                        fut.set_result(None)
                self._apply(self.machine.on_leave(rec.client_id, self.clock()))

    def _is_done(self) -> bool:
        return self._done is not None and self._done.done()

    async def _register(self, peer: Peer) -> ClientRecord:
        msg = await peer.recv(timeout=HANDSHAKE_TIMEOUT_S)
        hello = msg.header
        if not isinstance(hello, Hello):
            raise ProtocolError(f"expected HELLO, got {msg.type.name}", code=ErrorCode.UNEXPECTED_MESSAGE)
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
        if cid in self.clients:
            raise ProtocolError(f"client id {cid!r} is already connected", code=ErrorCode.IDENTITY_MISMATCH)
        if self.base_fingerprint is None:
            self.base_fingerprint = hello.base_fingerprint
        elif hello.base_fingerprint != self.base_fingerprint:
            raise SchemaMismatchError(
                f"{cid}: base model fingerprint {hello.base_fingerprint} differs from the job's {self.base_fingerprint}"
            )
        job = self.cfg.job
        peer.send(
            Welcome(
                version=max(common),
                job_id=job.job_id,
                rounds=self.cfg.policy.rounds,
                init_seed=job.init_seed,
                federation=job.federation,
                mixer=job.mixer,
                lora=job.lora,
            )
        )
        msg = await peer.recv(timeout=HANDSHAKE_TIMEOUT_S * 10)  # the client builds its adapters first
        join = msg.header
        if not isinstance(join, Join):
            raise ProtocolError(f"expected JOIN, got {msg.type.name}", code=ErrorCode.UNEXPECTED_MESSAGE)
        if self.schema is None:
            self.schema = join.adapter
            self._init_state = init_lora_state(self.schema, job.init_seed)
            log.info(
                "adapter schema %s: %d tensors, %d parameters",
                self.schema.fingerprint(),
                len(self.schema.tensors),
                self.schema.numel,
            )
        elif join.adapter.fingerprint() != self.schema.fingerprint():
            raise SchemaMismatchError(
                f"{cid}: adapter schema {join.adapter.fingerprint()} differs from the "
                f"job's {self.schema.fingerprint()} (rank and target modules are job-level)"
            )
        assert self._init_state is not None
        view = {k: v.copy() for k, v in self._init_state.items()}
        rec = ClientRecord(cid, peer, hello.num_samples, view, state_hash(view))
        rec.held = {"row": zeros_state(self.schema), "global": {k: v.copy() for k, v in view.items()}}
        rec.downlink_ef.enabled = job.downlink_error_feedback
        self.clients[cid] = rec
        peer.send(Ack(ref=MsgType.JOIN, round=self.machine.round, state_hash=rec.view_hash))
        log.info("client %s joined (%d samples)", cid, hello.num_samples)
        self._apply(self.machine.on_join(cid, self.clock()))
        return rec

    # -- messages ----------------------------------------------------------------------------------

    def _handle(self, rec: ClientRecord, msg: Message) -> None:
        h = msg.header
        if isinstance(h, Update):
            self._on_update(rec, h, msg.body)
        elif isinstance(h, Metrics):
            rec.stats.setdefault(h.round, {}).update(h.values)
        elif isinstance(h, Ack) and h.ref is MsgType.AGGREGATE:
            expected = rec.held_hash.pop(h.round, None)
            if expected is not None and h.state_hash != expected:
                log.error(
                    "round %d: the client holds aggregate %s, the server expected %s", h.round, h.state_hash, expected
                )
            fut = rec.aggregate_acks.get(h.round)
            if fut is not None and not fut.done():
                fut.set_result(None)
        elif isinstance(h, Bye):
            log.info("client said bye: %s", h.reason)
        elif isinstance(h, Error):
            log.warning("client reported error %d: %s", h.code, h.message)
        elif msg.type is not MsgType.HEARTBEAT:
            raise ProtocolError(f"unexpected {msg.type.name} from a client", code=ErrorCode.UNEXPECTED_MESSAGE)

    def _on_update(self, rec: ClientRecord, h: Update, body: bytes) -> None:
        round_var.set(h.round)
        if h.client_id != rec.client_id:
            raise ProtocolError(
                f"UPDATE names client {h.client_id!r} on {rec.client_id!r}'s connection",
                code=ErrorCode.IDENTITY_MISMATCH,
            )
        digest = hashlib.sha256(body).hexdigest()[:32]
        prior = rec.updates.get(h.round)
        if prior is not None:
            if prior != digest:
                raise ProtocolError(
                    f"a different update for round {h.round} was already accepted",
                    code=ErrorCode.CONFLICTING_UPDATE,
                )
            rec.peer.send(Ack(ref=MsgType.UPDATE, round=h.round, state_hash=rec.view_hash))  # lost-ACK resend
            return
        if h.base_hash != rec.view_hash:
            raise ProtocolError(
                f"update applies to state {h.base_hash}, server holds {rec.view_hash}",
                code=ErrorCode.CONFLICTING_UPDATE,
            )
        self.machine.check_update(rec.client_id, h.round)
        assert self.schema is not None
        self.schema.check_manifest(h.manifest, what=f"update from {rec.client_id}")
        delta = decode_tensors(h.manifest, body, self.cfg.transport.limits)
        for k, d in delta.items():
            rec.view[k] = rec.view[k] + d
        rec.view_hash = state_hash(rec.view)
        rec.updates[h.round] = digest
        rec.num_samples = h.num_samples
        st = rec.stats.setdefault(h.round, {})
        st["bytes_up"] = float(frame_size(h, len(body)))
        st["fp32_up"] = float(fp32_nbytes(h.manifest))
        rec.peer.send(Ack(ref=MsgType.UPDATE, round=h.round, state_hash=rec.view_hash))
        log.info(
            "update accepted: %d bytes on the wire (%.1fx smaller than fp32)",
            st["bytes_up"],
            st["fp32_up"] / max(st["bytes_up"], 1.0),
        )
        self._apply(self.machine.on_update(rec.client_id, h.round, self.clock()))

    # -- actions -----------------------------------------------------------------------------------

    def _apply(self, actions: list[Action]) -> None:
        for act in actions:
            if isinstance(act, StartRound):
                self._start_round(act)
            elif isinstance(act, CloseRound):
                self._spawn(self._close_round(act))
            elif isinstance(act, Finish):
                self._say_bye(f"job complete after {act.rounds_completed} rounds")
                self._finish(JobResult(True, act.rounds_completed))
            elif isinstance(act, Fail):
                log.error("job failed: %s", act.reason)
                self._say_bye(f"job failed: {act.reason}")
                self._finish(JobResult(False, max(self.machine.round - 1, 0), act.reason))

    def _start_round(self, act: StartRound) -> None:
        round_var.set(act.round)
        job = self.cfg.job
        deadline_s = max(act.deadline - self.clock(), 0.001)
        for cid in act.participants:
            rec = self.clients.get(cid)
            if rec is None:
                continue
            with contextlib.suppress(TransportError):
                rec.peer.send(
                    RoundStart(
                        round=act.round,
                        train=job.train,
                        uplink=job.uplink,
                        deadline_s=deadline_s,
                    )
                )
        log.info("round %d started with %d clients", act.round, len(act.participants))

    async def _close_round(self, act: CloseRound) -> None:
        round_var.set(act.round)
        t0 = time.perf_counter()
        contributors = [c for c in act.contributors if c in self.clients]
        payloads = await asyncio.to_thread(self._aggregate, contributors)
        agg_s = time.perf_counter() - t0
        # Every client's payload is encoded and sent concurrently: one slow receiver does not hold up the others.
        sent = await asyncio.gather(*(self._send_aggregate(act.round, cid, *entry) for cid, entry in payloads.items()))
        waits = [fut for fut in sent if fut is not None]
        if waits:
            # Delivery is the client's ACK, not our write returning.
            done, _ = await asyncio.wait(waits, timeout=self.cfg.policy.round_timeout_s)
            if len(done) < len(waits):
                log.warning("%d clients did not acknowledge their aggregate", len(waits) - len(done))
        self._write_history(act.round, contributors, agg_s, time.perf_counter() - t0)
        self._apply(self.machine.on_aggregated(act.round, self.clock()))

    async def _send_aggregate(
        self, round_: int, cid: str, state: TensorDict, kind: str, n_contrib: int
    ) -> asyncio.Future[None] | None:
        """Encode and send one client's aggregate; returns the future its ACK resolves (None if it is gone)."""
        rec = self.clients.get(cid)
        if rec is None:
            return None
        payload, held = await asyncio.to_thread(self._downlink_payload, rec, kind, state)
        header = Aggregate(round=round_, kind=kind, delta=True, contributors=n_contrib, manifest=payload.manifest)
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        rec.aggregate_acks[round_] = fut
        rec.held[kind] = held
        rec.held_hash[round_] = state_hash(held)
        if kind == "global":  # the global replaces the client's own adapter: that is now our view of it
            rec.view = {k: v.copy() for k, v in held.items()}
            rec.view_hash = state_hash(rec.view)
        try:
            n = await rec.peer.send_bulk(header, payload.body)
        except TransportError:
            fut.set_result(None)
            return None
        st = rec.stats.setdefault(round_, {})
        st["bytes_down"] = float(n)
        st["fp32_down"] = float(fp32_nbytes(payload.manifest))
        st["ef_down_residual_norm"] = rec.downlink_ef.residual_norm()
        return fut

    def _downlink_payload(self, rec: ClientRecord, kind: str, target: TensorDict) -> tuple[Payload, TensorDict]:
        """Encode (target − what the client holds) with the client's downlink error feedback.

        Returns the payload and the adapter the client will hold once it adds the decoded payload.
        """
        base = rec.held[kind]
        payload = rec.downlink_ef.compress({k: target[k] - base[k] for k in target}, self.cfg.job.downlink)
        return payload, {k: base[k] + payload.decoded[k] for k in base}

    def _aggregate(self, contributors: list[str]) -> dict[str, tuple[TensorDict, str, int]]:
        """Per recipient: (state, kind, number of clients averaged). Pure numpy, runs in a thread."""
        job = self.cfg.job
        if job.federation == "local" or not contributors:
            return {}
        recs = [self.clients[c] for c in contributors]
        states = [r.view for r in recs]
        if job.clip_norm is not None:
            assert self._init_state is not None
            states = [clip_deviation(s, self._init_state, job.clip_norm) for s in states]
        if job.weighting == "samples":
            weights = [float(min(max(r.num_samples, 1), job.max_sample_weight)) for r in recs]
        else:
            weights = [1.0] * len(recs)
        out: dict[str, tuple[TensorDict, str, int]] = {}
        if job.federation == "fedavg":
            g = fedavg(states, weights)
            for cid in self.clients:
                out[cid] = (g, "global", len(recs))
            return out
        if len(recs) < 2:
            # Privacy floor: a RoW built from one client would hand out that client's adapter alone.
            log.warning("round closed with %d contributor(s): no Rest-of-World adapter is sent", len(recs))
            return {}
        exact = job.row_mode == "exact"
        rows = leave_one_out_exact(states, weights) if exact else leave_one_out(states, weights)
        for cid, row in zip(contributors, rows, strict=True):
            out[cid] = (row, "row", len(recs) - 1)
        others = [c for c in self.clients if c not in out]
        if others:
            mean = exact_mean(states, weights) if exact else fedavg(states, weights)
            for cid in others:
                out[cid] = (mean, "row", len(recs))
        return out

    def _write_history(self, round_: int, contributors: list[str], agg_s: float, close_s: float) -> None:
        row = {
            "round": round_,
            "time": time.time(),
            "federation": self.cfg.job.federation,
            "contributors": contributors,
            "aggregate_s": round(agg_s, 6),
            "close_s": round(close_s, 6),
            "clients": {cid: rec.stats.get(round_, {}) for cid, rec in sorted(self.clients.items())},
        }
        with self.history_path.open("a") as f:
            f.write(json.dumps(row) + "\n")
            f.flush()
            os.fsync(f.fileno())

    def _say_bye(self, reason: str) -> None:
        for rec in list(self.clients.values()):
            with contextlib.suppress(TransportError):
                rec.peer.send(Bye(reason=reason))


def _atomic_write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


async def serve_job(cfg: ServerConfig) -> JobResult:
    """Run one federated job to completion (the ``fedquic server`` command)."""
    server = AggregationServer(cfg)
    await server.start()
    return await server.run()


__all__ = ["AggregationServer", "JobError", "JobResult", "serve_job"]
