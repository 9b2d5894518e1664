"""A round's close, sans-I/O: aggregate the contributors, then for each recipient compute, persist and send its
downlink, wait for the ACKs (or the round timeout), write the history row and move the round machine on.

:class:`RoundClose` is a small machine over the phases LOAD → AGGREGATE → DOWNLINK → AWAIT_ACKS → HISTORY → DONE.
It returns :mod:`~fedquic.server.actions`; the heavy steps are background :class:`Work` (the daemon runs them in
worker threads beside the connections' traffic). At most ``downlink_slots`` downlinks are prepared and in flight
at once: each holds a few copies of the adapter (target, change, encoded body, what the client will hold), so the
close's peak memory is bounded by the slots, not the number of clients. A slot frees when its send returns.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from enum import Enum
from functools import partial
from typing import TYPE_CHECKING

from ..common.adapter import TensorDict, state_hash
from ..common.codec import CompactManifest, Manifest, Payload, fp32_nbytes, to_compact
from ..common.logs import round_var
from ..common.messages import Aggregate
from .actions import Action, SendBulk, Work
from .downlink import downlink_change
from .history import append_history, history_row
from .memory import trim
from .rounds import CloseRound
from .rules import RoundInputs, Target, round_targets

if TYPE_CHECKING:
    from ..common.adapter import AdapterSchema
    from .config import JobConfig
    from .job import ClientRecord, ServerJob

log = logging.getLogger(__name__)


class ClosePhase(str, Enum):
    LOAD = "load"
    AGGREGATE = "aggregate"
    DOWNLINK = "downlink"
    AWAIT_ACKS = "await-acks"
    HISTORY = "history"
    DONE = "done"


class RoundClose:
    def __init__(self, job: ServerJob, act: CloseRound, now: float) -> None:
        self.job = job
        self.round = act.round
        self.contributors = [c for c in act.contributors if c in job.records]
        self.phase = ClosePhase.LOAD
        self.started = now
        self.agg_s = 0.0
        self.weights: dict[str, dict[str, float]] = {}
        self._queue: deque[tuple[str, Target]] = deque()
        self._in_flight = 0  # downlinks prepared or being sent
        self.awaiting: set[str] = set()  # sent, ACK not yet in
        self.persisting: set[str] = set()  # what the client will hold, being written beside the send
        # A shared target's downlink by (share, hash of what the recipient holds): encoded once (rules.Target)
        self._shared = _SingleFlight()
        self._ack_deadline = 0.0

    # -- events --------------------------------------------------------------------------------------

    def start(self, now: float) -> list[Action]:
        round_var.set(self.round)
        return [self._work(self._load_inputs, self._loaded, keys=tuple(self.contributors), name="load contributors")]

    def on_ack(self, cid: str, now: float) -> list[Action]:
        """The client acknowledged this round's downlink, or left (no ACK will come)."""
        self.awaiting.discard(cid)
        return self._maybe_history(now)

    forget = on_ack

    def on_tick(self, now: float) -> list[Action]:
        if self.phase is ClosePhase.AWAIT_ACKS and now >= self._ack_deadline:
            log.warning("round %d: %d clients did not acknowledge their aggregate", self.round, len(self.awaiting))
            self.awaiting.clear()
            return self._maybe_history(now)
        return []

    # -- the steps -----------------------------------------------------------------------------------

    def _load_inputs(self) -> tuple[list[TensorDict], list[float], list[frozenset[str] | None]]:
        recs = [self.job.records[c] for c in self.contributors]
        for rec in recs:
            self.job.load(rec)
        # Snapshot the views: a late (folded) update may replace a client's view while we aggregate.
        states = [dict(r.view) for r in recs if r.view is not None]
        carried = [r.carried.get(self.round) for r in recs]  # routed rounds: what each UPDATE carried
        return states, [weight(self.job.cfg.job, r) for r in recs], carried

    def _loaded(
        self, result: tuple[list[TensorDict], list[float], list[frozenset[str] | None]], now: float
    ) -> list[Action]:
        self.phase = ClosePhase.AGGREGATE
        states, weights, carried = result
        job, machine = self.job, self.job.machine
        # No free-riding: a client that missed its rounds (inactive) is sent nothing until it contributes again.
        listeners = [c for c in job.clients if c not in self.contributors and machine.receives_aggregate(c)]
        routed = any(c is not None for c in carried)
        inputs = RoundInputs(self.contributors, states, weights, listeners, carried=carried if routed else None)
        known = frozenset(job.records)

        def aggregate() -> tuple[dict[str, Target], float]:
            t0 = time.perf_counter()
            targets = round_targets(job.rule, job.cfg.job, inputs, job.init_state, known=known)
            return targets, time.perf_counter() - t0

        return [self._work(aggregate, self._aggregated, name="aggregate")]

    def _aggregated(self, result: tuple[dict[str, Target], float], now: float) -> list[Action]:
        targets, self.agg_s = result
        # a weighted rule's choice of who makes up each target (relevance), for history.jsonl: the largest shares
        # only, so that a round of many clients does not write N² numbers
        self.weights = {cid: _largest(t.weights) for cid, t in targets.items() if t.weights}
        self.job.metrics.aggregate_seconds += self.agg_s
        self.phase = ClosePhase.DOWNLINK
        self._queue.extend(targets.items())
        return self._pump(now)

    def _pump(self, now: float) -> list[Action]:
        out: list[Action] = []
        while self._queue and self._in_flight < self.job.cfg.downlink_slots:
            cid, target = self._queue.popleft()
            self._in_flight += 1
            out.append(
                self._work(
                    partial(self._prepare, cid, target),
                    partial(self._prepared, cid, target),
                    keys=(cid,),
                    name=f"downlink to {cid}",
                )
            )
        if self.phase is ClosePhase.DOWNLINK and not self._queue and not self._in_flight:
            # Delivery is the client's ACK, not our write returning.
            self.phase = ClosePhase.AWAIT_ACKS
            self._ack_deadline = now + self.job.cfg.policy.round_timeout_s
            out += self._maybe_history(now)
        return out

    def _prepare(self, cid: str, target: Target) -> _Prepared | None:
        """Compute (target − what the client holds) and encode it. A client whose aggregate for this round is on
        disk already (a close redone after a crash) is skipped: it gets a dense reset when it rejoins."""
        rec = self.job.records[cid]
        if rec.disk.closed_round >= self.round:
            return None
        self.job.load(rec)
        if target.share is None or not self.job.cfg.job.downlink_error_feedback:  # else each has its reference
            return _prepare_one(self.job, rec, target)
        key = (target.share, self.job.held_hash(rec, target.kind))
        return self._shared.get(key, partial(_prepare_one, self.job, rec, target))

    def _prepared(self, cid: str, target: Target, result: _Prepared | None, now: float) -> list[Action]:
        """Send the downlink and, beside it, persist what the client will hold. Neither waits for the other: the
        round is over only once both are done (and the ACK is in). A crash before the write lands leaves the
        record at what the client held before; the client, which may have installed this one, then reports a
        different hash at its rejoin and gets a dense reset of what the record says; the close is redone."""
        if result is None:
            self._in_flight -= 1
            return self._pump(now)
        rec = self.job.records[cid]
        self.persisting.add(cid)
        persist = self._work(
            partial(_timed, commit_downlink, self.job, rec, self.round, target.kind, result.held, result.held_hash),
            partial(self._persisted, cid),
            keys=(cid,),  # before any later work on this client (a rejoin's load, the next upload's commit)
            name=f"persist downlink of {cid}",
        )
        if rec.peer is None:
            self._in_flight -= 1
            return [persist, *self._pump(now)]
        assert self.job.schema is not None
        header = Aggregate(
            round=self.round,
            kind=target.kind,
            delta=True,
            contributors=target.contributors,
            manifest=wire(self.job.schema, result.payload),
        )
        rec.held_hash_pending[self.round] = (target.kind, result.held_hash)
        self.awaiting.add(cid)
        then = partial(self._sent, cid, result.payload, result.encode_s, now)
        return [persist, SendBulk(header, result.payload.body, to=cid, then=then, background=True)]

    def _persisted(self, cid: str, persist_s: float, now: float) -> list[Action]:
        self.persisting.discard(cid)
        st = self.job.records[cid].stats.setdefault(self.round, {})
        st["downlink_persist_s"] = persist_s  # what the client will hold, written and fsynced beside the send
        return self._maybe_history(now)

    def _sent(  # the continuation of one send: its context, then what the send returned
        self,
        cid: str,
        payload: Payload,
        encode_s: float,
        started: float,
        nbytes: int | None,
        now: float,
    ) -> list[Action]:
        self._in_flight -= 1
        if nbytes is None:  # the connection closed under the send: no ACK will come
            self.awaiting.discard(cid)
        else:
            self.job.metrics.bytes_out += nbytes
            st = self.job.records[cid].stats.setdefault(self.round, {})
            st["downlink_encode_s"] = encode_s
            st["downlink_send_s"] = now - started  # until the last byte was handed to QUIC
            st["bytes_down"] = float(nbytes)
            st["fp32_down"] = float(fp32_nbytes(payload.manifest))
        return self._pump(now)

    def _maybe_history(self, now: float) -> list[Action]:
        if self.phase is not ClosePhase.AWAIT_ACKS or self.awaiting or self.persisting:
            return []
        self.phase = ClosePhase.HISTORY
        row = round_history(self.job, self.round, self.contributors, self.agg_s, now - self.started, self.weights)

        def write() -> None:
            trim()  # this round's payloads and rows are gone: give their pages back
            append_history(self.job.history_path, row)

        return [self._work(write, self._written, name="history")]

    def _written(self, _: None, now: float) -> list[Action]:
        self.phase = ClosePhase.DONE
        job = self.job
        for cid in self.contributors:
            rec = job.records[cid]
            if rec.peer is None and not job.busy(cid):
                rec.unload()
        job.metrics.rounds_completed = self.round
        job.closes.pop(self.round, None)
        return job.apply(job.machine.on_aggregated(self.round, now), now)

    def _work(self, run, then, *, keys: tuple[str, ...] = (), name: str) -> Work:  # type: ignore[no-untyped-def]
        return Work(run, then, keys=keys, background=True, name=f"round {self.round}: {name}")


# -- the pieces, shared with the dense reset and the tests ------------------------------------------------


@dataclass(frozen=True)
class _Prepared:
    payload: Payload
    held: TensorDict  # what the client holds once it installs the payload
    held_hash: str  # its hash: what the client's ACK must carry
    encode_s: float


HISTORY_SHARES = 16  # per recipient, the contributors whose shares history.jsonl keeps (the largest)


def _largest(shares: Mapping[str, float], keep: int = HISTORY_SHARES) -> dict[str, float]:
    if len(shares) <= keep:
        return dict(shares)
    return dict(sorted(shares.items(), key=lambda kv: (-kv[1], kv[0]))[:keep])


def _prepare_one(job: ServerJob, rec: ClientRecord, target: Target) -> _Prepared:
    t0 = time.perf_counter()  # the target (e.g. this client's leave-one-out row) is computed here
    payload, held = downlink_payload(job.cfg.job, rec, target.kind, target.make())
    return _Prepared(payload, held, state_hash(held), time.perf_counter() - t0)


class _SingleFlight:
    """Prepared downlinks by key, each computed once. The close prepares several downlinks at once in worker
    threads: a second recipient of the same change waits for the first one's result instead of computing it beside
    it (two encodes of 45 MB side by side took 0.47-0.58 s each on 2 cores, against one for both)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._done: dict[tuple[str, str], _Prepared] = {}
        self._running: dict[tuple[str, str], threading.Event] = {}

    def get(self, key: tuple[str, str], compute: Callable[[], _Prepared]) -> _Prepared:
        while True:
            with self._lock:
                hit = self._done.get(key)
                if hit is not None:  # the same change from the same state: the same payload and result
                    return _Prepared(hit.payload, hit.held, hit.held_hash, 0.0)
                running = self._running.get(key)
                if running is None:
                    running = self._running[key] = threading.Event()
                    break
            running.wait()  # the owner finished (or failed: then the loop makes this thread the owner)
        try:
            prepared = compute()
            with self._lock:
                self._done[key] = prepared
            return prepared
        finally:
            with self._lock:
                del self._running[key]
            running.set()


def _timed(fn, *args) -> float:  # type: ignore[no-untyped-def]
    t0 = time.perf_counter()
    fn(*args)
    return time.perf_counter() - t0


def weight(job: JobConfig, rec: ClientRecord) -> float:
    if job.weighting == "samples":
        return float(min(max(rec.disk.num_samples, 1), job.max_sample_weight))
    return 1.0


def wire(schema: AdapterSchema, payload: Payload) -> Manifest | CompactManifest:
    """The manifest as sent: compact (schema-referenced) when it can be, else the full form."""
    return to_compact(payload.manifest, schema) or payload.manifest


def downlink_payload(job: JobConfig, rec: ClientRecord, kind: str, target: TensorDict) -> tuple[Payload, TensorDict]:
    """Encode (target − what the client holds): see :mod:`fedquic.server.downlink` for why no residual.

    Returns the payload and the adapter the client will hold once it adds the decoded payload.
    """
    assert rec.held is not None
    reference = None
    if not job.downlink_error_feedback:
        reference = rec.last_target.get(kind)
        rec.last_target[kind] = target
    change = downlink_change(rec.held[kind], target, job.downlink, reference=reference)
    return change.payload, change.held_after


def commit_downlink(
    job: ServerJob, rec: ClientRecord, round_: int, kind: str, held: TensorDict, held_hash: str | None = None
) -> None:
    """Persist what the client will hold after this round (blocking: an fsynced commit). ``held_hash``: its hash
    if the caller has it (else it is computed as the file is written)."""
    assert rec.held is not None
    name = f"{kind}-r{round_}.safetensors"
    known = {name: held_hash} if held_hash is not None else None
    digest = job.store.write_files(rec.client_id, {name: held}, known)[name]
    update: dict[str, object] = {
        "closed_round": round_,
        "held_hash": {**rec.disk.held_hash, kind: digest},
        "held_files": {**rec.disk.held_files, kind: name},
        "ef_file": None,  # no downlink residual (server/downlink.py); a state written before keeps none either
    }
    if kind == "global":  # the global replaces the client's own adapter: that is now our view of it (one file)
        update["view_file"] = name
        update["view_hash"] = digest
    disk = rec.disk.model_copy(update=update)
    job.store.commit(disk, {}, rec.disk)
    rec.disk = disk
    rec.held[kind] = held
    if kind == "global":
        rec.view = {k: v.copy() for k, v in held.items()}


def round_history(  # type: ignore[no-untyped-def]
    job: ServerJob,
    round_: int,
    contributors: list[str],
    agg_s: float,
    close_s: float,
    weights: dict[str, dict[str, float]] | None = None,
):
    """The round's history row, from every known client's figures (taken now, on the loop); ``weights``: per
    recipient, the share of each contributor in what it was sent (rules that weight contributors)."""
    recs = sorted(job.records.items())
    return history_row(
        round_, job.cfg.job, contributors, agg_s, close_s,
        clients={cid: dict(rec.stats.get(round_, {})) for cid, rec in recs},
        reported={cid: dict(rec.reported[round_]) for cid, rec in recs if round_ in rec.reported},
        wall=job.wall(),
        weights=weights or {},
    )  # fmt: skip


__all__ = ["ClosePhase", "RoundClose", "commit_downlink", "downlink_payload", "round_history", "weight", "wire"]
