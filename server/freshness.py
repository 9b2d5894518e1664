"""Routed rounds: each block aggregated over the clients that sent it (FedMosaic-Adaptive's layerwise routing).

With ``uplink_routing`` a client's UPDATE carries some of its blocks; the server's copy of the others is what the
client sent for them in an earlier round. Averaging those stale copies with this round's fresh ones would pull
each aggregate back towards older states, so a tensor that only some contributors carried this round is averaged
over those contributors alone. Where too few carried it (fewer than ``min_contributors`` besides the recipient,
the Rest-of-World privacy floor; for a shared mean, none at all) the tensor keeps the all-clients aggregate, stale
copies included: a row is never built from a single other client. Tensors every contributor carried are the
plain aggregate, unchanged. Pure numpy, O(P) per recipient on top of the plain rule.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence

import numpy as np

from ..common.adapter import TensorDict
from .aggregation import LeaveOneOut, fedavg, weighted_sum


def _carriers(carried: Sequence[Collection[str] | None], name: str) -> list[int]:
    return [j for j, c in enumerate(carried) if c is None or name in c]


def _partial(
    states: Sequence[Mapping[str, np.ndarray]], carried: Sequence[Collection[str] | None]
) -> dict[str, list[int]]:
    """Tensor -> the contributors that carried it, for the tensors that not every contributor carried."""
    out = {}
    for name in states[0]:
        js = _carriers(carried, name)
        if len(js) < len(states):
            out[name] = js
    return out


class FreshLeaveOneOut:
    """Leave-one-out rows, each tensor over the contributors that carried it this round (see the module)."""

    def __init__(
        self,
        states: Sequence[Mapping[str, np.ndarray]],
        weights: Sequence[float],
        carried: Sequence[Collection[str] | None],
        min_contributors: int = 2,
    ) -> None:
        self.loo = LeaveOneOut(states, weights)
        self.states, self.weights = states, [float(w) for w in weights]
        self.min_contributors = min_contributors
        self.partial = _partial(states, carried)
        self.totals: dict[str, tuple[np.ndarray, float]] = {}
        for name, js in self.partial.items():
            total = np.zeros(np.shape(states[0][name]), dtype=np.float64)
            for j in js:
                total += self.weights[j] * np.asarray(states[j][name], dtype=np.float64)
            self.totals[name] = (total, sum(self.weights[j] for j in js))

    def row(self, k: int) -> TensorDict:
        row = self.loo.row(k)
        for name, js in self.partial.items():
            others = [j for j in js if j != k]
            if len(others) < self.min_contributors:
                continue  # too few fresh copies: the all-clients row (the privacy floor holds per tensor)
            total, weight = self.totals[name]
            if k in js:  # take the recipient's own fresh copy out
                total = total - self.weights[k] * np.asarray(self.states[k][name], dtype=np.float64)
                weight -= self.weights[k]
            row[name] = (total / weight).astype(np.float32)
        return row


def fresh_weighted_row(
    states: Sequence[Mapping[str, np.ndarray]],
    shares: np.ndarray,
    k: int,
    carried: Sequence[Collection[str] | None],
    min_contributors: int = 2,
) -> TensorDict:
    """Client k's row Σ_j shares[j]·X_j of a weighted rule (relevance), each tensor over the others that carried
    it with their shares renormalised; where fewer than ``min_contributors`` others did, the all-clients row."""
    row = weighted_sum(states, shares)
    for name, js in _partial(states, carried).items():
        others = [j for j in js if j != k and shares[j] > 0]
        if len(others) < min_contributors:
            continue
        mass = float(sum(shares[j] for j in others))
        row[name] = weighted_sum([{name: states[j][name]} for j in others], [shares[j] / mass for j in others])[name]
    return row


def fresh_mean(
    states: Sequence[Mapping[str, np.ndarray]], weights: Sequence[float], carried: Sequence[Collection[str] | None]
) -> TensorDict:
    """The weighted mean, each tensor over the contributors that carried it (all of them where none did)."""
    mean = fedavg(states, weights)
    for name, js in _partial(states, carried).items():
        if js:
            mean[name] = fedavg([{name: states[j][name]} for j in js], [weights[j] for j in js])[name]
    return mean


__all__ = ["FreshLeaveOneOut", "fresh_mean", "fresh_weighted_row"]
