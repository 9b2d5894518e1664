"""What the server's sans-I/O objects ask the daemon to do: the actions of
:class:`~fedquic.server.session.ServerSession`, :class:`~fedquic.server.job.ServerJob` and
:class:`~fedquic.server.close.RoundClose`.

The objects never touch a socket, a thread or a clock: they take a message (or a finished piece of work, or the
time) and return a list of these. The daemon (:mod:`fedquic.server.daemon`) carries them out in order; a unit test
carries them out inline (:mod:`testkit.memory`). ``to`` names the client whose connection an action is for; None
is the connection whose event produced it.

Work that takes time (decoding, an fsynced commit, aggregation) is a :class:`Work`: a callable the daemon runs in
a worker thread, serialized per client id, and a continuation the object gives the result to. ``background``
work (a round close's downlinks) runs beside the connection's next messages instead of before them.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from ..common.errors import ErrorCode, FedQuicError
from ..common.messages import Header, MsgType
from ..transport.connection import BulkPermit

Then = Callable[[Any, float], list["Action"]]  # (result, now) -> the next actions


def _none(result: Any, now: float) -> list[Action]:
    return []


@dataclass(frozen=True)
class Send:
    """A control message. To another connection (``to`` set) it is best effort: a closed one is skipped."""

    header: Header
    to: str | None = None


@dataclass(frozen=True)
class SendBulk:
    """A message on a stream of its own; ``then`` gets the bytes sent, or None if the connection closed."""

    header: Header
    body: bytes
    to: str | None = None
    then: Then = _none
    background: bool = False


@dataclass(frozen=True)
class Refuse:
    """Send ERROR for a refused message; the connection stays open."""

    error: FedQuicError


@dataclass(frozen=True)
class Close:
    """Close the connection with ``0x100 + code``; with ``error`` an ERROR message goes first."""

    code: ErrorCode
    reason: str
    error: FedQuicError | None = None
    to: str | None = None


@dataclass(frozen=True)
class Replace:
    """Close another connection (``handle``, the stale one of a client that reconnected), before going on."""

    handle: Any
    code: ErrorCode
    reason: str


@dataclass(frozen=True)
class Permit:
    msg_type: MsgType
    permit: BulkPermit
    to: str | None = None


@dataclass(frozen=True)
class Revoke:
    msg_type: MsgType
    to: str | None = None


@dataclass(frozen=True)
class Work:
    """Run ``run()`` off the event loop, holding the locks of ``keys`` (client ids), then ``then(result, now)``.
    ``inline`` work is short and runs on the loop (the job record's write)."""

    run: Callable[[], Any]
    then: Then = _none
    fail: Then | None = None  # given a FedQuicError the work raised (a bad tensor); other errors are internal
    keys: tuple[str, ...] = ()
    background: bool = False
    inline: bool = False
    name: str = field(default="work", compare=False)


@dataclass(frozen=True)
class QueueUpload:
    """Queue the client's upload request with the admission rule (the daemon's ``_grant``)."""

    client_id: str
    round: int
    nbytes: int


@dataclass(frozen=True)
class UploadDone:
    """The client's update for ``round`` was handled (accepted or refused): its upload slot is free."""

    client_id: str
    round: int


@dataclass(frozen=True)
class JobDone:
    result: Any  # fedquic.server.job.JobResult


Action = Send | SendBulk | Refuse | Close | Replace | Permit | Revoke | Work | QueueUpload | UploadDone | JobDone

__all__ = [
    "Action",
    "Close",
    "JobDone",
    "Permit",
    "QueueUpload",
    "Refuse",
    "Replace",
    "Revoke",
    "Send",
    "SendBulk",
    "Then",
    "UploadDone",
    "Work",
]
