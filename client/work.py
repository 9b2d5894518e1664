"""The client's local work, synchronous: :class:`LocalWork` carries out each
:class:`~fedquic.client.actions.Work` a :class:`~fedquic.client.session.ClientSession` asks for (attach, restore,
train, install, checkpoint, save the results) against the learner, the
:class:`~fedquic.client.sync.SyncedAdapter` and the checkpoint store, and keeps the books of what the session
reports (:class:`~fedquic.client.actions.Joined`, :class:`~fedquic.client.actions.Record`,
:class:`~fedquic.client.actions.Landed`): joins, resets, late rounds, the round records.

It makes no protocol decision (the session does: whether to measure an aggregate, what to send and when), touches
no network, reads no event loop and starts no thread. :mod:`fedquic.client.runner` calls it in worker threads,
off the event loop; ``testkit/memory_client.py`` calls it inline, on a fake clock.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict

from ..common.adapter import AdapterSchema, TensorDict, state_hash
from ..common.atomic import atomic_write_text
from ..common.codec import Encoding, fp32_nbytes
from ..common.messages import SUPPORTED_VERSIONS, Aggregate, Hello, RoundStart, Welcome
from ..transport.framing import frame_size
from .actions import (
    Attach,
    Checkpoint,
    Install,
    Installed,
    Joined,
    Landed,
    Record,
    Restore,
    SaveResults,
    Train,
    Trained,
    Work,
)
from .checkpointer import Checkpoints, InlineCheckpoints
from .config import ClientConfig
from .learner import Learner
from .results import ClientResult, RoundRecord, accuracy_note
from .state import StateStore
from .sync import SyncedAdapter

log = logging.getLogger(__name__)

WorkResult = AdapterSchema | bool | Trained | Installed | None


class LocalWork:
    def __init__(self, cfg: ClientConfig, learner: Learner, sync: SyncedAdapter) -> None:
        self.cfg = cfg
        self.learner = learner
        self.sync = sync
        self.store = StateStore(cfg.run_dir / "state") if cfg.checkpoint else None
        # when a checkpoint is written (client/checkpointer.py): inline here; the runner writes in the background
        self.checkpoints: Checkpoints | None = InlineCheckpoints(self.store) if self.store is not None else None
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

    def hello(self) -> Hello:
        return Hello(
            versions=SUPPORTED_VERSIONS,
            client_id=self.cfg.client_id,
            base_fingerprint=self.learner.base_fingerprint(),
            num_samples=self.learner.num_samples(),
            encodings=tuple(Encoding),  # this client decodes every encoding of the protocol
        )

    def run(self, work: Work) -> WorkResult:
        """Carry out ``work``; what it returns goes to ``ClientSession.on_work_done``."""
        if isinstance(work, Attach):
            return self.learner.attach(work.job)
        if isinstance(work, Restore):
            return self.restore(work.job, work.schema)
        if isinstance(work, Train):
            return self.train(work.start)
        if isinstance(work, Install):
            return self.install(work.msg.header, work.msg.body, evaluate=work.evaluate)  # type: ignore[arg-type]
        if isinstance(work, Checkpoint):
            self.checkpoint()
        elif isinstance(work, SaveResults):
            self.save_results(work.reason)
        return None

    # -- the work -------------------------------------------------------------------------------------------

    def restore(self, job: Welcome, schema: AdapterSchema) -> bool:
        """Load run_dir/state if it belongs to this job, client, schema and base model; False otherwise."""
        if self.store is None:
            return False
        if self.checkpoints is not None:
            self.checkpoints.flush()  # read what was last written, not what a write in progress replaces
        ckpt = self.store.load()
        if ckpt is None:
            return False
        differs = self.sync.foreign(ckpt, job, schema)
        if differs:
            log.warning("ignoring the checkpoint in %s: %s", self.store.dir, "; ".join(differs))
            return False
        self.sync.restore(ckpt, job, schema)
        self.resumed_from_checkpoint = ckpt.round
        log.info("restored client state of job %s after round %d from %s", job.job_id, ckpt.round, self.store.dir)
        return True

    def checkpoint(self) -> None:
        if self.checkpoints is not None and self.sync.job is not None:
            self.checkpoints.submit(self.sync.snapshot())  # taken now: the state does not change meanwhile

    def flush_checkpoints(self) -> None:
        """Every checkpoint asked for so far is on disk (raises a background write's failure)."""
        if self.checkpoints is not None:
            self.checkpoints.flush()

    def train(self, rs: RoundStart) -> Trained:
        """Train the round (from its start again if it was handed before unanswered), measure, encode."""
        sync = self.sync
        assert sync.job is not None
        start = sync.begin_round(rs.round)
        t0 = time.perf_counter()
        base = self._base_evaluation()
        metrics = self.learner.train(rs.round, rs.train)
        prepared = sync.prepare_update(rs.round, rs.uplink, start)
        if sync.job.federation == "local":
            # Nothing is shared: the model the round produced is the one to measure (there is no aggregate).
            metrics.update(self.evaluate(rs.round))
        metrics = {**metrics, **base, "round_s": time.perf_counter() - t0, "ef_residual_norm": sync.ef.residual_norm()}
        return Trained(prepared, RoundRecord(rs.round, metrics, fp32_up=fp32_nbytes(prepared.manifest)))

    def _base_evaluation(self) -> dict[str, float]:
        """Before the first round trains from the job's initial adapter (the base model: B = 0), measure it;
        reported as ``base_<metric>`` until a round carrying it is acknowledged."""
        if not self.sync.base_pending:
            return {}
        if self._base_metrics is None:
            found = self.evaluate(0)
            self._base_metrics = {f"base_{k}": v for k, v in found.items()}
            if found:
                log.info("round 0 (base model)%s", accuracy_note(found, "held-out"))
        return dict(self._base_metrics)

    def evaluate(self, round_: int) -> dict[str, float]:
        """The learner's held-out figures for the model it holds now (empty if it has no ``evaluate``); the whole
        held-out set for the base model and after the job's last round."""
        evaluate = getattr(self.learner, "evaluate", None)
        if evaluate is None:
            return {}
        assert self.sync.job is not None
        final = round_ == 0 or round_ >= self.sync.job.rounds
        try:
            found = dict(evaluate(final))
        except Exception as exc:  # a failed measurement (out of memory...) must not cost the round or the job
            log.error("held-out evaluation failed (round %d): %s: %s", round_, type(exc).__name__, exc)
            return {}
        if found and final and round_ > 0:
            found["eval_final"] = 1.0
        return found

    def install(self, h: Aggregate, body: bytes | bytearray, *, evaluate: bool = False) -> Installed:
        """Decode an AGGREGATE, install it, hash what it made; with ``evaluate`` (the session asks for a round's
        result) measure the model it makes (for FedALT: the client's own adapter with the new RoW)."""
        manifest, decoded = self.sync.decode(h, body, self.cfg.transport.limits)
        state, reset = self.sync.install(h, decoded)
        self.resets += reset
        if self.keep_rows and h.kind != "local":
            self.rows_received[h.round] = state
        digest = state_hash(state)
        if h.kind != "local":
            self.sync.remember_held_hash(h.kind, state, digest)  # the checkpoint need not hash it again
        figures = self.evaluate(h.round) if evaluate else {}
        return Installed(digest, manifest, frame_size(h, len(body)), figures, reset)

    def save_results(self, reason: str) -> None:
        """BYE: write the round log and the adapters."""
        assert self.result is not None
        self.result.bye_reason = reason
        self.flush_checkpoints()
        self.save_rounds()
        save = getattr(self.learner, "save", None)
        if save is not None:
            save(self.cfg.run_dir / "adapters")

    def save_rounds(self) -> None:
        assert self.result is not None
        lines = "".join(json.dumps(asdict(rec)) + "\n" for rec in self.result.rounds)
        atomic_write_text(self.cfg.run_dir / "rounds.jsonl", lines)

    def job_ended(self, exc: BaseException) -> ClientResult:
        """The server says the job is over (ERROR JOB_ENDED, or a close with that code, at any point): a success
        with nothing left to do. Keeps what there is: the round log and the adapters."""
        log.info("the job has ended (%s); nothing left to do, not retrying", exc)
        self.flush_checkpoints()
        if self.result is None:  # ended before we took part: keep the round log of an earlier run of this client
            return ClientResult(job_id=self.sync.job.job_id if self.sync.job else "", bye_reason=str(exc))
        self.result.bye_reason = self.result.bye_reason or str(exc)
        self.save_rounds()
        save = getattr(self.learner, "save", None)
        if save is not None:  # the job ended under us (e.g. while we measured the last round): keep the adapters
            try:
                save(self.cfg.run_dir / "adapters")
            except Exception as err:
                log.error("could not save the adapters: %s", err)
        return self.result

    # -- the books ------------------------------------------------------------------------------------------

    def note(self, action: Joined | Record | Landed) -> None:
        """What the session reports for the books."""
        if isinstance(action, Joined):
            self._joined(action)
        elif isinstance(action, Record):
            self._record(action.record)
            if action.late:
                self.late_rounds.append(action.record.round)
        else:
            self._landed(action)

    def _joined(self, joined: Joined) -> None:
        job, resume = joined.job, joined.resume
        log.info(
            "%s job %s: %s, %d rounds, %d adapter parameters%s",
            "rejoined" if resume is not None else "joined",
            job.job_id,
            job.federation,
            job.rounds,
            self.sync.schema.numel if self.sync.schema is not None else 0,
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

    def _landed(self, landed: Landed) -> None:
        h, done = landed.header, landed.installed
        if self.result is not None:
            for rec in self.result.rounds:
                if rec.round == h.round:
                    rec.fp32_down = fp32_nbytes(done.manifest)
                    rec.bytes_down = done.bytes_down
                    rec.metrics.update(done.figures)
        log.info(
            "installed %s adapter for round %d (%d contributors)%s",
            h.kind,
            h.round,
            h.contributors,
            accuracy_note(done.figures, "held-out after the aggregate"),
        )


__all__ = ["LocalWork", "WorkResult"]
