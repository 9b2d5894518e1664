"""The client's synchronized adapter state, kept across connections for the life of the client process.

:class:`SyncedAdapter` owns what the protocol keeps in sync with the server (docs/protocol.md section 7):

* ``view``: the client's individual adapter exactly as the server reconstructed it (its hash versions it);
* ``synced``: the learner's adapter at the last sync (the next delta is ``local - synced``);
* ``ef``: the uplink error-feedback residual (with FedALT, ``view + ef.residual == local``);
* ``held``: the aggregate of each kind (``row``, ``global``) the client holds;
* ``unacked``: the learner's state at the start of a round whose UPDATE was never acknowledged.

It is the pure half of the client loop: numpy maths and calls into the learner it is given, no I/O and no clock.
:mod:`fedquic.client.session` decides *when* to prepare, commit or roll back; :mod:`fedquic.client.runner`
runs the heavy calls in a worker thread and writes the checkpoint that :meth:`SyncedAdapter.snapshot` returns.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from ..common.adapter import AdapterSchema, TensorDict, init_lora_state, initial_held, state_hash
from ..common.codec import EncodingSpec, Manifest, decode_tensors, expand, to_compact
from ..common.errors import ConfigError, ErrorCode, ProtocolError
from ..common.feedback import ErrorFeedback
from ..common.limits import WireLimits
from ..common.messages import Aggregate, SyncState, Update, Welcome
from ..common.names import ADAPTER_KINDS
from ..common.routing import uplink_selection
from .kinds import get_kind
from .learner import Learner
from .state import ClientState

log = logging.getLogger(__name__)


@dataclass
class RoundStartState:
    """The learner's state when it began training a round whose UPDATE is not acknowledged yet.

    Why roll back rather than resend: a round handed again (the server never applied our UPDATE: the connection
    dropped, or the server restarted, between training and the ACK) is retrained from this state, so the client
    never trains a round twice on top of itself. The alternative, persisting the encoded UPDATE and resending it,
    needs a second durable artefact (the payload, its residual and view) that must agree with the checkpoint; the
    rollback needs nothing on disk: the checkpoint is only written after a sync, so it already holds this state,
    and a restarted process and a reconnected one resume from the same point. Where the server did apply the
    UPDATE (only its ACK was lost) it does not hand the round again; its view hash differs at the rejoin and the
    dense reset installs its copy, the trained adapter.
    """

    round: int
    local: TensorDict
    extra: TensorDict


@dataclass(frozen=True)
class PreparedUpdate:
    """A round's UPDATE, encoded, with what committing or abandoning it needs."""

    header: Update
    body: bytes | bytearray
    manifest: Manifest  # the full form, for the fp32 size in the round record
    local: TensorDict  # the learner's adapter the update brings the server to (the next sync point)
    new_view: TensorDict  # the view once the server applied it
    residual_before: TensorDict  # the error-feedback residual before this update was encoded
    start: RoundStartState

    @property
    def round(self) -> int:
        return self.header.round


class SyncedAdapter:
    def __init__(self, learner: Learner, client_id: str) -> None:
        self.learner = learner
        self.client_id = client_id
        self.view: TensorDict = {}
        self.view_hash = ""
        self.synced: TensorDict = {}
        self.synced_round = 0
        self.ef = ErrorFeedback()  # enabled or not as the job says (WELCOME)
        self.held: dict[str, TensorDict] = {}
        self.job: Welcome | None = None  # the job joined first; a rejoin must find the same one
        self.schema: AdapterSchema | None = None
        # Set when a round's UPDATE went unacknowledged: if the server hands that round again, train it from here.
        self.unacked: RoundStartState | None = None
        # The client holds the job's initial adapter alone (nothing synced since a fresh start): the first round
        # measures the base model and reports it until an UPDATE carrying those figures is acknowledged.
        self.base_pending = False
        # The learner's adapter has not changed since it was ``synced`` (an acknowledged UPDATE, or a global
        # installed): a snapshot then shares synced's arrays for ``local`` rather than copying the learner's, so
        # a checkpoint neither hashes nor writes the same 45 MB twice. Anything that may change the learner's
        # adapter (training, restoring, a reset, a roll-back) clears it.
        self.local_is_synced = False
        # The hash of what we hold of a kind, as computed for its ACK, with the very dict it is the hash of: a
        # checkpoint reuses it only while that dict is still the one held (anything that replaces it goes unused).
        self._held_hash: dict[str, tuple[TensorDict, str]] = {}

    # -- joining -----------------------------------------------------------------------------------------

    def fresh(self, job: Welcome, schema: AdapterSchema) -> None:
        """Start from the job's shared initial adapter (no checkpoint to resume from)."""
        self.base_pending = True
        self.view = init_lora_state(schema, job.init_seed)
        self.view_hash = state_hash(self.view)
        self.synced = {k: v.copy() for k, v in self.view.items()}
        self.synced_round = 0
        self.ef.residual = {}
        # what we hold of each kind of aggregate: the RoW starts at zero, the global at the shared init
        self.held = {kind: initial_held(kind, schema, self.view) for kind in ADAPTER_KINDS}
        if state_hash(self.learner.local_state()) != self.view_hash:
            # Averaging LoRA factors is only meaningful from a shared starting point.
            raise ConfigError(
                "the learner's adapter does not start from the job's initialisation "
                "(init_lora_state(schema, init_seed))"
            )

    def sync_state(self) -> SyncState:
        """What JOIN.resume says we hold."""
        return SyncState(
            round=self.synced_round,
            view_hash=self.view_hash,
            held={kind: state_hash(s) for kind, s in sorted(self.held.items())},  # type: ignore[misc]
        )

    # -- checkpoint --------------------------------------------------------------------------------------

    def snapshot(self) -> ClientState:
        assert self.job is not None and self.schema is not None
        extra_fn = getattr(self.learner, "extra_state", None)
        return ClientState(
            job_id=self.job.job_id,
            client_id=self.client_id,
            round=self.synced_round,
            schema_fingerprint=self.schema.fingerprint(),
            base_fingerprint=self.learner.base_fingerprint(),
            federation=self.job.federation,
            local=self.synced if self.local_is_synced else self.learner.local_state(),
            view=self.view,
            synced=self.synced,
            residual=dict(self.ef.residual),
            held=dict(self.held),
            extra=extra_fn() if extra_fn is not None else {},
            known_hashes={
                "view": self.view_hash,
                **{f"held.{k}": h for k, (held, h) in self._held_hash.items() if self.held.get(k) is held},
            },
        )

    def remember_held_hash(self, kind: str, state: TensorDict, digest: str) -> None:
        """``digest`` is the state_hash of ``state``, what we now hold of ``kind`` (computed for its ACK)."""
        self._held_hash[kind] = (state, digest)

    def foreign(self, ckpt: ClientState, job: Welcome, schema: AdapterSchema) -> list[str]:
        """Why ``ckpt`` is not this job's, client's, schema's and base model's (empty: it is ours)."""
        mine = {
            "job id": (ckpt.job_id, job.job_id),
            "client id": (ckpt.client_id, self.client_id),
            "adapter schema": (ckpt.schema_fingerprint, schema.fingerprint()),
            "base model": (ckpt.base_fingerprint, self.learner.base_fingerprint()),
            "federation": (ckpt.federation, job.federation),
        }
        return [f"{what} {old!r} != {new!r}" for what, (old, new) in mine.items() if old != new]

    def restore(self, ckpt: ClientState, job: Welcome, schema: AdapterSchema) -> None:
        """Load a checkpoint of ours (:meth:`foreign` found nothing) into the learner and this object."""
        self.local_is_synced = False
        for what, state in (("local", ckpt.local), ("view", ckpt.view), ("synced", ckpt.synced), *ckpt.held.items()):
            schema.check_state(state, what=f"checkpointed {what} adapter")
        self.learner.set_local_state(ckpt.local)
        if job.federation == "fedalt" and "row" in ckpt.held:
            self.learner.set_row_state(ckpt.held["row"])
        load_extra = getattr(self.learner, "load_extra_state", None)
        if load_extra is not None:
            load_extra(ckpt.extra)
        elif ckpt.extra:
            log.warning("the checkpoint holds learner state the learner cannot load (no load_extra_state)")
        self.view, self.view_hash = ckpt.view, ckpt.view_hash
        self.synced = ckpt.synced
        self.synced_round = ckpt.round
        self.ef.residual = dict(ckpt.residual)
        init = init_lora_state(schema, job.init_seed)
        self.held = {**{kind: initial_held(kind, schema, init) for kind in ADAPTER_KINDS}, **ckpt.held}

    # -- a round -----------------------------------------------------------------------------------------

    def begin_round(self, round_: int) -> RoundStartState:
        """Before training ``round_``: undo an unacknowledged first training of it, then note where it starts."""
        unacked, self.unacked = self.unacked, None
        self.local_is_synced = False  # training follows
        if unacked is not None and unacked.round == round_:
            self._roll_back_learner(unacked)  # never train a round on top of its own first training
        extra_fn = getattr(self.learner, "extra_state", None)
        return RoundStartState(round_, self.learner.local_state(), extra_fn() if extra_fn is not None else {})

    def _roll_back_learner(self, start: RoundStartState) -> None:
        """Put the learner back where it began ``start.round`` (the adapter and its extra state, e.g. mixers)."""
        self.learner.set_local_state(start.local)
        load_extra = getattr(self.learner, "load_extra_state", None)
        if load_extra is not None and start.extra:
            load_extra(start.extra)
        log.warning(
            "round %d handed again: rolled back to the start of round %d to retrain it", start.round, start.round
        )

    def prepare_update(self, round_: int, uplink: EncodingSpec, start: RoundStartState) -> PreparedUpdate:
        """After training: encode ``C(local - synced + e)`` (CPU-heavy: the runner calls it in a thread)."""
        assert self.job is not None and self.schema is not None
        local = self.learner.local_state()
        residual_before = dict(self.ef.residual)  # arrays are replaced, never mutated: a shallow copy suffices
        if self.job.federation == "local":
            # Nothing is shared: the UPDATE carries no tensors and only tells the server the round is done here.
            manifest, body, new_view = Manifest(tensors=(), raw_size=0), b"", self.view
        else:
            # only what the job shares: not FFA-LoRA's frozen A, not FedSA-LoRA's local B (LoraJobSpec.shares)
            delta = {k: local[k] - self.synced[k] for k in self.synced if self.job.lora.shares(k)}
            payload = self.ef.compress(delta, uplink, uplink_selection(self.job))
            manifest, body, sent = payload.manifest, payload.body, payload.decoded
            new_view = {k: self.view[k] + sent[k] if k in sent else self.view[k] for k in self.view}
        header = Update(
            round=round_,
            client_id=self.client_id,
            num_samples=self.learner.num_samples(),
            base_hash=self.view_hash,
            # schema-referenced: the server expands it with the schema agreed at JOIN (names, shapes, offsets)
            manifest=to_compact(manifest, self.schema) or manifest,
        )
        return PreparedUpdate(header, body, manifest, local, new_view, residual_before, start)

    def commit(self, prepared: PreparedUpdate, server_hash: str | None) -> None:
        """ACK(UPDATE): the server applied it; move the view and the sync point, then compare the hashes."""
        assert self.job is not None
        self.base_pending = False  # the base figures reached the server with this round's METRICS
        self.view, self.view_hash = prepared.new_view, state_hash(prepared.new_view)
        self.synced = prepared.local if self.job.federation != "local" else self.synced
        self.local_is_synced = self.job.federation != "local"  # no training since prepare_update took ``local``
        if server_hash != self.view_hash:
            raise ProtocolError("server acknowledged a different adapter state", code=ErrorCode.CONFLICTING_UPDATE)
        self.synced_round = prepared.round

    def roll_back(self, prepared: PreparedUpdate) -> None:
        """Refused (late), or BYE instead of an answer: view and synced stay, so the round's change goes into the
        next delta; the residual goes back to before this update was encoded."""
        self.ef.residual = prepared.residual_before

    def abandon(self, prepared: PreparedUpdate) -> None:
        """The connection ended before the answer: whatever the server did with it, a rejoin settles (its view
        hash tells). Should the server hand this round again, it is retrained from where it started."""
        self.ef.residual = prepared.residual_before
        self.unacked = prepared.start

    # -- aggregates --------------------------------------------------------------------------------------

    def decode(self, h: Aggregate, body: bytes | bytearray, limits: WireLimits) -> tuple[Manifest, TensorDict]:
        """An AGGREGATE's tensors, checked against the job's schema (a compact manifest names no tensors)."""
        assert self.schema is not None
        manifest = expand(h.manifest, self.schema, limits)
        self.schema.check_manifest(manifest, what=f"{h.kind} adapter for round {h.round}")
        return manifest, decode_tensors(manifest, body, limits)

    def keep_unshared(self, state: TensorDict) -> TensorDict:
        """``state`` with the tensors the job does not share (FedSA-LoRA's B) taken from the learner's own adapter:
        the server's copy of those is the init, never what the client learned."""
        assert self.job is not None
        if not self.job.lora.local_b:
            return state
        own = self.learner.local_state()
        return {k: v if self.job.lora.shares(k) else own[k] for k, v in state.items()}

    def install(self, h: Aggregate, decoded: TensorDict) -> tuple[TensorDict, bool]:
        """Install a decoded AGGREGATE; returns the state it made (its hash goes in the ACK) and whether it was a
        ``local`` reset that replaced our adapter."""
        self.base_pending = False  # what the client holds is no longer the job's initial adapter alone
        reset = False
        if h.kind == "local":
            if h.delta:
                raise ProtocolError("a `local` AGGREGATE must be dense (delta=false)", code=ErrorCode.BAD_HEADER)
            state = decoded
            if state_hash(state) != self.view_hash:
                # The server's copy of our adapter is the truth: adopt it, drop what it never received.
                self.local_is_synced = False
                self.learner.set_local_state(self.keep_unshared(state))
                self.view, self.view_hash = state, state_hash(state)
                self.synced = {k: v.copy() for k, v in state.items()}
                self.ef.residual = {}
                self.unacked = None  # the server applied our update after all: its copy is the round's result
                reset = True
                log.warning("adapter reset to the server's copy (round %d)", h.round)
            # else: we already agree; our unsent local progress stays.
        else:
            if h.delta:  # downlink error feedback: add the change to what we hold
                base = self.held[h.kind]
                state = {k: base[k] + decoded[k] for k in base}
            else:
                state = decoded
            self.held[h.kind] = state
            get_kind(h.kind).install(self, state)  # client/kinds.py: what holding it means for the learner
        self.synced_round = max(self.synced_round, h.round)
        return state, reset


__all__ = ["PreparedUpdate", "RoundStartState", "SyncedAdapter"]
