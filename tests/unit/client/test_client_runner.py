"""The client's network loop against the real server, in memory (testkit.memory: the server's job, sessions and
round closes, its clock fake) through a link with faults (testkit.memory_link), no QUIC: rejoin and reset, late
updates, message ordering, reconnect after joining, and resuming from the on-disk checkpoint.

The server keeps its own copy of the client's adapter (it decodes every UPDATE and adds it), so every check
compares two independently maintained states. A scripted second participant (a phantom, uploading after the
client each round) makes every round close with two contributors, so that the client is sent a Rest-of-World.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from fedquic.client.config import ClientConfig
from fedquic.client.reconnect import LATE_CODES, is_retryable
from fedquic.client.runner import FederatedClient
from fedquic.client.state import StateStore
from fedquic.common.adapter import TensorDict, init_lora_state, state_hash
from fedquic.common.codec import EncodingSpec
from fedquic.common.errors import ErrorCode, JobError, RemoteError, TransportError
from fedquic.common.messages import Aggregate, Error, Header, Heartbeat, Join, Metrics, MsgType, RoundStart, TrainSpec
from fedquic.server.config import JobConfig, ServerConfig
from fedquic.server.job import KINDS
from fedquic.server.rounds import RoundPolicy
from fedquic.transport.settings import TlsFiles

from testkit.memory import MemoryServer
from testkit.memory_link import LinkFaults, MemoryLink, MemoryPeer, on
from testkit.synthetic import SyntheticLearner, lora_schema

FP32 = EncodingSpec.parse("fp32")
INT8 = EncodingSpec.parse("int8")
_RUN_DIRS = itertools.count()


def _knob(apply: Callable[[Any, Any], None]) -> property:
    """A setting of the fake server this file once had, kept by name: setting it adds link faults."""
    name = apply.__name__

    def set_(self: Any, value: Any) -> None:
        self.__dict__[name] = value
        apply(self, value)

    return property(lambda self: self.__dict__.get(name), set_, doc=apply.__doc__)


class Server:
    """The real server of a job for client ``c1`` and a phantom co-participant, read the way the fake server this
    file once had was: its settings map onto link faults, its bookkeeping is read from the link (what crossed it)
    and the server's records. The records are on disk, so its state survives dropped connections (as a restarted
    real server's does); a new job id is a new server for the connections from then on."""

    def __init__(self, tmp_path: Path, rounds: int, *, federation: str = "fedalt", uplink: EncodingSpec = INT8) -> None:
        self.root, self.rounds, self.federation, self.uplink = tmp_path, rounds, federation, uplink
        self.init_seed = 7
        self._job_id, self._mixer = "job-1", "fixed"
        self.faults = LinkFaults()  # shared by every server of this object: a fault set before a job change holds
        self.on_round_start: Callable[[int], None] | None = None  # as c1 takes each ROUND_START
        self.links: list[MemoryLink] = []
        self._start()

    def _start(self) -> None:
        job = JobConfig(
            job_id=self._job_id,
            init_seed=self.init_seed,
            federation=self.federation,  # type: ignore[arg-type]
            mixer=self._mixer,  # type: ignore[arg-type]
            uplink=self.uplink,
            downlink=INT8,
            train=TrainSpec(local_steps=1),
        )
        cfg = ServerConfig(
            tls=TlsFiles(ca=self.root / "unused-ca.pem"),
            run_dir=self.root / f"server-{next(_RUN_DIRS)}",
            policy=RoundPolicy(rounds=self.rounds, min_clients=2, round_timeout_s=60),
            job=job,
        )
        self.srv = MemoryServer(cfg)
        self.link = self.srv.link(self.faults)
        self.link.phantom("phantom", follow="c1")  # registers after c1's first JOIN, uploads after its UPDATEs
        self.link.on_recv.append(self._received)
        self.links.append(self.link)

    def connector(self) -> Callable[[ClientConfig], contextlib.AbstractAsyncContextManager[Any]]:
        @contextlib.asynccontextmanager
        async def connect(cfg: ClientConfig) -> AsyncIterator[MemoryPeer]:
            async with self.link.connector()(cfg) as peer:  # the server of the job at this connect
                yield peer

        return connect

    def _received(self, peer: MemoryPeer, msg: Any) -> None:
        if isinstance(msg.header, RoundStart) and peer.client_id == "c1" and self.on_round_start is not None:
            self.on_round_start(msg.header.round)

    # -- settings -------------------------------------------------------------------------------------------

    @property
    def job_id(self) -> str:
        return self._job_id

    @job_id.setter
    def job_id(self, job_id: str) -> None:
        self._job_id = job_id
        self._start()

    @property
    def mixer(self) -> str:
        return self._mixer

    @mixer.setter
    def mixer(self, mixer: str) -> None:
        assert not self.link.connections, "the job's terms are set before anyone connects"
        self._mixer = mixer
        self._start()

    @property
    def down(self) -> bool:
        return self.faults.down

    @down.setter
    def down(self, down: bool) -> None:
        self.faults.down = down  # no answer to new connections

    @property
    def refuse(self) -> ErrorCode | None:
        return self.faults.refuse

    @refuse.setter
    def refuse(self, code: ErrorCode | None) -> None:
        self.faults.refuse = code  # new connections refused with this code

    @_knob
    def late(self, rounds: set[int]) -> None:
        """These rounds close without c1: its UPLOAD_REQUEST comes after the deadline and is refused as late (the
        round closes with the phantom alone; c1, inactive for its miss, is active again with that request)."""
        for r in rounds:
            self.faults.late(r, client_id="c1")

    @_knob
    def drop_after_update(self, rounds: dict[int, bool]) -> None:
        """round -> the connection drops after c1's UPDATE, which the server applied (True) or never got."""
        for r, applied in rounds.items():
            self.faults.drop_after(MsgType.UPDATE, r, deliver=applied, client_id="c1")

    @_knob
    def drop_after_round(self, rounds: set[int]) -> None:
        """The connection drops once c1 acknowledged the round's aggregate (the next ROUND_START is lost)."""
        for r in rounds:
            self.faults.drop_after(MsgType.ACK, r, client_id="c1")

    @_knob
    def silent_after_round(self, rounds: set[int]) -> None:
        """The server's end goes silent once c1 acknowledged the round's aggregate (it stays open there)."""
        for r in rounds:
            self.faults.silence_after(MsgType.ACK, r, client_id="c1")

    @_knob
    def quiet_s(self, seconds: float) -> None:
        """Silence before each ROUND_START reaches c1."""
        self.faults.delay_s[MsgType.ROUND_START] = seconds

    @_knob
    def interleave(self, rounds: set[int]) -> None:
        """HEARTBEAT, METRICS, the round's AGGREGATE and the next ROUND_START reach c1 before its UPDATE's ACK."""
        for r in rounds:
            ack = on(MsgType.ACK, r, ref=MsgType.UPDATE)
            self.faults.add(on(MsgType.UPDATE, r), before=lambda p, a=ack: p.hold(a), after=_interleave, client_id="c1")

    # -- what happened --------------------------------------------------------------------------------------

    def _seen(self, direction: str) -> list[Header]:
        return [h for link in self.links for d, cid, h in link.log if d == direction and cid == "c1"]

    @property
    def joins(self) -> list[Join]:
        return [h for h in self._seen("up") if isinstance(h, Join)]

    @property
    def connections(self) -> int:
        return sum(link.connections for link in self.links)

    @property
    def resets_sent(self) -> int:
        return sum(isinstance(h, Aggregate) and h.kind == "local" and not h.delta for h in self._seen("down"))

    @property
    def accepted(self) -> list[int]:
        """The rounds whose UPDATE the server applied, in order (its durable record of c1)."""
        rec = self.srv.job.records.get("c1")
        return list(rec.disk.updates) if rec is not None else []

    @property
    def refused(self) -> list[int]:
        return [r for link in self.links for cid, r, code in link.refusals if cid == "c1" and code in LATE_CODES]

    @property
    def errors(self) -> list[Header]:
        """ERRORs the server sent c1 that no test asked for (a refused update applying to another state...)."""
        return [h for h in self._seen("down") if isinstance(h, Error) and ErrorCode(h.code) not in LATE_CODES]

    def view_hash(self) -> str:
        return self.srv.job.records["c1"].view_hash

    @property
    def view(self) -> TensorDict:
        return self._state(None)

    @property
    def held(self) -> dict[str, TensorDict]:
        return {kind: self._state(kind) for kind in KINDS}

    def _state(self, kind: str | None) -> TensorDict:
        """c1's adapter (or what it holds of ``kind``) in the server's record, from disk once it left."""
        job = self.srv.job
        rec = job.records["c1"]
        if rec.loaded:
            return rec.view if kind is None else rec.held[kind]  # type: ignore[index,return-value]
        name = rec.disk.view_file if kind is None else rec.disk.held_files.get(kind)  # type: ignore[arg-type]
        if name:
            return job.store.read_tensors("c1", name)
        return dict(job.init_state) if kind is None else job.default_held(kind)  # type: ignore[arg-type]


def _interleave(peer: MemoryPeer) -> None:
    """After c1's UPDATE: its ACK is held while the close waits out its ACK wait (c1 cannot acknowledge the
    aggregate it queued) and the next round starts; a HEARTBEAT and a METRICS go first."""
    r = peer.sent[-1].header.round  # type: ignore[attr-defined]
    peer.inject(Heartbeat(seq=1), Metrics(round=r, values={"x": 1.0}), first=True)
    peer.link.advance(peer.link.srv.cfg.policy.round_timeout_s + 1)
    peer.release()


SCHEMA = lora_schema(layers=2, dim=16, rank=2)


def make_client(tmp_path: Path, server: Server, learner: SyntheticLearner | None = None, **cfg: Any):
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


async def run(client: FederatedClient, server: Server, timeout: float = 20.0):  # type: ignore[no-untyped-def]
    try:
        return await asyncio.wait_for(client.run(), timeout)
    finally:
        assert not server.errors, server.errors


async def test_a_clean_job_keeps_both_views_equal_and_checkpoints_every_sync(tmp_path: Path) -> None:
    server = Server(tmp_path, rounds=3)
    client, learner = make_client(tmp_path, server)
    result = await run(client, server)
    assert [r.round for r in result.rounds] == [1, 2, 3] and all(r.accepted for r in result.rounds)
    # The real server's BYE names the rounds (the fake server's said "job complete"); the client keeps it as said.
    assert result.bye_reason == "job complete after 3 rounds" and server.accepted == [1, 2, 3]
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
    server = Server(tmp_path, rounds=3)
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
    server = Server(tmp_path, rounds=2, uplink=FP32)
    server.late = {1}
    client, learner = make_client(tmp_path, server)
    await run(client, server)
    assert learner.trained_rounds == [1, 2] and server.accepted == [2]
    assert_same(server.view, learner.local_state())  # both rounds' training arrived, in round 2's update


async def test_messages_arriving_before_the_update_ack_are_queued_not_fatal(tmp_path: Path) -> None:
    server = Server(tmp_path, rounds=3)
    server.interleave = {1, 2}
    client, learner = make_client(tmp_path, server)
    client.keep_rows = True
    result = await run(client, server)
    assert [r.round for r in result.rounds] == [1, 2, 3] and learner.trained_rounds == [1, 2, 3]
    assert client.view_hash == server.view_hash() and sorted(client.rows_received) == [1, 2, 3]
    assert_same(learner.row_state(), server.held["row"])


@pytest.mark.parametrize("applied", [True, False])
async def test_connection_lost_before_the_update_ack_rejoins_and_settles_by_hash(tmp_path: Path, applied: bool) -> None:
    server = Server(tmp_path, rounds=3)
    server.drop_after_update = {2: applied}
    client, learner = make_client(tmp_path, server)
    result = await run(client, server)
    assert server.connections == 2 and client.joins == 2
    resume = server.joins[1].resume
    assert resume is not None and resume.round == 1  # round 2 was never acknowledged
    if applied:  # the server has our round-2 update but we never heard: it resets us to its copy
        assert server.resets_sent == 1 and client.resets == 1
        # A real server never hands a round again to a client whose update for it it applied (server/rounds.py
        # resumes a round only for a client not in `received`): round 2's update counts once, through the reset,
        # and the client's round log has no round 2 (the fake server re-ran it: accepted [1, 2, 2, 3], rounds
        # [1, 2, 3]).
        assert server.accepted == [1, 2, 3]
        assert [r.round for r in result.rounds] == [1, 3]
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
    server = Server(tmp_path, rounds=3, uplink=EncodingSpec.parse("fp32"))
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
    server = Server(tmp_path, rounds=3)
    server.drop_after_round = {1}
    client, learner = make_client(tmp_path, server)
    await run(client, server)
    resume = server.joins[1].resume
    assert resume is not None and resume.round == 1
    assert resume.held["row"] and server.resets_sent == 0 and learner.trained_rounds == [1, 2, 3]
    assert client.view_hash == server.view_hash()


async def test_reconnect_gives_up_after_consecutive_failures(tmp_path: Path) -> None:
    server = Server(tmp_path, rounds=3)
    server.drop_after_round = {1}
    client, _ = make_client(tmp_path, server, connect_attempts=3)
    server.on_round_start = lambda r: setattr(server, "down", True)  # once round 1 ends it never comes back
    with pytest.raises(TransportError):
        await run(client, server)
    assert server.connections == 1 and client.joins == 1


@pytest.mark.parametrize("code", [ErrorCode.CERTIFICATE, ErrorCode.IDENTITY_MISMATCH])
async def test_refused_identity_after_joining_is_final(tmp_path: Path, code: ErrorCode) -> None:
    server = Server(tmp_path, rounds=3)
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
    server = Server(tmp_path, rounds=4)
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
    server = Server(tmp_path, rounds=3)
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
    server = Server(tmp_path, rounds=1)
    first, _ = make_client(tmp_path, server)
    await run(first, server)
    other = Server(tmp_path, rounds=1)
    other.job_id = "job-2"
    second, _ = make_client(tmp_path, other)
    await run(second, other)
    assert second.resumed_from_checkpoint is None and other.joins[0].resume is None
    assert StateStore(tmp_path / "client" / "state").load().job_id == "job-2"  # type: ignore[union-attr]


async def test_a_new_job_on_rejoin_is_refused(tmp_path: Path) -> None:
    server = Server(tmp_path, rounds=3)
    server.drop_after_round = {1}
    client, _ = make_client(tmp_path, server)
    server.on_round_start = lambda r: setattr(server, "job_id", "job-other")  # seen by the rejoin
    with pytest.raises(JobError):
        await run(client, server)


async def test_a_silently_dead_server_is_detected_by_heartbeats_and_left(tmp_path: Path) -> None:
    server = Server(tmp_path, rounds=3)
    server.silent_after_round = {1}
    client, learner = make_client(tmp_path, server, heartbeat_s=0.05, liveness_timeout_s=0.3)
    result = await run(client, server, timeout=10)
    assert client.joins == 2 and server.joins[1].resume is not None and server.joins[1].resume.round == 1
    assert [r.round for r in result.rounds] == [1, 2, 3] and learner.trained_rounds == [1, 2, 3]
    assert client.view_hash == server.view_hash()


async def test_a_live_but_quiet_server_is_not_left(tmp_path: Path) -> None:
    server = Server(tmp_path, rounds=2)
    server.quiet_s = 0.5  # long silences before each round, on a connection that acknowledges everything
    conns: list[MemoryPeer] = []
    connect = server.connector()

    @contextlib.asynccontextmanager
    async def spy(cfg: ClientConfig) -> AsyncIterator[MemoryPeer]:
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

    server = Server(tmp_path, rounds=3)
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
