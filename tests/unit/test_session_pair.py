"""The real client against the real server, in memory: FederatedClient (its ClientSession, SyncedAdapter and a
SyntheticLearner) against MemoryServer (the server's ServerJob, ServerSessions, RoundClose and upload admission),
through testkit.memory_link, on the server's fake clock. No QUIC, no threads on the server side.

A clean job, a rejoin with a dense reset, a lost ACK and its identical resend, a late update under each straggler
rule, the refusals that end a client, a stale connection taken over by the same certificate and upload slots under
contention; after each, both sides hold the same adapter states.

Then the same without the runner (testkit.memory_client): ClientSession + LocalWork + SyntheticLearner against
MemoryServer, synchronously, with ONE fake clock for both sides: no event loop, no threads. A clean job, a rejoin
with a dense reset, a late update whose deadline passes on that clock while the client trains, refusals, and the
client's liveness timeout.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from fedquic.client.actions import Finished, Outcome, Train, Work, classify
from fedquic.client.config import ClientConfig
from fedquic.client.runner import FederatedClient
from fedquic.common.adapter import TensorDict, state_hash
from fedquic.common.codec import Encoding, EncodingSpec
from fedquic.common.errors import ErrorCode, RemoteError, TransportError
from fedquic.common.messages import (
    Ack,
    Aggregate,
    Error,
    Header,
    Heartbeat,
    Hello,
    Join,
    LoraJobSpec,
    Message,
    MsgType,
    TrainSpec,
    Update,
    UploadGrant,
    UploadRequest,
)
from fedquic.server.config import JobConfig, ServerConfig
from fedquic.server.history import read_history_dicts
from fedquic.server.rounds import Phase, RoundPolicy
from fedquic.transport.settings import TlsFiles

from testkit.memory import MemoryConn, MemoryServer
from testkit.memory_client import MemoryClient, run
from testkit.memory_link import MemoryLink, MemoryPeer, on
from testkit.synthetic import SyntheticLearner, lora_schema

SCHEMA = lora_schema(layers=2, dim=16, rank=2)
FP32 = EncodingSpec.parse("fp32")
INT8 = EncodingSpec.parse("int8")


def make_server(
    tmp_path: Path, *, min_clients: int = 2, straggler: str = "drop", uplink: EncodingSpec = INT8, **cfg: Any
) -> MemoryServer:
    policy = RoundPolicy(rounds=3, min_clients=min_clients, round_timeout_s=60, straggler=straggler)  # type: ignore[arg-type]
    job = JobConfig(uplink=uplink, downlink=INT8, train=TrainSpec(local_steps=1))
    return MemoryServer(
        ServerConfig(tls=TlsFiles(ca=tmp_path / "ca.pem"), run_dir=tmp_path / "server", policy=policy, job=job, **cfg)
    )


def make_client(
    tmp_path: Path,
    link: MemoryLink,
    cid: str,
    *,
    seed: int = 0,
    learner: SyntheticLearner | None = None,
    cls: type[FederatedClient] = FederatedClient,
    **cfg: Any,
) -> FederatedClient:
    config = ClientConfig(
        client_id=cid,
        tls=TlsFiles(ca=tmp_path / "ca.pem"),
        run_dir=tmp_path / cid,
        backoff_initial_s=0.01,
        backoff_max_s=0.02,
        **cfg,
    )
    return cls(config, learner or SyntheticLearner(SCHEMA, seed=seed), connector=link.connector())


async def run_all(*clients: FederatedClient, timeout: float = 20.0) -> list[Any]:
    tasks = [asyncio.ensure_future(c.run()) for c in clients]
    try:
        return list(await asyncio.wait_for(asyncio.gather(*tasks), timeout))
    finally:  # a failure ends the others too: none is left waiting, nor a worker thread on a gate
        for c in clients:
            for g in c.learner.gates.values():  # type: ignore[attr-defined]
                g.set()
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


def seen(link: MemoryLink, direction: str, cid: str, kind: type[Header]) -> list[Any]:
    return [h for d, c, h in link.log if d == direction and c == cid and isinstance(h, kind)]


def server_state(srv: MemoryServer, cid: str, kind: str | None = None) -> TensorDict:
    """The server's record of ``cid``'s adapter (or of what it holds of ``kind``), from disk once it left."""
    job, rec = srv.job, srv.job.records[cid]
    name = rec.disk.view_file if kind is None else rec.disk.held_files.get(kind)  # type: ignore[arg-type]
    if name:
        return job.store.read_tensors(cid, name)
    assert job.init_state is not None
    return dict(job.init_state) if kind is None else job.default_held(kind)


def assert_same(a: TensorDict, b: TensorDict, atol: float = 0.0) -> None:
    assert set(a) == set(b)
    for k in a:
        np.testing.assert_allclose(a[k], b[k], rtol=0, atol=atol, err_msg=k)


def assert_agree(srv: MemoryServer, clients: dict[str, FederatedClient] | dict[str, MemoryClient]) -> None:
    """Each client and the server hold the same view and Rest-of-World; the client's adapter is its view plus the
    uplink residual (what compression has not delivered yet)."""
    for cid, c in clients.items():
        assert c.view_hash == srv.job.records[cid].view_hash, cid
        assert_same(c.view, server_state(srv, cid))
        assert_same(c.learner.row_state(), server_state(srv, cid, "row"))  # type: ignore[attr-defined]
        local = c.learner.local_state()
        assert_same({k: c.view[k] + c.ef.residual.get(k, 0.0) for k in local}, local, atol=1e-6)


Sent = Callable[[MemoryPeer, Header], bool]


def gate(link: MemoryLink, client: FederatedClient, round_: int, *, after: Sent) -> None:
    """``client`` trains ``round_`` only once a message ``after`` accepts has reached the server."""
    event = client.learner.gates[round_] = threading.Event()  # type: ignore[attr-defined]
    link.observers.append(lambda peer, msg: event.set() if after(peer, msg.header) else None)


def sent(cid: str, kind: type[Header], round_: int) -> Sent:
    return lambda peer, h: peer.client_id == cid and isinstance(h, kind) and getattr(h, "round", None) == round_


async def until(cond: Callable[[], bool], timeout: float = 10.0) -> None:
    for _ in range(int(timeout / 0.005)):
        if cond():
            return
        await asyncio.sleep(0.005)
    raise AssertionError("timed out waiting")


# -- a clean job -------------------------------------------------------------------------------------------


async def test_a_clean_job_of_three_clients_agrees_after_every_round(tmp_path: Path) -> None:
    srv = make_server(tmp_path, min_clients=3)
    link = srv.link()
    clients = {cid: make_client(tmp_path, link, cid, seed=i) for i, cid in enumerate("abc")}
    agreed: list[tuple[int, str]] = []

    def check(peer: MemoryPeer, msg: Message) -> None:  # as each round's aggregate is acknowledged
        h, c = msg.header, clients[peer.client_id]
        if not isinstance(h, Ack):
            return
        rec = srv.job.records[peer.client_id]
        if c.view_hash == rec.view_hash and h.state_hash == rec.disk.held_hash["row"] == state_hash(c.held["row"]):
            agreed.append((h.round, peer.client_id))

    link.observers.append(check)
    results = await run_all(*clients.values())
    assert sorted(agreed) == [(r, cid) for r in (1, 2, 3) for cid in "abc"]
    for cid, res in zip(clients, results, strict=True):
        assert [r.round for r in res.rounds] == [1, 2, 3] and all(r.accepted for r in res.rounds)
        assert list(srv.job.records[cid].disk.updates) == [1, 2, 3]
        assert not [h for h in seen(link, "down", cid, Aggregate) if not h.delta]  # nothing to reset
    assert_agree(srv, clients)
    rows = read_history_dicts(srv.job.history_path)
    assert [row["round"] for row in rows] == [1, 2, 3]
    assert all(sorted(row["contributors"]) == ["a", "b", "c"] and set(row["reported"]) == set("abc") for row in rows)
    assert srv.result is not None and srv.result.ok and srv.result.rounds_completed == 3
    assert srv.job.metrics.updates_accepted == 9 and link.connections == 3


# -- lost connections and lost answers -----------------------------------------------------------------------


async def test_a_rejoin_after_a_lost_connection_gets_a_dense_reset_and_agrees(tmp_path: Path) -> None:
    srv = make_server(tmp_path)
    link = srv.link()
    link.faults.drop_after(MsgType.UPDATE, 2, client_id="a")  # applied; its ACK and the round's aggregate are lost
    a, b = make_client(tmp_path, link, "a", seed=1), make_client(tmp_path, link, "b", seed=2)
    gate(link, a, 2, after=sent("b", Update, 2))  # a's update closes round 2: the server commits a's new RoW
    ra, rb = await run_all(a, b)
    resets = [h for h in seen(link, "down", "a", Aggregate) if not h.delta]
    assert [h.kind for h in resets] == ["local", "row"] and a.resets == 1
    joins = seen(link, "up", "a", Join)
    assert len(joins) == 2 and joins[0].resume is None and joins[1].resume.round == 1 and a.joins == 2
    assert list(srv.job.records["a"].disk.updates) == [1, 2, 3]  # round 2 applied once, never handed again
    assert [r.round for r in ra.rounds] == [1, 3] and [r.round for r in rb.rounds] == [1, 2, 3]
    assert a.learner.trained_rounds == [1, 2, 3]  # type: ignore[attr-defined]
    assert_agree(srv, {"a": a, "b": b})
    assert srv.result is not None and srv.result.ok


async def test_a_lost_update_ack_is_sent_again_for_the_identical_resend(tmp_path: Path) -> None:
    srv = make_server(tmp_path)
    link = srv.link()
    lost: list[Message] = []

    def resend(peer: MemoryPeer) -> None:  # the ACK is lost; the UPLOAD_REQUEST and UPDATE reach the server again
        lost.extend(peer.release(deliver=False))
        request = next(m for m in reversed(peer.sent) if isinstance(m.header, UploadRequest))
        peer.hold(on(MsgType.UPLOAD_GRANT))
        link.deliver(peer, request)
        link.deliver(peer, peer.sent[-1])
        [grant] = peer.release(deliver=False)  # the resend's grant (without a slot): the client asked once
        assert isinstance(grant.header, UploadGrant)

    hold = on(MsgType.ACK, 2, ref=MsgType.UPDATE)
    link.faults.add(on(MsgType.UPDATE, 2), before=lambda p: p.hold(hold), after=resend, client_id="a")
    a, b = make_client(tmp_path, link, "a", seed=1), make_client(tmp_path, link, "b", seed=2)
    ra, _ = await run_all(a, b)
    [first] = lost
    acks = [h for h in seen(link, "down", "a", Ack) if h.ref is MsgType.UPDATE and h.round == 2]
    assert len(acks) == 2 and acks[0].state_hash == acks[1].state_hash == first.header.state_hash  # type: ignore[attr-defined]
    assert [h.round for h in seen(link, "up", "a", Update)] == [1, 2, 2, 3]
    assert list(srv.job.records["a"].disk.updates) == [1, 2, 3] and srv.job.metrics.updates_accepted == 6
    assert all(r.accepted for r in ra.rounds) and a.joins == 1 and a.resets == 0
    assert_agree(srv, {"a": a, "b": b})


@pytest.mark.parametrize("straggler", ["drop", "fold"])
async def test_a_late_update_keeps_its_change(tmp_path: Path, straggler: str) -> None:
    """Round 2 closes at its deadline with b alone; a's request for it comes after. Dropped: refused as
    LATE_UPDATE, the change goes out with round 3. Folded: accepted, a counts in the next close."""
    srv = make_server(tmp_path, straggler=straggler, uplink=FP32)
    link = srv.link()
    link.faults.late(2, client_id="a")
    a, b = make_client(tmp_path, link, "a", seed=1), make_client(tmp_path, link, "b", seed=2)
    gate(link, a, 2, after=sent("b", Update, 2))
    ra, rb = await run_all(a, b)
    rows = read_history_dicts(srv.job.history_path)
    assert [row["contributors"] for row in rows][1] == ["b"]  # round 2 closed without a
    assert sorted(rows[2]["contributors"]) == ["a", "b"] and all(r.accepted for r in rb.rounds)
    if straggler == "drop":
        assert link.refusals == [("a", 2, ErrorCode.LATE_UPDATE)] and a.late_rounds == [2]
        assert [r.accepted for r in ra.rounds] == [True, False, True]
        assert list(srv.job.records["a"].disk.updates) == [1, 3]
    else:
        assert link.refusals == [] and a.late_rounds == [] and all(r.accepted for r in ra.rounds)
        assert list(srv.job.records["a"].disk.updates) == [1, 2, 3]
    assert a.learner.trained_rounds == [1, 2, 3]  # type: ignore[attr-defined]
    # both rounds' training reached the server (fp32: exactly what a holds)
    assert_same(server_state(srv, "a"), a.learner.local_state(), atol=1e-6)
    assert_agree(srv, {"a": a, "b": b})


# -- refusals ------------------------------------------------------------------------------------------------


class Fp32Only(FederatedClient):
    """A client that decodes fp32 alone: the job's int8 downlink is beyond it."""

    def _hello(self) -> Hello:
        return super()._hello().model_copy(update={"encodings": (Encoding.FP32,)})


REFUSALS = [
    ("encoding", ErrorCode.UNSUPPORTED_ENCODING),
    ("base model", ErrorCode.SCHEMA_MISMATCH),
    ("adapter schema", ErrorCode.SCHEMA_MISMATCH),
    ("first join too large", ErrorCode.LIMIT_EXCEEDED),
]


@pytest.mark.parametrize(("case", "code"), REFUSALS, ids=[c for c, _ in REFUSALS])
async def test_a_refusal_ends_the_client_for_good(tmp_path: Path, case: str, code: ErrorCode) -> None:
    limit = {"max_adapter_parameters": SCHEMA.numel - 1} if case == "first join too large" else {}
    srv = make_server(tmp_path, **limit)
    link = srv.link()
    first = None
    if case in ("base model", "adapter schema"):  # another client joined first: its JOIN fixed both for the job
        first = asyncio.ensure_future(make_client(tmp_path, link, "first").run())
        await until(lambda: "first" in srv.job.clients)
    learner = SyntheticLearner(lora_schema(2, 16, 4) if case == "adapter schema" else SCHEMA, seed=1)
    if case == "base model":
        learner.fingerprint = "0123456789"
    cls = Fp32Only if case == "encoding" else FederatedClient
    client = make_client(tmp_path, link, "c", learner=learner, cls=cls, connect_attempts=5)
    with pytest.raises(RemoteError) as info:
        await asyncio.wait_for(client.run(), 10)
    assert info.value.code is code and classify(info.value) is Outcome.FATAL
    [peer] = [p for p in link.peers if p.client_id == "c"]  # no second attempt
    assert peer.conn.closed is not None and peer.conn.closed.code is code and peer.conn.closed.error
    assert client.joins == 0 and "c" not in srv.job.clients and srv.job.metrics.rejected == {code.name: 1}
    if first is None:
        assert srv.job.schema is None  # nothing was fixed by the refused JOIN
    else:
        assert srv.job.schema is not None and srv.job.schema.fingerprint() == SCHEMA.fingerprint()
        assert "first" in srv.job.clients and not first.done()  # the job goes on for the others
        first.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await first


# -- a stale connection; upload slots ------------------------------------------------------------------------


async def test_a_stale_connection_is_taken_over_by_the_same_certificate(tmp_path: Path) -> None:
    srv = make_server(tmp_path)
    link = srv.link()
    link.faults.silence_after(MsgType.ACK, 1, client_id="a")  # a's path dies after round 1; the server's end stays
    a = make_client(tmp_path, link, "a", seed=1, heartbeat_s=0.05, liveness_timeout_s=0.2)
    b = make_client(tmp_path, link, "b", seed=2)
    # b sends round 2 once a JOINs again (server connections 1 and 2 are the first two): round 2 is still open then
    gate(link, b, 2, after=lambda peer, h: isinstance(h, Join) and peer.client_id == "a" and peer.conn.id > 2)
    ra, rb = await run_all(a, b)
    old, new = [p for p in link.peers if p.client_id == "a"]
    assert old.silent and old.heartbeats > 0  # a probed the silent connection before leaving it
    # the server had kept the old connection until the new HELLO replaced it (a drop would read INTERNAL)
    assert old.conn.closed is not None and old.conn.closed.code is ErrorCode.IDENTITY_MISMATCH
    assert not old.conn.closed.error and new.conn.closed is not None and new.conn.closed.code is ErrorCode.INTERNAL
    joins = seen(link, "up", "a", Join)
    assert len(joins) == 2 and joins[1].resume.round == 1 and a.joins == 2 and a.resets == 0
    assert not [h for h in seen(link, "down", "a", Aggregate) if not h.delta]  # same state: nothing to reset
    assert [r.round for r in ra.rounds] == [1, 2, 3] and all(r.accepted for r in ra.rounds)  # round 2 resumed
    assert [r.round for r in rb.rounds] == [1, 2, 3]
    assert_agree(srv, {"a": a, "b": b})


async def test_upload_slots_under_contention_grant_one_at_a_time(tmp_path: Path) -> None:
    srv = make_server(tmp_path, min_clients=4, upload_slots=1)
    link = srv.link()
    link.faults.bulk_s = 0.005  # an UPDATE takes a while to arrive: the others ask meanwhile
    clients = {cid: make_client(tmp_path, link, cid, seed=i) for i, cid in enumerate("abcd")}
    results = await run_all(*clients.values())
    granted: set[tuple[str, int]] = set()
    most = queued = 0
    for i, (d, cid, h) in enumerate(link.log):
        if d == "down" and isinstance(h, UploadGrant):
            granted.add((cid, h.round))
            most = max(most, len(granted))
        elif d == "down" and isinstance(h, Ack) and h.ref is MsgType.UPDATE:
            granted.discard((cid, h.round))
        elif d == "up" and isinstance(h, UploadRequest):
            nxt = link.log[i + 1][2] if i + 1 < len(link.log) else None
            queued += not isinstance(nxt, UploadGrant)  # not granted at once: it waited for the slot
    assert most == 1 and srv.admission.in_flight_max == 1 and queued >= 3
    for res in results:
        assert [r.round for r in res.rounds] == [1, 2, 3] and all(r.accepted for r in res.rounds)
    rows = read_history_dicts(srv.job.history_path)
    assert [sorted(row["contributors"]) for row in rows] == [list("abcd")] * 3
    assert srv.job.metrics.updates_accepted == 12 and srv.budget.reserved == 0
    assert_agree(srv, clients)


# -- without the runner: ClientSession + LocalWork, one fake clock for both sides -------------------------------


def memory_client(
    tmp_path: Path, srv: MemoryServer, cid: str, *, seed: int = 0, learner: SyntheticLearner | None = None, **cfg: Any
) -> MemoryClient:
    config = ClientConfig(client_id=cid, tls=TlsFiles(ca=tmp_path / "ca.pem"), run_dir=tmp_path / cid, **cfg)
    return MemoryClient(srv, config, learner or SyntheticLearner(SCHEMA, seed=seed))


def trains(work: Work, round_: int) -> bool:
    return isinstance(work, Train) and work.start.round == round_


class Measuring(SyntheticLearner):
    """A learner with held-out figures: a round's aggregate is measured, and its METRICS go before its ACK."""

    def evaluate(self, final: bool) -> dict[str, float]:
        return {"acc_exact": 0.25 + 0.25 * len(self.trained_rounds), "eval_n": 8.0 if final else 4.0}


def test_without_the_runner_a_clean_job_agrees_after_every_round_and_takes_no_time(tmp_path: Path) -> None:
    srv = make_server(tmp_path)
    clients = {cid: memory_client(tmp_path, srv, cid, learner=Measuring(SCHEMA, seed=i)) for i, cid in enumerate("ab")}
    agreed: list[tuple[int, str]] = []

    def check(c: MemoryClient, msg: Message) -> None:  # as each round's aggregate is acknowledged
        h = msg.header
        if not (isinstance(h, Ack) and h.ref is MsgType.AGGREGATE):
            return
        rec = srv.job.records[c.client_id]
        if c.view_hash == rec.view_hash and h.state_hash == rec.disk.held_hash["row"] == state_hash(c.held["row"]):
            agreed.append((h.round, c.client_id))

    for c in clients.values():
        c.on_sent.append(check)
    t0 = srv.clock()
    run(srv, *clients.values())
    assert srv.clock() == t0  # nothing waited: no timer was needed
    assert sorted(agreed) == [(r, cid) for r in (1, 2, 3) for cid in "ab"]
    rows = read_history_dicts(srv.job.history_path)
    assert [sorted(row["contributors"]) for row in rows] == [["a", "b"]] * 3
    for cid, c in clients.items():
        assert c.outcome == Finished(Outcome.DONE, reason=c.outcome.reason) and c.ends == [c.outcome]  # type: ignore[union-attr]
        assert len(c.conns) == 1 and c.joins == 1 and c.resets == 0
        assert list(srv.job.records[cid].disk.updates) == [1, 2, 3]
        assert not [h for h in c.received_of(Aggregate) if not h.delta]  # nothing to reset
        records = c.result.rounds
        assert [r.round for r in records] == [1, 2, 3] and all(r.accepted and r.bytes_down > 0 for r in records)
        # each aggregate was measured, and its figures reached the server's history before its ACK
        assert [r.metrics["acc_exact"] for r in records] == [0.5, 0.75, 1.0] and records[2].metrics["eval_final"]
        assert [row["clients"][cid]["acc_exact"] for row in rows] == [0.5, 0.75, 1.0]
        assert len((tmp_path / cid / "rounds.jsonl").read_text().splitlines()) == 3
        assert (tmp_path / cid / "state" / "checkpoint.json").is_file()
    assert_agree(srv, clients)
    assert srv.result is not None and srv.result.ok and srv.result.rounds_completed == 3


def test_without_the_runner_a_rejoin_after_a_dropped_connection_gets_a_dense_reset(tmp_path: Path) -> None:
    srv = make_server(tmp_path)
    a, b = memory_client(tmp_path, srv, "a", seed=1), memory_client(tmp_path, srv, "b", seed=2)
    a.gate = lambda w: not trains(w, 2) or any(h.round == 2 for h in b.sent_of(Update))  # a's update closes round 2

    def drop(c: MemoryClient, msg: Message) -> None:  # applied; its ACK and the round's aggregate are lost
        if isinstance(msg.header, Update) and msg.header.round == 2 and len(c.conns) == 1:
            c.drop()

    a.on_sent.append(drop)
    run(srv, a, b)
    resets = [h for h in a.received_of(Aggregate) if not h.delta]
    assert [h.kind for h in resets] == ["local", "row"] and a.resets == 1
    joins = a.sent_of(Join)
    assert len(joins) == 2 and joins[0].resume is None and joins[1].resume.round == 1 and a.joins == 2
    assert [e.outcome for e in a.ends] == [Outcome.RETRY, Outcome.DONE] and len(a.conns) == 2
    assert a.conns[0].closed is not None and a.conns[0].closed.code is ErrorCode.INTERNAL  # dropped
    assert list(srv.job.records["a"].disk.updates) == [1, 2, 3]  # round 2 applied once, never handed again
    assert [r.round for r in a.result.rounds] == [1, 3] and [r.round for r in b.result.rounds] == [1, 2, 3]
    assert a.learner.trained_rounds == [1, 2, 3]  # type: ignore[attr-defined]
    assert_agree(srv, {"a": a, "b": b})
    assert srv.result is not None and srv.result.ok


def test_without_the_runner_the_deadline_passes_while_a_client_trains_and_its_change_comes_next(
    tmp_path: Path,
) -> None:
    srv = make_server(tmp_path, straggler="drop", uplink=FP32)
    a, b = memory_client(tmp_path, srv, "a", seed=1), memory_client(tmp_path, srv, "b", seed=2)
    machine, held = srv.job.machine, []

    def gate(w: Work) -> bool:  # a trains round 2 only once the server closed it without a
        if not trains(w, 2):
            return True
        held.append(srv.clock())
        return machine.round > 2 or machine.phase is not Phase.TRAINING

    a.gate = gate
    run(srv, a, b)
    assert held[-1] - held[0] >= 60.0  # the round's deadline (round_timeout_s) passed on the one clock meanwhile
    assert [ErrorCode(h.code) for h in a.received_of(Error)] == [ErrorCode.LATE_UPDATE]
    assert a.late_rounds == [2] and [r.accepted for r in a.result.rounds] == [True, False, True]
    assert list(srv.job.records["a"].disk.updates) == [1, 3] and len(a.conns) == 1
    rows = read_history_dicts(srv.job.history_path)
    assert rows[1]["contributors"] == ["b"] and sorted(rows[2]["contributors"]) == ["a", "b"]
    assert a.learner.trained_rounds == [1, 2, 3]  # type: ignore[attr-defined]
    # both rounds' training reached the server with round 3 (fp32: exactly what a holds)
    assert_same(server_state(srv, "a"), a.learner.local_state(), atol=1e-6)
    assert_agree(srv, {"a": a, "b": b})


@pytest.mark.parametrize(
    ("case", "code"),
    [("encoding", ErrorCode.UNSUPPORTED_ENCODING), ("adapter schema", ErrorCode.SCHEMA_MISMATCH)],
)
def test_without_the_runner_a_refusal_ends_the_client_for_good(tmp_path: Path, case: str, code: ErrorCode) -> None:
    srv = make_server(tmp_path)
    first = memory_client(tmp_path, srv, "first")
    run(srv, first, until=lambda: "first" in srv.job.clients)  # its JOIN fixed the job's schema
    learner = SyntheticLearner(lora_schema(2, 16, 4) if case == "adapter schema" else SCHEMA, seed=1)
    c = memory_client(tmp_path, srv, "c", learner=learner, connect_attempts=5)
    if case == "encoding":  # it decodes fp32 alone: the job's int8 downlink is beyond it
        c.hello = c.hello.model_copy(update={"encodings": (Encoding.FP32,)})
    run(srv, first, c, until=lambda: c.done)
    end = c.outcome
    assert end is not None and end.outcome is Outcome.FATAL and c.ends == [end]
    assert isinstance(end.error, RemoteError) and end.error.code is code
    assert len(c.conns) == 1 and [ErrorCode(h.code) for h in c.received_of(Error)] == [code]  # no second attempt
    closed = c.conns[0].closed
    assert closed is not None and closed.code is code and closed.error
    assert c.joins == 0 and "c" not in srv.job.clients and srv.job.metrics.rejected == {code.name: 1}
    assert "first" in srv.job.clients and not first.done  # the job goes on for the others


def test_without_the_runner_a_silent_server_ends_the_session_at_the_liveness_timeout(tmp_path: Path) -> None:
    srv = make_server(tmp_path)
    a = memory_client(tmp_path, srv, "a", seed=1, heartbeat_s=5.0, liveness_timeout_s=30.0)
    b = memory_client(tmp_path, srv, "b", seed=2)
    b.gate = lambda w: not trains(w, 2) or len(a.sent_of(Join)) == 2  # round 2 is still open when a rejoins
    silenced: list[float] = []

    def silence(c: MemoryClient, msg: Message) -> None:  # a's path dies once round 1's ACK is through
        h = msg.header
        if isinstance(h, Ack) and h.ref is MsgType.AGGREGATE and h.round == 1 and not silenced:
            c.silent = True
            silenced.append(srv.clock())

    a.on_sent.append(silence)
    run(srv, a, b, until=lambda: bool(a.ends))
    [end] = a.ends
    assert end.outcome is Outcome.RETRY and isinstance(end.error, TransportError)
    assert end.error.code is ErrorCode.TIMEOUT and "acknowledged nothing for 30 s" in str(end.error)
    assert srv.clock() - silenced[0] == 30.0  # liveness_timeout_s, long before the message timeout (3600 s)
    old = a.conns[0]
    assert sum(isinstance(h, Heartbeat) for cid, h in a.sent if cid == old.id) == 5  # probed every heartbeat_s
    assert old.closed is None  # the server's end is still open: only the client's probe noticed
    run(srv, a, b)  # a connects again: its HELLO takes the stale connection over, round 2 resumes
    assert old.closed is not None and old.closed.code is ErrorCode.IDENTITY_MISMATCH and not old.closed.error
    assert [e.outcome for e in a.ends] == [Outcome.RETRY, Outcome.DONE] and len(a.conns) == 2
    joins = a.sent_of(Join)
    assert len(joins) == 2 and joins[1].resume.round == 1 and a.resets == 0
    assert [r.round for r in a.result.rounds] == [1, 2, 3] and all(r.accepted for r in a.result.rounds)
    assert_agree(srv, {"a": a, "b": b})


class PersistLater(MemoryServer):
    """Holds back the writes of what each client will hold (they run beside the downlink's send in the daemon)
    until :meth:`release`: the sends, the clients' installs and their ACKs all happen first."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.held_back: list[tuple[Any, MemoryConn | None]] = []
        self.hold = True

    def _one(self, act: Any, conn: Any) -> None:
        from fedquic.server.actions import Work as ServerWork

        if self.hold and isinstance(act, ServerWork) and "persist downlink" in act.name:
            self.held_back.append((act, conn))
            return
        super()._one(act, conn)

    def release(self) -> None:
        self.hold = False
        pending, self.held_back = self.held_back, []
        for act, conn in pending:
            super()._one(act, conn)


def test_a_round_ends_only_once_what_each_client_holds_is_on_disk(tmp_path: Path) -> None:
    policy = RoundPolicy(rounds=2, min_clients=2, round_timeout_s=60)
    job = JobConfig(uplink=INT8, downlink=INT8, train=TrainSpec(local_steps=1))
    srv = PersistLater(
        ServerConfig(tls=TlsFiles(ca=tmp_path / "ca.pem"), run_dir=tmp_path / "server", policy=policy, job=job)
    )
    clients = [memory_client(tmp_path, srv, cid, seed=i) for i, cid in enumerate("ab")]
    acked: set[str] = set()
    for c in clients:
        c.on_sent.append(
            lambda c, msg: (
                acked.add(c.client_id) if isinstance(msg.header, Ack) and msg.header.ref is MsgType.AGGREGATE else None
            )
        )
    run(srv, *clients, until=lambda: acked == {"a", "b"})
    assert len(srv.held_back) == 2  # both sent and acknowledged, neither written yet
    assert not srv.job.history_path.exists()  # so round 1 has not ended
    assert all(srv.job.records[cid].disk.closed_round == 0 for cid in "ab")
    srv.release()
    assert [row["round"] for row in read_history_dicts(srv.job.history_path)] == [1]
    for c in clients:
        rec = srv.job.records[c.client_id]
        assert rec.disk.closed_round == 1 and rec.disk.held_hash["row"] == state_hash(c.held["row"])
    run(srv, *clients)
    assert srv.result is not None and srv.result.ok and srv.result.rounds_completed == 2


def test_a_fedavg_downlink_is_encoded_once_for_every_client_that_holds_the_same(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import fedquic.server.close as close_mod

    encoded: list[tuple[int, str]] = []
    real = close_mod.downlink_payload

    def counting(job: Any, rec: Any, kind: str, target: TensorDict) -> Any:
        encoded.append((rec.disk.closed_round + 1, kind))
        return real(job, rec, kind, target)

    monkeypatch.setattr(close_mod, "downlink_payload", counting)
    policy = RoundPolicy(rounds=3, min_clients=3, round_timeout_s=60)
    job = JobConfig(federation="fedavg", uplink=INT8, downlink=INT8, train=TrainSpec(local_steps=1))
    cfg = ServerConfig(tls=TlsFiles(ca=tmp_path / "ca.pem"), run_dir=tmp_path / "server", policy=policy, job=job)
    srv = MemoryServer(cfg)
    clients = {cid: memory_client(tmp_path, srv, cid, seed=i) for i, cid in enumerate("abc")}
    run(srv, *clients.values())
    assert srv.result is not None and srv.result.ok and srv.result.rounds_completed == 3
    assert encoded == [(1, "global"), (2, "global"), (3, "global")]  # once a round, not once per client
    for cid, c in clients.items():  # and each holds exactly what the server records for it
        rec = srv.job.records[cid]
        assert state_hash(c.held["global"]) == rec.disk.held_hash["global"] == rec.view_hash == c.view_hash


def test_a_fedalt_job_with_aligned_factors_sends_each_client_the_aligned_rest_of_world(tmp_path: Path) -> None:
    from fedquic.server.aggregation import LeaveOneOut
    from fedquic.server.alignment import align_states

    policy = RoundPolicy(rounds=2, min_clients=3, round_timeout_s=60)
    job = JobConfig(
        federation="fedalt", aggregation="loo-aligned", uplink=FP32, downlink=FP32, train=TrainSpec(local_steps=1)
    )
    cfg = ServerConfig(tls=TlsFiles(ca=tmp_path / "ca.pem"), run_dir=tmp_path / "server", policy=policy, job=job)
    srv = MemoryServer(cfg)
    clients = {cid: memory_client(tmp_path, srv, cid, seed=i) for i, cid in enumerate("abc")}
    run(srv, *clients.values())
    assert srv.result is not None and srv.result.ok and srv.result.rounds_completed == 2
    # what each client holds is the leave-one-out mean of the others' last views, aligned to the job's init
    cids = sorted(clients)
    assert all(clients[c].view_hash == srv.job.records[c].view_hash for c in cids)  # the views the round used
    assert srv.job.init_state is not None
    loo = LeaveOneOut(align_states([clients[c].view for c in cids], srv.job.init_state), [1.0] * 3)
    for k, cid in enumerate(cids):
        row = loo.row(k)
        for name, want in row.items():
            np.testing.assert_allclose(clients[cid].held["row"][name], want, rtol=1e-6, atol=1e-7)


def test_a_relevance_weighted_job_keeps_who_made_up_each_rest_of_world_in_its_history(tmp_path: Path) -> None:
    policy = RoundPolicy(rounds=2, min_clients=3, round_timeout_s=60)
    job = JobConfig(
        federation="fedalt",
        aggregation="loo-simgrad",
        rule_options={"temperature": 0.2, "floor": 0.5},
        uplink=FP32,
        downlink=FP32,
        train=TrainSpec(local_steps=1),
    )
    cfg = ServerConfig(tls=TlsFiles(ca=tmp_path / "ca.pem"), run_dir=tmp_path / "server", policy=policy, job=job)
    srv = MemoryServer(cfg)
    clients = [memory_client(tmp_path, srv, cid, seed=i) for i, cid in enumerate("abc")]
    run(srv, *clients)
    assert srv.result is not None and srv.result.ok and srv.result.rounds_completed == 2
    rows = read_history_dicts(srv.job.history_path)
    assert [r["round"] for r in rows] == [1, 2]
    for row in rows:
        assert set(row["weights"]) == {"a", "b", "c"}
        for cid, share in row["weights"].items():
            assert set(share) == {"a", "b", "c"} - {cid}
            assert sum(share.values()) == pytest.approx(1.0, abs=1e-5)
            assert min(share.values()) >= 0.5 / 2 - 1e-6  # the floor: half the row is spread evenly


def _routed_job(tmp_path: Path, fraction: float | None) -> tuple[float, float, dict[str, MemoryClient]]:
    policy = RoundPolicy(rounds=3, min_clients=2, round_timeout_s=60)
    job = JobConfig(federation="fedalt", uplink=FP32, downlink=FP32, train=TrainSpec(local_steps=1))
    job = job.model_copy(update={"uplink_routing": fraction})
    cfg = ServerConfig(tls=TlsFiles(ca=tmp_path / "ca.pem"), run_dir=tmp_path / "server", policy=policy, job=job)
    srv = MemoryServer(cfg)
    clients = {cid: memory_client(tmp_path, srv, cid, seed=i) for i, cid in enumerate("ab")}
    run(srv, *clients.values())
    assert srv.result is not None and srv.result.ok and srv.result.rounds_completed == 3
    for cid, c in clients.items():  # every UPDATE was acknowledged with the hash both sides computed: in sync
        assert c.view_hash == srv.job.records[cid].view_hash
        # a routed round's close knows what each UPDATE carried (server/freshness.py averages over the carriers)
        carried = srv.job.records[cid].carried
        assert bool(carried) == (fraction is not None) and all(0 < len(v) < 8 for v in carried.values())
    rows = read_history_dicts(srv.job.history_path)
    up = sum(r["clients"][cid]["bytes_up"] for r in rows for cid in "ab")
    fp32 = sum(r["clients"][cid]["fp32_up"] for r in rows for cid in "ab")
    return up, fp32, clients


def test_a_routed_job_sends_its_clients_most_changed_blocks_and_stays_in_sync(tmp_path: Path) -> None:
    full = 6 * 4 * sum(math.prod(t.shape) for t in SCHEMA.tensors)  # 3 rounds x 2 clients, fp32
    up_all, fp32_all, _ = _routed_job(tmp_path / "all", None)
    up_half, fp32_half, clients = _routed_job(tmp_path / "half", 0.5)
    assert fp32_all == full and fp32_half == full / 2  # equal blocks: exactly half of them each round
    assert up_half < 0.75 * up_all  # frame headers included (compact manifests with a selection)
    assert all(c.ef.residual_norm() > 0 for c in clients.values())  # what was not sent waits there


def _ffa_server(tmp_path: Path, lora: LoraJobSpec | None = None) -> MemoryServer:
    policy = RoundPolicy(rounds=2, min_clients=2, round_timeout_s=60)
    lora = lora or LoraJobSpec(freeze_a=True)
    job = JobConfig(federation="fedavg", lora=lora, uplink=FP32, downlink=FP32, train=TrainSpec(local_steps=1))
    return MemoryServer(
        ServerConfig(tls=TlsFiles(ca=tmp_path / "ca.pem"), run_dir=tmp_path / "server", policy=policy, job=job)
    )


def test_an_ffa_job_sends_only_b_and_averages_it_exactly(tmp_path: Path) -> None:
    """FFA-LoRA (``lora.freeze_a``): every UPDATE carries the B factors alone, A stays at the job's init on both
    sides, and the global adapter's B is the plain mean of the clients' B: the mean of the products B·A exactly."""
    from fedquic.common.adapter import is_lora_a

    srv = _ffa_server(tmp_path)
    clients = {cid: memory_client(tmp_path, srv, cid, seed=i) for i, cid in enumerate("ab")}
    run(srv, *clients.values())
    assert srv.result is not None and srv.result.ok and srv.result.rounds_completed == 2
    b_values = sum(math.prod(t.shape) for t in SCHEMA.tensors if not is_lora_a(t.name))
    rows = read_history_dicts(srv.job.history_path)
    assert all(r["clients"][cid]["fp32_up"] == 4 * b_values for r in rows for cid in "ab")  # B only, fp32
    init = srv.job.init_state
    assert init is not None
    views = [clients[c].view for c in "ab"]
    for cid, c in clients.items():
        assert c.view_hash == srv.job.records[cid].view_hash  # in sync
        for name, value in c.held["global"].items():
            want = init[name] if is_lora_a(name) else (views[0][name] + views[1][name]) / 2
            np.testing.assert_allclose(value, want, rtol=1e-6, atol=1e-7)


def test_an_ffa_job_refuses_an_update_that_moves_a(tmp_path: Path) -> None:
    srv = _ffa_server(tmp_path)
    good = memory_client(tmp_path, srv, "good", seed=0)
    bad = memory_client(tmp_path, srv, "bad", seed=1)
    compress = bad.sync.ef.compress

    def with_a(delta: TensorDict, spec: EncodingSpec, select: Any = None) -> Any:  # a client that moves its A
        a_names = [n for n in bad.sync.synced if ".lora_A." in n]
        return compress({**delta, a_names[0]: np.ones_like(bad.sync.synced[a_names[0]])}, spec, select)

    bad.sync.ef.compress = with_a
    run(srv, good, bad, until=lambda: bad.done)
    end = bad.outcome
    assert end is not None and isinstance(end.error, RemoteError) and end.error.code is ErrorCode.SCHEMA_MISMATCH
    assert "FFA-LoRA keeps every A at its init" in str(end.error)
    assert srv.job.metrics.rejected.get("SCHEMA_MISMATCH") == 1 and not good.outcome  # the job goes on for good


def test_a_fedsa_job_averages_a_and_each_client_keeps_its_own_b(tmp_path: Path) -> None:
    """FedSA-LoRA (``lora.local_b``): UPDATEs carry the A factors alone, the global adapter is their mean with B
    at the init (the server's copy), and each client's learner keeps the B it trained, its personal part."""
    from fedquic.common.adapter import is_lora_a

    srv = _ffa_server(tmp_path, LoraJobSpec(local_b=True))
    clients = {cid: memory_client(tmp_path, srv, cid, seed=i) for i, cid in enumerate("ab")}
    run(srv, *clients.values())
    assert srv.result is not None and srv.result.ok and srv.result.rounds_completed == 2
    a_values = sum(math.prod(t.shape) for t in SCHEMA.tensors if is_lora_a(t.name))
    rows = read_history_dicts(srv.job.history_path)
    assert all(r["clients"][cid]["fp32_up"] == 4 * a_values for r in rows for cid in "ab")  # A only, fp32
    init = srv.job.init_state
    assert init is not None
    views = [clients[c].view for c in "ab"]
    own_b = {}
    for cid, c in clients.items():
        assert c.view_hash == srv.job.records[cid].view_hash  # in sync
        mine = c.learner.local_state()
        for name, value in c.held["global"].items():
            if is_lora_a(name):
                np.testing.assert_allclose(value, (views[0][name] + views[1][name]) / 2, rtol=1e-6, atol=1e-7)
                np.testing.assert_allclose(mine[name], value, rtol=1e-6)  # the learner trains from the shared A
            else:
                np.testing.assert_array_equal(value, init[name])  # the server never saw a B
        own_b[cid] = {k: v for k, v in mine.items() if not is_lora_a(k)}
        assert any(np.abs(v).max() > 0 for v in own_b[cid].values())  # what it trained stays
    assert any(not np.array_equal(own_b["a"][k], own_b["b"][k]) for k in own_b["a"])  # personal: they differ


def test_a_fedsa_job_refuses_an_update_that_carries_b(tmp_path: Path) -> None:
    srv = _ffa_server(tmp_path, LoraJobSpec(local_b=True))
    good = memory_client(tmp_path, srv, "good", seed=0)
    bad = memory_client(tmp_path, srv, "bad", seed=1)
    compress = bad.sync.ef.compress

    def with_b(delta: TensorDict, spec: EncodingSpec, select: Any = None) -> Any:
        b_name = next(n for n in bad.sync.synced if ".lora_B." in n)
        return compress({**delta, b_name: np.ones_like(bad.sync.synced[b_name])}, spec, select)

    bad.sync.ef.compress = with_b
    run(srv, good, bad, until=lambda: bad.done)
    end = bad.outcome
    assert end is not None and isinstance(end.error, RemoteError) and end.error.code is ErrorCode.SCHEMA_MISMATCH
    assert "FedSA-LoRA keeps B local" in str(end.error) and not good.outcome
