"""A ready client's uploads, sans-I/O: UPLOAD_REQUEST (admission) and UPDATE (checks, decode, durable commit, ACK).

Mixed into :class:`~fedquic.server.session.ServerSession`, whose record, job and refusal rule it uses. The checks
run in the order docs/protocol.md gives; the ACK is sent only after the fsynced commit (a crash after it loses
nothing); every outcome of an UPDATE, accepted or refused, frees its upload slot.
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Callable
from functools import partial
from typing import TYPE_CHECKING, Any

from ..common.adapter import TensorDict
from ..common.codec import Manifest, decode_tensors, expand, fp32_nbytes
from ..common.errors import ErrorCode, FedQuicError, ProtocolError, SchemaMismatchError
from ..common.logs import round_var
from ..common.messages import Ack, Message, MsgType, Update, UploadGrant, UploadRequest
from ..transport.connection import BulkPermit
from ..transport.framing import frame_size
from .actions import Action, Permit, QueueUpload, Send, UploadDone, Work

if TYPE_CHECKING:
    from .job import ClientRecord, ServerJob

log = logging.getLogger(__name__)


class UploadHandling:
    job: ServerJob
    rec: ClientRecord | None
    budget: Any

    def _refuse(self, msg: Message | None, exc: FedQuicError) -> list[Action]: ...

    def _on_upload_request(self, msg: Message, now: float) -> list[Action]:
        h, rec, job = msg.header, self.rec, self.job
        assert isinstance(h, UploadRequest) and rec is not None
        limit = min(job.cfg.transport.limits.max_body_bytes, job.max_update_body(), self.budget.limit)
        if h.nbytes > limit:  # before anything is reserved for it
            raise ProtocolError(
                f"an update of {h.nbytes} bytes exceeds {limit}, the most the job's adapter takes in "
                f"{job.cfg.job.uplink.encoding.value}",
                code=ErrorCode.LIMIT_EXCEEDED,
            )
        grant = Send(UploadGrant(round=h.round, expires_s=job.cfg.upload_slot_timeout_s))
        if h.round in rec.disk.updates:  # a resend after a lost ACK: answered from disk, it needs no slot
            permit = BulkPermit(max_body=h.nbytes, count=1, reserved=self.budget.try_reserve(h.nbytes))
            return [Permit(MsgType.UPDATE, permit), grant]
        job.machine.check_update(rec.client_id, h.round)  # refuse late or unknown rounds before any wait
        if h.round in rec.upload_done:
            return []  # already queued or granted
        return [QueueUpload(rec.client_id, h.round, h.nbytes)]

    def _on_update(self, msg: Message, now: float) -> list[Action]:
        h, rec = msg.header, self.rec
        assert isinstance(h, Update) and rec is not None
        round_var.set(h.round)
        if h.client_id != rec.client_id:
            raise ProtocolError(
                f"UPDATE names client {h.client_id!r} on {rec.client_id!r}'s connection",
                code=ErrorCode.IDENTITY_MISMATCH,
            )
        body = msg.body
        digest = partial(lambda b: hashlib.sha256(b).hexdigest()[:32], body)  # off the loop: bodies are large
        return [Work(digest, self._guard(h, partial(self._update_digested, h, body)), name="digest")]

    def _update_digested(self, h: Update, body: bytes, digest: str, now: float) -> list[Action]:
        rec, job = self.rec, self.job
        assert rec is not None and job.schema is not None
        prior = rec.disk.updates.get(h.round)
        if prior is not None:
            if prior != digest:
                raise ProtocolError(
                    f"a different update for round {h.round} was already accepted", code=ErrorCode.CONFLICTING_UPDATE
                )
            return [Send(Ack(ref=MsgType.UPDATE, round=h.round, state_hash=rec.view_hash)), self._slot_free(h)]
        if h.base_hash != rec.view_hash:
            raise ProtocolError(
                f"update applies to state {h.base_hash}, server holds {rec.view_hash}",
                code=ErrorCode.CONFLICTING_UPDATE,
            )
        job.machine.check_update(rec.client_id, h.round)
        manifest = expand(h.manifest, job.schema, job.cfg.transport.limits)  # a compact one names no tensors
        if not (job.cfg.job.federation == "local" and not manifest.tensors):
            # In a `local` job an UPDATE without tensors is a client's "round done": it shares nothing.
            # a routed job's clients send their most changed blocks only, an FFA-LoRA job's their B factors only
            # (common/routing.py uplink_selection)
            terms = job.cfg.job
            partial_ok = terms.uplink_routing is not None or terms.lora.freeze_a or terms.lora.local_b
            job.schema.check_manifest(manifest, what=f"update from {rec.client_id}", subset=partial_ok)
            unshared = [t.name for t in manifest.tensors if not terms.lora.shares(t.name)]
            if unshared:
                # FFA-LoRA: A stays the same on every client, which is what makes averaging B exact; FedSA-LoRA:
                # B is each client's own. Never let an update move either.
                raise SchemaMismatchError(
                    f"update from {rec.client_id} carries {unshared[0]}, which this job does not share "
                    f"({'FFA-LoRA keeps every A at its init' if terms.lora.freeze_a else 'FedSA-LoRA keeps B local'})"
                )

        def decode() -> tuple[TensorDict, float]:
            t0 = time.perf_counter()
            return decode_tensors(manifest, body, job.cfg.transport.limits), time.perf_counter() - t0

        then = self._guard(h, partial(self._update_decoded, h, len(body), manifest, digest))
        return [Work(decode, then, fail=self._guard(h, _reraise), name="decode")]

    def _update_decoded(
        self, h: Update, nbody: int, manifest: Manifest, digest: str, result: tuple[TensorDict, float], now: float
    ) -> list[Action]:
        rec, job = self.rec, self.job
        assert rec is not None
        delta, decode_s = result
        st = rec.stats.setdefault(h.round, {})
        st["bytes_up"] = float(frame_size(h, nbody))
        st["fp32_up"] = float(fp32_nbytes(manifest))
        st["decode_s"] = decode_s
        st["accepted_at"] = job.wall()  # wall clock: with granted_at, a history reader measures ingest
        if job.cfg.job.uplink_routing is not None:  # which blocks are fresh this round (server/freshness.py)
            rec.carried = {r: c for r, c in rec.carried.items() if r >= h.round - 1} | {h.round: frozenset(delta)}

        def commit() -> tuple[str, float]:
            t0 = time.perf_counter()
            job.load(rec)
            assert rec.view is not None
            view = {k: rec.view[k] + delta[k] if k in delta else rec.view[k] for k in rec.view}
            name = f"view-u{h.round}.safetensors"
            view_hash = job.store.write_files(rec.client_id, {name: view})[name]  # hashed as it is written
            disk = rec.disk.model_copy(
                update={
                    "view_hash": view_hash,
                    "view_file": name,
                    "num_samples": h.num_samples,
                    "updates": {**rec.disk.updates, h.round: digest},
                    # This round's figures (the client's METRICS, bytes, timings) go to disk with the update, so a
                    # restart still writes them to history; rounds before the last are already in history.
                    "stats": {r: dict(v) for r, v in rec.stats.items() if r >= h.round - 1},
                    "reported": {r: dict(v) for r, v in rec.reported.items() if r >= h.round - 1},
                }
            )
            # Acknowledged only once it is on disk: a crash after the ACK loses nothing.
            job.store.commit(disk, {}, rec.disk)
            rec.disk, rec.view = disk, view  # under the client's key: a downlink commit builds on this one
            return disk.view_hash, time.perf_counter() - t0

        return [Work(commit, self._guard(h, partial(self._update_committed, h)), keys=(rec.client_id,), name="commit")]

    def _update_committed(self, h: Update, result: tuple[str, float], now: float) -> list[Action]:
        rec, job = self.rec, self.job
        assert rec is not None
        vhash, persist_s = result
        st = rec.stats.setdefault(h.round, {})
        st["persist_s"] = persist_s  # apply + write + fsync before the ACK
        job.metrics.updates_accepted += 1
        out: list[Action] = [Send(Ack(ref=MsgType.UPDATE, round=h.round, state_hash=vhash)), self._slot_free(h)]
        log.info(
            "update accepted: %d bytes on the wire (%.1fx smaller than fp32)",
            st["bytes_up"],
            st["fp32_up"] / max(st["bytes_up"], 1.0),
        )
        try:
            return out + job.apply(job.machine.on_update(rec.client_id, h.round, now), now)
        except ProtocolError as exc:
            # The round moved on while the update was written: it is on disk and in the client's view, so it
            # reaches the next aggregate through the view.
            log.info("update for round %d stored after the round moved on: %s", h.round, exc)
            return out

    def _slot_free(self, h: Update) -> UploadDone:
        assert self.rec is not None
        return UploadDone(self.rec.client_id, h.round)

    def _guard(self, h: Update, then: Callable[[Any, float], list[Action]]) -> Callable[[Any, float], list[Action]]:
        """A continuation of an UPDATE: a refusal inside it is refused like the message, and frees the slot."""

        def run(result: Any, now: float) -> list[Action]:
            try:
                return then(result, now)
            except FedQuicError as exc:
                return [*self._refuse(None, exc), self._slot_free(h)]

        return run


def _reraise(exc: FedQuicError, now: float) -> list[Action]:
    raise exc


__all__ = ["UploadHandling"]
