"""common/tensorfile.py: one-pass safetensors writes whose hash is the protocol's state_hash."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from fedquic.common.adapter import state_hash
from fedquic.common.tensorfile import write_tensors, write_tensors_named
from safetensors import safe_open
from safetensors.numpy import load_file


def tensors(seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        "b.weight": rng.standard_normal((3, 5)).astype(np.float32),
        "a.weight": rng.standard_normal((7,)).astype(np.float64),  # converted to float32
        "scalar": np.full((), 2.5, np.float32),
        "empty": np.zeros((0, 4), np.float32),
        "strided": np.arange(24, dtype=np.float32).reshape(4, 6)[:, ::2],  # not contiguous
    }


def test_the_file_is_safetensors_and_the_digest_is_state_hash(tmp_path: Path) -> None:
    t = tensors()
    path = tmp_path / "x.safetensors"
    digest = write_tensors(path, t, metadata={"format": "test"})
    assert digest == state_hash(t)
    back = load_file(str(path))
    assert set(back) == set(t)
    for k, v in t.items():
        assert back[k].dtype == np.float32 and back[k].shape == np.shape(v)
        np.testing.assert_array_equal(back[k], np.asarray(v, dtype=np.float32))
    with safe_open(str(path), "np") as f:
        assert f.metadata() == {"format": "test"}
    assert not list(tmp_path.glob("*.tmp"))


def test_a_named_write_of_content_already_there_keeps_the_file(tmp_path: Path) -> None:
    p1, d1, made1 = write_tensors_named(tmp_path, "s-{hash}.safetensors", tensors(1))
    ino = p1.stat().st_ino
    p2, d2, made2 = write_tensors_named(tmp_path, "s-{hash}.safetensors", {k: v.copy() for k, v in tensors(1).items()})
    assert (p2, d2) == (p1, d1) and made1 and not made2
    assert p2.stat().st_ino == ino  # not replaced
    p3, d3, made3 = write_tensors_named(tmp_path, "s-{hash}.safetensors", tensors(2))
    assert made3 and d3 != d1 and p3.name == f"s-{d3}.safetensors"
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([p1.name, p3.name])


def test_a_failed_write_leaves_no_temporary_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import fedquic.common.atomic as atomic

    def fail(fd: int) -> None:
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(atomic.os, "fsync", fail)
    with pytest.raises(OSError, match="Input/output"):
        write_tensors(tmp_path / "x.safetensors", tensors())
    with pytest.raises(OSError, match="Input/output"):
        write_tensors_named(tmp_path, "s-{hash}.safetensors", tensors())
    assert not list(tmp_path.iterdir())  # neither the target nor a .tmp


def test_a_known_hash_is_taken_as_given_and_names_the_file(tmp_path: Path) -> None:
    t = tensors(3)
    digest = state_hash(t)
    p1, d1, made1 = write_tensors_named(tmp_path, "s-{hash}.safetensors", t, known_hash=digest)
    assert (p1.name, d1, made1) == (f"s-{digest}.safetensors", digest, True)
    np.testing.assert_array_equal(load_file(str(p1))["b.weight"], t["b.weight"])
    ino = p1.stat().st_ino
    p2, d2, made2 = write_tensors_named(tmp_path, "s-{hash}.safetensors", t, known_hash=digest)
    assert (p2, d2, made2) == (p1, digest, False) and p2.stat().st_ino == ino  # there already: not written again
    assert write_tensors(tmp_path / "x.safetensors", t, known_hash=digest) == digest
    assert not list(tmp_path.glob("*.tmp"))
