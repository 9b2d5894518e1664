"""Aggregation rules: pure numpy functions over named tensors (``dict[str, np.ndarray]``).

Leave-one-out (FedALT's Rest-of-World): client k receives the weighted mean of every *other*
client's adapter. Computed for all N clients from one weighted total S = Σ w_m X_m as
RoW_k = (S − w_k X_k) / (W − w_k): O(N·P) work instead of the naive O(N²·P).
Factors A and B are averaged separately, as the FedALT paper does ("factor-mean").
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from ..common.errors import JobError

TensorDict = dict[str, np.ndarray]


def _check(states: Sequence[Mapping[str, np.ndarray]], weights: Sequence[float]) -> None:
    if len(states) != len(weights):
        raise ValueError("one weight per state")
    if not states:
        raise JobError("nothing to aggregate")
    names = set(states[0])
    for s in states[1:]:
        if set(s) != names:
            raise ValueError("states have different tensor names")
    if any(w < 0 for w in weights) or sum(weights) <= 0:
        raise ValueError("weights must be non-negative with a positive sum")


def weighted_sum(states: Sequence[Mapping[str, np.ndarray]], weights: Sequence[float]) -> TensorDict:
    _check(states, weights)
    out: TensorDict = {}
    for name in states[0]:
        acc = np.zeros_like(states[0][name], dtype=np.float64)
        for s, w in zip(states, weights, strict=True):
            acc += w * s[name]
        out[name] = acc
    return out


def fedavg(states: Sequence[Mapping[str, np.ndarray]], weights: Sequence[float]) -> TensorDict:
    """Weighted mean of all states (one shared payload)."""
    total = weighted_sum(states, weights)
    w = float(sum(weights))
    return {k: (v / w).astype(np.float32) for k, v in total.items()}


def leave_one_out(states: Sequence[Mapping[str, np.ndarray]], weights: Sequence[float]) -> list[TensorDict]:
    """For each client k, the weighted mean of all other clients' states.

    Needs at least two clients with positive weight apart from each k; the sum is accumulated in
    float64 so that subtracting a client's own share does not cancel catastrophically.
    """
    _check(states, weights)
    if len(states) < 2:
        raise JobError("leave-one-out needs at least two contributing clients")
    total = weighted_sum(states, weights)
    w_total = float(sum(weights))
    out: list[TensorDict] = []
    for s, w in zip(states, weights, strict=True):
        rest = w_total - w
        if rest <= 0:
            raise JobError("a client holds all the weight: no other clients to average")
        out.append({k: ((total[k] - w * s[k]) / rest).astype(np.float32) for k in total})
    return out
