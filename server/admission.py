"""Upload admission, sans-I/O: who may send an UPDATE now (slots, FIFO) and with how much room reserved.

A client asks with UPLOAD_REQUEST(round, nbytes); the server answers UPLOAD_GRANT when (1) one of
``slots`` upload slots is free, handed out in arrival order, and (2) the server's receive budget can reserve
``nbytes``, so a granted UPDATE never waits for memory mid-stream. A request that holds a slot but finds no
room keeps its slot and tries again (:meth:`admit`) while the other slot holders try theirs. A slot is held
until the update is handled, the client leaves, or ``timeout_s`` pass after the grant.

This object only decides; it never sleeps, sends or touches a connection. The daemon feeds it requests,
releases and the time, and carries out what it returns: :class:`Granted` (permit the UPDATE stream, send
UPLOAD_GRANT) and :class:`Expired` (revoke the unused permit). The budget is the transport's
(:class:`fedquic.transport.budget.BufferBudget`), reached through the two calls of :class:`Budget`; once a
request is granted the reservation belongs to the connection's permit, which gives it back when it is used or
revoked.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Hashable
from dataclasses import dataclass
from typing import Protocol

Key = Hashable  # the daemon uses (client id, round)


class Budget(Protocol):
    def try_reserve(self, nbytes: int) -> bool: ...

    def unreserve(self, nbytes: int) -> None: ...


@dataclass(frozen=True)
class Granted:
    key: Key
    nbytes: int
    expires_at: float


@dataclass(frozen=True)
class Expired:
    key: Key


AdmissionEvent = Granted | Expired


@dataclass
class _Entry:
    nbytes: int
    slot: bool = False  # holds an upload slot (waiting for budget, or granted)
    expires_at: float | None = None  # set once granted


class UploadAdmission:
    def __init__(self, slots: int, timeout_s: float, budget: Budget) -> None:
        if slots < 1:
            raise ValueError("at least one upload slot")
        self.slots = slots
        self.timeout_s = timeout_s
        self.budget = budget
        self._entries: OrderedDict[Key, _Entry] = OrderedDict()  # arrival order
        self.in_flight_max = 0

    # -- what the daemon reports -------------------------------------------------------------------------

    def request(self, key: Key, nbytes: int, now: float) -> list[AdmissionEvent]:
        """A new UPLOAD_REQUEST; a key already queued or granted is ignored (a repeated request)."""
        if key not in self._entries:
            self._entries[key] = _Entry(nbytes)
        return self._admit(now)

    def release(self, key: Key, now: float) -> list[AdmissionEvent]:
        """The update was handled (accepted or refused), or the client left: its place or slot goes to the
        next in line. A key that holds no place is ignored."""
        self._entries.pop(key, None)
        return self._admit(now)

    def poll(self, now: float) -> list[AdmissionEvent]:
        """Expire the grants whose time is up (call at :meth:`next_deadline`). Their slots are free at once;
        their reserved room only once the daemon has revoked the unused permits, so call :meth:`admit` after
        carrying these out."""
        out: list[AdmissionEvent] = []
        for key, e in list(self._entries.items()):
            if e.expires_at is not None and now >= e.expires_at:
                del self._entries[key]
                out.append(Expired(key))
        return out

    def admit(self, now: float) -> list[AdmissionEvent]:
        """Grant what fits now: after expiries, and every few tens of milliseconds while
        :attr:`waiting_for_budget` (other connections free budget without telling us)."""
        return self._admit(now)

    # -- what the daemon asks ------------------------------------------------------------------------------

    def next_deadline(self) -> float | None:
        times = [e.expires_at for e in self._entries.values() if e.expires_at is not None]
        return min(times) if times else None

    @property
    def waiting(self) -> int:
        """Requests waiting for an upload slot (a slot holder waiting for budget is not counted)."""
        return sum(1 for e in self._entries.values() if not e.slot)

    @property
    def in_flight(self) -> int:
        return sum(1 for e in self._entries.values() if e.expires_at is not None)

    @property
    def waiting_for_budget(self) -> bool:
        return any(e.slot and e.expires_at is None for e in self._entries.values())

    def holds(self, key: Key) -> bool:
        return key in self._entries

    # -- the rule --------------------------------------------------------------------------------------

    def _admit(self, now: float) -> list[AdmissionEvent]:
        out: list[AdmissionEvent] = []
        held = sum(1 for e in self._entries.values() if e.slot)
        for key, e in self._entries.items():
            if e.expires_at is not None:
                continue
            if not e.slot:
                if held >= self.slots:
                    break  # slots go in arrival order: nobody without one overtakes
                e.slot, held = True, held + 1
            if not self.budget.try_reserve(e.nbytes):
                continue  # keeps its slot and tries again; another slot holder's bytes may fit
            e.expires_at = now + self.timeout_s
            out.append(Granted(key, e.nbytes, e.expires_at))
        self.in_flight_max = max(self.in_flight_max, self.in_flight)
        return out


__all__ = ["AdmissionEvent", "Budget", "Expired", "Granted", "UploadAdmission"]
