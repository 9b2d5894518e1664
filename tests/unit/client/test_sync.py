"""SyncedAdapter on small numpy states: fresh start, preparing, committing and rolling back an UPDATE, the round's
start for a retrain, installing each kind of AGGREGATE, and the checkpoint round trip."""

from __future__ import annotations

import numpy as np
import pytest
from fedquic.client.sync import SyncedAdapter
from fedquic.common.adapter import TensorDict, init_lora_state, state_hash, zeros_state
from fedquic.common.codec import EncodingSpec, encode_tensors, expand
from fedquic.common.errors import ConfigError, ErrorCode, ProtocolError
from fedquic.common.limits import WireLimits
from fedquic.common.messages import Aggregate, TrainSpec, Welcome

from testkit.synthetic import SyntheticLearner, lora_schema

SCHEMA = lora_schema(layers=1, dim=8, rank=2)
JOB = Welcome(version=1, job_id="job-1", rounds=3, init_seed=7)
INT8 = EncodingSpec.parse("int8")
FP32 = EncodingSpec.parse("fp32")
SPEC = TrainSpec(local_steps=1)


def fresh(job: Welcome = JOB) -> tuple[SyncedAdapter, SyntheticLearner]:
    learner = SyntheticLearner(SCHEMA, seed=3)
    learner.attach(job)
    sync = SyncedAdapter(learner, "c1")  # type: ignore[arg-type]
    sync.job, sync.schema = job, SCHEMA
    sync.fresh(job, SCHEMA)
    return sync, learner


def same(a: TensorDict, b: TensorDict, atol: float = 0.0) -> None:
    assert set(a) == set(b)
    for k in a:
        np.testing.assert_allclose(a[k], b[k], rtol=0, atol=atol, err_msg=k)


def aggregate(kind: str, state: TensorDict, *, delta: bool = False, round_: int = 1) -> tuple[Aggregate, bytes]:
    manifest, body = encode_tensors(state, FP32)
    return Aggregate(round=round_, kind=kind, delta=delta, contributors=1, manifest=manifest), body


def install(sync: SyncedAdapter, h: Aggregate, body: bytes) -> tuple[TensorDict, bool]:
    _, decoded = sync.decode(h, body, WireLimits())
    return sync.install(h, decoded)


def trained_round(sync: SyncedAdapter, learner: SyntheticLearner, r: int, uplink: EncodingSpec = INT8):  # type: ignore[no-untyped-def]
    start = sync.begin_round(r)
    learner.train(r, SPEC)
    return sync.prepare_update(r, uplink, start)


def test_a_fresh_start_is_the_shared_init_and_a_learner_elsewhere_is_refused() -> None:
    sync, _ = fresh()
    init = init_lora_state(SCHEMA, JOB.init_seed)
    same(sync.view, init)
    same(sync.synced, init)
    same(sync.held["global"], init)
    same(sync.held["row"], zeros_state(SCHEMA))
    assert sync.view_hash == state_hash(init) and sync.base_pending and sync.ef.residual == {}
    state = sync.sync_state()
    assert state.round == 0 and state.view_hash == sync.view_hash
    assert state.held == {"global": state_hash(init), "row": state_hash(zeros_state(SCHEMA))}
    learner = SyntheticLearner(SCHEMA, seed=3)
    learner.set_local_state({k: v + 1 for k, v in init.items()})
    with pytest.raises(ConfigError):
        SyncedAdapter(learner, "c1").fresh(JOB, SCHEMA)  # type: ignore[arg-type]


def test_prepare_then_commit_moves_view_and_sync_point_and_keeps_view_plus_residual_equal_to_local() -> None:
    sync, learner = fresh()
    base_hash = sync.view_hash
    prepared = trained_round(sync, learner, 1)
    assert prepared.header.base_hash == base_hash and prepared.header.round == 1
    assert expand(prepared.header.manifest, SCHEMA).tensors  # compact on the wire, full once expanded
    assert sync.view_hash == base_hash  # nothing moves before the ACK
    sync.commit(prepared, state_hash(prepared.new_view))
    local = learner.local_state()
    assert sync.view_hash == state_hash(prepared.new_view) and sync.synced_round == 1 and not sync.base_pending
    same(sync.synced, local)
    same({k: sync.view[k] + sync.ef.residual[k] for k in local}, local, atol=1e-6)
    assert sync.ef.residual_norm() > 0  # int8 dropped something, carried in the residual


def test_a_commit_acknowledged_with_another_hash_is_a_conflict() -> None:
    sync, learner = fresh()
    prepared = trained_round(sync, learner, 1)
    with pytest.raises(ProtocolError) as info:
        sync.commit(prepared, "ab" * 16)
    assert info.value.code is ErrorCode.CONFLICTING_UPDATE and sync.synced_round == 0


def test_roll_back_keeps_view_and_synced_and_restores_the_residual() -> None:
    sync, learner = fresh()
    sync.commit(p1 := trained_round(sync, learner, 1), state_hash(trained_view := p1.new_view))
    residual, view_hash, synced = sync.ef.residual, sync.view_hash, sync.synced
    p2 = trained_round(sync, learner, 2)
    assert sync.ef.residual is not residual
    sync.roll_back(p2)
    assert sync.ef.residual is p2.residual_before and sync.view_hash == view_hash == state_hash(trained_view)
    same(sync.ef.residual, residual)
    assert sync.synced is synced and sync.unacked is None
    # the refused round's change is in the next delta: local - synced covers rounds 2 and 3
    p3 = trained_round(sync, learner, 3)
    sync.commit(p3, state_hash(p3.new_view))
    local = learner.local_state()
    same({k: sync.view[k] + sync.ef.residual[k] for k in local}, local, atol=1e-6)


def test_an_abandoned_round_handed_again_is_retrained_from_its_start() -> None:
    sync, learner = fresh()
    at_start = learner.local_state()
    p1 = trained_round(sync, learner, 1)
    sync.abandon(p1)
    assert sync.unacked is p1.start and sync.ef.residual is p1.residual_before
    again = sync.begin_round(1)  # handed again: the learner is put back where round 1 began
    assert sync.unacked is None
    same(learner.local_state(), at_start)
    same(again.local, at_start)


def test_an_abandoned_round_is_not_rolled_back_for_another_round() -> None:
    sync, learner = fresh()
    p1 = trained_round(sync, learner, 1)
    trained = learner.local_state()
    sync.abandon(p1)
    sync.begin_round(2)  # the server moved on: keep the training, it goes into round 2's delta
    same(learner.local_state(), trained)
    assert sync.unacked is None


def test_installing_a_row_delta_adds_to_what_is_held() -> None:
    sync, learner = fresh()
    change = {k: np.full(v.shape, 0.25, np.float32) for k, v in zeros_state(SCHEMA).items()}
    state, reset = install(sync, *aggregate("row", change, delta=True, round_=2))
    assert not reset and sync.synced_round == 2
    same(state, change)
    state, _ = install(sync, *aggregate("row", change, delta=True, round_=3))
    same(state, {k: 2 * v for k, v in change.items()})
    same(sync.held["row"], state)
    same(learner.row_state(), state)


def test_installing_a_global_aggregate_replaces_the_adapter_view_and_sync_point() -> None:
    sync, learner = fresh(JOB.model_copy(update={"federation": "fedavg"}))
    sync.abandon(trained_round(sync, learner, 1))
    target = {k: v + 0.5 for k, v in init_lora_state(SCHEMA, JOB.init_seed).items()}
    state, reset = install(sync, *aggregate("global", target))
    assert not reset and sync.view_hash == state_hash(target) and sync.unacked is None
    same(state, target)
    same(sync.held["global"], target)
    same(learner.local_state(), target)
    same(sync.synced, target)


def test_a_local_reset_adopts_the_servers_copy_and_clears_the_residual() -> None:
    sync, learner = fresh()
    p1 = trained_round(sync, learner, 1)
    sync.commit(p1, state_hash(p1.new_view))
    sync.abandon(trained_round(sync, learner, 2))
    assert sync.ef.residual and sync.unacked is not None
    server = {k: v + 1.0 for k, v in init_lora_state(SCHEMA, JOB.init_seed).items()}
    h, body = aggregate("local", server, round_=0)  # a rejoin's reset carries the server's round counter
    state, reset = install(sync, h, body)
    assert reset and sync.view_hash == state_hash(server) and sync.ef.residual == {} and sync.unacked is None
    assert sync.synced_round == 1  # max(sync round, the reset's round)
    same(learner.local_state(), server)
    same(sync.synced, server)
    assert sync.synced is not state  # a copy: the sync point does not alias the view
    learner.train(3, SPEC)
    trained = learner.local_state()
    _, again = install(sync, h, body)  # we already agree: our unsent progress stays
    assert not again
    same(learner.local_state(), trained)


def test_a_local_delta_is_refused() -> None:
    sync, _ = fresh()
    with pytest.raises(ProtocolError) as info:
        install(sync, *aggregate("local", zeros_state(SCHEMA), delta=True))
    assert info.value.code is ErrorCode.BAD_HEADER


def test_a_local_job_sends_no_tensors_and_keeps_its_view() -> None:
    sync, learner = fresh(JOB.model_copy(update={"federation": "local"}))
    view, synced = sync.view_hash, sync.synced
    prepared = trained_round(sync, learner, 1)
    assert prepared.body == b"" and prepared.manifest.tensors == ()
    sync.commit(prepared, view)
    assert sync.view_hash == view and sync.synced is synced and sync.synced_round == 1


def test_snapshot_and_restore_round_trip() -> None:
    sync, learner = fresh()
    p1 = trained_round(sync, learner, 1)
    sync.commit(p1, state_hash(p1.new_view))
    install(sync, *aggregate("row", {k: np.ones(v.shape, np.float32) for k, v in zeros_state(SCHEMA).items()}))
    ckpt = sync.snapshot()
    assert ckpt.round == 1 and ckpt.view_hash == sync.view_hash and ckpt.client_id == "c1"
    other = SyncedAdapter(SyntheticLearner(SCHEMA, seed=3), "c1")  # type: ignore[arg-type]
    assert other.foreign(ckpt, JOB, SCHEMA) == []
    assert other.foreign(ckpt, JOB.model_copy(update={"job_id": "job-2"}), SCHEMA) == ["job id 'job-1' != 'job-2'"]
    other.restore(ckpt, JOB, SCHEMA)
    assert other.view_hash == sync.view_hash and other.synced_round == 1 and other.sync_state() == sync.sync_state()
    same(other.learner.local_state(), learner.local_state())
    same(other.ef.residual, sync.ef.residual)
    same(other.learner.row_state(), sync.held["row"])  # type: ignore[attr-defined]
