"""Aggregation rules: the extension point where a round's contributions become what each client is sent.

A rule is a small object with a ``name``, the ``kind`` of adapter it sends (``"global"``: one shared LoRA that
replaces the client's own, FedAvg-style; ``"row"``: a Rest-of-World LoRA the client keeps beside its own,
FedALT-style) and ``targets(inputs)``, which maps each recipient to its :class:`Target`; optionally
``check_job(job)``, which raises ConfigError for a job the rule cannot serve. Rules are pure numpy
(they run in a worker thread) and registered by name; the job picks one with ``JobConfig.aggregation``.
The built-ins are registered below exactly as an outside rule would be::

    from fedquic.server.rules import RoundInputs, Target, register_rule

    class Median:
        name, kind = "median", "global"
        def targets(self, inp: RoundInputs) -> dict[str, Target]:
            med = {k: np.median([s[k] for s in inp.states], axis=0) for k in inp.states[0]}
            # one adapter for everyone: ``share`` lets the server encode its downlink once per held state
            return {cid: Target(lambda: med, "global", len(inp.states), share="median") for cid in inp.recipients}

    register_rule(Median())

What stays outside every rule, in the server: which clients contribute and which listen (stragglers get an
aggregate only while they are active), clipping each contribution (``clip_norm``), the privacy floor on
Rest-of-World adapters (``min_row_contributors``), and encoding, persisting and sending each target.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, ClassVar, Protocol, runtime_checkable

import numpy as np

from ..common.adapter import TensorDict
from ..common.errors import ConfigError, JobError
from ..common.names import ADAPTER_KINDS, AdapterKind
from ..common.registry import Registry
from .aggregation import LeaveOneOut, clip_deviation, exact_mean, fedavg, leave_one_out_exact, weighted_sum
from .alignment import align_states
from .freshness import FreshLeaveOneOut, fresh_mean, fresh_weighted_row
from .relevance import drift_cosines, relevance_matrix

if TYPE_CHECKING:
    from .config import JobConfig

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RoundInputs:
    """One closed round, as a rule sees it."""

    contributors: Sequence[str]  # the clients whose updates the round holds, in the order of ``states``
    states: Sequence[TensorDict]  # each contributor's adapter (clipped when the job clips)
    weights: Sequence[float]  # one per state (uniform, or by sample count: JobConfig.weighting)
    listeners: Sequence[str]  # active clients that contributed nothing this round but receive an aggregate
    # The job's initial adapter (seeded, the same on every client and the server; no client data): a fixed
    # reference, e.g. the anchor that geometric alignment rotates factors towards. None outside a job.
    init_state: TensorDict | None = None
    options: Mapping[str, float] = field(default_factory=dict)  # the job's ``rule_options``, for the rule to read
    # Routed rounds (``uplink_routing``): per contributor, the tensors its UPDATE carried (None: all of them); the
    # built-in rules average each tensor over its carriers (server/freshness.py). None when nothing was routed.
    carried: Sequence[frozenset[str] | None] | None = None
    min_contributors: int = 2  # the Rest-of-World privacy floor, per tensor too

    @property
    def recipients(self) -> list[str]:
        return [*self.contributors, *self.listeners]


@dataclass(frozen=True)
class Target:
    """What one client is to hold after the round. ``make`` computes it on demand, one client at a time, so
    a leave-one-out round needs O(P) memory per client in flight, not O(N·P)."""

    make: Callable[[], TensorDict]
    kind: AdapterKind
    contributors: int  # how many clients' adapters it averages (AGGREGATE's ``contributors``)
    # Targets of a round with the same ``share`` are one and the same adapter (FedAvg's mean for everyone): the
    # server encodes the downlink once per distinct state their recipients hold, not once per recipient.
    share: str | None = None
    # How much of it each contributor makes up (a weighted rule's choice, e.g. relevance): kept in history.jsonl
    weights: Mapping[str, float] | None = None


@runtime_checkable
class AggregationRule(Protocol):
    name: str
    kind: AdapterKind

    def targets(self, inputs: RoundInputs) -> dict[str, Target]: ...


def _check_kind(rule: AggregationRule) -> None:
    if rule.kind not in ADAPTER_KINDS:
        raise ConfigError(f"rule {rule.name!r}: kind must be one of {list(ADAPTER_KINDS)}, got {rule.kind!r}")


_RULES: Registry[AggregationRule] = Registry("aggregation rule", AggregationRule, "name, kind, targets", _check_kind)


def register_rule(rule: AggregationRule, *, replace: bool = False) -> AggregationRule:
    """Make ``rule`` available to jobs as ``aggregation = rule.name``; returns it. Registering a taken name is
    an error unless ``replace``."""
    return _RULES.register(rule, replace=replace)


def get_rule(name: str) -> AggregationRule:
    return _RULES.get(name)


def rule_names() -> list[str]:
    return _RULES.names()


# -- the built-ins -------------------------------------------------------------------------------------------


def _mean(inp: RoundInputs) -> TensorDict:
    """The weighted mean of the round; in a routed round, each tensor over the clients that sent it."""
    return fedavg(inp.states, inp.weights) if inp.carried is None else fresh_mean(inp.states, inp.weights, inp.carried)


class FedAvg:
    """One weighted mean for everyone (FedAvg): the client replaces its adapter with it."""

    name = "fedavg"
    kind: AdapterKind = "global"

    def targets(self, inp: RoundInputs) -> dict[str, Target]:
        g = _mean(inp)
        return {cid: Target(lambda: g, "global", len(inp.states), share="mean") for cid in inp.recipients}


class FedProx(FedAvg):
    """FedProx (Li et al., 2020): the server's step is FedAvg's weighted mean; what makes it FedProx is the
    clients' proximal term mu/2·‖w − w_round‖², sent to them in ROUND_START (``train.prox_mu``). The rule
    refuses a job without one, which would be FedAvg under another name."""

    name = "fedprox"

    def check_job(self, job: JobConfig) -> None:
        if job.train.prox_mu <= 0:
            raise ConfigError("aggregation 'fedprox' needs a proximal term: set train.prox_mu > 0 (--prox-mu)")


class LeaveOneOutFactorMean:
    """FedALT's Rest-of-World: client k gets the mean of every *other* client's adapter, A and B averaged
    separately as the paper does; a listener gets the mean of all."""

    name = "loo-factor-mean"
    kind: AdapterKind = "row"

    def targets(self, inp: RoundInputs) -> dict[str, Target]:
        loo: LeaveOneOut | FreshLeaveOneOut = LeaveOneOut(inp.states, inp.weights)
        if inp.carried is not None:  # a routed round: each tensor over the clients that sent it
            loo = FreshLeaveOneOut(inp.states, inp.weights, inp.carried, inp.min_contributors)
        n = len(inp.states)
        out = {cid: Target(lambda k=k: loo.row(k), "row", n - 1) for k, cid in enumerate(inp.contributors)}
        others = [c for c in inp.listeners if c not in out]
        if others:
            mean = _mean(inp)
            out.update({cid: Target(lambda: mean, "row", n, share="mean") for cid in others})
        return out


class LeaveOneOutExact:
    """Rest-of-World as the mean of the products B·A of the others, re-factored to rank r by truncated SVD."""

    name = "loo-exact"
    kind: AdapterKind = "row"

    def targets(self, inp: RoundInputs) -> dict[str, Target]:
        rows = leave_one_out_exact(inp.states, inp.weights)
        n = len(inp.states)
        out = {cid: Target(lambda row=row: row, "row", n - 1) for cid, row in zip(inp.contributors, rows, strict=True)}
        others = [c for c in inp.listeners if c not in out]
        if others:
            mean = exact_mean(inp.states, inp.weights)
            out.update({cid: Target(lambda: mean, "row", n, share="mean") for cid in others})
        return out


def aligned(inp: RoundInputs) -> RoundInputs:
    """The round with every contributor's LoRA factors rotated into one basis (server/alignment.py), anchored
    at the job's initial adapter (or, outside a job, the first contributor's)."""
    anchor = inp.init_state if inp.init_state is not None else inp.states[0]
    return replace(inp, states=align_states(inp.states, anchor))


class FedAvgAligned(FedAvg):
    """FedAvg over factors aligned to one basis first (data-free geometric alignment, FedMosaic-Adaptive)."""

    name = "fedavg-aligned"

    def targets(self, inp: RoundInputs) -> dict[str, Target]:
        return super().targets(aligned(inp))


class LeaveOneOutAligned(LeaveOneOutFactorMean):
    """FedALT's factor-mean Rest-of-World over factors aligned to one basis first (FedMosaic-Adaptive)."""

    name = "loo-aligned"

    def targets(self, inp: RoundInputs) -> dict[str, Target]:
        return super().targets(aligned(inp))


class LeaveOneOutRelevance:
    """FedALT's Rest-of-World weighted by relevance: client k gets Σ_j r_kj·X_j over the others, r_kj from the
    cosine of their drifts from the job's init (server/relevance.py; SimGrad, FedMosaic-Adaptive). Options
    (``[job.rule_options]``): ``temperature`` (default 0.1) and ``floor`` (default 0.25, the share of the row
    spread evenly over every other contributor; 1 is plain leave-one-out). A listener gets the mean of all."""

    name = "loo-simgrad"
    kind: AdapterKind = "row"
    defaults: ClassVar[dict[str, float]] = {"temperature": 0.1, "floor": 0.25}

    def check_job(self, job: JobConfig) -> None:
        opts = {**self.defaults, **job.rule_options}  # job_rule refused names not in defaults
        if opts["temperature"] <= 0 or not 0 <= opts["floor"] <= 1:
            raise ConfigError(f"aggregation {self.name!r}: temperature must be > 0 and floor in [0, 1], got {opts}")

    def targets(self, inp: RoundInputs) -> dict[str, Target]:
        opts = {**self.defaults, **inp.options}
        anchor = inp.init_state if inp.init_state is not None else {}
        rel = relevance_matrix(drift_cosines(inp.states, anchor), inp.weights, opts["temperature"], opts["floor"])
        n, ids = len(inp.states), list(inp.contributors)
        out: dict[str, Target] = {}
        for k, cid in enumerate(ids):
            share = {ids[j]: round(float(rel[k, j]), 6) for j in range(n) if j != k}
            out[cid] = Target(lambda k=k: self._row(inp, rel[k], k), "row", n - 1, weights=share)
        others = [c for c in inp.listeners if c not in out]
        if others:
            mean = _mean(inp)
            out.update({cid: Target(lambda: mean, "row", n, share="mean") for cid in others})
        return out

    @staticmethod
    def _row(inp: RoundInputs, shares: np.ndarray, k: int) -> TensorDict:
        if inp.carried is None:
            return weighted_sum(inp.states, shares)
        return fresh_weighted_row(inp.states, shares, k, inp.carried, inp.min_contributors)


class LeaveOneOutMosaic(LeaveOneOutRelevance):
    """FedMosaic-Adaptive's aggregation: factors aligned to one basis (``loo-aligned``), then each Rest-of-World
    weighted by relevance (``loo-simgrad``, same options); with ``uplink_routing`` each tensor over its carriers."""

    name = "loo-mosaic"

    def targets(self, inp: RoundInputs) -> dict[str, Target]:
        return super().targets(aligned(inp))


for _rule in (
    FedAvg(),
    FedProx(),
    LeaveOneOutFactorMean(),
    LeaveOneOutExact(),
    FedAvgAligned(),
    LeaveOneOutAligned(),
    LeaveOneOutRelevance(),
    LeaveOneOutMosaic(),
):
    register_rule(_rule)


def default_rule(federation: str, row_mode: str = "factor-mean") -> str:
    """The rule a job uses when it names none: FedAvg's mean, or FedALT's leave-one-out by ``row_mode``."""
    if federation == "fedavg":
        return "fedavg"
    return "loo-exact" if row_mode == "exact" else "loo-factor-mean"


def job_rule(job: JobConfig) -> AggregationRule | None:
    """The job's rule (None for ``local``: nothing is aggregated), checked against its federation: a FedAvg job
    sends a global adapter, a FedALT job a Rest-of-World one."""
    if job.federation == "local":
        return None
    rule = get_rule(job.aggregation or default_rule(job.federation, job.row_mode))
    want = "global" if job.federation == "fedavg" else "row"
    if rule.kind != want:
        raise ConfigError(
            f"aggregation rule {rule.name!r} sends {rule.kind!r} adapters; federation={job.federation!r} needs "
            f"{want!r} ones (rules of that kind: {[n for n in rule_names() if get_rule(n).kind == want]})"
        )
    known = getattr(rule, "defaults", {})  # the rule_options a rule reads, with their defaults (optional)
    unknown = sorted(set(job.rule_options) - set(known))
    if unknown:  # an option no rule reads is a typo, or meant for another rule
        raise ConfigError(
            f"aggregation rule {rule.name!r} does not read rule_options {unknown} (it reads {sorted(known)})"
        )
    check = getattr(rule, "check_job", None)  # optional: a rule may need settings of the job (FedProx's mu)
    if check is not None:
        check(job)
    return rule


def round_targets(
    rule: AggregationRule | None,
    job: JobConfig,
    inputs: RoundInputs,
    init_state: TensorDict | None,
    known: Collection[str],
) -> dict[str, Target]:
    """What the server sends after a round, around the rule: each contribution clipped (``clip_norm``), the
    Rest-of-World privacy floor (``min_row_contributors``), and the rule's answer checked (kind, recipients)."""
    if rule is None or not inputs.contributors:
        return {}
    states = inputs.states
    if job.clip_norm is not None:
        assert init_state is not None
        states = [clip_deviation(s, init_state, job.clip_norm) for s in states]
    if rule.kind == "row" and len(states) < job.min_row_contributors:
        # Privacy floor: a RoW built from too few clients would hand out one client's adapter.
        log.warning(
            "round closed with %d contributor(s), fewer than %d: no Rest-of-World adapter is sent",
            len(states),
            job.min_row_contributors,
        )
        return {}
    out = rule.targets(
        RoundInputs(
            inputs.contributors,
            states,
            inputs.weights,
            inputs.listeners,
            init_state,
            job.rule_options,
            inputs.carried,
            job.min_row_contributors,
        )
    )
    wrong = sorted({t.kind for t in out.values()} - {rule.kind})
    if wrong:
        raise JobError(f"aggregation rule {rule.name!r} returned {wrong} targets, not {rule.kind!r}")
    unknown = sorted(set(out) - set(known))
    if unknown:
        raise JobError(f"aggregation rule {rule.name!r} targets unknown clients {unknown}")
    return out


def load_plugins(modules: Sequence[str]) -> None:
    """Import each module, which registers its rules (``ServerConfig.plugins``)."""
    import importlib

    for name in modules:
        try:
            importlib.import_module(name)
        except ImportError as exc:
            raise ConfigError(f"plugin module {name!r} cannot be imported: {exc}") from exc


__all__ = [
    "AggregationRule",
    "RoundInputs",
    "Target",
    "default_rule",
    "get_rule",
    "job_rule",
    "load_plugins",
    "register_rule",
    "round_targets",
    "rule_names",
]
