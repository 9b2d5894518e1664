"""The client process's asyncio driver: :class:`FederatedClient` and :func:`run_client`.

Per connection it creates a :class:`~fedquic.client.session.ClientSession` (the protocol, sans-I/O), feeds it
what happens (messages, its timer, finished work, bulk sends and acknowledgement waits, the connection ending) and
carries out the actions it returns (:mod:`fedquic.client.actions`): send on the peer, bulk-send on a stream of its
own, wait for the peer's QUIC stack to acknowledge, run local work in a worker thread, close. The work itself is
:class:`~fedquic.client.work.LocalWork`'s (synchronous: the learner, the checkpoint store, the result files,
the books; ``joins``, ``resets``, ``result``... delegate to it); the runner owns the peer, the threads and the
reconnect policy. The synchronized adapter state outlives connections in a
:class:`~fedquic.client.sync.SyncedAdapter` (``view``, ``view_hash``, ``synced``, ``ef``, ``held`` delegate to it).

Resilience (docs/client.md):

* **Checkpoint.** After every acknowledged UPDATE, every UPDATE refused as late and every installed AGGREGATE
  the client state is written atomically to ``run_dir/state`` (:mod:`fedquic.client.state`; with
  ``checkpoint_in_background``, by :mod:`fedquic.client.checkpointer`'s thread); a client restarted on the same
  job restores it and sends ``Join(resume=SyncState(...))``.
* **Reset.** The server answers JOIN with its own view hash; when it differs from ours it sends dense
  AGGREGATEs (kind ``local``, maybe ``row``/``global``) that the client installs before it takes part in a round.
* **Reconnect.** A connection lost after joining is re-established with exponential backoff and jitter, and
  the client rejoins with ``resume`` from its in-memory state; refusals (certificate, identity, schema) are final.
* **Job ended.** An ERROR ``JOB_ENDED`` or a close with that code, at any point, ends the client with success.

``_install(h, body, *, evaluate=False)`` is the one coroutine every AGGREGATE (dense resets too) is installed
through; it returns what it installed (:class:`~fedquic.client.actions.Installed`: the hash the session then
acknowledges): a subclass may override it (tests corrupt a delta that way).
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import random
from collections import deque
from typing import Any

from ..common.errors import RemoteError, TransportError
from ..common.logs import client_id_var, round_var
from ..common.messages import Aggregate, Hello
from ..transport.tickets import TicketJar
from .actions import (
    Action,
    Close,
    Finished,
    Install,
    Installed,
    Joined,
    Landed,
    Outcome,
    Record,
    RunWork,
    Send,
    SendBulk,
    Train,
    WaitAcked,
    Work,
    classify,
)
from .checkpointer import BackgroundCheckpoints
from .config import ClientConfig
from .connector import Connector, MessagePeer, quic_connector
from .learner import Learner
from .results import ClientResult
from .session import ClientSession
from .sync import SyncedAdapter
from .work import LocalWork, WorkResult

log = logging.getLogger(__name__)


def _synced(name: str, doc: str) -> Any:
    """An attribute of the client that is its SyncedAdapter's (kept so that code reading ``client.view`` works)."""
    return property(lambda self: getattr(self.sync, name), lambda self, v: setattr(self.sync, name, v), doc=doc)


def _worked(name: str, doc: str) -> Any:
    """An attribute of the client that is its LocalWork's (the books: joins, resets, the result...)."""
    return property(lambda self: getattr(self.work, name), lambda self, v: setattr(self.work, name, v), doc=doc)


def _unacked_control(peer: MessagePeer) -> bool | None:
    """Whether what we wrote on the control stream is unacknowledged by the server's QUIC stack; None when the peer
    is not a QUIC one (nothing to probe)."""
    core = getattr(peer, "core", None)
    sid = getattr(core, "control_stream_id", None)
    if core is None or sid is None:
        return None
    return bool(core.unacked_bytes(sid) > 0)


class FederatedClient:
    view = _synced("view", "our individual adapter exactly as the server reconstructed it")
    view_hash = _synced("view_hash", "the hash of view (versions the state)")
    synced = _synced("synced", "our adapter when we last synced")
    synced_round = _synced("synced_round", "the last round synced (ACKed UPDATE or installed AGGREGATE)")
    ef = _synced("ef", "the uplink ErrorFeedback: what compression has not delivered yet")
    held = _synced("held", "the aggregate of each kind we hold")
    job = _synced("job", "the job's WELCOME (the first connection's)")
    schema = _synced("schema", "the adapter schema agreed at the first JOIN")
    joined = _worked("joined", "whether a connection got as far as joining")
    joins = _worked("joins", "successful JOINs (1 + the number of rejoins)")
    resets = _worked("resets", "`local` resets installed")
    late_rounds = _worked("late_rounds", "rounds whose UPDATE the server refused as late")
    resumed_from_checkpoint = _worked("resumed_from_checkpoint", "the round restored from run_dir/state, if any")
    result = _worked("result", "the job's ClientResult (from the first JOIN on)")
    rows_received = _worked("rows_received", "last RoW per round, for inspection and tests (with keep_rows)")
    keep_rows = _worked("keep_rows", "keep every RoW received in rows_received")

    def __init__(self, cfg: ClientConfig, learner: Learner, *, connector: Connector | None = None) -> None:
        self.cfg = cfg
        self.learner = learner
        # Session tickets from earlier connections to this server: a reconnect resumes (and sends HELLO in 0-RTT).
        self.tickets = TicketJar()
        self._connect = connector or (lambda cfg: quic_connector(cfg, tickets=self.tickets, hello=self._hello()))
        self.sync = SyncedAdapter(learner, cfg.client_id)
        self.work = LocalWork(cfg, learner, self.sync)
        if self.work.store is not None and cfg.checkpoint_in_background:  # client/checkpointer.py: why it is safe
            self.work.checkpoints = BackgroundCheckpoints(self.work.store)
        self._beats = itertools.count(1)  # HEARTBEAT seq: not reset on reconnect

    # -- connections and the reconnect policy -------------------------------------------------------------

    async def run(self) -> ClientResult:
        client_id_var.set(self.cfg.client_id)
        try:
            return await self._run()
        finally:
            if self.work.checkpoints is not None:  # however the client ends, what it checkpointed is on disk
                await asyncio.to_thread(self.work.checkpoints.close)

    async def _run(self) -> ClientResult:
        cfg = self.cfg
        delay = cfg.backoff_initial_s
        failures = 0
        while True:
            joins = self.joins
            try:
                end = await self._run_once()
            except (TransportError, RemoteError) as exc:  # connecting failed (or closing did)
                end = Finished(classify(exc), exc)
            if end.outcome is Outcome.DONE:
                assert self.result is not None
                return self.result
            exc = end.error
            assert exc is not None
            if end.outcome is Outcome.JOB_ENDED:
                return self.work.job_ended(exc)
            if end.outcome is Outcome.FATAL:
                raise exc
            if self.joins > joins:  # this connection got as far as joining: count afresh
                failures, delay = 0, cfg.backoff_initial_s
            failures += 1
            if failures >= cfg.connect_attempts:
                log.error("giving up after %d consecutive failed connection attempts", failures)
                raise exc
            wait = delay * (1.0 + 0.5 * random.random())  # jitter: clients do not retry in lockstep
            what = "connection lost" if self.joined else "connection attempt failed"
            log.warning("%s (%d/%d: %s); retrying in %.1f s", what, failures, cfg.connect_attempts, exc, wait)
            await asyncio.sleep(wait)
            delay = min(delay * 2, cfg.backoff_max_s)

    async def _run_once(self) -> Finished:
        cfg = self.cfg
        async with self._connect(cfg) as peer:
            log.info("connected to %s:%d%s", cfg.host, cfg.port, " (resumed)" if peer.session_resumed else "")
            session = ClientSession(cfg, self.sync, hello=self._hello(), beats=self._beats)
            try:
                return await self._drive(peer, session)
            except BaseException as exc:
                # Whatever ended the connection (the peer, a refusal, a failed write, cancellation), the session
                # rolls back a round whose UPDATE may be out unanswered.
                lost = session.on_connection_lost(exc, asyncio.get_running_loop().time())
                if lost and isinstance(exc, TransportError | RemoteError):
                    end = lost[-1]
                    assert isinstance(end, Finished)
                    return end
                raise

    async def _drive(self, peer: MessagePeer, session: ClientSession) -> Finished:
        """Feed the session until it finishes: one event at a time, no message while its work runs."""
        loop = asyncio.get_running_loop()
        todo: deque[Action] = deque(session.start(loop.time(), hello_sent=bool(getattr(peer, "hello_sent", False))))
        while True:
            while todo:
                action = todo.popleft()
                if isinstance(action, Finished):
                    return action
                todo.extend(await self._carry_out(peer, session, action))
            when = session.get_timer()
            assert when is not None, f"the session awaits nothing in state {session.state}"
            try:
                msg = await asyncio.wait_for(peer.recv(), max(when - loop.time(), 0.0))
            except asyncio.TimeoutError:
                todo.extend(session.handle_timer(loop.time(), unacked_control=_unacked_control(peer)))
            else:
                todo.extend(session.on_message(msg, loop.time()))

    async def _carry_out(self, peer: MessagePeer, session: ClientSession, action: Action) -> list[Action]:
        loop = asyncio.get_running_loop()
        if isinstance(action, Send):
            peer.send(action.header)
        elif isinstance(action, SendBulk):
            nbytes = await peer.send_bulk(action.header, action.body)  # type: ignore[arg-type]
            return session.on_bulk_sent(nbytes, loop.time())
        elif isinstance(action, WaitAcked):
            wait_acked = getattr(peer, "wait_acked", None)  # not a QUIC peer: nothing to wait for
            ok = True if wait_acked is None else bool(await wait_acked(action.timeout_s))
            return session.on_acked(ok, loop.time())
        elif isinstance(action, RunWork):
            result = await self._work(action.work)
            return session.on_work_done(result, loop.time())
        elif isinstance(action, Close):
            await peer.aclose(action.code, action.reason)
        elif isinstance(action, Joined | Record | Landed):
            self.work.note(action)
        else:
            raise TypeError(f"not an action the client can carry out: {action!r}")
        return []

    async def _work(self, work: Work) -> WorkResult:
        """Local work in a worker thread (decoding 45 MB, training, writing the checkpoint...): the QUIC stack
        keeps acknowledging and receiving meanwhile. The session sends nothing else until it returns."""
        if isinstance(work, Install):
            round_var.set(work.msg.header.round)  # type: ignore[attr-defined]
            return await self._install(work.msg.header, work.msg.body, evaluate=work.evaluate)  # type: ignore[arg-type]
        if isinstance(work, Train):
            round_var.set(work.start.round)
        return await asyncio.to_thread(self.work.run, work)

    # -- seams --------------------------------------------------------------------------------------------

    def _hello(self) -> Hello:
        return self.work.hello()

    async def _install(self, h: Aggregate, body: bytes | bytearray, *, evaluate: bool = False) -> Installed:
        """Decode and install an AGGREGATE and hash what it made (with ``evaluate``, measure it too); the session
        then sends its METRICS and acknowledges it with that hash."""
        return await asyncio.to_thread(self.work.install, h, body, evaluate=evaluate)


async def run_client(cfg: ClientConfig, learner: Learner, *, connector: Connector | None = None) -> ClientResult:
    return await FederatedClient(cfg, learner, connector=connector).run()


__all__ = ["FederatedClient", "run_client"]
