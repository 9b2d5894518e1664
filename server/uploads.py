"""The daemon's side of upload admission: it feeds :class:`~fedquic.server.admission.UploadAdmission` the
requests, releases and time, and carries out its decisions on the connections (permit the UPDATE stream, send
UPLOAD_GRANT, revoke an unused grant). Mixed into :class:`~fedquic.server.daemon.AggregationServer`, whose
records, transport budget, clock and metrics it uses."""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING, Any

from ..common.messages import MsgType
from .admission import AdmissionEvent, Expired, Granted, UploadAdmission

if TYPE_CHECKING:
    from ..transport.aio import Peer

log = logging.getLogger(__name__)


class UploadDesk:
    admission: UploadAdmission
    _admission_timer: asyncio.Future[None] | None
    _granted_peers: dict[tuple[str, int], Peer]
    _closing: bool
    records: dict[str, Any]
    metrics: Any
    cfg: Any
    clock: Any
    _transport: Any
    _tasks: set[asyncio.Task[None]]
    job: Any
    _carry_now: Any  # AggregationServer._carry_now: carry one action out

    async def _grant(self, rec: Any, round_: int, nbytes: int) -> None:
        """Queue the request with the admission rule (:mod:`fedquic.server.admission`: upload slots in arrival
        order, room in the buffer budget), and hold its place until the update is handled, the client leaves
        or the grant expires; then give the place to the next in line. The grant itself is sent by
        :meth:`_carry_admission` when the rule makes it."""
        done = rec.upload_done[round_]
        key = (rec.client_id, round_)
        try:
            self._carry_admission(self.admission.request(key, nbytes, self.clock()))
            await done.wait()
        finally:
            granted_to = self._granted_peers.pop(key, None)
            if granted_to is not None:  # the connection the grant was for, even if the client has a new one
                granted_to.core.revoke(MsgType.UPDATE)  # an unused grant gives its reserved room back
            self._carry_admission(self.admission.release(key, self.clock()))
            if rec.upload_done.get(round_) is done:
                del rec.upload_done[round_]

    def _carry_admission(self, events: list[AdmissionEvent]) -> None:
        """Carry out the admission rule's decisions: permit and announce a grant, or revoke an expired one."""
        for ev in events:
            if isinstance(ev, Expired):
                self._expire_grant(ev)
                continue
            try:
                self._send_grant(ev)
            except Exception:  # never strand a reservation: give it back and free the place
                log.exception("upload grant for %s failed", ev.key)
                self._granted_peers.pop(ev.key, None)
                self._transport.budget.unreserve(ev.nbytes)
                self._carry_admission(self.admission.release(ev.key, self.clock()))
        m = self.metrics
        m.uploads_waiting, m.uploads_in_flight = self.admission.waiting, self.admission.in_flight
        m.uploads_in_flight_max = max(m.uploads_in_flight_max, self.admission.in_flight_max)
        idle = not (self.admission.waiting or self.admission.in_flight or self.admission.waiting_for_budget)
        if not idle and self._admission_timer is None and not self._closing:
            self._admission_timer = task = asyncio.ensure_future(self._admission_clock())
            self._tasks.add(task)  # cancelled by close()
            task.add_done_callback(self._tasks.discard)

    def _send_grant(self, ev: Granted) -> None:
        cid, round_ = ev.key  # type: ignore[misc]
        rec = self.records.get(cid)
        done = rec.upload_done.get(round_) if rec is not None else None
        peer = rec.peer if rec is not None else None
        if rec is None or peer is None or done is None or done.is_set() or self._closing:
            # gone (or the server stopping) between the request and its turn: nothing to permit
            self._transport.budget.unreserve(ev.nbytes)
            self._carry_admission(self.admission.release(ev.key, self.clock()))
            return
        self._granted_peers[ev.key] = peer  # revoked on this connection, even if the client has a new one by then
        for act in self.job.grant(rec, round_, ev.nbytes):  # the permit and the UPLOAD_GRANT (ServerJob.grant)
            self._carry_now(act, None)

    def _expire_grant(self, ev: Expired) -> None:
        cid, round_ = ev.key  # type: ignore[misc]
        log.warning("round %d: %s did not use its upload slot in time", round_, cid)
        granted_to = self._granted_peers.pop(ev.key, None)
        if granted_to is not None:
            granted_to.core.revoke(MsgType.UPDATE)  # the unused grant gives its reserved room back
        rec = self.records.get(cid)
        if rec is not None:
            done = rec.upload_done.pop(round_, None)  # a new request for the round may queue again at once
            if done is not None:
                done.set()

    async def _admission_clock(self) -> None:
        """Tell the admission rule the time while it holds requests: expiries at their deadline, and every 50 ms
        while the head of line waits for budget that other connections free without telling us."""
        try:
            while not self._closing and (
                self.admission.waiting or self.admission.in_flight or self.admission.waiting_for_budget
            ):
                deadline = self.admission.next_deadline()
                wait = 1.0 if deadline is None else max(deadline - self.clock(), 0.0)
                await asyncio.sleep(min(wait, 0.05 if self.admission.waiting_for_budget else 1.0))
                self._carry_admission(self.admission.poll(self.clock()))  # expiries first: their room comes back
                self._carry_admission(self.admission.admit(self.clock()))
        finally:
            self._admission_timer = None
