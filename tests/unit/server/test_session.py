"""The server's protocol, sans-I/O: the real ServerJob and ServerSession driven in memory with a fake clock
(testkit.memory), with scripted clients. Every refusal, timeout and takeover of registration; uploads, lost
ACKs, late updates and a round's close; the dense reset on a rejoin."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from fedquic.common.adapter import TensorDict, init_lora_state, state_hash, zeros_state
from fedquic.common.codec import Encoding, EncodingSpec, encode_payload
from fedquic.common.errors import ErrorCode
from fedquic.common.messages import (
    Ack,
    Aggregate,
    Bye,
    Error,
    Heartbeat,
    Hello,
    Join,
    Metrics,
    MsgType,
    RoundStart,
    SyncState,
    Update,
    UploadGrant,
    UploadRequest,
    Welcome,
)
from fedquic.server.config import JobConfig, ServerConfig
from fedquic.server.history import read_history_dicts
from fedquic.server.rounds import Phase, RoundPolicy
from fedquic.server.session import JOIN_TIMEOUT_S, RESET_ACK_TIMEOUT_S, State
from fedquic.transport.settings import TlsFiles

from testkit.memory import MemoryConn, MemoryServer
from testkit.synthetic import lora_schema

SCHEMA = lora_schema(1, 8, 2)
FP = "ab" * 16
FP32 = EncodingSpec.parse("fp32")
INIT = init_lora_state(SCHEMA, 0)


def make_server(tmp_path: Path, *, policy: RoundPolicy | None = None, **job: object) -> MemoryServer:
    cfg = ServerConfig(
        tls=TlsFiles(ca=tmp_path / "ca.pem"),
        run_dir=tmp_path / "run",
        policy=policy or RoundPolicy(rounds=2, min_clients=2, round_timeout_s=60),
        job=JobConfig(uplink=FP32, downlink=FP32, **job),  # type: ignore[arg-type]
    )
    return MemoryServer(cfg)


class Scripted:
    """A client as a script of messages, keeping the state hashes it would hold."""

    def __init__(self, srv: MemoryServer, cid: str, *, certified: bool = True) -> None:
        self.srv, self.cid = srv, cid
        self.conn: MemoryConn = srv.connect(identity=cid if certified else None)
        self.view: TensorDict = {k: v.copy() for k, v in INIT.items()}
        self.held: dict[str, TensorDict] = {"row": zeros_state(SCHEMA), "global": dict(INIT)}

    def hello(self, **kw: object) -> list:
        fields = {"versions": (1,), "client_id": self.cid, "base_fingerprint": FP, "num_samples": 10, **kw}
        self.srv.deliver(self.conn, Hello(**fields))  # type: ignore[arg-type]
        return self.conn.headers()

    def join(self, resume: SyncState | None = None) -> list:
        self.srv.deliver(self.conn, Join(adapter=SCHEMA, resume=resume))
        return self.conn.headers()

    def register(self) -> list:
        [welcome] = self.hello()
        assert isinstance(welcome, Welcome)
        return self.join()

    def update(self, round_: int, scale: float = 0.01, seed: int = 0) -> tuple[Update, bytes]:
        rng = np.random.default_rng(seed)
        delta = {k: (scale * rng.standard_normal(v.shape)).astype(np.float32) for k, v in INIT.items()}
        payload = encode_payload(delta, FP32)
        self.pending = {k: self.view[k] + delta[k] for k in self.view}
        header = Update(
            round=round_, client_id=self.cid, num_samples=10, base_hash=state_hash(self.view), manifest=payload.manifest
        )
        return header, payload.body

    def upload(self, round_: int, seed: int = 0) -> list:
        header, body = self.update(round_, seed=seed)
        self.srv.deliver(self.conn, UploadRequest(round=round_, nbytes=len(body)))
        grant = self.conn.headers()
        assert [type(h) for h in grant] == [UploadGrant], grant
        self.srv.deliver(self.conn, header, body)
        msgs = self.conn.take()
        out = [m.header for m in msgs]
        self.conn.outbox.extend(m for m in msgs if isinstance(m.header, Aggregate))  # the close it completed
        acks = [h for h in out if isinstance(h, Ack) and h.ref is MsgType.UPDATE]
        if acks:
            self.view = self.pending
            assert acks[0].state_hash == state_hash(self.view)
        return out

    def ack_aggregates(self, msgs: list | None = None) -> list[Aggregate]:
        """Install every AGGREGATE sent (fp32: exact) and acknowledge it."""
        aggs = []
        for m in self.conn.take() if msgs is None else msgs:
            h = m.header
            if not isinstance(h, Aggregate):
                continue
            from fedquic.common.codec import decode_tensors, expand

            manifest = expand(h.manifest, SCHEMA)
            state = decode_tensors(manifest, m.body)
            if h.kind == "local":
                self.view = state
                new = state
            else:
                new = {k: self.held[h.kind][k] + state[k] for k in state} if h.delta else state
                self.held[h.kind] = new
            aggs.append(h)
            self.srv.deliver(self.conn, Ack(ref=MsgType.AGGREGATE, round=h.round, state_hash=state_hash(new)))
        return aggs

    def resume(self, round_: int) -> SyncState:
        held = {k: state_hash(v) for k, v in self.held.items()}
        return SyncState(round=round_, view_hash=state_hash(self.view), held=held)


# -- registration: refusals, in the order the server checks them ------------------------------------------


REFUSALS = [
    ("wrong version", {"versions": (99,)}, ErrorCode.UNSUPPORTED_VERSION),
    ("certificate of another", {"client_id": "mallory"}, ErrorCode.IDENTITY_MISMATCH),
    ("missing encoding", {"encodings": (Encoding.INT8,)}, ErrorCode.UNSUPPORTED_ENCODING),
]


@pytest.mark.parametrize(("case", "fields", "code"), REFUSALS, ids=[r[0] for r in REFUSALS])
def test_a_refused_hello_closes_with_an_error(tmp_path: Path, case: str, fields: dict, code: ErrorCode) -> None:
    srv = make_server(tmp_path)
    c = Scripted(srv, "alice")
    [err] = c.hello(**fields)
    assert isinstance(err, Error) and err.code == code
    assert c.conn.closed is not None and c.conn.closed.code is code and c.conn.closed.error
    assert srv.job.metrics.rejected == {code.name: 1}
    assert "alice" not in srv.job.records and not srv.job.clients


def test_hello_after_the_end_and_while_stopping(tmp_path: Path) -> None:
    srv = make_server(tmp_path)
    srv.job.stopping = True
    [err] = Scripted(srv, "a").hello()
    assert err.code == ErrorCode.SHUTTING_DOWN
    srv.job.stopping = False
    srv.job.result = object()  # type: ignore[assignment]
    [err] = Scripted(srv, "b").hello()
    assert err.code == ErrorCode.JOB_ENDED


def test_the_first_message_must_be_hello_and_the_second_join(tmp_path: Path) -> None:
    srv = make_server(tmp_path)
    c = Scripted(srv, "alice")
    srv.deliver(c.conn, Heartbeat(seq=1))  # may ride beside HELLO in 0-RTT: ignored
    assert c.conn.closed is None and not c.conn.outbox
    assert isinstance(c.hello()[0], Welcome)
    srv.deliver(c.conn, Heartbeat(seq=2))  # before JOIN it is not
    [err] = c.conn.headers()
    assert err.code == ErrorCode.UNEXPECTED_MESSAGE and c.conn.closed.code is ErrorCode.UNEXPECTED_MESSAGE
    d = Scripted(srv, "bob")
    srv.deliver(d.conn, Join(adapter=SCHEMA))
    assert d.conn.headers()[0].code == ErrorCode.UNEXPECTED_MESSAGE and d.conn.closed is not None


def test_join_refusals_schema_and_size(tmp_path: Path) -> None:
    srv = make_server(tmp_path)
    srv.cfg = srv.job.cfg = srv.cfg.model_copy(update={"max_adapter_parameters": SCHEMA.numel - 1})
    big = Scripted(srv, "big")
    [err] = big.register()
    assert err.code == ErrorCode.LIMIT_EXCEEDED and srv.job.schema is None  # refused before the init exists
    srv.cfg = srv.job.cfg = srv.cfg.model_copy(update={"max_adapter_parameters": 1 << 28})
    assert isinstance(Scripted(srv, "a").register()[-1], Ack)
    other = Scripted(srv, "b")
    other.hello()
    srv.deliver(other.conn, Join(adapter=lora_schema(1, 8, 4)))
    [err] = other.conn.headers()
    assert err.code == ErrorCode.SCHEMA_MISMATCH and other.conn.closed is not None
    [err] = Scripted(srv, "c").hello(base_fingerprint="cd" * 16)  # the first JOIN fixed the base model
    assert err.code == ErrorCode.SCHEMA_MISMATCH


@pytest.mark.parametrize("stage", ["hello", "join"])
def test_registration_deadlines_close_without_an_error(tmp_path: Path, stage: str) -> None:
    srv = make_server(tmp_path)
    c = Scripted(srv, "alice")
    wait = srv.cfg.transport.hello_timeout_s
    if stage == "join":
        c.hello()
        wait = JOIN_TIMEOUT_S
    srv.advance(wait - 0.01)
    assert c.conn.closed is None
    srv.advance(0.02)
    assert c.conn.closed is not None and c.conn.closed.code is ErrorCode.TIMEOUT and not c.conn.closed.error
    assert not c.conn.outbox and srv.job.metrics.rejected == {"TIMEOUT": 1}


def test_a_reconnect_with_the_certificate_replaces_the_connection_without_it_is_refused(tmp_path: Path) -> None:
    srv = make_server(tmp_path)
    first = Scripted(srv, "alice")
    first.register()
    assert srv.conn_of("alice") is first.conn
    squatter = Scripted(srv, "alice", certified=False)
    [err] = squatter.hello()
    assert err.code == ErrorCode.IDENTITY_MISMATCH and srv.conn_of("alice") is first.conn
    again = Scripted(srv, "alice")
    assert isinstance(again.hello()[0], Welcome)
    assert first.conn.closed is not None and first.conn.closed.code is ErrorCode.IDENTITY_MISMATCH
    assert "alice" not in srv.job.clients  # detached until the new connection joins
    assert isinstance(again.join()[-1], Ack) and srv.conn_of("alice") is again.conn
    srv.drop(first.conn)  # the old connection's end does not detach the new one
    assert srv.conn_of("alice") is again.conn


# -- rounds ------------------------------------------------------------------------------------------------


def two_joined(srv: MemoryServer) -> tuple[Scripted, Scripted]:
    a, b = Scripted(srv, "a"), Scripted(srv, "b")
    ack_a = a.register()
    assert [type(h) for h in ack_a] == [Ack] and ack_a[0].ref is MsgType.JOIN
    assert ack_a[0].state_hash == state_hash(INIT)
    after_b = b.register()
    assert [type(h) for h in after_b] == [Ack, RoundStart]  # min_clients reached: round 1 starts
    [rs] = a.conn.headers()
    assert isinstance(rs, RoundStart) and rs.round == 1
    return a, b


def test_a_round_uploads_closes_with_leave_one_out_and_writes_history(tmp_path: Path) -> None:
    srv = make_server(tmp_path)
    a, b = two_joined(srv)
    out = a.upload(1, seed=1)
    assert [type(h) for h in out] == [Ack]
    assert 1 in srv.job.store.load_client("a").updates  # on disk before the ACK
    srv.deliver(a.conn, Metrics(round=1, values={"loss": 0.5, "bytes_up": -1.0}))
    b.upload(1, seed=2)
    assert srv.job.machine.phase is Phase.CLOSING
    [agg_a] = a.ack_aggregates()
    assert agg_a.kind == "row" and agg_a.delta and agg_a.contributors == 1  # the others: leave-one-out
    # leave-one-out: a holds b's adapter
    assert state_hash(a.held["row"]) == srv.job.records["a"].disk.held_hash["row"]
    np.testing.assert_allclose(a.held["row"][next(iter(INIT))], b.view[next(iter(INIT))], atol=1e-6)
    assert srv.job.machine.phase is Phase.CLOSING  # b has not acknowledged
    b.ack_aggregates()
    assert srv.job.machine.round == 2 and srv.job.machine.phase is Phase.TRAINING
    [row] = read_history_dicts(srv.job.history_path)
    assert row["round"] == 1 and sorted(row["contributors"]) == ["a", "b"]
    assert row["clients"]["a"]["bytes_up"] > 0 and row["reported"]["a"] == {"loss": 0.5, "bytes_up": -1.0}
    assert isinstance(a.conn.headers()[-1], RoundStart)


def test_the_close_waits_for_acks_only_until_the_round_timeout(tmp_path: Path) -> None:
    srv = make_server(tmp_path)
    a, b = two_joined(srv)
    a.upload(1)
    b.upload(1, seed=3)
    a.ack_aggregates()  # b never acknowledges
    srv.advance(59)
    assert srv.job.machine.phase is Phase.CLOSING
    srv.advance(2)
    assert srv.job.machine.round == 2 and len(read_history_dicts(srv.job.history_path)) == 1


def test_a_lost_ack_resend_is_acknowledged_again_and_a_different_one_refused(tmp_path: Path) -> None:
    srv = make_server(tmp_path)
    a, _ = two_joined(srv)
    header, body = a.update(1)
    a.upload(1)
    srv.deliver(a.conn, UploadRequest(round=1, nbytes=len(body)))  # the resend needs no slot
    assert isinstance(a.conn.headers()[0], UploadGrant)
    srv.deliver(a.conn, header, body)
    [ack] = a.conn.headers()
    assert isinstance(ack, Ack) and ack.state_hash == state_hash(a.view)
    other, other_body = a.update(1, seed=9)
    other = other.model_copy(update={"base_hash": header.base_hash})
    srv.deliver(a.conn, other, other_body)
    [err] = a.conn.headers()
    assert err.code == ErrorCode.CONFLICTING_UPDATE and a.conn.closed is None  # one message refused
    assert srv.job.metrics.updates_accepted == 1


def test_per_message_refusals_keep_the_connection(tmp_path: Path) -> None:
    srv = make_server(tmp_path)
    a, _ = two_joined(srv)
    srv.deliver(a.conn, UploadRequest(round=1, nbytes=10**9))
    assert a.conn.headers()[0].code == ErrorCode.LIMIT_EXCEEDED
    srv.deliver(a.conn, UploadRequest(round=5, nbytes=10))
    assert a.conn.headers()[0].code == ErrorCode.ROUND_NOT_OPEN
    header, body = a.update(1)
    srv.deliver(a.conn, header.model_copy(update={"client_id": "b"}), body)
    assert a.conn.headers()[0].code == ErrorCode.IDENTITY_MISMATCH
    srv.deliver(a.conn, header.model_copy(update={"base_hash": "00"}), body)
    assert a.conn.headers()[0].code == ErrorCode.CONFLICTING_UPDATE
    srv.deliver(a.conn, header, body[:-4])  # the body does not match its manifest
    assert a.conn.headers()[0].code == ErrorCode.BAD_TENSOR
    srv.deliver(a.conn, Join(adapter=SCHEMA))
    assert a.conn.headers()[0].code == ErrorCode.UNEXPECTED_MESSAGE
    assert a.conn.closed is None and srv.job.metrics.updates_accepted == 0


def test_a_late_update_is_refused_under_drop_and_marks_the_client_active(tmp_path: Path) -> None:
    policy = RoundPolicy(rounds=3, min_clients=2, round_timeout_s=10, quorum=0.5, max_missed_rounds=2)
    srv = make_server(tmp_path, policy=policy)
    a, b = two_joined(srv)
    _header, body = b.update(1)
    a.upload(1)
    srv.advance(11)  # b missed the deadline: the round closes with a alone (quorum 0.5)
    assert srv.job.machine.missed == {"b": 1}
    a.ack_aggregates()
    b.ack_aggregates()
    assert srv.job.machine.round == 2
    srv.deliver(b.conn, UploadRequest(round=1, nbytes=len(body)))
    [err] = [h for h in b.conn.headers() if isinstance(h, Error)]
    assert err.code == ErrorCode.LATE_UPDATE
    assert "b" not in srv.job.machine.missed  # a late update shows a slow client, not an absent one


def test_a_wrong_ack_of_an_aggregate_closes_for_a_dense_reset(tmp_path: Path) -> None:
    srv = make_server(tmp_path)
    a, b = two_joined(srv)
    a.upload(1)
    b.upload(1, seed=2)
    [_m] = [m for m in a.conn.take() if isinstance(m.header, Aggregate)]
    srv.deliver(a.conn, Ack(ref=MsgType.AGGREGATE, round=1, state_hash="00"))
    assert a.conn.closed is not None and a.conn.closed.code is ErrorCode.CONFLICTING_UPDATE
    assert not a.conn.closed.error  # no ERROR: the client takes the close as retryable and rejoins
    assert "a" not in srv.job.clients


def test_a_rejoin_gets_a_dense_reset_and_must_acknowledge_it(tmp_path: Path) -> None:
    srv = make_server(tmp_path)
    a, b = two_joined(srv)
    a.upload(1)
    b.upload(1, seed=2)
    a.ack_aggregates()
    b.ack_aggregates()
    srv.drop(a.conn)
    assert "a" not in srv.job.clients and not srv.job.records["a"].loaded
    # a restarts from nothing: its view is the init, its row zeros; the server's record says otherwise
    fresh = Scripted(srv, "a")
    fresh.hello()
    srv.deliver(fresh.conn, Join(adapter=SCHEMA))
    ack = fresh.conn.outbox[0].header
    assert isinstance(ack, Ack) and ack.state_hash == srv.job.records["a"].view_hash != state_hash(INIT)
    assert fresh.conn.session.state is State.RESETTING
    aggs = [h for h in fresh.conn.outbox if isinstance(h.header, Aggregate)]
    assert sorted(m.header.kind for m in aggs) == ["local", "row"] and not any(m.header.delta for m in aggs)
    before = {r: dict(v) for r, v in srv.job.records["a"].reported.items()}
    srv.deliver(fresh.conn, Metrics(round=1, values={"acc": 1.0}))  # an evaluation of the reset: not filed
    fresh.ack_aggregates()
    assert fresh.conn.session.state is State.READY and srv.job.records["a"].reported == before
    assert state_hash(fresh.view) == srv.job.records["a"].view_hash
    assert state_hash(fresh.held["row"]) == srv.job.records["a"].disk.held_hash["row"]


def test_a_reset_acknowledged_with_another_state_or_never(tmp_path: Path) -> None:
    srv = make_server(tmp_path)
    a, _b = two_joined(srv)
    a.upload(1)
    srv.drop(a.conn)
    fresh = Scripted(srv, "a")
    fresh.register()
    srv.deliver(fresh.conn, Ack(ref=MsgType.AGGREGATE, round=1, state_hash="00"))
    assert fresh.conn.closed.code is ErrorCode.CONFLICTING_UPDATE and fresh.conn.closed.error
    late = Scripted(srv, "a")
    late.register()
    assert late.conn.session.state is State.RESETTING
    srv.advance(RESET_ACK_TIMEOUT_S + 1)
    assert late.conn.closed.code is ErrorCode.TIMEOUT and not late.conn.closed.error


def test_a_job_that_ended_says_bye_to_a_client_registering_meanwhile(tmp_path: Path) -> None:
    srv = make_server(tmp_path, policy=RoundPolicy(rounds=1, min_clients=2, round_timeout_s=60))
    a, b = two_joined(srv)
    c = Scripted(srv, "c")
    c.hello()
    a.upload(1)
    b.upload(1, seed=2)
    a.ack_aggregates()
    b.ack_aggregates()
    assert srv.result is not None and srv.result.ok and srv.result.rounds_completed == 1
    assert isinstance(a.conn.headers()[-1], Bye)
    out = c.join()
    assert isinstance(out[0], Ack) and isinstance(out[-1], Bye)
