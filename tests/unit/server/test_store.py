"""The durable store: atomic commits, stale files removed, a torn write never replaces a committed record."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from fedquic.common.adapter import AdapterSchema, state_hash
from fedquic.common.errors import ConfigError
from fedquic.server.rounds import Phase, RoundSnapshot
from fedquic.server.store import ClientRecordOnDisk, JobRecord, ServerStore


def state(seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        "l.lora_A.weight": rng.standard_normal((2, 4), dtype=np.float32),
        "l.lora_B.weight": np.zeros((4, 2), np.float32),
    }


def test_job_record_round_trips(tmp_path: Path) -> None:
    store = ServerStore(tmp_path)
    assert store.load_job() is None
    rec = JobRecord(
        job_id="j",
        adapter=AdapterSchema.from_state(state(0)),
        base_fingerprint="ab12",
        round=RoundSnapshot(round=3, phase=Phase.TRAINING, sampled=("a", "b")),
    )
    store.save_job(rec)
    assert store.load_job() == rec
    (tmp_path / "job.json").write_text('{"format": 99, "job_id": "j"}')
    with pytest.raises(ConfigError, match="format 99"):
        store.load_job()
    (tmp_path / "job.json").write_text("[]")
    with pytest.raises(ConfigError, match="not a fedquic server state"):
        store.load_job()


def test_commit_writes_tensors_then_record_and_drops_stale_files(tmp_path: Path) -> None:
    store = ServerStore(tmp_path)
    s1, s2 = state(1), state(2)
    r1 = ClientRecordOnDisk(
        client_id="c1", view_hash=state_hash(s1), view_file="view-u1.safetensors", updates={1: "aa"}
    )
    store.commit(r1, {"view-u1.safetensors": s1}, None)
    r2 = r1.model_copy(
        update={"view_hash": state_hash(s2), "view_file": "view-u2.safetensors", "updates": {1: "aa", 2: "bb"}}
    )
    store.commit(r2, {"view-u2.safetensors": s2}, r1)
    assert store.client_ids() == ["c1"]
    back = store.load_client("c1")
    assert back == r2 and back.updates == {1: "aa", 2: "bb"}  # int keys survive JSON
    got = store.read_tensors("c1", back.view_file)
    assert state_hash(got) == state_hash(s2)
    files = sorted(p.name for p in (tmp_path / "clients" / "c1").iterdir())
    assert files == ["meta.json", "view-u2.safetensors"]  # the superseded view is gone


def test_a_crash_before_the_record_is_renamed_leaves_the_previous_commit(tmp_path: Path) -> None:
    store = ServerStore(tmp_path)
    s1 = state(1)
    r1 = ClientRecordOnDisk(client_id="c1", view_hash=state_hash(s1), view_file="view-u1.safetensors")
    store.commit(r1, {"view-u1.safetensors": s1}, None)
    d = tmp_path / "clients" / "c1"
    # What a kill -9 in the middle of the next commit leaves: a new tensor file and a half-written record.
    (d / "view-u2.safetensors").write_bytes(b"\x00" * 10)
    (d / "meta.json.tmp").write_text('{"client_id": "c1", "view_ha')
    back = store.load_client("c1")
    assert back == r1
    assert state_hash(store.read_tensors("c1", back.view_file)) == state_hash(s1)


def test_no_pickle_in_state_files(tmp_path: Path) -> None:
    store = ServerStore(tmp_path)
    s1 = state(1)
    r1 = ClientRecordOnDisk(client_id="c1", view_hash=state_hash(s1), view_file="v.safetensors")
    store.commit(r1, {"v.safetensors": s1}, None)
    for p in (tmp_path / "clients" / "c1").iterdir():
        assert not p.read_bytes().startswith(b"\x80"), p  # pickle protocol 2+ opcode
