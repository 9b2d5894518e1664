"""Crash-safe writes: after a crash a reader finds the old file or the whole new one, never a torn one.

One recipe for every durable file the server and the client write (job and client records, checkpoints,
exported adapters, ready files): write a temporary file beside the target, flush and fsync it, rename it over
the target (atomic on POSIX within one filesystem), then fsync the directory so the rename itself survives a
power cut. Writers that only take a path (``safetensors.save_file``, ``torch.save``) go through
:func:`atomic_write_with`.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

# fsync on a directory fails with these where the filesystem cannot sync directories (the rename is then as
# durable as that filesystem makes it); any other error (EIO...) is a failed write and is raised.
_NO_DIR_SYNC = {errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EBADF, errno.EACCES, errno.EISDIR}


def fsync_dir(path: Path) -> None:
    """Make the renames inside ``path`` durable. Windows cannot open a directory and some filesystems cannot
    fsync one: there this is a no-op; a real I/O error is raised (a caller that acknowledges a write after
    this must not acknowledge one that may not survive)."""
    if os.name == "nt":
        return
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError as exc:
        if exc.errno in _NO_DIR_SYNC:
            return
        raise
    try:
        os.fsync(fd)
    except OSError as exc:
        if exc.errno not in _NO_DIR_SYNC:
            raise
    finally:
        os.close(fd)


def _tmp_for(path: Path) -> Path:
    return path.with_name(path.name + ".tmp")


def atomic_write_with(path: Path, write: Callable[[Path], None], *, sync_dir: bool = True) -> None:
    """Call ``write(tmp)`` to produce the new file, fsync it, and rename it over ``path``.

    ``sync_dir=False`` leaves the directory fsync to the caller, who renames several files into one directory
    and syncs it once (the tensor files of a commit before the record that names them)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _tmp_for(path)
    try:
        write(tmp)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    publish(tmp, path)
    if sync_dir:
        fsync_dir(path.parent)


def publish(tmp: Path, path: Path) -> None:
    """fsync the finished ``tmp`` and rename it over ``path`` (the directory is the caller's to fsync); ``tmp`` is
    removed if either fails."""
    try:
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise


def atomic_write_bytes(path: Path, data: bytes, *, sync_dir: bool = True) -> None:
    """Write ``data`` to ``path`` atomically (see the module docstring)."""

    def write(tmp: Path) -> None:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()

    atomic_write_with(path, write, sync_dir=sync_dir)


def atomic_write_text(path: Path, text: str, *, sync_dir: bool = True) -> None:
    atomic_write_bytes(path, text.encode("utf-8"), sync_dir=sync_dir)


__all__ = ["atomic_write_bytes", "atomic_write_text", "atomic_write_with", "fsync_dir"]


@contextlib.contextmanager
def staged_dir(dest: Path) -> Iterator[Path]:
    """A new sibling directory to build ``dest`` in (a model folder); gone on exit whatever happens. Hand it
    to :func:`commit_dir` to put it in place."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(f".{dest.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    tmp.mkdir()
    try:
        yield tmp
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def commit_dir(tmp: Path, dest: Path) -> None:
    """Make every file under ``tmp`` durable, then rename ``tmp`` to ``dest`` (absent, or an empty directory) and
    sync the parent: a crash leaves the old ``dest`` or the new one, never half of one."""
    for p in sorted(tmp.rglob("*"), reverse=True):  # files first, then their directories
        if p.is_file():
            with open(p, "rb+") as f:
                os.fsync(f.fileno())
        elif p.is_dir():
            fsync_dir(p)
    fsync_dir(tmp)
    os.replace(tmp, dest)
    fsync_dir(dest.parent)
