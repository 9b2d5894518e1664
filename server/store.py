"""Durable server state: the job, the round, and each client's adapters, on disk.

Layout under ``STATE_DIR`` (``RUN_DIR/state``)::

    job.json                          job id, adapter schema, base fingerprint, round snapshot
    clients/<id>/meta.json            the client's record: hashes, accepted updates, which files are current
    clients/<id>/view-r<R>.safetensors      its individual LoRA as the server reconstructed it (after round R)
    clients/<id>/row-r<R>.safetensors       the aggregate it holds (kind row/global) after round R's close
    clients/<id>/ef-r<R>.safetensors        its downlink error-feedback residual after round R's close

Every write is atomic: write a temporary file, fsync it, rename it over the target, fsync the directory.
Tensor files are never overwritten: a new one gets a new name, and the ``meta.json`` rename is the commit
point (the file it replaces is deleted afterwards), so a crash leaves either the old or the new record,
never a mix. Tensors are safetensors; metadata is JSON. No pickle.
"""

from __future__ import annotations

import logging
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, ValidationError
from safetensors.numpy import load as st_load

from ..common.adapter import AdapterSchema, TensorDict
from ..common.atomic import atomic_write_bytes, fsync_dir
from ..common.errors import ConfigError
from ..common.names import AdapterKind
from ..common.tensorfile import write_tensors
from .rounds import RoundSnapshot

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
Kind = AdapterKind


class JobRecord(BaseModel):
    model_config = ConfigDict(extra="forbid")

    format: int = FORMAT_VERSION
    job_id: str
    adapter: AdapterSchema | None = None
    base_fingerprint: str | None = None
    round: RoundSnapshot = RoundSnapshot()


class ClientRecordOnDisk(BaseModel):
    """A client's durable record; tensor files are named relative to its directory."""

    model_config = ConfigDict(extra="forbid")

    client_id: str
    num_samples: int = 0
    view_hash: str
    view_file: str | None = None  # None: the job's shared initialisation
    updates: dict[int, str] = Field(default_factory=dict)  # round -> digest of the accepted payload
    held_hash: dict[Kind, str] = Field(default_factory=dict)
    held_files: dict[Kind, str] = Field(default_factory=dict)  # absent: zeros (row) / the init (global)
    ef_file: str | None = None  # written by earlier versions (a downlink residual); no longer used
    closed_round: int = 0  # the last round whose aggregate was computed for this client
    # Per round: what the server measured (bytes, timings; history.jsonl's ``clients``), saved with the update.
    stats: dict[int, dict[str, float]] = Field(default_factory=dict)
    # Per round: the client's own METRICS (history.jsonl's ``reported``). Earlier versions kept them in ``stats``.
    reported: dict[int, dict[str, float]] = Field(default_factory=dict)


class ServerStore:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.clients_dir = root / "clients"

    # -- job ---------------------------------------------------------------------------------------

    def load_job(self) -> JobRecord | None:
        path = self.root / "job.json"
        if not path.is_file():
            return None
        try:
            rec = JobRecord.model_validate_json(path.read_bytes())
        except ValidationError as exc:
            raise ConfigError(f"{path} is not a fedquic server state file: {exc.errors()[0]['msg']}") from None
        if rec.format != FORMAT_VERSION:
            raise ConfigError(f"{path}: state format {rec.format}, this server reads {FORMAT_VERSION}")
        return rec

    def save_job(self, rec: JobRecord) -> None:
        atomic_write_bytes(self.root / "job.json", rec.model_dump_json(indent=1).encode())

    # -- clients -----------------------------------------------------------------------------------

    def client_ids(self) -> list[str]:
        if not self.clients_dir.is_dir():
            return []
        return sorted(p.name for p in self.clients_dir.iterdir() if (p / "meta.json").is_file())

    def load_client(self, client_id: str) -> ClientRecordOnDisk | None:
        path = self.clients_dir / client_id / "meta.json"
        if not path.is_file():
            return None
        return ClientRecordOnDisk.model_validate_json(path.read_bytes())

    def read_tensors(self, client_id: str, name: str) -> TensorDict:
        return dict(st_load((self.clients_dir / client_id / name).read_bytes()))

    def write_files(
        self, client_id: str, files: dict[str, TensorDict], known: dict[str, str] | None = None
    ) -> dict[str, str]:
        """Write tensor files of a client, durable (the directory fsynced) before a record names them; returns
        each file's content hash (:func:`~fedquic.common.adapter.state_hash`), computed as it was written unless
        ``known`` has it."""
        d = self.clients_dir / client_id
        d.mkdir(parents=True, exist_ok=True)
        known = known or {}
        digests = {
            name: write_tensors(d / name, tensors, sync_dir=False, known_hash=known.get(name))
            for name, tensors in files.items()
        }
        if files:
            fsync_dir(d)
        return digests

    def commit(
        self,
        rec: ClientRecordOnDisk,
        new_files: dict[str, TensorDict],
        old: ClientRecordOnDisk | None,
    ) -> None:
        """Write ``new_files`` (never overwriting), then ``rec`` as the commit point, then drop stale files."""
        d = self.clients_dir / rec.client_id
        self.write_files(rec.client_id, new_files)
        atomic_write_bytes(d / "meta.json", rec.model_dump_json(indent=1).encode())
        if old is not None:
            for stale in _files(old) - _files(rec):
                (d / stale).unlink(missing_ok=True)


def _files(rec: ClientRecordOnDisk) -> set[str]:
    out = set(rec.held_files.values())
    if rec.view_file:
        out.add(rec.view_file)
    if rec.ef_file:
        out.add(rec.ef_file)
    return out
