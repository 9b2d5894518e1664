"""The client checkpoint: atomic, pickle-free, and a crash at any point leaves the previous one readable."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
from fedquic.client.state import META_FILE, ClientState, StateStore
from fedquic.common.adapter import state_hash
from fedquic.common.atomic import atomic_write_bytes
from fedquic.common.errors import ConfigError
from safetensors.numpy import load_file, save


def make_state(round_: int, seed: int = 0, *, with_global: bool = False) -> ClientState:
    rng = np.random.default_rng(seed)

    def tensors() -> dict[str, np.ndarray]:
        return {
            "m.layers.0.q_proj.lora_A.weight": rng.standard_normal((2, 8)).astype(np.float32),
            "m.layers.0.q_proj.lora_B.weight": rng.standard_normal((8, 2)).astype(np.float32),
        }

    held = {"row": tensors()}
    if with_global:
        held["global"] = tensors()
    return ClientState(
        job_id="job-1",
        client_id="c1",
        round=round_,
        schema_fingerprint="abc",
        base_fingerprint="def",
        federation="fedalt",
        local=tensors(),
        view=tensors(),
        synced=tensors(),
        residual=tensors(),
        held=held,
        extra={"m.layers.0.q_proj.router.weight": rng.standard_normal((2, 8)).astype(np.float32)},
    )


def assert_states_equal(a: ClientState, b: ClientState) -> None:
    assert (a.job_id, a.client_id, a.round, a.schema_fingerprint, a.base_fingerprint, a.federation) == (
        b.job_id,
        b.client_id,
        b.round,
        b.schema_fingerprint,
        b.base_fingerprint,
        b.federation,
    )
    for section, tensors in a.sections().items():
        other = b.sections()[section]
        assert set(tensors) == set(other), section
        for k in tensors:
            np.testing.assert_array_equal(tensors[k], other[k])


def section_files(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.glob("section-*.safetensors"))


def test_round_trip_and_metadata(tmp_path: Path) -> None:
    store = StateStore(tmp_path / "state")
    assert store.load() is None
    state = make_state(3, with_global=True)
    path = store.save(state)
    assert path == tmp_path / "state" / META_FILE
    loaded = StateStore(tmp_path / "state").load()  # a new process
    assert loaded is not None
    assert_states_equal(state, loaded)
    meta = json.loads(path.read_text())
    assert meta["round"] == 3 and meta["view_hash"] == state_hash(state.view) == loaded.view_hash
    assert meta["held"] == {"global": state_hash(state.held["global"]), "row": state_hash(state.held["row"])}
    assert meta["job_id"] == "job-1" and meta["schema_fingerprint"] == "abc" and meta["base_fingerprint"] == "def"
    assert meta["version"] == 2 and "optimizer" in meta
    assert {k: v["hash"] for k, v in meta["sections"].items()} == {
        k: state_hash(v) for k, v in state.sections().items()
    }
    # plain safetensors files (no pickle): any safetensors reader opens them
    flat = load_file(str(tmp_path / "state" / meta["sections"]["local"]["file"]))
    assert "m.layers.0.q_proj.lora_A.weight" in flat
    assert "m.layers.0.q_proj.router.weight" in load_file(str(tmp_path / "state" / meta["sections"]["extra"]["file"]))


def test_each_save_replaces_the_previous_one_and_cleans_up(tmp_path: Path) -> None:
    store = StateStore(tmp_path)
    store.save(make_state(1, seed=1))
    first = section_files(tmp_path)
    store.save(make_state(2, seed=2))
    second = section_files(tmp_path)
    assert not set(first) & set(second) and len(second) == len(make_state(2).sections())
    loaded = store.load()
    assert loaded is not None and loaded.round == 2
    assert_states_equal(loaded, make_state(2, seed=2))
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([META_FILE, *second])


def test_a_save_writes_only_the_sections_that_changed(tmp_path: Path) -> None:
    store = StateStore(tmp_path)
    state = make_state(1, seed=1)
    store.save(state)
    inodes = {p.name: p.stat().st_ino for p in tmp_path.glob("section-*.safetensors")}
    after = make_state(1, seed=1)
    after.round = 2
    after.held["row"] = {k: v + 1.0 for k, v in state.held["row"].items()}  # what installing an aggregate changes
    store.save(after)
    now = {p.name: p.stat().st_ino for p in tmp_path.glob("section-*.safetensors")}
    new = sorted(set(now) - set(inodes))
    assert len(new) == 1 and new[0].startswith("section-held.row-")
    assert all(now[name] == ino for name, ino in inodes.items() if name in now)  # the others were not rewritten
    loaded = StateStore(tmp_path).load()
    assert loaded is not None and loaded.round == 2
    assert_states_equal(loaded, after)


def test_a_format_1_checkpoint_is_still_read(tmp_path: Path) -> None:
    state = make_state(5, seed=5)
    flat = {f"{sec}/{k}": v for sec, tensors in state.sections().items() for k, v in tensors.items()}
    data = save(flat)
    (tmp_path / "tensors-00000003.safetensors").write_bytes(data)
    meta = {
        "format": "fedquic-client-state",
        "version": 1,
        "generation": 3,
        "tensors_file": "tensors-00000003.safetensors",
        "tensors_sha256": hashlib.sha256(data).hexdigest(),
        "job_id": state.job_id,
        "client_id": state.client_id,
        "round": state.round,
        "view_hash": state.view_hash,
        "held": state.held_hashes(),
        "schema_fingerprint": state.schema_fingerprint,
        "base_fingerprint": state.base_fingerprint,
        "federation": state.federation,
        "sections": {k: len(v) for k, v in state.sections().items()},
    }
    (tmp_path / META_FILE).write_text(json.dumps(meta))
    store = StateStore(tmp_path)
    loaded = store.load()
    assert loaded is not None
    assert_states_equal(loaded, state)
    store.save(loaded)  # the next save writes format 2 and removes the old file
    assert not (tmp_path / "tensors-00000003.safetensors").exists()
    assert json.loads((tmp_path / META_FILE).read_text())["generation"] == 4


def test_a_crash_mid_write_leaves_the_previous_checkpoint(tmp_path: Path) -> None:
    store = StateStore(tmp_path)
    store.save(make_state(1, seed=1))
    # A crash while writing the next checkpoint: a half-written section file, a complete but uncommitted one,
    # and a half-written checkpoint.json.tmp. None of them is referenced by checkpoint.json.
    (tmp_path / f"section-local-{'0' * 32}.safetensors.tmp").write_bytes(b"\x00garbage")
    (tmp_path / f"section-view-{'1' * 32}.safetensors").write_bytes(b"not even safetensors")
    (tmp_path / f"{META_FILE}.tmp").write_text('{"format": "fedquic-client-state", "round": 9')
    loaded = StateStore(tmp_path).load()
    assert loaded is not None and loaded.round == 1
    assert_states_equal(loaded, make_state(1, seed=1))
    # the next save ignores the debris, commits, and removes it
    StateStore(tmp_path).save(make_state(4, seed=4))
    loaded = StateStore(tmp_path).load()
    assert loaded is not None and loaded.round == 4
    assert not any(p.name.endswith(".tmp") for p in tmp_path.iterdir())
    assert len(section_files(tmp_path)) == len(make_state(4).sections())


def test_a_damaged_checkpoint_is_refused_not_silently_used(tmp_path: Path) -> None:
    store = StateStore(tmp_path)
    store.save(make_state(1))
    meta = json.loads((tmp_path / META_FILE).read_text())
    path = tmp_path / meta["sections"]["local"]["file"]
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(ConfigError, match="checksum"):
        StateStore(tmp_path).load()
    path.unlink()
    with pytest.raises(ConfigError, match="missing"):
        StateStore(tmp_path).load()
    (tmp_path / META_FILE).write_text("{broken")
    with pytest.raises(ConfigError, match="not valid JSON"):
        StateStore(tmp_path).load()
    (tmp_path / META_FILE).write_text('{"format": "something-else"}')
    with pytest.raises(ConfigError, match="not a fedquic client checkpoint"):
        StateStore(tmp_path).load()


def test_atomic_write_never_exposes_a_partial_file(tmp_path: Path) -> None:
    target = tmp_path / "f.bin"
    atomic_write_bytes(target, b"old")
    (tmp_path / "f.bin.tmp").write_bytes(b"partial")  # a writer that died before its rename
    assert target.read_bytes() == b"old"
    atomic_write_bytes(target, b"new")
    assert target.read_bytes() == b"new" and not (tmp_path / "f.bin.tmp").exists()


def _inodes(d: Path) -> dict[str, int]:
    return {p.name: p.stat().st_ino for p in d.glob("section-*.safetensors")}


def test_a_local_that_shares_synced_arrays_is_linked_not_written(tmp_path: Path) -> None:
    state = make_state(1, seed=1)
    state.local = state.synced  # what SyncedAdapter.snapshot hands over after an acknowledged UPDATE
    StateStore(tmp_path).save(state)
    local = next(tmp_path.glob("section-local-*.safetensors"))
    synced = next(tmp_path.glob("section-synced-*.safetensors"))
    assert local.stat().st_ino == synced.stat().st_ino  # one file, two names
    loaded = StateStore(tmp_path).load()
    assert loaded is not None
    assert_states_equal(loaded, state)


def test_the_learners_own_arrays_are_hashed_again_even_when_they_are_the_same_objects(tmp_path: Path) -> None:
    # a learner may hand out arrays it goes on changing in place: identity must not stand for content there
    store = StateStore(tmp_path)
    state = make_state(1, seed=1)
    store.save(state)
    before = _inodes(tmp_path)
    for arr in state.local.values():
        arr += 1.0  # the same objects, changed
    state.round = 2
    store.save(state)
    new = sorted(set(_inodes(tmp_path)) - set(before))
    assert len(new) == 1 and new[0].startswith("section-local-")
    loaded = StateStore(tmp_path).load()
    assert loaded is not None
    assert_states_equal(loaded, state)


def test_sections_of_unchanged_arrays_are_not_hashed_again(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import fedquic.client.state as state_mod

    store = StateStore(tmp_path)
    state = make_state(1, seed=1)
    store.save(state)
    written: list[str] = []
    real = state_mod.write_tensors_named
    monkeypatch.setattr(
        state_mod, "write_tensors_named", lambda d, n, t, m=None, **kw: written.append(n) or real(d, n, t, m, **kw)
    )
    state.round = 2
    state.local = {k: v.copy() for k, v in state.local.items()}  # a learner's fresh copy: hashed (and deduped)
    store.save(state)
    assert written == ["section-local-{hash}.safetensors", "section-extra-{hash}.safetensors"]
