"""Tensor files written in one pass: safetensors bytes streamed from the arrays, hashed on the way.

``safetensors.numpy.save`` builds the whole file in memory (and copies it once more into ``bytes``), and the
content hash (:func:`~fedquic.common.adapter.state_hash`) is a second pass over the same tensors. Checkpoints and
the server's per-client records write tens of MB per round, so :func:`write_tensors` streams each array's buffer
straight to the file (no copy of the payload) and feeds the same buffers to the hash: one pass, half the memory
traffic, and no second full-size buffer.

The file is standard safetensors (8-byte little-endian header length, a JSON header padded with spaces to a
multiple of 8, then the data, tensors in name order): ``safetensors.numpy.load`` and ``safe_open`` read it.
Only float32 tensors are written (what adapters, residuals and aggregates are); anything else is converted.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from .atomic import fsync_dir, publish

_ALIGN = 8


def _header(
    names: list[str], shapes: list[tuple[int, ...]], arrays: list[np.ndarray], metadata: Mapping[str, str] | None
) -> bytes:
    entries: dict[str, object] = {}
    if metadata:
        entries["__metadata__"] = dict(metadata)
    offset = 0
    for name, shape, arr in zip(names, shapes, arrays, strict=True):
        entries[name] = {"dtype": "F32", "shape": list(shape), "data_offsets": [offset, offset + arr.nbytes]}
        offset += arr.nbytes
    head = json.dumps(entries, separators=(",", ":")).encode()
    head += b" " * (-len(head) % _ALIGN)  # the data starts 8-byte aligned, as safetensors' own writer does
    return len(head).to_bytes(8, "little") + head


def _write(
    tmp: Path, tensors: Mapping[str, np.ndarray], metadata: Mapping[str, str] | None, known_hash: str | None = None
) -> str:
    """Write ``tmp`` (not yet fsynced); the tensors' state_hash, from the buffers as they were written (or
    ``known_hash``, when the caller has it already: then nothing is hashed)."""
    names = sorted(tensors)
    shapes = [np.shape(tensors[n]) for n in names]  # as given: ascontiguousarray makes a 0-d array 1-d
    arrays = [np.ascontiguousarray(tensors[n], dtype=np.float32) for n in names]
    digest = hashlib.sha256()
    try:
        with open(tmp, "wb", buffering=0) as f:
            f.write(_header(names, shapes, arrays, metadata))
            for name, arr in zip(names, arrays, strict=True):
                data = memoryview(arr.reshape(-1).view(np.uint8).data)
                if known_hash is None:
                    digest.update(name.encode())
                    digest.update(repr(arr.shape).encode())  # state_hash's form, so the digests agree
                    digest.update(data)
                while data:  # a raw file's write may be short
                    data = data[f.write(data) :]
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    return known_hash if known_hash is not None else digest.hexdigest()[:32]


def write_tensors(
    path: Path,
    tensors: Mapping[str, np.ndarray],
    *,
    metadata: Mapping[str, str] | None = None,
    sync_dir: bool = True,
    known_hash: str | None = None,
) -> str:
    """Write ``tensors`` to ``path`` atomically (common/atomic.py's recipe: a ``.tmp`` file, fsync, rename, the
    directory fsynced unless ``sync_dir=False``); returns their :func:`~fedquic.common.adapter.state_hash`,
    computed from the same buffers as they were written."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    digest = _write(tmp, tensors, metadata, known_hash)
    publish(tmp, path)
    if sync_dir:
        fsync_dir(path.parent)
    return digest


def write_tensors_named(
    directory: Path,
    name_for: str,
    tensors: Mapping[str, np.ndarray],
    metadata: Mapping[str, str] | None = None,
    known_hash: str | None = None,
) -> tuple[Path, str, bool]:
    """Write ``tensors`` to a file named by their hash (``name_for`` with ``{hash}`` filled in) in ``directory``;
    returns the path, the hash and whether a new file was made.

    The bytes go to a ``.tmp`` file (the hash is known only once they are written). If a file of that name is
    there already it holds the same content: the copy is dropped, unsynced, and the file left as it was (content
    addressing makes an unchanged section cost one pass and no fsync). Else the copy is fsynced and renamed into
    place. The directory is not fsynced: the caller syncs it once for several files. With ``known_hash`` (the
    caller's own :func:`~fedquic.common.adapter.state_hash` of these tensors) nothing is hashed again."""
    directory.mkdir(parents=True, exist_ok=True)
    if known_hash is not None and (directory / name_for.replace("{hash}", known_hash)).is_file():
        return directory / name_for.replace("{hash}", known_hash), known_hash, False
    tmp = directory / (name_for.replace("{hash}", "staging") + ".tmp")
    digest = _write(tmp, tensors, metadata, known_hash)
    final = directory / name_for.replace("{hash}", digest)
    if final.is_file():
        tmp.unlink()
        return final, digest, False
    publish(tmp, final)
    return final, digest, True


__all__ = ["write_tensors", "write_tensors_named"]
