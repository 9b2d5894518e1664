"""The client's durable state: what a restarted client needs to rejoin its job where it left off.

One checkpoint is ``run_dir/state/checkpoint.json`` and one file per section,
``section-<name>-<hash>.safetensors``, holding that section's tensors:

* the sections: ``local`` (the individual LoRA), ``view`` (that LoRA as the server reconstructed it), ``synced``
  (the local LoRA at the last sync), ``residual`` (uplink error-feedback residual), ``held.row`` /
  ``held.global`` (the aggregates the client holds) and ``extra`` (the learner's own state, e.g. the mixers);
* ``checkpoint.json``: the job id, client id, round, schema and base fingerprints, format version, and per
  section its file and content hash (:func:`~fedquic.common.adapter.state_hash`, the hash the protocol uses: the
  view's is the view hash JOIN reports).

Files are named by their content, so a save writes only the sections that changed since the last one (after an
AGGREGATE usually one of six) and hashes each section once. Writes are atomic and ordered so that a crash at any
point leaves the previous checkpoint readable: new section files are written to ``.tmp`` files, flushed, fsynced
and renamed into place, the directory fsynced; then ``checkpoint.json`` is replaced the same way (the commit
point); only then are files no longer referenced removed. A reader follows ``checkpoint.json`` only and checks
every section against its hash, so leftover ``.tmp`` files and unreferenced files are ignored (and cleaned up by
the next save). Checkpoints of format 1 (one file of every tensor) are still read. No pickle anywhere.

The built-in trainer re-creates its AdamW optimizer every round (no optimizer state crosses rounds), so there is
no optimizer state to persist; a learner that keeps one can return its tensors from ``extra_state()``.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from safetensors import SafetensorError
from safetensors.numpy import load as st_load

from ..common.adapter import TensorDict, state_hash
from ..common.atomic import atomic_write_bytes, fsync_dir
from ..common.errors import ConfigError
from ..common.names import ADAPTER_KINDS
from ..common.tensorfile import write_tensors_named

log = logging.getLogger(__name__)

FORMAT = "fedquic-client-state"
FORMAT_VERSION = 2
READABLE_VERSIONS = (1, 2)
META_FILE = "checkpoint.json"
OPTIMIZER_NOTE = "not persisted: the built-in trainer re-creates AdamW each round; learners may use extra_state()"
_TENSORS_RE = re.compile(r"^tensors-(\d{8})\.safetensors$")  # format 1
_SECTIONS = ("local", "view", "synced", "residual", *(f"held.{kind}" for kind in ADAPTER_KINDS), "extra")
_SECTION_RE = re.compile(rf"^section-({'|'.join(map(re.escape, _SECTIONS))})-[0-9a-f]{{32}}\.safetensors$")


@dataclass
class ClientState:
    """Everything a client restores on restart (see the module docstring for what each part is)."""

    job_id: str
    client_id: str
    round: int  # the last round whose UPDATE or AGGREGATE was acknowledged
    schema_fingerprint: str
    base_fingerprint: str
    federation: str
    local: TensorDict
    view: TensorDict
    synced: TensorDict
    residual: TensorDict = field(default_factory=dict)
    held: dict[str, TensorDict] = field(default_factory=dict)
    extra: TensorDict = field(default_factory=dict)
    # Section hashes the caller knows already (e.g. the view's, which the protocol computed): saved unhashed.
    known_hashes: dict[str, str] = field(default_factory=dict, compare=False, repr=False)

    @property
    def view_hash(self) -> str:
        return state_hash(self.view)

    def held_hashes(self) -> dict[str, str]:
        return {kind: state_hash(s) for kind, s in sorted(self.held.items())}

    def sections(self) -> dict[str, Mapping[str, np.ndarray]]:
        out: dict[str, Mapping[str, np.ndarray]] = {
            "local": self.local,
            "view": self.view,
            "synced": self.synced,
            "residual": self.residual,
            "extra": self.extra,
        }
        for kind, s in self.held.items():
            out[f"held.{kind}"] = s
        return out


# Sections whose arrays client/sync.py replaces and never changes in place: a section made of the same array
# objects as at the last save has the same content. The learner's own (``local``, ``extra``) are always hashed:
# a learner may hand out arrays it goes on changing.
_REPLACED_NOT_MUTATED = frozenset(s for s in _SECTIONS if s not in ("local", "extra"))


class _SectionDigests:
    """The digest each section had at the last save, keyed by the identity of its arrays (held, so an id is not
    reused by another array while it is remembered)."""

    def __init__(self) -> None:
        self._by_section: dict[str, tuple[tuple[tuple[str, int], ...], list[np.ndarray], str]] = {}

    @staticmethod
    def key(tensors: Mapping[str, np.ndarray]) -> tuple[tuple[str, int], ...]:
        return tuple((k, id(v)) for k, v in sorted(tensors.items()))

    def get(self, section: str, tensors: Mapping[str, np.ndarray]) -> str | None:
        hit = self._by_section.get(section)
        if section in _REPLACED_NOT_MUTATED and hit is not None and hit[0] == self.key(tensors):
            return hit[2]
        return None

    def put(self, section: str, tensors: Mapping[str, np.ndarray], digest: str) -> None:
        if section in _REPLACED_NOT_MUTATED:
            self._by_section[section] = (self.key(tensors), list(tensors.values()), digest)


def _link(src: Path, dst: Path) -> bool:
    """A second name for an identical section file (no copy); False where links are not possible (the caller
    then writes it)."""
    try:
        os.link(src, dst)
    except OSError:
        return False
    return True


class StateStore:
    """Atomic save/load of a :class:`ClientState` in one directory."""

    def __init__(self, directory: Path) -> None:
        self.dir = Path(directory)
        self._generation: int | None = None
        self._memo = _SectionDigests()

    @property
    def meta_path(self) -> Path:
        return self.dir / META_FILE

    def _read_meta(self) -> dict | None:
        try:
            text = self.meta_path.read_text(encoding="utf-8")
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise ConfigError(f"cannot read client checkpoint {self.meta_path}: {exc}") from exc
        try:
            meta = json.loads(text)
        except json.JSONDecodeError as exc:
            msg = f"{self.meta_path} is not valid JSON ({exc.msg}); delete {self.dir} to start over"
            raise ConfigError(msg) from None
        if not isinstance(meta, dict) or meta.get("format") != FORMAT:
            raise ConfigError(f"{self.meta_path} is not a fedquic client checkpoint")
        if meta.get("version") not in READABLE_VERSIONS:
            raise ConfigError(f"{self.meta_path}: unsupported checkpoint version {meta.get('version')!r}")
        return meta

    def save(self, state: ClientState) -> Path:
        """Write ``state`` as the new checkpoint (only the sections whose content changed); returns the path of
        ``checkpoint.json``."""
        self.dir.mkdir(parents=True, exist_ok=True)
        if self._generation is None:
            meta = None
            with contextlib.suppress(ConfigError):
                meta = self._read_meta()
            self._generation = int(meta.get("generation", 0)) if meta else 0
        generation = self._generation + 1
        sections: dict[str, dict[str, object]] = {}
        wrote = False
        # Ours first (replaced, never mutated): a later section made of the very same arrays (``local`` sharing
        # ``synced``'s) is then the same content, known without a pass over it.
        resolved: dict[tuple[tuple[str, int], ...], tuple[str, Path]] = {}
        given = state.sections()
        for name in sorted(given, key=lambda n: (n not in _REPLACED_NOT_MUTATED, _SECTIONS.index(n))):
            tensors = given[name]
            key = _SectionDigests.key(tensors)
            same = resolved.get(key) if key else None
            digest = state.known_hashes.get(name) or self._memo.get(name, tensors) or (same[0] if same else None)
            path = self.dir / f"section-{name}-{digest}.safetensors"
            if digest is not None and not path.is_file() and same is not None and same[0] == digest:
                wrote = _link(same[1], path) or wrote
            if digest is None or not path.is_file():  # content-addressed: an existing file holds this section
                # one pass: the bytes go to a file and through the hash together; kept only if new (tensorfile.py)
                meta = {"format": FORMAT, "section": name}
                named = f"section-{name}-{{hash}}.safetensors"
                path, digest, made = write_tensors_named(self.dir, named, tensors, meta, known_hash=digest)
                wrote = wrote or made
            self._memo.put(name, tensors, digest)
            if name in _REPLACED_NOT_MUTATED and key:
                resolved.setdefault(key, (digest, path))
            sections[name] = {"file": path.name, "hash": digest, "tensors": len(tensors)}
        sections = {n: sections[n] for n in given}  # checkpoint.json lists them in the usual order
        if wrote:
            fsync_dir(self.dir)  # the section files are durable before the record that names them
        meta = {
            "format": FORMAT,
            "version": FORMAT_VERSION,
            "generation": generation,
            "job_id": state.job_id,
            "client_id": state.client_id,
            "round": state.round,
            "view_hash": sections["view"]["hash"],
            "held": {k: sections[f"held.{k}"]["hash"] for k in sorted(state.held)},
            "schema_fingerprint": state.schema_fingerprint,
            "base_fingerprint": state.base_fingerprint,
            "federation": state.federation,
            "sections": sections,
            "optimizer": OPTIMIZER_NOTE,
        }
        atomic_write_bytes(self.meta_path, (json.dumps(meta, indent=2, sort_keys=True) + "\n").encode())
        self._generation = generation
        self._cleanup(keep={str(v["file"]) for v in sections.values()})
        return self.meta_path

    def _cleanup(self, keep: set[str]) -> None:
        for p in self.dir.iterdir():
            ours = _TENSORS_RE.match(p.name) is not None or _SECTION_RE.match(p.name) is not None
            stale = p.name.endswith(".tmp") or (ours and p.name not in keep)
            if stale:
                with contextlib.suppress(OSError):
                    p.unlink()

    def load(self) -> ClientState | None:
        """The last committed checkpoint, or None if there is none. Raises ConfigError if it is damaged."""
        meta = self._read_meta()
        if meta is None:
            return None
        sections = self._sections_v1(meta) if meta.get("version") == 1 else self._sections(meta)
        held = {kind: sections[f"held.{kind}"] for kind in ADAPTER_KINDS if f"held.{kind}" in meta["sections"]}
        try:
            state = ClientState(
                job_id=str(meta["job_id"]),
                client_id=str(meta["client_id"]),
                round=int(meta["round"]),
                schema_fingerprint=str(meta["schema_fingerprint"]),
                base_fingerprint=str(meta["base_fingerprint"]),
                federation=str(meta["federation"]),
                local=sections["local"],
                view=sections["view"],
                synced=sections["synced"],
                residual=sections["residual"],
                held=held,
                extra=sections["extra"],
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise ConfigError(f"{self.meta_path}: missing or bad field ({exc})") from None
        if meta.get("version") == 1 and (
            state.view_hash != meta.get("view_hash") or state.held_hashes() != meta.get("held")
        ):
            raise ConfigError(f"client checkpoint {self.dir}: tensors do not match the recorded hashes")
        self._generation = int(meta.get("generation", 0))
        return state

    def _sections(self, meta: dict) -> dict[str, TensorDict]:
        """Format 2: one file per section, each checked against its recorded content hash."""
        listed = meta.get("sections")
        if not isinstance(listed, dict) or set(listed) - set(_SECTIONS):
            raise ConfigError(f"{self.meta_path}: bad sections")
        out: dict[str, TensorDict] = {s: {} for s in _SECTIONS}
        for name, entry in listed.items():
            file = str(entry.get("file", "")) if isinstance(entry, dict) else ""
            if not _SECTION_RE.match(file):
                raise ConfigError(f"{self.meta_path}: bad file for section {name!r}")
            path = self.dir / file
            tensors = self._parse(path, self._read(path))
            if state_hash(tensors) != entry.get("hash"):
                raise self._damaged(path)
            out[name] = tensors
        return out

    def _sections_v1(self, meta: dict) -> dict[str, TensorDict]:
        """Format 1: every section in one file, keyed ``<section>/<tensor>``, with the file's SHA-256."""
        name = str(meta.get("tensors_file", ""))
        if not _TENSORS_RE.match(name):
            raise ConfigError(f"{self.meta_path}: bad tensors_file {name!r}")
        path = self.dir / name
        data = self._read(path)
        if hashlib.sha256(data).hexdigest() != meta.get("tensors_sha256"):
            raise self._damaged(path)
        sections: dict[str, TensorDict] = {s: {} for s in _SECTIONS}
        for key, arr in self._parse(path, data).items():
            section, sep, tname = key.partition("/")
            if not sep or section not in sections:
                raise ConfigError(f"client checkpoint {path}: unexpected tensor {key!r}")
            sections[section][tname] = arr
        return sections

    def _read(self, path: Path) -> bytes:
        try:
            return path.read_bytes()
        except OSError as exc:
            raise ConfigError(f"client checkpoint {path} is missing or unreadable ({exc}); delete {self.dir}") from exc

    def _parse(self, path: Path, data: bytes) -> dict[str, np.ndarray]:
        try:
            return dict(st_load(data))
        except (SafetensorError, ValueError) as exc:
            raise ConfigError(f"client checkpoint {path} is not a valid safetensors file: {exc}") from exc

    def _damaged(self, path: Path) -> ConfigError:
        return ConfigError(f"client checkpoint {path} does not match its checksum; delete {self.dir} to start over")
