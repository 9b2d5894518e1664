"""The client process's asyncio driver: :class:`FederatedClient` and :func:`run_client`.

Per connection it creates a :class:`~fedquic.client.session.ClientSession` (the protocol, sans-I/O), feeds it
what happens (messages, its timer, finished work and bulk sends, the connection ending) and carries out the
actions it returns (:mod:`fedquic.client.actions`): send on the peer, bulk-send on a stream of its own, run local
work in a worker thread, close. It owns what the session must not do: the peer, the threads, the checkpoint
store, the result files and the reconnect policy. The synchronized adapter state outlives connections in a
:class:`~fedquic.client.sync.SyncedAdapter` (``view``, ``view_hash``, ``synced``, ``ef``, ``held`` delegate to it).

Resilience (docs/client.md):

* **Checkpoint.** After every acknowledged UPDATE, every UPDATE refused as late and every installed AGGREGATE
  the client state is written atomically to ``run_dir/state`` (:mod:`fedquic.client.state`); a client restarted
  on the same job restores it and sends ``Join(resume=SyncState(...))``.
* **Reset.** The server answers JOIN with its own view hash; when it differs from ours it sends dense
  AGGREGATEs (kind ``local``, maybe ``row``/``global``) that the client installs before it takes part in a round.
* **Reconnect.** A connection lost after joining is re-established with exponential backoff and jitter, and
  the client rejoins with ``resume`` from its in-memory state; refusals (certificate, identity, schema) are final.
* **Job ended.** An ERROR ``JOB_ENDED`` or a close with that code, at any point, ends the client with success.

``_install(peer, h, body, *, evaluate=False)`` is the one coroutine every AGGREGATE (dense resets too) goes
through, and it sends the ACK(AGGREGATE) itself: a subclass may override it (tests corrupt a delta that way).
"""

from __future__ import annotations

import asyncio
import itertools
import json
import logging
import random
import time
from collections import deque
from dataclasses import asdict
from typing import Any

from ..common.adapter import AdapterSchema, TensorDict, state_hash
from ..common.codec import Encoding, fp32_nbytes
from ..common.errors import RemoteError, TransportError
from ..common.logs import client_id_var, round_var
from ..common.messages import SUPPORTED_VERSIONS, Ack, Aggregate, Hello, Metrics, MsgType, RoundStart, Welcome
from ..transport.framing import frame_size
from ..transport.tickets import TicketJar
from .actions import (
    Action,
    Attach,
    Checkpoint,
    Close,
    Finished,
    Install,
    Joined,
    Outcome,
    Record,
    Restore,
    RunWork,
    SaveResults,
    Send,
    SendBulk,
    Train,
    Trained,
    Work,
    classify,
)
from .config import ClientConfig
from .connector import Connector, MessagePeer, quic_connector
from .learner import Learner
from .results import ClientResult, RoundRecord, accuracy_note, finite_metrics
from .session import ClientSession
from .state import StateStore
from .sync import SyncedAdapter

log = logging.getLogger(__name__)


def _synced(name: str, doc: str) -> Any:
    """An attribute of the client that is its SyncedAdapter's (kept so that code reading ``client.view`` works)."""
    return property(lambda self: getattr(self.sync, name), lambda self, v: setattr(self.sync, name, v), doc=doc)


def _unacked_control(peer: MessagePeer) -> bool | None:
    """Whether what we wrote on the control stream is unacknowledged by the server's QUIC stack; None when the peer
    is not a QUIC one (nothing to probe)."""
    core = getattr(peer, "core", None)
    sid = getattr(core, "control_stream_id", None)
    if core is None or sid is None:
        return None
    return bool(core.unacked_bytes(sid) > 0)


class FederatedClient:
    view = _synced("view", "our individual adapter exactly as the server reconstructed it")
    view_hash = _synced("view_hash", "the hash of view (versions the state)")
    synced = _synced("synced", "our adapter when we last synced")
    synced_round = _synced("synced_round", "the last round synced (ACKed UPDATE or installed AGGREGATE)")
    ef = _synced("ef", "the uplink ErrorFeedback: what compression has not delivered yet")
    held = _synced("held", "the aggregate of each kind we hold")
    job = _synced("job", "the job's WELCOME (the first connection's)")
    schema = _synced("schema", "the adapter schema agreed at the first JOIN")

    def __init__(self, cfg: ClientConfig, learner: Learner, *, connector: Connector | None = None) -> None:
        self.cfg = cfg
        self.learner = learner
        # Session tickets from earlier connections to this server: a reconnect resumes (and sends HELLO in 0-RTT).
        self.tickets = TicketJar()
        self._connect = connector or (lambda cfg: quic_connector(cfg, tickets=self.tickets, hello=self._hello()))
        self.sync = SyncedAdapter(learner, cfg.client_id)
        self.joined = False
        self.joins = 0  # successful JOINs (1 + the number of rejoins)
        self.resets = 0  # `local` resets installed
        self.late_rounds: list[int] = []  # rounds whose UPDATE the server refused as late
        self.resumed_from_checkpoint: int | None = None  # the round restored from run_dir/state, if any
        self.result: ClientResult | None = None
        self.rows_received: dict[int, TensorDict] = {}  # last RoW per round, for inspection and tests
        self.keep_rows = False
        # The base model's held-out figures (round 0), measured before the first round trained from the job's
        # initial adapter and reported as base_* in that round's METRICS until an UPDATE carrying them is ACKed.
        self._base_metrics: dict[str, float] | None = None
        self._beats = itertools.count(1)  # HEARTBEAT seq: not reset on reconnect
        self._store = StateStore(cfg.run_dir / "state") if cfg.checkpoint else None

    # -- connections and the reconnect policy -------------------------------------------------------------

    async def run(self) -> ClientResult:
        client_id_var.set(self.cfg.client_id)
        cfg = self.cfg
        delay = cfg.backoff_initial_s
        failures = 0
        while True:
            joins = self.joins
            try:
                end = await self._run_once()
            except (TransportError, RemoteError) as exc:  # connecting failed (or closing did)
                end = Finished(classify(exc), exc)
            if end.outcome is Outcome.DONE:
                assert self.result is not None
                return self.result
            exc = end.error
            assert exc is not None
            if end.outcome is Outcome.JOB_ENDED:
                return self._job_ended(exc)
            if end.outcome is Outcome.FATAL:
                raise exc
            if self.joins > joins:  # this connection got as far as joining: count afresh
                failures, delay = 0, cfg.backoff_initial_s
            failures += 1
            if failures >= cfg.connect_attempts:
                log.error("giving up after %d consecutive failed connection attempts", failures)
                raise exc
            wait = delay * (1.0 + 0.5 * random.random())  # jitter: clients do not retry in lockstep
            what = "connection lost" if self.joined else "connection attempt failed"
            log.warning("%s (%d/%d: %s); retrying in %.1f s", what, failures, cfg.connect_attempts, exc, wait)
            await asyncio.sleep(wait)
            delay = min(delay * 2, cfg.backoff_max_s)

    def _job_ended(self, exc: BaseException) -> ClientResult:
        """The server says the job is over (ERROR JOB_ENDED, or a close with that code, at any point): a success
        with nothing left to do. No retry can change it, so the client stops at once."""
        log.info("the job has ended (%s); nothing left to do, not retrying", exc)
        if self.result is None:  # ended before we took part: keep the round log of an earlier run of this client
            return ClientResult(job_id=self.job.job_id if self.job else "", bye_reason=str(exc))
        self.result.bye_reason = self.result.bye_reason or str(exc)
        self._save(self.result)
        save = getattr(self.learner, "save", None)
        if save is not None:  # the job ended under us (e.g. while we measured the last round): keep the adapters
            try:
                save(self.cfg.run_dir / "adapters")
            except Exception as err:
                log.error("could not save the adapters: %s", err)
        return self.result

    async def _run_once(self) -> Finished:
        cfg = self.cfg
        async with self._connect(cfg) as peer:
            log.info("connected to %s:%d%s", cfg.host, cfg.port, " (resumed)" if peer.session_resumed else "")
            session = ClientSession(cfg, self.sync, hello=self._hello(), beats=self._beats)
            try:
                return await self._drive(peer, session)
            except BaseException as exc:
                # Whatever ended the connection (the peer, a refusal, a failed write, cancellation), the session
                # rolls back a round whose UPDATE may be out unanswered.
                lost = session.on_connection_lost(exc, asyncio.get_running_loop().time())
                if lost and isinstance(exc, TransportError | RemoteError):
                    end = lost[-1]
                    assert isinstance(end, Finished)
                    return end
                raise

    async def _drive(self, peer: MessagePeer, session: ClientSession) -> Finished:
        """Feed the session until it finishes: one event at a time, no message while its work runs."""
        loop = asyncio.get_running_loop()
        todo: deque[Action] = deque(session.start(loop.time(), hello_sent=bool(getattr(peer, "hello_sent", False))))
        while True:
            while todo:
                action = todo.popleft()
                if isinstance(action, Finished):
                    return action
                todo.extend(await self._carry_out(peer, session, action))
            when = session.get_timer()
            assert when is not None, f"the session awaits nothing in state {session.state}"
            try:
                msg = await asyncio.wait_for(peer.recv(), max(when - loop.time(), 0.0))
            except asyncio.TimeoutError:
                todo.extend(session.handle_timer(loop.time(), unacked_control=_unacked_control(peer)))
            else:
                todo.extend(session.on_message(msg, loop.time()))

    async def _carry_out(self, peer: MessagePeer, session: ClientSession, action: Action) -> list[Action]:
        loop = asyncio.get_running_loop()
        if isinstance(action, Send):
            peer.send(action.header)
        elif isinstance(action, SendBulk):
            nbytes = await peer.send_bulk(action.header, action.body)  # type: ignore[arg-type]
            return session.on_bulk_sent(nbytes, loop.time())
        elif isinstance(action, RunWork):
            result = await self._work(peer, action.work)
            return session.on_work_done(result, loop.time())
        elif isinstance(action, Close):
            await peer.aclose(action.code, action.reason)
        elif isinstance(action, Joined):
            self._joined(action)
        elif isinstance(action, Record):
            self._record(action.record)
            if action.late:
                self.late_rounds.append(action.record.round)
        else:
            raise TypeError(f"not an action the client can carry out: {action!r}")
        return []

    async def _work(self, peer: MessagePeer, work: Work) -> AdapterSchema | bool | Trained | None:
        if isinstance(work, Attach):
            return await asyncio.to_thread(self.learner.attach, work.job)
        if isinstance(work, Restore):
            return await asyncio.to_thread(self._restore, work.job, work.schema)
        if isinstance(work, Train):
            return await self._train(work.start)
        if isinstance(work, Install):
            await self._install(peer, work.msg.header, work.msg.body, evaluate=work.evaluate)  # type: ignore[arg-type]
        elif isinstance(work, Checkpoint):
            await self._checkpoint()
        elif isinstance(work, SaveResults):
            await self._finish(work.reason)
        return None

    # -- what the actions do ------------------------------------------------------------------------------

    def _hello(self) -> Hello:
        return Hello(
            versions=SUPPORTED_VERSIONS,
            client_id=self.cfg.client_id,
            base_fingerprint=self.learner.base_fingerprint(),
            num_samples=self.learner.num_samples(),
            encodings=tuple(Encoding),  # this client decodes every encoding of the protocol
        )

    def _joined(self, joined: Joined) -> None:
        job, resume = joined.job, joined.resume
        log.info(
            "%s job %s: %s, %d rounds, %d adapter parameters%s",
            "rejoined" if resume is not None else "joined",
            job.job_id,
            job.federation,
            job.rounds,
            self.schema.numel if self.schema is not None else 0,
            f", resuming after round {resume.round}" if resume is not None else "",
        )
        self.joined = True
        self.joins += 1
        if self.result is None:
            self.result = ClientResult(job_id=job.job_id)

    def _record(self, rec: RoundRecord) -> None:
        assert self.result is not None
        rounds = self.result.rounds
        rounds[:] = [r for r in rounds if r.round != rec.round]  # a round re-run after a reconnect: keep the last
        rounds.append(rec)

    def _restore(self, job: Welcome, schema: AdapterSchema) -> bool:
        """Load run_dir/state if it belongs to this job, client, schema and base model; False otherwise."""
        if self._store is None:
            return False
        ckpt = self._store.load()
        if ckpt is None:
            return False
        differs = self.sync.foreign(ckpt, job, schema)
        if differs:
            log.warning("ignoring the checkpoint in %s: %s", self._store.dir, "; ".join(differs))
            return False
        self.sync.restore(ckpt, job, schema)
        self.resumed_from_checkpoint = ckpt.round
        log.info("restored client state of job %s after round %d from %s", job.job_id, ckpt.round, self._store.dir)
        return True

    async def _checkpoint(self) -> None:
        if self._store is None or self.job is None:
            return
        store, snapshot = self._store, self.sync.snapshot
        await asyncio.to_thread(lambda: store.save(snapshot()))

    async def _train(self, rs: RoundStart) -> Trained:
        """Train the round (from its start again if it was handed before unanswered), measure, encode."""
        round_var.set(rs.round)
        sync = self.sync
        assert sync.job is not None
        start = sync.begin_round(rs.round)
        t0 = time.perf_counter()
        base = await self._base_evaluation()
        metrics = await asyncio.to_thread(self.learner.train, rs.round, rs.train)
        prepared = await asyncio.to_thread(sync.prepare_update, rs.round, rs.uplink, start)
        if sync.job.federation == "local":
            # Nothing is shared: the model the round produced is the one to measure (there is no aggregate).
            metrics.update(await self._evaluate(rs.round))
        metrics = {**metrics, **base, "round_s": time.perf_counter() - t0, "ef_residual_norm": sync.ef.residual_norm()}
        return Trained(prepared, RoundRecord(rs.round, metrics, fp32_up=fp32_nbytes(prepared.manifest)))

    async def _base_evaluation(self) -> dict[str, float]:
        """Before the first round trains from the job's initial adapter (the base model: B = 0), measure it;
        reported as ``base_<metric>`` until a round carrying it is acknowledged."""
        if not self.sync.base_pending:
            return {}
        if self._base_metrics is None:
            found = await self._evaluate(0)
            self._base_metrics = {f"base_{k}": v for k, v in found.items()}
            if found:
                log.info("round 0 (base model)%s", accuracy_note(found, "held-out"))
        return dict(self._base_metrics)

    async def _evaluate(self, round_: int) -> dict[str, float]:
        """The learner's held-out figures for the model it holds now (empty if it has no ``evaluate``); the whole
        held-out set for the base model and after the job's last round."""
        evaluate = getattr(self.learner, "evaluate", None)
        if evaluate is None:
            return {}
        assert self.job is not None
        final = round_ == 0 or round_ >= self.job.rounds
        try:
            found = dict(await asyncio.to_thread(evaluate, final))
        except Exception as exc:  # a failed measurement (out of memory...) must not cost the round or the job
            log.error("held-out evaluation failed (round %d): %s: %s", round_, type(exc).__name__, exc)
            return {}
        if found and final and round_ > 0:
            found["eval_final"] = 1.0
        return found

    async def _install(
        self, peer: MessagePeer, h: Aggregate, body: bytes | bytearray, *, evaluate: bool = False
    ) -> None:
        """Install an AGGREGATE, acknowledge, checkpoint. With ``evaluate`` (a round's aggregate, not a reset)
        the model it makes (for FedALT: the client's own adapter with the new RoW) is measured first and its
        figures sent as this round's METRICS, delivered before the ACK so the server's round history holds
        them."""
        round_var.set(h.round)
        # Off the event loop (decoding 45 MB, installing it in the model, hashing it): the QUIC stack keeps
        # acknowledging and receiving meanwhile. The session sends nothing else until this returns.
        limits = self.cfg.transport.limits
        manifest, decoded = await asyncio.to_thread(self.sync.decode, h, body, limits)
        state, reset = await asyncio.to_thread(self.sync.install, h, decoded)
        digest = await asyncio.to_thread(state_hash, state)
        self.resets += reset
        if self.keep_rows and h.kind != "local":
            self.rows_received[h.round] = state
        # A round's aggregate, not a reset (dense, no contributors: the server's copy re-sent after a rejoin).
        is_result = h.kind != "local" and (h.delta or h.contributors > 0)
        found = await self._evaluate(h.round) if evaluate and is_result else {}
        if found:
            await peer.send_bulk(Metrics(round=h.round, values=finite_metrics(found)), b"")
            wait_acked = getattr(peer, "wait_acked", None)
            if wait_acked is not None and not await wait_acked(10.0):
                log.warning("round %d: the server did not take the held-out figures in time", h.round)
        peer.send(Ack(ref=MsgType.AGGREGATE, round=h.round, state_hash=digest))
        # Checkpointed after the ACK, off the server's critical path: the server persisted what it sent before
        # sending it, so a crash in between costs a dense reset at the rejoin (JOIN reports the older held state),
        # never a lost or doubled aggregate.
        await self._checkpoint()
        if self.result is not None:
            for rec in self.result.rounds:
                if rec.round == h.round:
                    rec.fp32_down = fp32_nbytes(manifest)
                    rec.bytes_down = frame_size(h, len(body))
                    rec.metrics.update(found)
        log.info(
            "installed %s adapter for round %d (%d contributors)%s",
            h.kind,
            h.round,
            h.contributors,
            accuracy_note(found, "held-out after the aggregate"),
        )

    async def _finish(self, reason: str) -> None:
        """BYE: write the round log and the adapters."""
        assert self.result is not None
        self.result.bye_reason = reason
        self._save(self.result)
        save = getattr(self.learner, "save", None)
        if save is not None:
            await asyncio.to_thread(save, self.cfg.run_dir / "adapters")

    def _save(self, result: ClientResult) -> None:
        self.cfg.run_dir.mkdir(parents=True, exist_ok=True)
        with (self.cfg.run_dir / "rounds.jsonl").open("w") as f:
            for rec in result.rounds:
                f.write(json.dumps(asdict(rec)) + "\n")


async def run_client(cfg: ClientConfig, learner: Learner, *, connector: Connector | None = None) -> ClientResult:
    return await FederatedClient(cfg, learner, connector=connector).run()


__all__ = ["FederatedClient", "run_client"]
