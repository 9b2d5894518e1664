"""The job's shared state, sans-I/O: the round machine, the adapter schema, every client's record, which clients
are attached, and the translation of the round machine's actions into messages for them.

One :class:`ServerJob` per server; one :class:`~fedquic.server.session.ServerSession` per connection reads and
changes it. It returns :mod:`~fedquic.server.actions` and never sends, sleeps or reads a clock; the durable state
is reached through the injected :class:`~fedquic.server.store.ServerStore`, only inside :class:`Work` the daemon
runs (and the job record's small inline write).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from ..common.adapter import AdapterSchema, TensorDict, init_lora_state, initial_held, state_hash
from ..common.codec import Encoding, max_body_nbytes
from ..common.logs import round_var
from ..common.messages import Bye, MsgType, RoundStart, UploadGrant
from ..common.names import ADAPTER_KINDS
from ..transport.connection import BulkPermit
from .actions import Action, JobDone, Permit, Send, Work
from .config import ServerConfig
from .metrics import ServerMetrics
from .rounds import Action as RoundAction
from .rounds import CloseRound, Fail, Finish, Phase, ResumeRound, RoundMachine, StartRound
from .rules import job_rule
from .store import ClientRecordOnDisk, JobRecord, Kind, ServerStore

log = logging.getLogger(__name__)

KINDS: tuple[Kind, ...] = ADAPTER_KINDS  # type: ignore[assignment]


@dataclass
class ClientRecord:
    """A known client: its durable record, its tensors while loaded, and its connection while attached."""

    client_id: str
    disk: ClientRecordOnDisk
    peer: Any = None  # the daemon's connection handle while attached (the job never calls it)
    view: TensorDict | None = None  # the client's individual LoRA as the server reconstructed it
    # Downlink: per kind, the adapter exactly as the client holds it (it acknowledges its hash).
    held: dict[str, TensorDict] | None = None
    # Only with downlink_error_feedback off (a measurement switch): the target last sent, per kind.
    last_target: dict[str, TensorDict] = field(default_factory=dict)
    stats: dict[int, dict[str, float]] = field(default_factory=dict)  # per round, measured here
    reported: dict[int, dict[str, float]] = field(default_factory=dict)  # per round, the client's METRICS
    held_hash_pending: dict[int, tuple[str, str]] = field(default_factory=dict)  # round -> (kind, hash to ACK)
    upload_done: dict[int, Any] = field(default_factory=dict)  # round -> the daemon's "slot freed" event
    # Routed jobs: round -> the tensors its UPDATE carried (in memory: after a restart a round's rule sees every
    # tensor as carried, which is the all-clients aggregate, stale copies included)
    carried: dict[int, frozenset[str]] = field(default_factory=dict)

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


class ServerJob:
    def __init__(
        self,
        cfg: ServerConfig,
        store: ServerStore,
        now: float,
        *,
        busy: Callable[[str], bool] = lambda cid: False,
        wall: Callable[[], float] = time.time,
    ) -> None:
        self.cfg = cfg
        self.store = store
        self.machine = RoundMachine(cfg.policy, started_at=now)
        self.records: dict[str, ClientRecord] = {}  # every client the job knows (on disk)
        self.clients: dict[str, ClientRecord] = {}  # the attached ones (joined, their reset done or under way)
        self.schema: AdapterSchema | None = None
        self.base_fingerprint: str | None = None
        self.init_state: TensorDict | None = None
        self._init_hashes: dict[str, str] = {}  # "view" and each kind's default held: hashed once per schema
        self.rule = job_rule(cfg.job)  # None: a local job aggregates nothing
        self.metrics = ServerMetrics()
        self.stopping = False  # a graceful stop: disconnects are not departures, nothing new starts
        self.result: JobResult | None = None
        self.closes: dict[int, Any] = {}  # round -> its RoundClose while it runs
        self.busy = busy  # does the daemon hold work on this client's tensors (then they stay loaded)
        # The wall clock, for the figures a history reader compares across processes (granted_at, accepted_at,
        # a round's time); every deadline runs on the `now` each event is given.
        self.wall = wall
        self.history_path = cfg.run_dir / "history.jsonl"

    # -- what sessions ask ---------------------------------------------------------------------------

    @property
    def ended(self) -> bool:
        """The job is over (finished or failed), not merely stopping for a restart."""
        return self.result is not None and not self.stopping

    def required_encodings(self) -> set[Encoding]:
        """What every client must decode: the job's downlink, and fp32 for dense resets."""
        job = self.cfg.job
        return {Encoding.FP32} if job.federation == "local" else {Encoding.FP32, job.downlink.encoding}

    def max_update_body(self) -> int:
        """The largest UPDATE body the job's schema and uplink encoding allow (refused above it, before a byte)."""
        assert self.schema is not None
        return max_body_nbytes([t.shape for t in self.schema.tensors], self.cfg.job.uplink)

    def set_schema(self, schema: AdapterSchema) -> None:
        self.schema = schema
        self.init_state = init_lora_state(schema, self.cfg.job.init_seed)
        self._init_hashes = {}

    def init_hash(self) -> str:
        """The hash of the job's initial adapter (what a new client's view is), computed once."""
        assert self.init_state is not None
        if "view" not in self._init_hashes:
            self._init_hashes["view"] = state_hash(self.init_state)
        return self._init_hashes["view"]

    def held_hash(self, rec: ClientRecord, kind: str) -> str:
        """The hash of what ``rec`` holds of ``kind``: the one committed with its file, or the default's (computed
        once), never a hash of the tensors on the loop."""
        committed = rec.disk.held_hash.get(kind)  # type: ignore[call-overload]
        if committed is not None and kind in rec.disk.held_files:
            return committed
        return self.default_held_hash(kind)

    def default_held_hash(self, kind: str) -> str:
        """The hash of what a client holds of ``kind`` before its first aggregate of that kind."""
        if kind not in self._init_hashes:
            self._init_hashes[kind] = state_hash(self.default_held(kind))
        return self._init_hashes[kind]

    def default_held(self, kind: str) -> TensorDict:
        assert self.schema is not None and self.init_state is not None
        return initial_held(kind, self.schema, self.init_state)

    def load(self, rec: ClientRecord) -> None:
        """Bring a client's tensors into memory from disk (or from the job's init for a new client). Blocking:
        call it inside :class:`Work` holding the client's key."""
        if rec.loaded:
            return
        assert self.init_state is not None
        d = rec.disk
        view = self.store.read_tensors(d.client_id, d.view_file) if d.view_file else dict(self.init_state)
        held = {
            kind: self.store.read_tensors(d.client_id, d.held_files[kind])
            if kind in d.held_files
            else self.default_held(kind)
            for kind in KINDS
        }
        rec.view, rec.held = view, held

    def snapshot(self) -> JobRecord:
        return JobRecord(
            job_id=self.cfg.job.job_id,
            adapter=self.schema,
            base_fingerprint=self.base_fingerprint,
            round=self.machine.snapshot(),
        )

    def save(self) -> Work:
        """Write the job record (round, schema, fingerprint): small, on the loop, after every round event."""
        return Work(lambda: self.store.save_job(self.snapshot()), inline=True, name="save job")

    def rounds_completed(self) -> int:
        return self.machine.round if self.machine.phase is Phase.FINISHED else max(self.machine.round - 1, 0)

    def restore_records(self, job: JobRecord, now: float) -> list[RoundAction]:
        """Rebuild the job from its durable record and the clients' on disk; return the round actions that resume
        it (a training round's clients rejoin it, a closing round is closed again)."""
        self.base_fingerprint = job.base_fingerprint
        if job.adapter is not None:
            self.set_schema(job.adapter)
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
        self.machine, actions = RoundMachine.restore(self.cfg.policy, snap, received, now)
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

    # -- attach and detach -------------------------------------------------------------------------

    def attach(self, rec: ClientRecord, handle: Any) -> None:
        rec.peer = handle
        self.clients[rec.client_id] = rec

    def detach(self, rec: ClientRecord, now: float) -> list[Action]:
        """The client's connection is gone: forget it, keep its state (on disk)."""
        if self.clients.get(rec.client_id) is rec:
            del self.clients[rec.client_id]
        rec.peer = None
        rec.held_hash_pending.clear()
        if not self.busy(rec.client_id):
            rec.unload()  # its state is on disk; a round close loads what it needs
        out: list[Action] = []
        for close in list(self.closes.values()):
            out += close.forget(rec.client_id, now)  # no ACK will come from it
        if self.stopping:  # a graceful stop closes every connection: those are not departures
            return out
        return out + self.apply(self.machine.on_leave(rec.client_id, now), now)

    # -- round actions -------------------------------------------------------------------------------

    def apply(self, actions: list[RoundAction], now: float) -> list[Action]:
        """Turn the round machine's actions into messages and work, then save the job record."""
        if not actions or self.stopping:
            return []
        out: list[Action] = []
        for act in actions:
            if isinstance(act, StartRound):
                round_var.set(act.round)
                out += [self._round_start(cid, act.round, act.deadline, now) for cid in act.participants]
                self.metrics.round = act.round
                log.info("round %d started with %d clients", act.round, len(act.participants))
            elif isinstance(act, ResumeRound):
                out.append(self._round_start(act.client_id, act.round, act.deadline, now))
            elif isinstance(act, CloseRound):
                from .close import RoundClose  # the close uses this module's records

                close = RoundClose(self, act, now)
                self.closes[act.round] = close
                out += close.start(now)
            elif isinstance(act, Finish):
                self.metrics.rounds_completed = act.rounds_completed
                done = JobResult(True, act.rounds_completed)
                out += self._finish(done, f"job complete after {act.rounds_completed} rounds")
            elif isinstance(act, Fail):
                log.error("job failed: %s", act.reason)
                failed = JobResult(False, self.rounds_completed(), act.reason)
                out += self._finish(failed, f"job failed: {act.reason}")
        return [*out, self.save()]

    def tick(self, now: float) -> list[Action]:
        """The periodic clock: the round machine's deadlines and the round closes' ACK waits."""
        out: list[Action] = []
        for close in list(self.closes.values()):
            out += close.on_tick(now)
        return out + self.apply(self.machine.on_tick(now), now)

    def grant(self, rec: ClientRecord, round_: int, nbytes: int) -> list[Action]:
        """The admission rule gave the client's upload its turn: permit one UPDATE stream of ``nbytes`` (the room is
        reserved already) and say so."""
        rec.stats.setdefault(round_, {})["granted_at"] = self.wall()
        grant = UploadGrant(round=round_, expires_s=self.cfg.upload_slot_timeout_s)
        permit = BulkPermit(max_body=nbytes, count=1, reserved=True)
        return [Permit(MsgType.UPDATE, permit, to=rec.client_id), Send(grant, to=rec.client_id)]

    def on_aggregate_ack(self, rec: ClientRecord, round_: int, theirs: str, now: float) -> tuple[bool, list[Action]]:
        """An ACK(AGGREGATE) after a round's delta: (did it hold what was sent, what follows)."""
        expected = rec.held_hash_pending.pop(round_, None)
        close = self.closes.get(round_)
        out = close.on_ack(rec.client_id, now) if close is not None else []
        return expected is None or expected[1] == theirs, out

    def _round_start(self, cid: str, round_: int, deadline: float, now: float) -> Action:
        job = self.cfg.job
        header = RoundStart(round=round_, train=job.train, uplink=job.uplink, deadline_s=max(deadline - now, 0.001))
        return Send(header, to=cid)

    def _finish(self, result: JobResult, bye: str) -> list[Action]:
        if self.result is None:
            self.result = result
        return [*(Send(Bye(reason=bye), to=cid) for cid in self.clients), JobDone(result)]


__all__ = ["KINDS", "ClientRecord", "JobResult", "ServerJob"]
