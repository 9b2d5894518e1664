"""The client's durable state: what a restarted client needs to rejoin its job where it left off.

One checkpoint is two files in ``run_dir/state/``:

* ``tensors-<generation>.safetensors``: every tensor, keyed ``<section>/<tensor name>`` with the sections
  ``local`` (the individual LoRA), ``view`` (that LoRA as the server reconstructed it), ``synced`` (the local
  LoRA at the last sync), ``residual`` (uplink error-feedback residual), ``held.row`` / ``held.global`` (the
  aggregates the client holds) and ``extra`` (the learner's own state, e.g. the FedALT mixers);
* ``checkpoint.json``: the job id, client id, round, view hash, held hashes, schema and base fingerprints,
  format version, and the name and SHA-256 of the tensor file it belongs to.

Writes are atomic and ordered so that a crash at any point leaves the previous checkpoint readable: the tensor
file of the new generation is written to a ``.tmp`` file, flushed, fsynced, renamed into place and the directory
fsynced; then ``checkpoint.json`` is replaced the same way (the commit point); only then are older tensor files
removed. A reader follows ``checkpoint.json`` only, so leftover ``.tmp`` files and unreferenced tensor files are
ignored (and cleaned up by the next save). No pickle anywhere.

The built-in trainer re-creates its AdamW optimizer every round (no optimizer state crosses rounds), so there is
no optimizer state to persist; a learner that keeps one can return its tensors from ``extra_state()``.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from safetensors import SafetensorError
from safetensors.numpy import load as st_load
from safetensors.numpy import save as st_save

from ..common.adapter import TensorDict, state_hash
from ..common.atomic import atomic_write_bytes
from ..common.errors import ConfigError
from ..common.names import ADAPTER_KINDS

log = logging.getLogger(__name__)

FORMAT = "fedquic-client-state"
FORMAT_VERSION = 1
META_FILE = "checkpoint.json"
OPTIMIZER_NOTE = "not persisted: the built-in trainer re-creates AdamW each round; learners may use extra_state()"
_TENSORS_RE = re.compile(r"^tensors-(\d{8})\.safetensors$")
_SECTIONS = ("local", "view", "synced", "residual", "held.row", "held.global", "extra")


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


def _flatten(state: ClientState) -> dict[str, np.ndarray]:
    flat: dict[str, np.ndarray] = {}
    for section, tensors in state.sections().items():
        for name, arr in tensors.items():
            flat[f"{section}/{name}"] = np.ascontiguousarray(arr, dtype=np.float32)
    return flat


class StateStore:
    """Atomic save/load of a :class:`ClientState` in one directory."""

    def __init__(self, directory: Path) -> None:
        self.dir = Path(directory)
        self._generation: int | None = None

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
        if meta.get("version") != FORMAT_VERSION:
            raise ConfigError(f"{self.meta_path}: unsupported checkpoint version {meta.get('version')!r}")
        return meta

    def save(self, state: ClientState) -> Path:
        """Write ``state`` as the new checkpoint; returns the tensor file written."""
        self.dir.mkdir(parents=True, exist_ok=True)
        if self._generation is None:
            meta = None
            with contextlib.suppress(ConfigError):
                meta = self._read_meta()
            self._generation = int(meta.get("generation", 0)) if meta else 0
        generation = self._generation + 1
        data = st_save(_flatten(state), metadata={"format": FORMAT, "version": str(FORMAT_VERSION)})
        tensors = self.dir / f"tensors-{generation:08d}.safetensors"
        atomic_write_bytes(tensors, data)
        meta = {
            "format": FORMAT,
            "version": FORMAT_VERSION,
            "generation": generation,
            "tensors_file": tensors.name,
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
            "optimizer": OPTIMIZER_NOTE,
        }
        atomic_write_bytes(self.meta_path, (json.dumps(meta, indent=2, sort_keys=True) + "\n").encode())
        self._generation = generation
        self._cleanup(keep=tensors.name)
        return tensors

    def _cleanup(self, keep: str) -> None:
        for p in self.dir.iterdir():
            stale = p.name.endswith(".tmp") or (_TENSORS_RE.match(p.name) is not None and p.name != keep)
            if stale:
                with contextlib.suppress(OSError):
                    p.unlink()

    def load(self) -> ClientState | None:
        """The last committed checkpoint, or None if there is none. Raises ConfigError if it is damaged."""
        meta = self._read_meta()
        if meta is None:
            return None
        name = str(meta.get("tensors_file", ""))
        if not _TENSORS_RE.match(name):
            raise ConfigError(f"{self.meta_path}: bad tensors_file {name!r}")
        path = self.dir / name
        try:
            data = path.read_bytes()
        except OSError as exc:
            raise ConfigError(f"client checkpoint {path} is missing or unreadable ({exc}); delete {self.dir}") from exc
        if hashlib.sha256(data).hexdigest() != meta.get("tensors_sha256"):
            raise ConfigError(f"client checkpoint {path} does not match its checksum; delete {self.dir} to start over")
        try:
            flat = st_load(data)
        except (SafetensorError, ValueError) as exc:
            raise ConfigError(f"client checkpoint {path} is not a valid safetensors file: {exc}") from exc
        sections: dict[str, TensorDict] = {s: {} for s in _SECTIONS}
        for key, arr in flat.items():
            section, sep, name = key.partition("/")
            if not sep or section not in sections:
                raise ConfigError(f"client checkpoint {path}: unexpected tensor {key!r}")
            sections[section][name] = arr
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
        if state.view_hash != meta.get("view_hash") or state.held_hashes() != meta.get("held"):
            raise ConfigError(f"client checkpoint {self.dir}: tensors do not match the recorded hashes")
        self._generation = int(meta.get("generation", 0))
        return state
