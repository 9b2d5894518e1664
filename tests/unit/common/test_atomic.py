"""The one crash-safe write recipe: the old file or the whole new one, never a torn one, never a stray .tmp."""

from __future__ import annotations

from pathlib import Path

import pytest
from fedquic.common.atomic import atomic_write_bytes, atomic_write_text, atomic_write_with, commit_dir, staged_dir


def test_write_then_replace(tmp_path: Path) -> None:
    target = tmp_path / "sub" / "f.json"  # parents are made
    atomic_write_bytes(target, b"old")
    atomic_write_text(target, "new ✓")
    assert target.read_text("utf-8") == "new ✓"
    assert sorted(p.name for p in target.parent.iterdir()) == ["f.json"]


def test_a_failing_writer_leaves_the_old_file(tmp_path: Path) -> None:
    target = tmp_path / "f.bin"
    atomic_write_bytes(target, b"old")

    def half_then_crash(tmp: Path) -> None:
        tmp.write_bytes(b"ne")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        atomic_write_with(target, half_then_crash)
    assert target.read_bytes() == b"old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f.bin"]


def test_path_writers(tmp_path: Path) -> None:
    import numpy as np
    from safetensors.numpy import load_file, save_file

    target = tmp_path / "t.safetensors"
    atomic_write_with(target, lambda tmp: save_file({"x": np.arange(3, dtype=np.float32)}, str(tmp)))
    assert load_file(str(target))["x"].tolist() == [0.0, 1.0, 2.0]


def test_a_staged_directory_replaces_its_target_whole_or_not_at_all(tmp_path: Path) -> None:
    dest = tmp_path / "model"
    with staged_dir(dest) as tmp:
        (tmp / "config.json").write_text("{}")
        (tmp / "sub").mkdir()
        (tmp / "sub" / "w.bin").write_bytes(b"\x01" * 10)
        assert not dest.exists()  # nothing is visible until the commit
        commit_dir(tmp, dest)
    assert (dest / "config.json").read_text() == "{}" and (dest / "sub" / "w.bin").read_bytes() == b"\x01" * 10
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]  # the staging directory is gone
    with pytest.raises(RuntimeError), staged_dir(tmp_path / "other") as tmp:
        (tmp / "half").write_bytes(b"x")
        raise RuntimeError("the build failed")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]  # a failed build leaves nothing behind
