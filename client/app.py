"""The client's network loop: join a job, train each round, upload deltas, install aggregates.

Uplink error feedback: each round the client sends C(Δ + e) with Δ its adapter's change since the last
sync and e the residual of earlier rounds (:class:`~fedquic.common.feedback.ErrorFeedback`), and tracks
``view``, its adapter exactly as the server reconstructed it: in FedALT mode ``view + e == local``.

Resilience (see docs/client.md):

* **Checkpoint.** After every acknowledged UPDATE and every installed AGGREGATE the client state is written
  atomically to ``run_dir/state`` (:mod:`fedquic.client.state`); a client restarted on the same job restores it
  and sends ``Join(resume=SyncState(...))``.
* **Reset.** The server answers JOIN with its own view hash; when it differs from ours it sends dense
  AGGREGATEs (kind ``local``, maybe ``row``/``global``) that the client installs before it takes part in a round.
* **Late updates.** An UPDATE refused with LATE_UPDATE or ROUND_NOT_OPEN is not an error: ``view`` and ``synced``
  stay as they were (the change goes into the next round's delta) and the error-feedback residual is rolled back.
* **Reconnect.** A connection lost after joining is re-established with exponential backoff and jitter, and
  the client rejoins with ``resume`` from its in-memory state; refusals (certificate, identity, schema) are final.
  A round whose UPDATE was never acknowledged and that the server hands again is retrained from the learner's
  state at that round's start (:class:`RoundStartState`), never on top of the first training.
* **Job ended.** An ERROR ``JOB_ENDED`` or a close with that code, at any point, ends the client with success:
  there is nothing left to join, so it does not retry.
* **Ordering.** Messages that arrive while the client waits for a specific one (AGGREGATE, ROUND_START,
  HEARTBEAT, METRICS while it waits for the ACK of its UPDATE) are queued and handled afterwards.
"""

from __future__ import annotations

import asyncio
import json
import logging
import random
import time
from collections import deque
from collections.abc import Callable
from dataclasses import asdict, dataclass

from ..common.adapter import AdapterSchema, TensorDict, init_lora_state, state_hash, zeros_state
from ..common.codec import Encoding, Manifest, decode_tensors, expand, fp32_nbytes, to_compact
from ..common.errors import (
    ConfigError,
    ErrorCode,
    JobError,
    ProtocolError,
    RemoteError,
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
    Header,
    Heartbeat,
    Hello,
    Join,
    Message,
    Metrics,
    MsgType,
    RoundStart,
    SyncState,
    Update,
    UploadGrant,
    UploadRequest,
    Welcome,
)
from ..transport.framing import frame_size
from ..transport.tickets import TicketJar
from .config import ClientConfig
from .connector import Connector, MessagePeer, quic_connector
from .learner import Learner
from .reconnect import LATE_CODES, is_retryable, remote_error
from .results import ClientResult, RoundRecord, accuracy_note, finite_metrics
from .state import ClientState, StateStore

log = logging.getLogger(__name__)


@dataclass
class RoundStartState:
    """The learner's state when it began training a round whose UPDATE is not acknowledged yet.

    Why roll back rather than resend: a round handed again (the server never applied our UPDATE: the connection
    dropped, or the server restarted, between training and the ACK) is retrained from this state, so the client
    never trains a round twice on top of itself. The alternative, persisting the encoded UPDATE and resending it,
    needs a second durable artefact (the payload, its residual and view) that must agree with the checkpoint; the
    rollback needs nothing on disk: the checkpoint is only written after a sync, so it already holds this state,
    and a restarted process and a reconnected one resume from the same point. Where the server did apply the
    UPDATE (only its ACK was lost) it does not hand the round again; its view hash differs at the rejoin and the
    dense reset installs its copy, the trained adapter.
    """

    round: int
    local: TensorDict
    extra: TensorDict


class FederatedClient:
    def __init__(self, cfg: ClientConfig, learner: Learner, *, connector: Connector | None = None) -> None:
        self.cfg = cfg
        self.learner = learner
        # Session tickets from earlier connections to this server: a reconnect resumes (and sends HELLO in 0-RTT).
        self.tickets = TicketJar()
        self._connect = connector or (lambda cfg: quic_connector(cfg, tickets=self.tickets, hello=self._hello()))
        # view: our individual adapter exactly as the server reconstructed it (its hash versions the state);
        # synced: our adapter when we last synced; ef: what compression has not delivered yet.
        self.view: TensorDict = {}
        self.view_hash = ""
        self.synced: TensorDict = {}
        self.synced_round = 0
        self.ef = ErrorFeedback()  # enabled or not as the job says (WELCOME)
        self.schema: AdapterSchema | None = None
        self.job: Welcome | None = None
        self.held: dict[str, TensorDict] = {}
        self.joined = False
        self.joins = 0  # successful JOINs (1 + the number of rejoins)
        self.resets = 0  # `local` resets installed
        self.late_rounds: list[int] = []  # rounds whose UPDATE the server refused as late
        self.resumed_from_checkpoint: int | None = None  # the round restored from run_dir/state, if any
        self.result: ClientResult | None = None
        self.rows_received: dict[int, TensorDict] = {}  # last RoW per round, for inspection and tests
        self.keep_rows = False
        self._pending: deque[Message] = deque()
        # Set when a round's UPDATE went unacknowledged: if the server hands that round again, train it from here.
        self._unacked: RoundStartState | None = None
        # The base model's held-out figures (round 0), measured before the first round trained from the job's
        # initial adapter and reported as base_* in that round's METRICS until an UPDATE carrying them is ACKed.
        self._base_metrics: dict[str, float] | None = None
        self._base_pending = False
        self._heartbeats = 0
        self._heartbeat_ok = False
        self._unanswered_since: float | None = None
        self._store = StateStore(cfg.run_dir / "state") if cfg.checkpoint else None

    # -- connection management -------------------------------------------------------------------------

    async def run(self) -> ClientResult:
        client_id_var.set(self.cfg.client_id)
        cfg = self.cfg
        delay = cfg.backoff_initial_s
        failures = 0
        while True:
            joins = self.joins
            try:
                return await self._run_once()
            except (TransportError, RemoteError) as exc:
                if exc.code is ErrorCode.JOB_ENDED:
                    return self._job_ended(exc)
                if not is_retryable(exc):
                    raise
                if self.joins > joins:  # this connection got as far as joining: count afresh
                    failures, delay = 0, cfg.backoff_initial_s
                failures += 1
                if failures >= cfg.connect_attempts:
                    log.error("giving up after %d consecutive failed connection attempts", failures)
                    raise
                wait = delay * (1.0 + 0.5 * random.random())  # jitter: clients do not retry in lockstep
                what = "connection lost" if self.joined else "connection attempt failed"
                log.warning("%s (%d/%d: %s); retrying in %.1f s", what, failures, cfg.connect_attempts, exc, wait)
                await asyncio.sleep(wait)
                delay = min(delay * 2, cfg.backoff_max_s)

    def _job_ended(self, exc: TransportError | RemoteError) -> ClientResult:
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

    async def _run_once(self) -> ClientResult:
        cfg = self.cfg
        async with self._connect(cfg) as peer:
            log.info("connected to %s:%d%s", cfg.host, cfg.port, " (resumed)" if peer.session_resumed else "")
            self._pending.clear()  # nothing queued on a dead connection is still meaningful
            self._unanswered_since = None
            self._heartbeat_ok = False
            job = await self._join(peer)
            self.joined = True
            self.joins += 1
            if self.result is None:
                self.result = ClientResult(job_id=job.job_id)
            result = self.result
            while True:
                msg = await self._next(peer)
                h = msg.header
                if isinstance(h, RoundStart):
                    self._record(await self._round(peer, h))
                elif isinstance(h, Aggregate):
                    await self._install(peer, h, msg.body, evaluate=True)
                elif isinstance(h, Bye):
                    result.bye_reason = h.reason
                    log.info("server said bye: %s", h.reason)
                    break
                elif isinstance(h, Error):
                    raise remote_error(h)
                elif isinstance(h, Ack):
                    log.warning("ignoring a stray ACK of %s for round %d", h.ref.name, h.round)
                elif msg.type not in (MsgType.HEARTBEAT, MsgType.METRICS):
                    raise ProtocolError(
                        f"unexpected {msg.type.name} from the server", code=ErrorCode.UNEXPECTED_MESSAGE
                    )
            self._save(result)
            save = getattr(self.learner, "save", None)
            if save is not None:
                await asyncio.to_thread(save, self.cfg.run_dir / "adapters")
            await peer.aclose(0, "bye")
            return result

    def _record(self, rec: RoundRecord) -> None:
        assert self.result is not None
        rounds = self.result.rounds
        rounds[:] = [r for r in rounds if r.round != rec.round]  # a round re-run after a reconnect: keep the last
        rounds.append(rec)

    # -- receiving -------------------------------------------------------------------------------------

    async def _next(self, peer: MessagePeer) -> Message:
        if self._pending:
            return self._pending.popleft()
        cfg = self.cfg
        loop = asyncio.get_running_loop()
        deadline = loop.time() + cfg.message_timeout_s
        while True:
            left = deadline - loop.time()
            if left <= 0:
                raise TransportError("timed out waiting for a message", code=ErrorCode.TIMEOUT)
            try:
                return await asyncio.wait_for(peer.recv(), min(left, cfg.heartbeat_s))
            except asyncio.TimeoutError:
                self._check_liveness(peer, loop.time())

    def _check_liveness(self, peer: MessagePeer, now: float) -> None:
        """Called every heartbeat_s of silence: raise TransportError if the server's QUIC stack stopped answering."""
        core = getattr(peer, "core", None)
        sid = getattr(core, "control_stream_id", None)
        if core is None or sid is None:  # not a QUIC peer: nothing to probe
            return
        if core.unacked_bytes(sid) > 0:  # the last heartbeat (heartbeat_s ago) is still not acknowledged
            if self._unanswered_since is None:
                self._unanswered_since = now - self.cfg.heartbeat_s
            elif now - self._unanswered_since >= self.cfg.liveness_timeout_s:
                self._unanswered_since = None
                raise TransportError(
                    f"the server acknowledged nothing for {self.cfg.liveness_timeout_s:.0f} s", code=ErrorCode.TIMEOUT
                )
        else:
            self._unanswered_since = None
        if self._heartbeat_ok:  # before the JOIN is acknowledged the server expects HELLO/JOIN only
            self._heartbeats += 1
            peer.send(Heartbeat(seq=self._heartbeats))

    async def _wait_for(
        self, peer: MessagePeer, match: Callable[[Message], bool], *, stop: type[Header] | None = None
    ) -> Message:
        """The next message ``match`` accepts, or an ERROR; everything else is queued for later, in order.

        A message of type ``stop`` also ends the wait, but stays queued (after those that came before it).
        """
        deferred: list[Message] = []
        try:
            while True:
                msg = await self._next(peer)
                if match(msg) or isinstance(msg.header, Error):
                    return msg
                if stop is not None and isinstance(msg.header, stop):
                    deferred.append(msg)
                    return msg
                if msg.type is not MsgType.HEARTBEAT:
                    log.debug("queued %s while waiting", msg.type.name)
                    deferred.append(msg)
        finally:
            self._pending.extendleft(reversed(deferred))

    async def _expect(self, peer: MessagePeer, kind: type[Header]) -> Message:
        msg = await self._next(peer)
        if isinstance(msg.header, Error):
            raise remote_error(msg.header)
        if not isinstance(msg.header, kind):
            raise ProtocolError(f"expected {kind.__name__}, got {msg.type.name}", code=ErrorCode.UNEXPECTED_MESSAGE)
        return msg

    # -- joining ---------------------------------------------------------------------------------------

    def _hello(self) -> Hello:
        return Hello(
            versions=SUPPORTED_VERSIONS,
            client_id=self.cfg.client_id,
            base_fingerprint=self.learner.base_fingerprint(),
            num_samples=self.learner.num_samples(),
            encodings=tuple(Encoding),  # this client decodes every encoding of the protocol
        )

    async def _join(self, peer: MessagePeer) -> Welcome:
        learner = self.learner
        if not getattr(peer, "hello_sent", False):  # the QUIC connector sends it (in 0-RTT data when resuming)
            peer.send(self._hello())
        job = (await self._expect(peer, Welcome)).header
        assert isinstance(job, Welcome)
        self.ef.enabled = job.uplink_error_feedback
        schema = await asyncio.to_thread(learner.attach, job)
        resume: SyncState | None = None
        if self.job is not None:  # a rejoin: our in-memory state is the truth
            if job.job_id != self.job.job_id:
                raise JobError(f"the server now runs job {job.job_id!r}, not {self.job.job_id!r}")
            if self.schema is None or schema.fingerprint() != self.schema.fingerprint():
                raise SchemaMismatchError("the learner's adapter schema changed between connections")
            resume = self._sync_state()
        else:
            self.job, self.schema = job, schema
            if await asyncio.to_thread(self._restore, job, schema):
                resume = self._sync_state()
            else:
                self._fresh_state(job, schema)
        peer.send(Join(adapter=schema, resume=resume))
        msg = await self._wait_for(peer, lambda m: isinstance(m.header, Ack) and m.header.ref is MsgType.JOIN)
        if isinstance(msg.header, Error):
            raise remote_error(msg.header)
        ack = msg.header
        assert isinstance(ack, Ack)
        self._heartbeat_ok = True
        if ack.state_hash is not None and ack.state_hash != self.view_hash:
            await self._await_reset(peer, ack.state_hash)
        log.info(
            "%s job %s: %s, %d rounds, %d adapter parameters%s",
            "rejoined" if resume is not None else "joined",
            job.job_id,
            job.federation,
            job.rounds,
            schema.numel,
            f", resuming after round {resume.round}" if resume is not None else "",
        )
        return job

    def _fresh_state(self, job: Welcome, schema: AdapterSchema) -> None:
        self._base_pending = True  # nothing trained yet: the first round measures the base model first
        self.view = init_lora_state(schema, job.init_seed)
        self.view_hash = state_hash(self.view)
        self.synced = {k: v.copy() for k, v in self.view.items()}
        self.synced_round = 0
        self.ef.residual = {}
        # what we hold of each kind of aggregate: the RoW starts at zero, the global at the shared init
        self.held = {"row": zeros_state(schema), "global": {k: v.copy() for k, v in self.view.items()}}
        if state_hash(self.learner.local_state()) != self.view_hash:
            # Averaging LoRA factors is only meaningful from a shared starting point.
            raise ConfigError(
                "the learner's adapter does not start from the job's initialisation "
                "(init_lora_state(schema, init_seed))"
            )

    def _sync_state(self) -> SyncState:
        return SyncState(
            round=self.synced_round,
            view_hash=self.view_hash,
            held={kind: state_hash(s) for kind, s in sorted(self.held.items())},  # type: ignore[misc]
        )

    async def _await_reset(self, peer: MessagePeer, server_hash: str) -> None:
        """The server holds another view of our adapter: install its dense AGGREGATEs until we agree."""
        log.warning("the server holds adapter state %s, we hold %s: waiting for its reset", server_hash, self.view_hash)
        while self.view_hash != server_hash:
            msg = await self._wait_for(peer, lambda m: isinstance(m.header, (Aggregate, RoundStart, Bye)))
            h = msg.header
            if isinstance(h, Error):
                raise remote_error(h)
            if not isinstance(h, Aggregate):
                raise SchemaMismatchError(
                    f"the server holds adapter state {server_hash}, the client {self.view_hash}, "
                    f"and it sent {msg.type.name} instead of a reset"
                )
            await self._install(peer, h, msg.body)
            if h.kind == "local" and self.view_hash != server_hash:
                raise SchemaMismatchError(
                    f"the server's reset has state {self.view_hash}, but it acknowledged JOIN with {server_hash}"
                )

    # -- checkpoint ------------------------------------------------------------------------------------

    def _snapshot(self) -> ClientState:
        assert self.job is not None and self.schema is not None
        extra_fn = getattr(self.learner, "extra_state", None)
        return ClientState(
            job_id=self.job.job_id,
            client_id=self.cfg.client_id,
            round=self.synced_round,
            schema_fingerprint=self.schema.fingerprint(),
            base_fingerprint=self.learner.base_fingerprint(),
            federation=self.job.federation,
            local=self.learner.local_state(),
            view=self.view,
            synced=self.synced,
            residual=dict(self.ef.residual),
            held=dict(self.held),
            extra=extra_fn() if extra_fn is not None else {},
        )

    async def _checkpoint(self) -> None:
        if self._store is None or self.job is None:
            return
        store = self._store

        def write() -> None:
            store.save(self._snapshot())

        await asyncio.to_thread(write)

    def _restore(self, job: Welcome, schema: AdapterSchema) -> bool:
        """Load run_dir/state if it belongs to this job, client, schema and base model; False otherwise."""
        if self._store is None:
            return False
        ckpt = self._store.load()
        if ckpt is None:
            return False
        mine = {
            "job id": (ckpt.job_id, job.job_id),
            "client id": (ckpt.client_id, self.cfg.client_id),
            "adapter schema": (ckpt.schema_fingerprint, schema.fingerprint()),
            "base model": (ckpt.base_fingerprint, self.learner.base_fingerprint()),
            "federation": (ckpt.federation, job.federation),
        }
        differs = [f"{what} {old!r} != {new!r}" for what, (old, new) in mine.items() if old != new]
        if differs:
            log.warning("ignoring the checkpoint in %s: %s", self._store.dir, "; ".join(differs))
            return False
        for what, state in (("local", ckpt.local), ("view", ckpt.view), ("synced", ckpt.synced), *ckpt.held.items()):
            schema.check_state(state, what=f"checkpointed {what} adapter")
        self.learner.set_local_state(ckpt.local)
        if job.federation == "fedalt" and "row" in ckpt.held:
            self.learner.set_row_state(ckpt.held["row"])
        load_extra = getattr(self.learner, "load_extra_state", None)
        if load_extra is not None:
            load_extra(ckpt.extra)
        elif ckpt.extra:
            log.warning("the checkpoint holds learner state the learner cannot load (no load_extra_state)")
        self.view, self.view_hash = ckpt.view, ckpt.view_hash
        self.synced = ckpt.synced
        self.synced_round = ckpt.round
        self.ef.residual = dict(ckpt.residual)
        self.held = {"row": zeros_state(schema), "global": init_lora_state(schema, job.init_seed), **ckpt.held}
        self.resumed_from_checkpoint = ckpt.round
        log.info("restored client state of job %s after round %d from %s", job.job_id, ckpt.round, self._store.dir)
        return True

    # -- rounds ----------------------------------------------------------------------------------------

    def _round_start_state(self, round_: int) -> RoundStartState:
        extra_fn = getattr(self.learner, "extra_state", None)
        return RoundStartState(round_, self.learner.local_state(), extra_fn() if extra_fn is not None else {})

    def _roll_back(self, start: RoundStartState) -> None:
        """Put the learner back where it began ``start.round`` (the adapter and its extra state, e.g. mixers)."""
        self.learner.set_local_state(start.local)
        load_extra = getattr(self.learner, "load_extra_state", None)
        if load_extra is not None and start.extra:
            load_extra(start.extra)
        log.warning(
            "round %d handed again: rolled back to the start of round %d to retrain it", start.round, start.round
        )

    async def _round(self, peer: MessagePeer, rs: RoundStart) -> RoundRecord:
        round_var.set(rs.round)
        unacked, self._unacked = self._unacked, None
        if unacked is not None and unacked.round == rs.round:
            self._roll_back(unacked)  # never train a round on top of its own first training
        start = self._round_start_state(rs.round)
        assert self.job is not None
        t0 = time.perf_counter()
        base = await self._base_evaluation()
        metrics = await asyncio.to_thread(self.learner.train, rs.round, rs.train)
        local = self.learner.local_state()
        residual_before = dict(self.ef.residual)  # arrays are replaced, never mutated: a shallow copy suffices
        if self.job.federation == "local":
            # Nothing is shared: the UPDATE carries no tensors and only tells the server the round is done here;
            # the model the round produced is the one to measure (there is no aggregate to wait for).
            manifest, body, new_view = Manifest(tensors=(), raw_size=0), b"", self.view
            metrics.update(await self._evaluate(rs.round))
        else:
            delta = {k: local[k] - self.synced[k] for k in self.synced}
            payload = await asyncio.to_thread(self.ef.compress, delta, rs.uplink)
            manifest, body = payload.manifest, payload.body
            new_view = {k: self.view[k] + payload.decoded[k] for k in self.view}
        metrics = {
            **metrics,
            **base,
            "round_s": time.perf_counter() - t0,
            "ef_residual_norm": self.ef.residual_norm(),
        }
        assert self.schema is not None
        header = Update(
            round=rs.round,
            client_id=self.cfg.client_id,
            num_samples=self.learner.num_samples(),
            base_hash=self.view_hash,
            # schema-referenced: the server expands it with the schema agreed at JOIN (names, shapes, offsets)
            manifest=to_compact(manifest, self.schema) or manifest,
        )
        record = RoundRecord(rs.round, metrics, fp32_up=fp32_nbytes(manifest))
        try:
            # Metrics have their own stream: telemetry never queues in front of control messages.
            await peer.send_bulk(Metrics(round=rs.round, values=finite_metrics(metrics)), b"")
            # Admission: the server grants upload slots, so it never takes more uploads at once than it can hold.
            peer.send(UploadRequest(round=rs.round, nbytes=len(body)))
            msg = await self._wait_for(
                peer,
                lambda m: isinstance(m.header, UploadGrant) and m.header.round == rs.round,
                stop=Bye,
            )
            if isinstance(msg.header, UploadGrant):
                record.bytes_up = await peer.send_bulk(header, body)
                msg = await self._wait_for(
                    peer,
                    lambda m: (
                        isinstance(m.header, Ack) and m.header.ref is MsgType.UPDATE and m.header.round == rs.round
                    ),
                    stop=Bye,  # the job ended without acknowledging: the main loop handles the BYE
                )
        except BaseException:
            # Not acknowledged: whatever the server did with it, a rejoin settles (its view hash tells). Should the
            # server hand this round again, it is retrained from where it started (see RoundStartState).
            self.ef.residual = residual_before
            self._unacked = start
            raise
        h = msg.header
        if isinstance(h, (Error, Bye)):
            self.ef.residual = residual_before
            if isinstance(h, Bye):
                record.accepted = False
                return record
            err = remote_error(h)
            if err.code not in LATE_CODES:
                raise err
            # The round closed without us: view and synced stay, so this round's change is in the next delta.
            record.accepted = False
            self.late_rounds.append(rs.round)
            log.warning("round %d: update refused as late (%s); its change goes into the next one", rs.round, h.message)
            await self._checkpoint()
            return record
        assert isinstance(h, Ack)
        self._base_pending = False  # the base figures reached the server with this round's METRICS
        self.view, self.view_hash = new_view, state_hash(new_view)
        self.synced = local if self.job.federation != "local" else self.synced
        if h.state_hash != self.view_hash:
            raise ProtocolError("server acknowledged a different adapter state", code=ErrorCode.CONFLICTING_UPDATE)
        self.synced_round = rs.round
        await self._checkpoint()
        log.info(
            "round %d: loss %.4f -> %.4f%s, sent %d bytes%s",
            rs.round,
            metrics.get("loss_before", float("nan")),
            metrics.get("loss_after", float("nan")),
            accuracy_note(metrics, "held-out"),
            record.bytes_up,
            f" ({record.fp32_up / record.bytes_up:.1f}x smaller than fp32)" if record.fp32_up else " (no tensors)",
        )
        return record

    async def _base_evaluation(self) -> dict[str, float]:
        """Before the first round trains from the job's initial adapter (the base model: B = 0), measure it;
        reported as ``base_<metric>`` until a round carrying it is acknowledged."""
        if not self._base_pending:
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
        """Install an AGGREGATE, checkpoint, acknowledge. With ``evaluate`` (a round's aggregate, not a reset)
        the model it makes (for FedALT: the client's own adapter with the new RoW) is measured first and its
        figures sent as this round's METRICS, delivered before the ACK so the server's round history holds
        them."""
        round_var.set(h.round)
        assert self.schema is not None
        manifest = expand(h.manifest, self.schema, self.cfg.transport.limits)  # a compact one names no tensors
        self.schema.check_manifest(manifest, what=f"{h.kind} adapter for round {h.round}")
        decoded = decode_tensors(manifest, body, self.cfg.transport.limits)
        self._base_pending = False  # what the client holds is no longer the job's initial adapter alone
        if h.kind == "local":
            if h.delta:
                raise ProtocolError("a `local` AGGREGATE must be dense (delta=false)", code=ErrorCode.BAD_HEADER)
            state = decoded
            if state_hash(state) != self.view_hash:
                # The server's copy of our adapter is the truth: adopt it, drop what it never received.
                self.learner.set_local_state(state)
                self.view, self.view_hash = state, state_hash(state)
                self.synced = {k: v.copy() for k, v in state.items()}
                self.ef.residual = {}
                self.resets += 1
                self._unacked = None  # the server applied our update after all: its copy is the round's result
                log.warning("adapter reset to the server's copy (round %d)", h.round)
            # else: we already agree; our unsent local progress stays.
        else:
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
                self._unacked = None
                self.view, self.view_hash = state, state_hash(state)
                self.synced = state
            if self.keep_rows:
                self.rows_received[h.round] = state
        self.synced_round = max(self.synced_round, h.round)
        await self._checkpoint()
        # A round's aggregate, not a reset (dense, no contributors: the server's copy re-sent after a rejoin).
        is_result = h.kind != "local" and (h.delta or h.contributors > 0)
        found = await self._evaluate(h.round) if evaluate and is_result else {}
        if found:
            await peer.send_bulk(Metrics(round=h.round, values=finite_metrics(found)), b"")
            wait_acked = getattr(peer, "wait_acked", None)
            if wait_acked is not None and not await wait_acked(10.0):
                log.warning("round %d: the server did not take the held-out figures in time", h.round)
        peer.send(Ack(ref=MsgType.AGGREGATE, round=h.round, state_hash=state_hash(state)))
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

    def _save(self, result: ClientResult) -> None:
        self.cfg.run_dir.mkdir(parents=True, exist_ok=True)
        with (self.cfg.run_dir / "rounds.jsonl").open("w") as f:
            for rec in result.rounds:
                f.write(json.dumps(asdict(rec)) + "\n")


async def run_client(cfg: ClientConfig, learner: Learner, *, connector: Connector | None = None) -> ClientResult:
    return await FederatedClient(cfg, learner, connector=connector).run()


__all__ = [
    "ClientConfig",
    "ClientResult",
    "FederatedClient",
    "RoundRecord",
    "RoundStartState",
    "finite_metrics",
    "is_retryable",
    "run_client",
]
