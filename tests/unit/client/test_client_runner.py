"""The client's network loop against a scripted in-process server (no QUIC): rejoin and reset, late updates,
message ordering, reconnect after joining, and resuming from the on-disk checkpoint.

The fake server keeps its own copy of the client's adapter exactly as the real one does (it decodes every
UPDATE and adds it), so every check compares two independently maintained states.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from fedquic.client.config import ClientConfig
from fedquic.client.reconnect import is_retryable
from fedquic.client.runner import FederatedClient
from fedquic.client.state import StateStore
from fedquic.common.adapter import AdapterSchema, TensorDict, init_lora_state, state_hash, zeros_state
from fedquic.common.codec import EncodingSpec, decode_tensors, encode_tensors, expand
from fedquic.common.errors import ErrorCode, JobError, RemoteError, TransportError
from fedquic.common.feedback import ErrorFeedback
from fedquic.common.messages import (
    Ack,
    Aggregate,
    Bye,
    Error,
    Header,
    Heartbeat,
    Hello,
    Join,
    Message,
    Metrics,
    MsgType,
    RoundStart,
    TrainSpec,
    Update,
    UploadGrant,
    UploadRequest,
    Welcome,
)
from fedquic.transport.framing import frame_size
from fedquic.transport.settings import TlsFiles

from testkit.synthetic import SyntheticLearner, lora_schema

_CLOSED = object()
FP32 = EncodingSpec.parse("fp32")
INT8 = EncodingSpec.parse("int8")


class Dropped(Exception):
    pass


class FakeConn:
    """Both ends of one connection: the client side has Peer's methods, the server side put/get."""

    session_resumed = False

    def __init__(self) -> None:
        self.down: asyncio.Queue[Any] = asyncio.Queue()
        self.up: asyncio.Queue[Any] = asyncio.Queue()
        self.closed = False
        self.silent = False  # the server died without closing: nothing we send is acknowledged
        self.core = self  # what the client's liveness probe reads (Peer.core.control_stream_id / unacked_bytes)
        self.control_stream_id = 0
        self.heartbeats = 0

    def unacked_bytes(self, stream_id: int | None = None) -> int:
        return 1 if self.silent else 0

    # client side
    def send(self, header: Header, body: bytes = b"") -> int:
        if self.closed:
            raise TransportError("connection closed: fake drop")
        if isinstance(header, Heartbeat):
            self.heartbeats += 1
        if isinstance(header, UploadRequest):  # this fake server grants every upload slot at once
            self.down.put_nowait(Message(UploadGrant(round=header.round, expires_s=60)))
            return frame_size(header, 0)
        self.up.put_nowait(Message(header, bytes(body)))
        return frame_size(header, len(body))

    async def send_bulk(self, header: Header, body: bytes) -> int:
        return self.send(header, body)

    async def recv(self, timeout: float | None = None) -> Message:
        item = await asyncio.wait_for(self.down.get(), timeout)
        if item is _CLOSED:
            self.down.put_nowait(_CLOSED)
            raise TransportError("connection closed: fake drop")
        return item

    async def aclose(self, code: int = 0, reason: str = "") -> None:
        self.drop()

    # server side
    def drop(self) -> None:
        if not self.closed:
            self.closed = True
            self.down.put_nowait(_CLOSED)
            self.up.put_nowait(_CLOSED)

    def put(self, header: Header, body: bytes = b"") -> None:
        if not self.closed:
            self.down.put_nowait(Message(header, body))

    async def get(self, kind: type[Header] | None = None) -> Message:
        while True:
            item = await self.up.get()
            if item is _CLOSED:
                raise Dropped
            if kind is None or isinstance(item.header, kind):
                return item


class FakeServer:
    """A durable server for one client: its state survives dropped connections (like a restarted real one)."""

    def __init__(self, rounds: int, *, federation: str = "fedalt", uplink: EncodingSpec = INT8) -> None:
        self.rounds = rounds
        self.federation = federation
        self.uplink = uplink
        self.job_id = "job-1"
        self.mixer = "fixed"
        self.init_seed = 7
        self.round = 1  # next round to run
        self.schema: AdapterSchema | None = None
        self.view: TensorDict = {}
        self.held: dict[str, TensorDict] = {}
        self.downlink_ef = ErrorFeedback()
        # scripted behaviour
        self.late: set[int] = set()  # refuse these rounds' UPDATEs as late
        self.drop_after_update: dict[int, bool] = {}  # round -> apply the update before dropping the connection
        self.drop_after_round: set[int] = set()  # drop once this round's aggregate is acknowledged
        self.quiet_s = 0.0  # silence before each ROUND_START
        self.silent_after_round: set[int] = set()  # die without a word once this round's aggregate is acknowledged
        self.interleave: set[int] = set()  # send HEARTBEAT/METRICS/AGGREGATE/ROUND_START before the UPDATE's ACK
        self.refuse: ErrorCode | None = None  # refuse new connections with this code
        self.down = False  # no answer to new connections
        self.on_round_start: Callable[[int], None] | None = None
        # what happened
        self.joins: list[Join] = []
        self.resets_sent = 0
        self.connections = 0
        self.accepted: list[int] = []
        self.refused: list[int] = []
        self.errors: list[BaseException] = []

    def view_hash(self) -> str:
        return state_hash(self.view)

    def connector(self) -> Callable[[ClientConfig], contextlib.AbstractAsyncContextManager[Any]]:
        @contextlib.asynccontextmanager
        async def connect(cfg: ClientConfig) -> AsyncIterator[FakeConn]:
            if self.refuse is not None:
                raise TransportError("refused", code=self.refuse)
            if self.down:
                raise TransportError("no answer", code=ErrorCode.TIMEOUT)
            conn = FakeConn()
            self.connections += 1
            task = asyncio.ensure_future(self._serve(conn))
            try:
                yield conn
            finally:
                conn.drop()
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)

        return connect

    async def _serve(self, conn: FakeConn) -> None:
        try:
            await self._session(conn)
        except Dropped:
            pass
        except Exception as exc:  # a failed check here must fail the test
            self.errors.append(exc)
            conn.drop()

    async def _acked(self, conn: FakeConn, round_: int, expected: str) -> None:
        ack = (await conn.get(Ack)).header
        assert isinstance(ack, Ack) and ack.ref is MsgType.AGGREGATE and ack.round == round_, ack
        assert ack.state_hash == expected, (ack.state_hash, expected)

    def _dense(self, round_: int, kind: str, state: TensorDict) -> tuple[Aggregate, bytes]:
        manifest, body = encode_tensors(state, FP32)
        return Aggregate(round=round_, kind=kind, delta=False, contributors=0, manifest=manifest), body

    async def _session(self, conn: FakeConn) -> None:
        hello = (await conn.get()).header
        assert isinstance(hello, Hello)
        conn.put(
            Welcome(
                version=1,
                job_id=self.job_id,
                rounds=self.rounds,
                init_seed=self.init_seed,
                federation=self.federation,
                mixer=self.mixer,
            )
        )
        join = (await conn.get()).header
        assert isinstance(join, Join)
        self.joins.append(join)
        if self.schema is None:
            self.schema = join.adapter
            self.view = init_lora_state(self.schema, self.init_seed)
            self.held = {"row": zeros_state(self.schema), "global": dict(self.view)}
        assert self.schema is not None
        init = init_lora_state(self.schema, self.init_seed)
        conn.put(Ack(ref=MsgType.JOIN, round=self.round, state_hash=self.view_hash()))
        claimed = join.resume.view_hash if join.resume else state_hash(init)
        if claimed != self.view_hash():
            conn.put(*self._dense(self.round - 1, "local", self.view))
            self.resets_sent += 1
            await self._acked(conn, self.round - 1, self.view_hash())
        claimed_row = join.resume.held.get("row") if join.resume else state_hash(zeros_state(self.schema))
        if self.federation == "fedalt" and claimed_row != state_hash(self.held["row"]):
            conn.put(*self._dense(self.round - 1, "row", self.held["row"]))
            await self._acked(conn, self.round - 1, state_hash(self.held["row"]))
        started: set[int] = set()
        while self.round <= self.rounds:
            r = self.round
            if r not in started:
                await asyncio.sleep(self.quiet_s)
                if self.on_round_start is not None:
                    self.on_round_start(r)
                conn.put(RoundStart(round=r, train=TrainSpec(local_steps=1), uplink=self.uplink, deadline_s=60))
            msg = await conn.get(Update)
            upd = msg.header
            assert isinstance(upd, Update) and upd.round == r, upd
            assert upd.base_hash == self.view_hash(), "the client's update applies to another state"
            if r in self.late:
                self.refused.append(r)
                conn.put(Error(code=int(ErrorCode.LATE_UPDATE), message=f"round {r} closed before the update came"))
            else:
                apply = self.drop_after_update.pop(r, None)
                if apply is not False:
                    delta = decode_tensors(expand(upd.manifest, self.schema), msg.body)
                    self.view = {k: v + delta[k] for k, v in self.view.items()}
                    self.accepted.append(r)
                if apply is not None:
                    conn.drop()
                    raise Dropped
            row_round = r
            if r in self.interleave:
                conn.put(Heartbeat(seq=1))
                conn.put(Metrics(round=r, values={"x": 1.0}))
                expected = self._send_aggregate(conn, r)
                if r + 1 <= self.rounds:
                    conn.put(RoundStart(round=r + 1, train=TrainSpec(local_steps=1), uplink=self.uplink, deadline_s=60))
                    started.add(r + 1)
                    if self.on_round_start is not None:
                        self.on_round_start(r + 1)
            if r not in self.late:
                conn.put(Ack(ref=MsgType.UPDATE, round=r, state_hash=self.view_hash()))
            if r not in self.interleave:
                expected = self._send_aggregate(conn, row_round)
            if expected is not None:
                await self._acked(conn, r, expected)
            self.round += 1
            if r in self.drop_after_round:
                conn.drop()
                raise Dropped
            if r in self.silent_after_round:
                self.silent_after_round.discard(r)
                conn.silent = True
                raise Dropped  # the connection stays "open" on the client's side
        conn.put(Bye(reason="job complete"))

    def _send_aggregate(self, conn: FakeConn, r: int) -> str | None:
        """A Rest-of-World that depends on the server's view, as a delta through downlink error feedback."""
        if self.federation != "fedalt":
            return None
        rng = np.random.default_rng(r)
        target = {k: -0.5 * v + 0.01 * rng.standard_normal(v.shape).astype(np.float32) for k, v in self.view.items()}
        held = self.held["row"]
        payload = self.downlink_ef.compress({k: target[k] - held[k] for k in target}, INT8)
        self.held["row"] = {k: held[k] + payload.decoded[k] for k in held}
        conn.put(Aggregate(round=r, kind="row", delta=True, contributors=1, manifest=payload.manifest), payload.body)
        return state_hash(self.held["row"])


SCHEMA = lora_schema(layers=2, dim=16, rank=2)


def make_client(tmp_path: Path, server: FakeServer, learner: SyntheticLearner | None = None, **cfg: Any):
    learner = learner or SyntheticLearner(SCHEMA, seed=3)
    config = ClientConfig(
        client_id="c1",
        tls=TlsFiles(ca=tmp_path / "unused-ca.pem"),
        run_dir=tmp_path / "client",
        backoff_initial_s=0.01,
        backoff_max_s=0.02,
        **cfg,
    )
    return FederatedClient(config, learner, connector=server.connector()), learner


def assert_same(a: TensorDict, b: TensorDict, atol: float = 0.0) -> None:
    assert set(a) == set(b)
    for k in a:
        np.testing.assert_allclose(a[k], b[k], rtol=0, atol=atol, err_msg=k)


async def run(client: FederatedClient, server: FakeServer, timeout: float = 20.0):  # type: ignore[no-untyped-def]
    try:
        return await asyncio.wait_for(client.run(), timeout)
    finally:
        assert not server.errors, server.errors


async def test_a_clean_job_keeps_both_views_equal_and_checkpoints_every_sync(tmp_path: Path) -> None:
    server = FakeServer(rounds=3)
    client, learner = make_client(tmp_path, server)
    result = await run(client, server)
    assert [r.round for r in result.rounds] == [1, 2, 3] and all(r.accepted for r in result.rounds)
    assert result.bye_reason == "job complete" and server.accepted == [1, 2, 3]
    assert client.view_hash == server.view_hash()
    # error feedback: view + residual == local (what compression has not delivered is in the residual)
    local = learner.local_state()
    assert_same({k: client.view[k] + client.ef.residual[k] for k in local}, local, atol=1e-6)
    assert client.ef.residual_norm() > 0  # int8 uplink: something is carried
    assert_same(learner.row_state(), server.held["row"])
    ckpt = StateStore(tmp_path / "client" / "state").load()
    assert ckpt is not None and ckpt.round == 3 and ckpt.view_hash == server.view_hash()
    assert ckpt.held_hashes()["row"] == state_hash(server.held["row"])
    assert_same(ckpt.local, local)
    assert_same(ckpt.residual, client.ef.residual)
    assert server.joins[0].resume is None and server.connections == 1


async def test_late_update_keeps_the_change_and_rolls_back_error_feedback(tmp_path: Path) -> None:
    server = FakeServer(rounds=3)
    server.late = {2}
    client, learner = make_client(tmp_path, server)
    seen: dict[int, tuple[str, TensorDict, TensorDict]] = {}
    server.on_round_start = lambda r: seen.setdefault(r, (client.view_hash, dict(client.ef.residual), client.synced))
    result = await run(client, server)
    assert server.refused == [2] and server.accepted == [1, 3] and client.late_rounds == [2]
    assert [r.accepted for r in result.rounds] == [True, False, True]
    # at the start of round 3 nothing of round 2 had been synced: same view, residual and sync point as before
    view2, residual2, synced2 = seen[2]
    view3, residual3, synced3 = seen[3]
    assert view3 == view2
    assert_same(residual3, residual2)
    assert_same(synced3, synced2)
    assert client.ef.residual_norm() > 0
    # and round 3's update carried round 2's change too: the server's view + our residual is our adapter
    local = learner.local_state()
    assert_same({k: server.view[k] + client.ef.residual[k] for k in local}, local, atol=1e-6)
    assert client.view_hash == server.view_hash()


async def test_late_update_with_fp32_is_delivered_exactly_next_round(tmp_path: Path) -> None:
    server = FakeServer(rounds=2, uplink=FP32)
    server.late = {1}
    client, learner = make_client(tmp_path, server)
    await run(client, server)
    assert learner.trained_rounds == [1, 2] and server.accepted == [2]
    assert_same(server.view, learner.local_state())  # both rounds' training arrived, in round 2's update


async def test_messages_arriving_before_the_update_ack_are_queued_not_fatal(tmp_path: Path) -> None:
    server = FakeServer(rounds=3)
    server.interleave = {1, 2}
    client, learner = make_client(tmp_path, server)
    client.keep_rows = True
    result = await run(client, server)
    assert [r.round for r in result.rounds] == [1, 2, 3] and learner.trained_rounds == [1, 2, 3]
    assert client.view_hash == server.view_hash() and sorted(client.rows_received) == [1, 2, 3]
    assert_same(learner.row_state(), server.held["row"])


@pytest.mark.parametrize("applied", [True, False])
async def test_connection_lost_before_the_update_ack_rejoins_and_settles_by_hash(tmp_path: Path, applied: bool) -> None:
    server = FakeServer(rounds=3)
    server.drop_after_update = {2: applied}
    client, learner = make_client(tmp_path, server)
    result = await run(client, server)
    assert server.connections == 2 and client.joins == 2
    resume = server.joins[1].resume
    assert resume is not None and resume.round == 1  # round 2 was never acknowledged
    if applied:  # the server has our round-2 update but we never heard: it resets us to its copy
        assert server.resets_sent == 1 and client.resets == 1
        assert server.accepted == [1, 2, 2, 3]  # round 2 re-run (retrained) after the rejoin
    else:  # the server never applied it: the states agree and no reset is needed
        assert server.resets_sent == 0 and client.resets == 0
        assert server.accepted == [1, 2, 3]
    assert [r.round for r in result.rounds] == [1, 2, 3]
    assert client.view_hash == server.view_hash()
    local = learner.local_state()
    assert_same({k: client.view[k] + client.ef.residual[k] for k in local}, local, atol=1e-6)


async def test_a_round_handed_again_after_a_lost_update_is_trained_once_from_its_start(tmp_path: Path) -> None:
    """The UPDATE of round 2 never reached the server, which hands round 2 again after the rejoin: the client
    trains it from its state at the round's start, not a second time on top of the first training."""
    server = FakeServer(rounds=3, uplink=EncodingSpec.parse("fp32"))
    server.drop_after_update = {2: False}
    client, learner = make_client(tmp_path, server)
    await run(client, server)
    assert learner.trained_rounds == [1, 2, 2, 3] and server.accepted == [1, 2, 3]
    once = SyntheticLearner(SCHEMA, seed=3)  # the same learner, each round trained exactly once
    once.set_local_state(init_lora_state(SCHEMA, server.init_seed))
    for r in (1, 2, 3):
        once.train(r, TrainSpec(local_steps=1))
    assert_same(learner.local_state(), once.local_state())
    assert_same(server.view, once.local_state(), atol=1e-6)


async def test_connection_lost_between_rounds_rejoins_without_reset(tmp_path: Path) -> None:
    server = FakeServer(rounds=3)
    server.drop_after_round = {1}
    client, learner = make_client(tmp_path, server)
    await run(client, server)
    resume = server.joins[1].resume
    assert resume is not None and resume.round == 1
    assert resume.held["row"] and server.resets_sent == 0 and learner.trained_rounds == [1, 2, 3]
    assert client.view_hash == server.view_hash()


async def test_reconnect_gives_up_after_consecutive_failures(tmp_path: Path) -> None:
    server = FakeServer(rounds=3)
    server.drop_after_round = {1}
    client, _ = make_client(tmp_path, server, connect_attempts=3)
    server.on_round_start = lambda r: setattr(server, "down", True)  # once round 1 ends it never comes back
    with pytest.raises(TransportError):
        await run(client, server)
    assert server.connections == 1 and client.joins == 1


@pytest.mark.parametrize("code", [ErrorCode.CERTIFICATE, ErrorCode.IDENTITY_MISMATCH])
async def test_refused_identity_after_joining_is_final(tmp_path: Path, code: ErrorCode) -> None:
    server = FakeServer(rounds=3)
    server.drop_after_round = {1}
    server.on_round_start = lambda r: setattr(server, "refuse", code)  # refuses every later connection
    client, _ = make_client(tmp_path, server, connect_attempts=50)
    with pytest.raises(TransportError) as info:
        await run(client, server)
    assert info.value.code is code


def test_what_is_retried() -> None:
    assert is_retryable(TransportError("lost"))
    assert is_retryable(TransportError("timeout", code=ErrorCode.TIMEOUT))
    assert is_retryable(RemoteError("stopping", code=ErrorCode.SHUTTING_DOWN))
    for code in (ErrorCode.CERTIFICATE, ErrorCode.IDENTITY_MISMATCH, ErrorCode.SCHEMA_MISMATCH):
        assert not is_retryable(TransportError("refused", code=code))
        assert not is_retryable(RemoteError("refused", code=code))
    assert not is_retryable(RemoteError("bad", code=ErrorCode.CONFLICTING_UPDATE))
    assert not is_retryable(ValueError("bug"))


async def test_restart_from_checkpoint_resumes_without_retraining(tmp_path: Path) -> None:
    server = FakeServer(rounds=4)
    server.drop_after_round = {2}
    first, learner1 = make_client(tmp_path, server, connect_attempts=1)
    # the process "dies" after round 2: its connection drops and it makes no further attempt
    with pytest.raises(TransportError):
        await run(first, server)
    assert learner1.trained_rounds == [1, 2]

    learner2 = SyntheticLearner(SCHEMA, seed=3)  # a new process: a fresh learner at the shared init
    second, _ = make_client(tmp_path, server, learner=learner2)
    result = await run(second, server)
    assert second.resumed_from_checkpoint == 2 and server.resets_sent == 0
    resume = server.joins[-1].resume
    assert resume is not None and resume.round == 2 and resume.view_hash == first.view_hash
    assert learner2.trained_rounds == [3, 4] and [r.round for r in result.rounds] == [3, 4]
    assert second.view_hash == server.view_hash()
    # the restored adapter continued exactly where the first process stopped: same residual bookkeeping
    local = learner2.local_state()
    assert_same({k: second.view[k] + second.ef.residual[k] for k in local}, local, atol=1e-6)


async def test_lost_checkpoint_is_repaired_by_the_servers_reset(tmp_path: Path) -> None:
    server = FakeServer(rounds=3)
    server.drop_after_round = {1}
    first, _ = make_client(tmp_path, server, connect_attempts=1, checkpoint=False)
    with pytest.raises(TransportError):
        await run(first, server)
    learner2 = SyntheticLearner(SCHEMA, seed=3)
    second, _ = make_client(tmp_path, server, learner=learner2, checkpoint=False)
    await run(second, server)
    assert server.joins[-1].resume is None  # nothing to resume from
    assert server.resets_sent == 1 and second.resets == 1  # the server's copy of round 1 and its RoW came back
    assert second.view_hash == server.view_hash()
    assert_same(learner2.row_state(), server.held["row"])


async def test_checkpoint_of_another_job_is_ignored(tmp_path: Path) -> None:
    server = FakeServer(rounds=1)
    first, _ = make_client(tmp_path, server)
    await run(first, server)
    other = FakeServer(rounds=1)
    other.job_id = "job-2"
    second, _ = make_client(tmp_path, other)
    await run(second, other)
    assert second.resumed_from_checkpoint is None and other.joins[0].resume is None
    assert StateStore(tmp_path / "client" / "state").load().job_id == "job-2"  # type: ignore[union-attr]


async def test_a_new_job_on_rejoin_is_refused(tmp_path: Path) -> None:
    server = FakeServer(rounds=3)
    server.drop_after_round = {1}
    client, _ = make_client(tmp_path, server)
    server.on_round_start = lambda r: setattr(server, "job_id", "job-other")  # seen by the rejoin
    with pytest.raises(JobError):
        await run(client, server)


async def test_a_silently_dead_server_is_detected_by_heartbeats_and_left(tmp_path: Path) -> None:
    server = FakeServer(rounds=3)
    server.silent_after_round = {1}
    client, learner = make_client(tmp_path, server, heartbeat_s=0.05, liveness_timeout_s=0.3)
    result = await run(client, server, timeout=10)
    assert client.joins == 2 and server.joins[1].resume is not None and server.joins[1].resume.round == 1
    assert [r.round for r in result.rounds] == [1, 2, 3] and learner.trained_rounds == [1, 2, 3]
    assert client.view_hash == server.view_hash()


async def test_a_live_but_quiet_server_is_not_left(tmp_path: Path) -> None:
    server = FakeServer(rounds=2)
    server.quiet_s = 0.5  # long silences before each round, on a connection that acknowledges everything
    conns: list[FakeConn] = []
    connect = server.connector()

    @contextlib.asynccontextmanager
    async def spy(cfg: ClientConfig) -> AsyncIterator[FakeConn]:
        async with connect(cfg) as conn:
            conns.append(conn)
            yield conn

    client = FederatedClient(
        ClientConfig(
            client_id="c1",
            tls=TlsFiles(ca=tmp_path / "ca.pem"),
            run_dir=tmp_path / "client",
            heartbeat_s=0.02,
            liveness_timeout_s=0.05,
        ),
        SyntheticLearner(SCHEMA, seed=3),
        connector=spy,
    )
    await run(client, server)
    assert client.joins == 1 and len(conns) == 1
    assert conns[0].heartbeats >= 10  # it kept probing through the silences


@pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning")
async def test_peft_learner_restarts_from_its_checkpoint_with_adapters_and_mixers(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    from fedquic.client.peft_learner import PeftLearner, PeftLearnerConfig

    def learner() -> PeftLearner:
        cfg = PeftLearnerConfig(model_path=tiny_model_dir, task="reverse", num_examples=40, threads=1, progress=False)
        return PeftLearner(cfg)

    server = FakeServer(rounds=3)
    server.mixer = "learned"
    server.drop_after_round = {2}  # round 1 leaves the routers at zero (B = 0, RoW = 0: no gradient); round 2 not
    first_learner = await asyncio.to_thread(learner)
    first = FederatedClient(
        ClientConfig(client_id="c1", tls=TlsFiles(ca=tmp_path / "ca.pem"), run_dir=tmp_path / "c", connect_attempts=1),
        first_learner,
        connector=server.connector(),
    )
    with pytest.raises(TransportError):
        await run(first, server, timeout=120)
    fam1 = first_learner.fam
    assert fam1 is not None
    mixer1 = fam1.mixer_state()
    # the router weights start at zero: trained away from it
    assert any(np.abs(v).sum() > 0 for k, v in mixer1.items() if k.endswith(".router.weight"))

    second_learner = await asyncio.to_thread(learner)
    second = FederatedClient(
        ClientConfig(client_id="c1", tls=TlsFiles(ca=tmp_path / "ca.pem"), run_dir=tmp_path / "c"),
        second_learner,
        connector=server.connector(),
    )
    restored: dict[str, TensorDict] = {}

    def capture(r: int) -> None:  # round 3 starts: the second process restored but has not trained yet
        fam = second_learner.fam
        assert fam is not None
        restored.update(local=fam.local_state(), row=fam.row_state(), mixer=fam.mixer_state())

    server.on_round_start = capture
    result = await run(second, server, timeout=120)
    assert second.resumed_from_checkpoint == 2 and server.resets_sent == 0
    assert_same(restored["local"], fam1.local_state())
    assert_same(restored["row"], fam1.row_state())
    assert_same(restored["mixer"], mixer1)
    assert [r.round for r in result.rounds] == [3] and second.view_hash == server.view_hash()
    assert {"loss_eval", "acc_exact"} <= set(result.rounds[0].metrics)  # held-out metrics in the round's metrics


def test_non_finite_metrics_are_left_out_of_metrics_messages() -> None:
    """A NaN loss used to go out as JSON null: the server refused the header and closed the connection."""
    from fedquic.client.results import finite_metrics
    from fedquic.common.messages import Metrics
    from fedquic.transport.framing import FrameDecoder, encode_frame

    values = {"loss_before": float("nan"), "loss_after": 0.5, "grad_norm": float("inf")}
    [msg] = FrameDecoder().feed(encode_frame(Metrics(round=1, values=finite_metrics(values))))
    assert msg.header.values == {"loss_after": 0.5}
    with pytest.raises(Exception, match="BAD_HEADER"):
        FrameDecoder().feed(encode_frame(Metrics(round=1, values=values)))  # what the client sent before
