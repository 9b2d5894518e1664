"""The aggregation server daemon: the asyncio driver of the sans-I/O job, sessions and round closes.

Each connection gets a :class:`~fedquic.server.session.ServerSession`; the daemon feeds it the connection's
messages and timers and carries out the actions it returns (:mod:`~fedquic.server.actions`): sends, closes,
permits, and :class:`~fedquic.server.actions.Work` run in worker threads with a lock per client id (a durable
commit and a downlink commit of the same client never interleave). Upload admission is
:class:`~fedquic.server.uploads.UploadDesk`'s. An UPDATE is acknowledged only once it is on disk; a killed server
restarts into the same round.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import time
from collections.abc import Callable
from typing import Any

from ..common.atomic import atomic_write_bytes
from ..common.errors import ConfigError, ErrorCode, FedQuicError, TransportError
from ..common.logs import client_id_var
from ..transport.aio import FedQuicServer, Peer
from .actions import (
    Action,
    Close,
    JobDone,
    Permit,
    QueueUpload,
    Refuse,
    Replace,
    Revoke,
    Send,
    SendBulk,
    UploadDone,
    Work,
)
from .admission import UploadAdmission
from .close import round_history
from .config import ServerConfig
from .history import append_history
from .job import ClientRecord, JobResult, ServerJob
from .memory import pin_mmap_threshold
from .metrics import MetricsEndpoint, ServerMetrics, render_prometheus
from .rounds import Action as RoundAction
from .rounds import Phase, RoundMachine
from .rules import load_plugins
from .session import ServerSession
from .store import JobRecord, ServerStore
from .uploads import UploadDesk

log = logging.getLogger(__name__)

TICK_S = 0.25  # the round machine's deadlines and the round closes' ACK waits are checked this often


class AggregationServer(UploadDesk):
    def __init__(self, cfg: ServerConfig, clock: Callable[[], float] = time.monotonic) -> None:
        self.cfg = cfg
        self.clock = clock
        load_plugins(cfg.plugins)
        self._locks: dict[str, asyncio.Lock] = {}  # per client id: one piece of work on its tensors at a time
        self.job = ServerJob(cfg, ServerStore(cfg.run_dir / "state"), clock(), busy=self._busy)
        self._endpoint = MetricsEndpoint(self._metrics_text, self.status)
        self.metrics_port: int | None = None
        self._transport = FedQuicServer(cfg.transport, cfg.tls, self._on_connect)
        self._done: asyncio.Future[JobResult] | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self.admission = UploadAdmission(cfg.upload_slots, cfg.upload_slot_timeout_s, self._transport.budget)
        self._admission_timer: asyncio.Future[None] | None = None
        self._closing = False  # close() has begun: no new grants, no new admission clock
        self._granted_peers: dict[tuple[str, int], Peer] = {}  # (client, round) -> the connection granted
        self.port: int = 0

    # -- the job's state, as the tests and `fedquic status` read it ------------------------------------

    @property
    def machine(self) -> RoundMachine:
        return self.job.machine

    @property
    def records(self) -> dict[str, ClientRecord]:
        return self.job.records

    @property
    def clients(self) -> dict[str, ClientRecord]:
        return self.job.clients

    @property
    def metrics(self) -> ServerMetrics:
        return self.job.metrics

    @property
    def schema(self) -> Any:
        return self.job.schema

    @property
    def base_fingerprint(self) -> str | None:
        return self.job.base_fingerprint

    @property
    def store(self) -> ServerStore:
        return self.job.store

    @property
    def history_path(self) -> Any:
        return self.job.history_path

    # -- lifecycle ---------------------------------------------------------------------------------

    def _restore(self) -> list[RoundAction]:
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
        return self.job.restore_records(job, self.clock())

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
        self.job.store = ServerStore(root)

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
        await self._carry(self.job.apply(resume, self.clock()), None)
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
        self.job.stopping = True  # from here on, disconnects are not departures and nothing new starts
        with contextlib.suppress(OSError):
            self.store.save_job(self.job.snapshot())
        log.info("%s: state saved in %s; restart with the same run directory to resume", reason, self.store.root)
        self._finish(JobResult(False, self.job.rounds_completed(), reason, stopped=True))

    async def close(self, bye_grace_s: float = 10.0) -> None:
        self._closing = True
        ended = self._is_done() and not self.job.stopping  # the job ended: every client was sent a BYE
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

    def _spawn(self, coro: Any) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._task_done)

    def _task_done(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            exc = task.exception()
            log.error("server task failed: %r", exc, exc_info=exc)
            self._finish(JobResult(False, self.job.rounds_completed(), f"internal error: {exc!r}"))

    def _grant_done(self, task: asyncio.Task[None]) -> None:
        """An upload's place in line ended; a failure there costs that upload (the client asks again), not the job."""
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("upload admission failed: %r", task.exception(), exc_info=task.exception())

    def _finish(self, result: JobResult) -> None:
        if self.job.result is None:
            self.job.result = result
        if self._done is not None and not self._done.done():
            self._done.set_result(result)

    def _is_done(self) -> bool:
        return self._done is not None and self._done.done()

    async def _ticker(self) -> None:
        while True:
            await asyncio.sleep(TICK_S)
            await self._carry(self.job.tick(self.clock()), None)

    # -- seams the tests reach ------------------------------------------------------------------------

    def _load(self, rec: ClientRecord) -> None:
        self.job.load(rec)

    def _write_history(self, round_: int, contributors: list[str], agg_s: float, close_s: float) -> None:
        append_history(self.history_path, round_history(self.job, round_, contributors, agg_s, close_s))

    # -- connections: the driver -------------------------------------------------------------------

    async def _on_connect(self, peer: Peer) -> None:
        identity = peer.identity.client_id if peer.identity is not None else None
        session = ServerSession(self.job, peer, identity, self.clock(), budget=self._transport.budget)
        try:
            while not session.closed:
                deadline = session.deadline()
                timeout = None if deadline is None else max(deadline - self.clock(), 0.001)
                try:
                    msg = await peer.recv(timeout=timeout)
                except TransportError as exc:
                    if exc.code is not ErrorCode.TIMEOUT or peer.closed.is_set() or deadline is None:
                        raise
                    await self._carry(session.on_timer(self.clock()), peer)
                    continue
                if session.client_id is not None:
                    client_id_var.set(session.client_id)
                await self._carry(session.on_message(msg, self.clock()), peer)
        except TransportError as exc:
            if peer.refused_with is not None:  # a transport-level violation (frame limits, stream flood, ...)
                self.metrics.reject(peer.refused_with)
            elif session.rec is not None and not self._is_done():
                log.info("client disconnected: %s", exc)
        except FedQuicError as exc:  # a refusal the session did not turn into a close itself
            log.warning("closing connection from %s: %s", peer.remote_address, exc)
            self.metrics.reject(exc.code)
            peer.send_error(exc)
            await peer.aclose(0x100 + int(exc.code), str(exc)[:200])
        finally:
            left = session.on_closed(self.clock())
            if left:
                self._spawn(self._carry(left, None))

    def _busy(self, cid: str) -> bool:
        lock = self._locks.get(cid)
        return lock is not None and lock.locked()

    def _peer(self, to: str | None, own: Peer | None) -> Peer | None:
        if to is None:
            return own
        rec = self.clients.get(to)
        return rec.peer if rec is not None else None

    async def _carry(self, actions: list[Action], peer: Peer | None) -> None:
        """Carry out actions in order; background ones run beside this connection's next messages."""
        for act in actions:
            if isinstance(act, Work):
                if act.background:
                    self._spawn(self._work(act, None))
                else:
                    await self._work(act, peer)
            elif isinstance(act, SendBulk):
                if act.background:
                    self._spawn(self._send_bulk(act, None))
                else:
                    await self._send_bulk(act, peer)
            elif isinstance(act, Replace):
                with contextlib.suppress(Exception):
                    await act.handle.aclose(0x100 + int(act.code), act.reason)
            elif isinstance(act, Close):
                target = self._peer(act.to, peer)
                if target is not None:
                    if act.error is not None:
                        target.send_error(act.error)
                    await target.aclose(0x100 + int(act.code), act.reason)
            else:
                self._carry_now(act, peer)

    def _carry_now(self, act: Action, peer: Peer | None) -> None:
        if isinstance(act, Send):
            target = self._peer(act.to, peer)
            if act.to is None:
                assert target is not None
                target.send(act.header)  # on this connection: a closed one ends its loop
            elif target is not None:
                with contextlib.suppress(TransportError):  # another connection: best effort
                    target.send(act.header)
        elif isinstance(act, Refuse):
            assert peer is not None
            peer.send_error(act.error)
        elif isinstance(act, Permit | Revoke):
            target = self._peer(act.to, peer)
            if target is not None and isinstance(act, Permit):
                target.core.permit(act.msg_type, act.permit)
            elif target is not None:
                target.core.revoke(act.msg_type)
        elif isinstance(act, QueueUpload):
            rec = self.records[act.client_id]
            rec.upload_done[act.round] = asyncio.Event()
            task = asyncio.ensure_future(self._grant(rec, act.round, act.nbytes))
            self._tasks.add(task)
            task.add_done_callback(self._grant_done)
        elif isinstance(act, UploadDone):
            rec = self.records.get(act.client_id)
            done = rec.upload_done.get(act.round) if rec is not None else None
            if done is not None:
                done.set()
        elif isinstance(act, JobDone):
            self._finish(act.result)

    async def _work(self, work: Work, peer: Peer | None) -> None:
        async with contextlib.AsyncExitStack() as stack:
            for key in sorted(set(work.keys)):  # in one order: two works on the same clients never deadlock
                await stack.enter_async_context(self._locks.setdefault(key, asyncio.Lock()))
            try:
                result = work.run() if work.inline else await asyncio.to_thread(work.run)
            except FedQuicError as exc:
                if work.fail is None or isinstance(exc, TransportError):
                    raise
                more = work.fail(exc, self.clock())
            else:
                more = None
        if more is None:
            more = work.then(result, self.clock())
        await self._carry(more, peer)

    async def _send_bulk(self, act: SendBulk, own: Peer | None) -> None:
        target = self._peer(act.to, own)
        n: int | None = None
        if target is not None:
            try:
                n = await target.send_bulk(act.header, act.body)
            except TransportError:
                if act.to is None and not act.background:
                    raise
        await self._carry(act.then(n, self.clock()), own)


__all__ = ["AggregationServer", "JobResult"]
