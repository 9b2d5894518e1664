"""The round state machine: pure, clock passed in, its whole transition table in this file.

Inputs are events (a client joined or left, an update arrived, time passed, aggregation finished);
outputs are actions for the daemon to carry out. No I/O, no tasks, no wall clock: tested by hand.

    phase        event          -> effect
    WAITING      join           -> TRAINING(next) once min_clients have joined (StartRound with a sample)
    WAITING      tick           -> TRAINING(next) if min_clients are active again (a late update revived
                                   one); FAILED when the registration timeout passes (Fail)
    TRAINING     join           -> a sampled client that has not sent yet rejoins the round (ResumeRound);
                                   anyone else waits for the next round
    TRAINING     update(r)      -> CLOSING once every participant has sent (CloseRound)
    TRAINING     update(<r)     -> late: refused (straggler "drop") or folded into the next close ("fold")
    TRAINING     leave          -> CLOSING if all remaining participants have sent; with no participant
                                   and no update left, the round is drawn again (or WAITING)
    TRAINING     tick           -> at the deadline: sampled clients without an update missed the round;
                                   CLOSING with the updates at hand if they reach the quorum of the
                                   sampled clients still eligible; else the deadline moves on for the
                                   eligible ones still training; with none left and no update, the
                                   round starts again with a new sample (or WAITING, see below)
    CLOSING      update(r)      -> late, as above
    CLOSING      aggregated     -> FINISHED (Finish) after the last round; else TRAINING(r+1) if min_clients
                                   are connected, else WAITING for them
    *            leave          -> the client is dropped from the joined set

Missed rounds (no free-riding): a sampled client that has not sent its update by the deadline missed the round;
one that missed its last ``max_missed_rounds`` sampled rounds is *inactive*: it is not sampled, does not count
towards ``min_clients`` or the quorum, and is sent no aggregate (:meth:`RoundMachine.eligible`). It becomes
active again when it contributes (a late update, folded in or refused as late). One that rejoins (a restarted
client) may be sampled again but is *on probation*: it is sent no aggregate until it contributes, and one more
miss makes it inactive again, so reconnecting is no way to free-ride (:meth:`RoundMachine.receives_aggregate`).
The job fails only when fewer than ``min_clients`` active clients stay connected for ``registration_timeout_s``.

Sampling: each round draws max(min_clients, ceil(sample_fraction · active)) of the joined, active clients with
a generator seeded by (sample_seed, round), so a restarted server draws the same sample.

A late update is one for a round that has already closed. With ``straggler="drop"`` it is refused
(LATE_UPDATE): the client keeps its change and sends it as part of its next delta, so no training is lost.
With ``"fold"`` it is accepted, and the client counts as a contributor of the next round that closes.

:meth:`RoundMachine.snapshot` and :meth:`RoundMachine.restore` let the daemon persist and resume a round.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field
from enum import Enum
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from ..common.errors import ErrorCode, JobError, ProtocolError


class Phase(str, Enum):
    WAITING = "waiting"
    TRAINING = "training"
    CLOSING = "closing"
    FINISHED = "finished"
    FAILED = "failed"


class UpdateKind(str, Enum):
    CURRENT = "current"
    LATE = "late"  # for a closed round, accepted under straggler="fold"


class RoundPolicy(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    rounds: int = Field(default=3, ge=1, description="number of rounds")
    min_clients: int = Field(
        default=2, ge=1, description="clients to wait for before each round (also a floor for each round's sample)"
    )
    registration_timeout_s: float = Field(
        default=600.0, gt=0, description="seconds to wait for min_clients active clients before the job fails"
    )
    round_timeout_s: float = Field(default=600.0, gt=0, description="seconds per round")
    # Those who missed max_missed_rounds in a row no longer count among the sampled.
    quorum: float = Field(
        default=1.0,
        gt=0,
        le=1,
        description="fraction of the sampled, still active clients whose updates close a round at its deadline",
    )
    # A sampled client that sends nothing by the deadline this many rounds in a row is inactive (see above).
    max_missed_rounds: int = Field(default=1, ge=1, le=1000)
    # Client sampling: the fraction of connected clients asked to train each round.
    sample_fraction: float = Field(default=1.0, gt=0, le=1, description="fraction of clients sampled per round")
    sample_seed: int = Field(default=0, ge=0)
    straggler: Literal["drop", "fold"] = Field(
        default="drop",
        description="a late update is refused (the client sends its change with its next one) or folded into "
        "the next round",
    )


@dataclass(frozen=True)
class StartRound:
    round: int
    participants: tuple[str, ...]
    deadline: float


@dataclass(frozen=True)
class ResumeRound:
    """A sampled client came back before sending its update: hand it the open round again."""

    client_id: str
    round: int
    deadline: float


@dataclass(frozen=True)
class CloseRound:
    round: int
    contributors: tuple[str, ...]


@dataclass(frozen=True)
class Finish:
    rounds_completed: int


@dataclass(frozen=True)
class Fail:
    reason: str


Action = StartRound | ResumeRound | CloseRound | Finish | Fail


class RoundSnapshot(BaseModel):
    """What the daemon persists to resume a round (received updates are recovered from the client store)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    round: int = Field(default=0, ge=0)
    phase: Phase = Phase.WAITING
    sampled: tuple[str, ...] = ()
    folded: tuple[str, ...] = ()
    missed: dict[str, int] = Field(default_factory=dict)  # consecutive sampled rounds without an update
    probation: tuple[str, ...] = ()  # rejoined after being inactive: no aggregate until they contribute


@dataclass
class RoundMachine:
    policy: RoundPolicy
    started_at: float
    phase: Phase = Phase.WAITING
    round: int = 0
    joined: set[str] = field(default_factory=set)
    sampled: set[str] = field(default_factory=set)  # drawn for this round
    participants: set[str] = field(default_factory=set)  # sampled and still connected (or not yet back)
    received: dict[str, int] = field(default_factory=dict)  # client -> round of its update
    folded: set[str] = field(default_factory=set)  # late updates that count at the next close
    missed: dict[str, int] = field(default_factory=dict)  # client -> consecutive sampled rounds it sent nothing
    probation: set[str] = field(default_factory=set)  # rejoined after being inactive, not yet contributed
    deadline: float = math.inf

    # -- events ----------------------------------------------------------------------------------

    def eligible(self, client_id: str) -> bool:
        """Active: not inactive for missed rounds. Only active clients are sampled and sent aggregates."""
        return self.missed.get(client_id, 0) < self.policy.max_missed_rounds

    def receives_aggregate(self, client_id: str) -> bool:
        """Active and not on probation: what a client must be to be sent an aggregate it did not contribute to."""
        return self.eligible(client_id) and client_id not in self.probation

    def _contributed(self, client_id: str) -> None:
        self.missed.pop(client_id, None)
        self.probation.discard(client_id)

    @property
    def active(self) -> set[str]:
        return {c for c in self.joined if self.eligible(c)}

    def on_join(self, client_id: str, now: float) -> list[Action]:
        self.joined.add(client_id)
        if not self.eligible(client_id):
            # A restarted process deserves another chance to contribute, not the others' average: it may be sampled
            # again, gets no aggregate until it contributes, and one more miss makes it inactive again.
            self.missed[client_id] = self.policy.max_missed_rounds - 1
            self.probation.add(client_id)
        if self.phase is Phase.WAITING and len(self.active) >= self.policy.min_clients:
            return [self._start(self.round + 1, now)]
        if self.phase is Phase.TRAINING and client_id in self.sampled and client_id not in self.received:
            self.participants.add(client_id)
            return [ResumeRound(client_id, self.round, self.deadline)]
        return []

    def on_leave(self, client_id: str, now: float) -> list[Action]:
        self.joined.discard(client_id)
        if self.phase is Phase.TRAINING and client_id in self.participants:
            self.participants.discard(client_id)
            return self._maybe_close(now)
        return []

    def check_update(self, client_id: str, round_: int) -> UpdateKind:
        """Classify an update from ``client_id`` for ``round_``; raise if it must be refused."""
        closed = self.round - 1 if self.phase is Phase.TRAINING else self.round
        if 1 <= round_ <= closed and self.phase in (Phase.TRAINING, Phase.CLOSING, Phase.WAITING):
            # A late update, folded or refused, shows a slow client, not an absent one: it is active again.
            self._contributed(client_id)
            if self.policy.straggler == "fold":
                return UpdateKind.LATE
            raise ProtocolError(
                f"round {round_} closed before this update arrived; send the change with the next round",
                code=ErrorCode.LATE_UPDATE,
            )
        if self.phase is not Phase.TRAINING or round_ != self.round:
            raise ProtocolError(
                f"round {round_} is not open (phase {self.phase.value}, round {self.round})",
                code=ErrorCode.ROUND_NOT_OPEN,
            )
        if client_id not in self.participants:
            raise ProtocolError(
                f"{client_id} is not a participant of round {self.round}", code=ErrorCode.ROUND_NOT_OPEN
            )
        return UpdateKind.CURRENT

    def on_update(self, client_id: str, round_: int, now: float) -> list[Action]:
        kind = self.check_update(client_id, round_)
        self._contributed(client_id)
        if kind is UpdateKind.LATE:
            self.folded.add(client_id)
            return []
        self.received[client_id] = round_
        return self._maybe_close(now)

    def on_tick(self, now: float) -> list[Action]:
        if self.phase is Phase.WAITING and len(self.active) >= self.policy.min_clients:
            return [self._start(self.round + 1, now)]  # a client became active again (a late update)
        if self.phase is Phase.WAITING and now - self.started_at > self.policy.registration_timeout_s:
            inactive = len(self.joined) - len(self.active)
            extra = f" ({inactive} more connected but inactive: they missed their rounds)" if inactive else ""
            return [self._fail(f"only {len(self.active)} of {self.policy.min_clients} active clients in time{extra}")]
        if self.phase is Phase.TRAINING and now >= self.deadline:
            return self._on_deadline(now)
        return []

    def _on_deadline(self, now: float) -> list[Action]:
        for cid in self.sampled - set(self.received):
            self.missed[cid] = self.missed.get(cid, 0) + 1
        still = {c for c in self.sampled if self.eligible(c)} | set(self.received)
        need = max(math.ceil(self.policy.quorum * len(still)), 1)
        if len(self.received) >= need:
            return [self._close()]
        waiting = {c for c in self.participants if self.eligible(c) and c not in self.received}
        if waiting:  # some still count: give them another round's time (each miss brings them nearer the cut)
            self.deadline = now + self.policy.round_timeout_s
            return []
        # Nobody left to wait for: close with what came, or draw the round again from the active clients.
        return [self._close()] if self.received else self._redraw(now)

    def on_aggregated(self, round_: int, now: float) -> list[Action]:
        if self.phase is not Phase.CLOSING or round_ != self.round:
            raise JobError(f"aggregation finished for round {round_} while in {self.phase.value}")
        if self.round >= self.policy.rounds:
            self.phase = Phase.FINISHED
            return [Finish(self.round)]
        if len(self.active) < self.policy.min_clients:
            self.phase = Phase.WAITING  # e.g. after a server restart, before the clients are back
            self.started_at = now
            return []
        return [self._start(self.round + 1, now)]

    # -- persistence -----------------------------------------------------------------------------

    def snapshot(self) -> RoundSnapshot:
        return RoundSnapshot(
            round=self.round,
            phase=self.phase,
            sampled=tuple(sorted(self.sampled)),
            folded=tuple(sorted(self.folded)),
            missed=dict(self.missed),
            probation=tuple(sorted(self.probation)),
        )

    @classmethod
    def restore(
        cls, policy: RoundPolicy, snap: RoundSnapshot, received: dict[str, int], now: float
    ) -> tuple[RoundMachine, list[Action]]:
        """Rebuild the machine after a restart; ``received`` are the updates of ``snap.round`` on disk.

        A training round resumes with a fresh deadline (its sampled clients rejoin it); a closing round
        is closed again (the daemon's close is idempotent per client); a failed round is retried.
        """
        m = cls(
            policy,
            started_at=now,
            round=snap.round,
            folded=set(snap.folded),
            missed=dict(snap.missed),
            probation=set(snap.probation),
        )
        received = {c: r for c, r in received.items() if r == snap.round}
        if snap.phase is Phase.TRAINING:
            m.phase = Phase.TRAINING
            m.sampled = set(snap.sampled)
            m.participants = set(snap.sampled)
            m.received = received
            m.deadline = now + policy.round_timeout_s
            return m, m._maybe_close(now)
        if snap.phase is Phase.CLOSING:
            m.received = received
            m.sampled = set(snap.sampled)
            return m, [m._close()]
        if snap.phase is Phase.FINISHED:
            m.phase = Phase.FINISHED
            return m, [Finish(snap.round)]
        if snap.phase is Phase.FAILED and snap.round > 0:
            m.round = snap.round - 1  # retry the failed round
        return m, []

    # -- helpers -----------------------------------------------------------------------------------

    def _sample(self, round_: int) -> set[str]:
        pool = sorted(self.active)
        k = max(min(self.policy.min_clients, len(pool)), math.ceil(self.policy.sample_fraction * len(pool)))
        rng = random.Random(f"{self.policy.sample_seed}:{round_}")
        return set(rng.sample(pool, k))

    def _start(self, round_: int, now: float) -> StartRound:
        self.phase = Phase.TRAINING
        self.round = round_
        self.sampled = self._sample(round_)
        self.participants = set(self.sampled)
        self.received = {}
        self.deadline = now + self.policy.round_timeout_s
        return StartRound(round_, tuple(sorted(self.participants)), self.deadline)

    def _maybe_close(self, now: float) -> list[Action]:
        if self.participants and set(self.received) >= self.participants:
            return [self._close()]
        if not self.participants:
            return [self._close()] if self.received else self._redraw(now)
        return []

    def _redraw(self, now: float) -> list[Action]:
        """The open round has no update and nobody left to wait for: draw it again, or wait for clients."""
        if len(self.active) >= self.policy.min_clients:
            return [self._start(self.round, now)]
        self.phase = Phase.WAITING
        self.round -= 1  # the next start opens this round again
        self.started_at = now
        return []

    def _close(self) -> CloseRound:
        self.phase = Phase.CLOSING
        contributors = set(self.received) | self.folded
        self.folded = set()
        return CloseRound(self.round, tuple(sorted(contributors)))

    def _fail(self, reason: str) -> Fail:
        self.phase = Phase.FAILED
        return Fail(reason)
