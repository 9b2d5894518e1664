"""What the client's :class:`~fedquic.client.session.ClientSession` asks its driver to do, and how a connection
ends.

The session returns lists of these actions; :mod:`fedquic.client.runner` carries them out in order (a unit test
and ``testkit/memory_client.py`` do so inline). Three complete later and feed a result back into the session:
:class:`SendBulk` (``on_bulk_sent``), :class:`WaitAcked` (``on_acked``) and :class:`RunWork` (``on_work_done``).
A :class:`Work` names the local work (:class:`~fedquic.client.work.LocalWork` carries each out: the learner, the
adapter state, the checkpoint) and says what it returns. :class:`Joined`, :class:`Record` and :class:`Landed`
are for the driver's books. :class:`Finished` ends the connection, with its :class:`Outcome` for the reconnect
policy. :class:`Verdict` and :class:`Rule` are the words of
the session's transition table.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum
from typing import Any

from ..common.adapter import AdapterSchema
from ..common.codec import Manifest
from ..common.errors import ErrorCode, RemoteError, TransportError
from ..common.messages import Aggregate, Message, RoundStart, SyncState, Welcome
from .reconnect import is_retryable
from .results import RoundRecord
from .sync import PreparedUpdate


class Verdict(Enum):
    ACCEPT = "accept"  # handled now
    STOP = "stop"  # handled (it ends the wait), but stays queued for the main loop
    DROP = "drop"  # discarded
    DEFER = "defer"  # queued in `pending`, in arrival order, until a state handles it
    FAIL = "fail"  # UNEXPECTED_MESSAGE: the connection ends


@dataclass(frozen=True)
class Rule:
    verdict: Verdict
    handler: str = ""  # the ClientSession method for ACCEPT and STOP
    # (session, header) -> whether the rule applies; when it does not, the state's UNLISTED verdict does
    guard: Callable[[Any, Any], bool] | None = None


class Outcome(Enum):
    DONE = "done"  # BYE: the job is over, results and adapters saved
    JOB_ENDED = "job ended"  # ERROR or close JOB_ENDED: a success too, nothing is left to do
    RETRY = "retry"  # worth another connection (reconnect.is_retryable)
    FATAL = "fatal"  # a refusal no retry changes, a protocol violation, a local error


def classify(exc: BaseException) -> Outcome:
    """How a connection that ended with ``exc`` ends the client: only transport and remote errors may retry."""
    if isinstance(exc, TransportError | RemoteError):
        if exc.code is ErrorCode.JOB_ENDED:
            return Outcome.JOB_ENDED
        if is_retryable(exc):
            return Outcome.RETRY
    return Outcome.FATAL


# -- actions (out) --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Send:
    header: Any  # a control message (peer.send)


@dataclass(frozen=True)
class SendBulk:
    header: Any  # on a stream of its own (await peer.send_bulk), then on_bulk_sent(bytes)
    body: bytes | bytearray = b""


@dataclass(frozen=True)
class Attach:  # learner.attach(job) -> AdapterSchema
    job: Welcome


@dataclass(frozen=True)
class Restore:  # load the checkpoint if it is this job's -> bool
    job: Welcome
    schema: AdapterSchema


@dataclass(frozen=True)
class Train:  # train, evaluate as the round needs, encode -> Trained
    start: RoundStart


@dataclass(frozen=True)
class WaitAcked:  # until the server's QUIC stack acknowledged what was sent (at most timeout_s), then on_acked(ok)
    timeout_s: float


@dataclass(frozen=True)
class Install:  # decode, install and hash an AGGREGATE; with `evaluate`, measure the model it makes -> Installed
    msg: Message
    evaluate: bool


@dataclass(frozen=True)
class Checkpoint:  # write run_dir/state -> None
    pass


@dataclass(frozen=True)
class SaveResults:  # rounds.jsonl and the adapters, at BYE -> None
    reason: str


Work = Attach | Restore | Train | Install | Checkpoint | SaveResults


@dataclass(frozen=True)
class Trained:
    prepared: PreparedUpdate
    record: RoundRecord


@dataclass(frozen=True)
class Installed:
    state_hash: str  # of the state the aggregate made: what its ACK says
    manifest: Manifest  # the full form, for the fp32 size in the round record
    bytes_down: int  # the AGGREGATE's size on the wire
    figures: dict[str, float]  # held-out figures of the model it makes (empty unless Install.evaluate)
    reset: bool  # a `local` reset that replaced our adapter


@dataclass(frozen=True)
class RunWork:
    work: Work  # run it (in a thread where it is heavy), then on_work_done(its result)


@dataclass(frozen=True)
class Close:
    code: int
    reason: str


@dataclass(frozen=True)
class Joined:  # the JOIN and its resets are done: count the join
    job: Welcome
    resume: SyncState | None  # what JOIN.resume said (None: a fresh start)


@dataclass(frozen=True)
class Record:  # a round's outcome, for the result (a round re-run after a reconnect replaces its record)
    record: RoundRecord
    late: bool = False


@dataclass(frozen=True)
class Landed:  # an AGGREGATE installed, acknowledged and checkpointed: its figures go in the round's record
    header: Aggregate
    installed: Installed


@dataclass(frozen=True)
class Finished:
    outcome: Outcome
    error: BaseException | None = None
    reason: str = ""  # BYE's


Action = Send | SendBulk | WaitAcked | RunWork | Close | Joined | Record | Landed | Finished


__all__ = [
    "Action",
    "Attach",
    "Checkpoint",
    "Close",
    "Finished",
    "Install",
    "Installed",
    "Joined",
    "Landed",
    "Outcome",
    "Record",
    "Restore",
    "Rule",
    "RunWork",
    "SaveResults",
    "Send",
    "SendBulk",
    "Train",
    "Trained",
    "Verdict",
    "WaitAcked",
    "Work",
    "classify",
]
