"""One round of ours on the wire: the ROUND state of :class:`~fedquic.client.session.ClientSession`, its
:class:`Step`, and what each answer to the round's UPDATE does to the :class:`~fedquic.client.sync.SyncedAdapter`;
and one AGGREGATE coming in: the INSTALLING state, a :class:`Landing`.

A round goes TRAIN (training and encoding, local work) → METRICS_OUT → AWAIT_GRANT → UPLOADING → AWAIT_ACK →
COMMIT (the checkpoint once answered). The answers: ACK(UPDATE) commits; ERROR LATE_UPDATE/ROUND_NOT_OPEN rolls
the residual back and keeps the change for the next round; BYE rolls back too; another ERROR rolls back and ends
the connection; a connection lost while the UPDATE may be on its way (:data:`IN_FLIGHT`) rolls back and notes
the round's start, so that a round handed again is retrained from there.

An AGGREGATE is installed (local work, measured too when it is a round's result), its figures go out as the
round's METRICS and are taken by the server before the ACK(AGGREGATE), then the checkpoint. Pure, like the session.
"""

from __future__ import annotations

import logging
from enum import Enum
from typing import Any

from ..common.errors import SchemaMismatchError
from ..common.messages import Ack, Error, Message, Metrics, MsgType, RoundStart, UploadRequest
from .actions import Action, Checkpoint, Install, Installed, Landed, Record, RunWork, Send, SendBulk, Trained, WaitAcked
from .reconnect import LATE_CODES, remote_error
from .results import RoundRecord, accuracy_note, finite_metrics
from .sync import PreparedUpdate, SyncedAdapter

log = logging.getLogger(__name__)


class Step(Enum):
    TRAIN = "train"  # training and encoding (work)
    METRICS_OUT = "metrics out"  # the round's METRICS being sent
    AWAIT_GRANT = "await grant"  # UPLOAD_REQUEST sent, waiting for UPLOAD_GRANT
    UPLOADING = "uploading"  # the UPDATE being sent
    AWAIT_ACK = "await ack"  # waiting for ACK(UPDATE)
    COMMIT = "commit"  # answered: the checkpoint being written


# The UPDATE may be on its way or applied unanswered: a connection lost here rolls the round back.
IN_FLIGHT = frozenset({Step.METRICS_OUT, Step.AWAIT_GRANT, Step.UPLOADING, Step.AWAIT_ACK})
# How long the server's QUIC stack has to acknowledge an aggregate's METRICS before its ACK goes out anyway.
METRICS_TAKEN_S = 10.0


class Flight:
    def __init__(self, start: RoundStart) -> None:
        self.start = start
        self.step = Step.TRAIN
        self._prepared: PreparedUpdate | None = None
        self._record: RoundRecord | None = None
        self.late = False  # refused as late

    @property
    def round(self) -> int:
        return self.start.round

    @property
    def prepared(self) -> PreparedUpdate:
        assert self._prepared is not None, self.step
        return self._prepared

    @property
    def record(self) -> RoundRecord:
        assert self._record is not None, self.step
        return self._record

    def trained(self, trained: Trained) -> SendBulk:
        self._prepared, self._record = trained.prepared, trained.record
        self.step = Step.METRICS_OUT
        # Metrics have their own stream: telemetry never queues in front of control messages.
        return SendBulk(Metrics(round=self.round, values=finite_metrics(trained.record.metrics)))

    def bulk_sent(self, nbytes: int) -> list[Action]:
        if self.step is Step.METRICS_OUT:
            # Admission: the server grants upload slots, so it never takes more uploads at once than it can hold.
            self.step = Step.AWAIT_GRANT
            return [Send(UploadRequest(round=self.round, nbytes=len(self.prepared.body)))]
        if self.step is Step.UPLOADING:
            self.record.bytes_up = nbytes
            self.step = Step.AWAIT_ACK
            return []
        raise RuntimeError(f"no bulk send was pending in round step {self.step.value}")

    def granted(self) -> SendBulk:
        self.step = Step.UPLOADING
        return SendBulk(self.prepared.header, self.prepared.body)

    def acked(self, sync: SyncedAdapter, server_hash: str | None) -> None:
        """ACK(UPDATE): commit (a different hash than ours raises ProtocolError, with nothing to roll back)."""
        self.step = Step.COMMIT
        sync.commit(self.prepared, server_hash)

    def refused(self, sync: SyncedAdapter, h: Error) -> None:
        """ERROR instead of a grant or an ACK: raise it unless it says late."""
        self.step = Step.COMMIT
        sync.roll_back(self.prepared)
        err = remote_error(h)
        if err.code not in LATE_CODES:
            raise err
        # The round closed without us: view and synced stay, so this round's change is in the next delta.
        self.record.accepted, self.late = False, True
        log.warning("round %d: update refused as late (%s); its change goes into the next one", self.round, h.message)

    def stopped(self, sync: SyncedAdapter) -> Record:
        """BYE instead of an answer: the job ended without acknowledging; abandon the update."""
        sync.roll_back(self.prepared)
        self.record.accepted = False
        return Record(self.record)

    def abandon(self, sync: SyncedAdapter) -> None:
        """The connection ended: roll back if the UPDATE may be out unanswered (whatever the server did with it, the
        view hash at the rejoin tells)."""
        if self.step in IN_FLIGHT:
            sync.abandon(self.prepared)

    def done(self) -> Record:
        """The answer is checkpointed."""
        rec = self.record
        if not self.late:
            log.info(
                "round %d: loss %.4f -> %.4f%s, sent %d bytes%s",
                rec.round,
                rec.metrics.get("loss_before", float("nan")),
                rec.metrics.get("loss_after", float("nan")),
                accuracy_note(rec.metrics, "held-out"),
                rec.bytes_up,
                f" ({rec.fp32_up / rec.bytes_up:.1f}x smaller than fp32)" if rec.fp32_up else " (no tensors)",
            )
        return Record(rec, late=self.late)


class Landing:
    """One AGGREGATE (``reset``: a dense one after JOIN): installed, then a round's result is measured and its
    figures sent as the round's METRICS, delivered before the ACK so the server's round history holds them; the
    checkpoint comes after the ACK, off the server's critical path: the server persisted what it sent before
    sending it, so a crash in between costs a dense reset at the rejoin, never a lost or doubled aggregate."""

    def __init__(self, msg: Message, *, reset: bool) -> None:
        self.msg, self.reset = msg, reset
        self.header: Any = msg.header
        self._installed: Installed | None = None

    def work(self) -> Install:
        h = self.header
        # A round's aggregate, not a reset (dense, no contributors: the server's copy re-sent after a rejoin).
        is_result = h.kind != "local" and (h.delta or h.contributors > 0)
        return Install(self.msg, evaluate=not self.reset and bool(is_result))

    @property
    def installed(self) -> Installed:
        assert self._installed is not None, "not installed yet"
        return self._installed

    def done_installing(self, installed: Installed) -> list[Action]:
        self._installed = installed
        if installed.figures:
            return [SendBulk(Metrics(round=self.header.round, values=finite_metrics(installed.figures)))]
        return self._ack()

    def bulk_sent(self) -> list[Action]:
        return [WaitAcked(METRICS_TAKEN_S)]

    def taken(self, ok: bool) -> list[Action]:
        if not ok:
            log.warning("round %d: the server did not take the held-out figures in time", self.header.round)
        return self._ack()

    def _ack(self) -> list[Action]:
        ack = Ack(ref=MsgType.AGGREGATE, round=self.header.round, state_hash=self.installed.state_hash)
        return [Send(ack), RunWork(Checkpoint())]

    def done(self) -> Landed:
        """Checkpointed."""
        return Landed(self.header, self.installed)

    def reset_complete(self, view_hash: str, server_hash: str) -> bool:
        """After a reset: whether we now hold what the server acknowledged JOIN with (a `local` reset must)."""
        if self.header.kind == "local" and view_hash != server_hash:
            raise SchemaMismatchError(
                f"the server's reset has state {view_hash}, but it acknowledged JOIN with {server_hash}"
            )
        return view_hash == server_hash


__all__ = ["IN_FLIGHT", "METRICS_TAKEN_S", "Flight", "Landing", "Step"]
