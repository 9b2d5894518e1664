"""The round state machine: pure, clock passed in, its whole transition table in this file.

Inputs are events (a client joined or left, an update arrived, time passed, aggregation finished);
outputs are actions for the daemon to carry out. No I/O, no tasks, no wall clock: tested by hand.

    phase        event          -> effect
    WAITING      join           -> TRAINING(1) once min_clients have joined (StartRound)
    WAITING      tick           -> FAILED when the registration timeout passes (Fail)
    TRAINING     join           -> the client waits for the next round (no action)
    TRAINING     update         -> CLOSING once every participant has sent (CloseRound)
    TRAINING     leave          -> CLOSING if all remaining participants have sent
    TRAINING     tick           -> at the deadline: CLOSING with the updates at hand if they reach the
                                   quorum, else FAILED
    CLOSING      aggregated     -> TRAINING(r+1) (StartRound) or FINISHED (Finish) after the last round
    *            leave          -> the client is dropped from the joined set
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from enum import Enum

from pydantic import BaseModel, ConfigDict, Field

from ..common.errors import ErrorCode, JobError, ProtocolError


class Phase(str, Enum):
    WAITING = "waiting"
    TRAINING = "training"
    CLOSING = "closing"
    FINISHED = "finished"
    FAILED = "failed"


class RoundPolicy(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    rounds: int = Field(default=3, ge=1)
    min_clients: int = Field(default=2, ge=1)
    registration_timeout_s: float = Field(default=600.0, gt=0)
    round_timeout_s: float = Field(default=600.0, gt=0)
    # Fraction of a round's participants whose updates close the round at its deadline.
    quorum: float = Field(default=1.0, gt=0, le=1)


@dataclass(frozen=True)
class StartRound:
    round: int
    participants: tuple[str, ...]
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


Action = StartRound | CloseRound | Finish | Fail


@dataclass
class RoundMachine:
    policy: RoundPolicy
    started_at: float
    phase: Phase = Phase.WAITING
    round: int = 0
    joined: set[str] = field(default_factory=set)
    participants: set[str] = field(default_factory=set)
    received: dict[str, int] = field(default_factory=dict)  # client -> round of its update
    deadline: float = math.inf

    # -- events ----------------------------------------------------------------------------------

    def on_join(self, client_id: str, now: float) -> list[Action]:
        self.joined.add(client_id)
        if self.phase is Phase.WAITING and len(self.joined) >= self.policy.min_clients:
            return [self._start(1, now)]
        return []

    def on_leave(self, client_id: str, now: float) -> list[Action]:
        self.joined.discard(client_id)
        if self.phase is Phase.TRAINING and client_id in self.participants:
            self.participants.discard(client_id)
            return self._maybe_close(now)
        return []

    def check_update(self, client_id: str, round_: int) -> None:
        """Raise unless an update from ``client_id`` for ``round_`` would be accepted now."""
        if self.phase is not Phase.TRAINING or round_ != self.round:
            raise ProtocolError(
                f"round {round_} is not open (phase {self.phase.value}, round {self.round})",
                code=ErrorCode.ROUND_NOT_OPEN,
            )
        if client_id not in self.participants:
            raise ProtocolError(
                f"{client_id} is not a participant of round {self.round}", code=ErrorCode.ROUND_NOT_OPEN
            )

    def on_update(self, client_id: str, round_: int, now: float) -> list[Action]:
        self.check_update(client_id, round_)
        self.received[client_id] = round_
        return self._maybe_close(now)

    def on_tick(self, now: float) -> list[Action]:
        if self.phase is Phase.WAITING and now - self.started_at > self.policy.registration_timeout_s:
            return [self._fail(f"only {len(self.joined)} of {self.policy.min_clients} clients joined in time")]
        if self.phase is Phase.TRAINING and now >= self.deadline:
            need = math.ceil(self.policy.quorum * len(self.participants))
            if len(self.received) >= max(need, 1):
                return [self._close()]
            return [self._fail(f"round {self.round}: {len(self.received)} updates by the deadline, quorum is {need}")]
        return []

    def on_aggregated(self, round_: int, now: float) -> list[Action]:
        if self.phase is not Phase.CLOSING or round_ != self.round:
            raise JobError(f"aggregation finished for round {round_} while in {self.phase.value}")
        if self.round >= self.policy.rounds:
            self.phase = Phase.FINISHED
            return [Finish(self.round)]
        if len(self.joined) < 1:
            return [self._fail("no clients left")]
        return [self._start(self.round + 1, now)]

    # -- helpers -----------------------------------------------------------------------------------

    def _start(self, round_: int, now: float) -> StartRound:
        self.phase = Phase.TRAINING
        self.round = round_
        self.participants = set(self.joined)
        self.received = {}
        self.deadline = now + self.policy.round_timeout_s
        return StartRound(round_, tuple(sorted(self.participants)), self.deadline)

    def _maybe_close(self, now: float) -> list[Action]:
        if self.participants and set(self.received) >= self.participants:
            return [self._close()]
        if not self.participants:
            return [self._close()] if self.received else [self._fail(f"round {self.round}: every participant left")]
        return []

    def _close(self) -> CloseRound:
        self.phase = Phase.CLOSING
        return CloseRound(self.round, tuple(sorted(self.received)))

    def _fail(self, reason: str) -> Fail:
        self.phase = Phase.FAILED
        return Fail(reason)
