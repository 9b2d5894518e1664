"""Aggregation across clients of different LoRA ranks (CA-PFL's heterogeneous ranks; HetLoRA, FlexLoRA).

A client of rank r holds, per module, A (r x in) and B (out x r). Two ways to aggregate clients whose r differ,
and to hand each one back an adapter of its own rank:

* **zero-padding** (HetLoRA): pad every A with zero rows and every B with zero columns up to the largest rank R
  (the products B·A are unchanged), average the factors as FedALT's factor mean does, then give a rank-r client
  the first r components. Cheap (O(N·P)); exact only where the clients' factors share a basis, and the
  truncation drops whatever the mean put in components r..R.
* **SVD re-projection** (FlexLoRA): the weighted mean of the products Σ c_m B_m A_m, never formed as an
  out x in matrix (two thin QRs of the stacked factors, one SVD of a small core:
  :func:`fedquic.server.aggregation._low_rank_mean`, which takes stacks of any ranks), truncated to each
  recipient's rank: the best rank-r approximation of the exact mean (Eckart-Young). Costs one SVD of an
  (Σ r_m)² core per module and recipient rank.

Pure numpy; the caller groups recipients by rank (one re-projection per distinct rank, not per client).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from ..common.errors import JobError
from .aggregation import TensorDict, _low_rank_mean, fedavg, lora_pairs


def rank_of(state: Mapping[str, np.ndarray]) -> int:
    """The LoRA rank of a state: the row count of its A factors (all of them must agree)."""
    ranks = {int(state[a].shape[0]) for a, _ in lora_pairs(state)}
    if len(ranks) != 1:
        raise JobError(f"a state's LoRA factors disagree on their rank: {sorted(ranks)}")
    return ranks.pop()


def pad_to_rank(state: Mapping[str, np.ndarray], rank: int) -> TensorDict:
    """A zero-padded to ``rank`` rows and B to ``rank`` columns (the same products); other tensors as they are."""
    out = dict(state)
    for a_name, b_name in lora_pairs(state):
        a, b = state[a_name], state[b_name]
        r = a.shape[0]
        if r > rank:
            raise JobError(f"{a_name}: rank {r} is above the padded rank {rank}")
        out[a_name] = np.concatenate([a, np.zeros((rank - r, a.shape[1]), a.dtype)], axis=0)
        out[b_name] = np.concatenate([b, np.zeros((b.shape[0], rank - r), b.dtype)], axis=1)
    return out


def truncate_to_rank(state: Mapping[str, np.ndarray], rank: int) -> TensorDict:
    """The first ``rank`` components of every pair (what a zero-padded aggregate gives a rank-``rank`` client)."""
    out = dict(state)
    for a_name, b_name in lora_pairs(state):
        out[a_name] = np.ascontiguousarray(state[a_name][:rank])
        out[b_name] = np.ascontiguousarray(state[b_name][:, :rank])
    return out


def padded_mean(states: Sequence[Mapping[str, np.ndarray]], weights: Sequence[float]) -> TensorDict:
    """HetLoRA's aggregate: the weighted factor mean of the states zero-padded to the largest rank."""
    if not states or len(states) != len(weights) or sum(weights) <= 0:
        raise JobError("a padded mean needs states and one positive-sum weight each")
    top = max(rank_of(s) for s in states)
    return fedavg([pad_to_rank(s, top) for s in states], weights)


def reprojected_mean(states: Sequence[Mapping[str, np.ndarray]], weights: Sequence[float], rank: int) -> TensorDict:
    """FlexLoRA's aggregate for a rank-``rank`` recipient: the best rank-``rank`` factors of the weighted mean of
    the clients' products, whatever their own ranks (non-LoRA tensors: their weighted mean)."""
    if not states or len(states) != len(weights) or sum(weights) <= 0:
        raise JobError("a re-projected mean needs states and one positive-sum weight each")
    coeffs = [float(w) / float(sum(weights)) for w in weights]
    pairs = lora_pairs(states[0])
    out: TensorDict = {}
    for a_name, b_name in pairs:
        out[b_name], out[a_name] = _low_rank_mean(
            [s[b_name] for s in states], [s[a_name] for s in states], coeffs, rank
        )
    factors = {n for pair in pairs for n in pair}
    rest = [{k: v for k, v in s.items() if k not in factors} for s in states]
    if rest[0]:
        out.update(fedavg(rest, weights))
    return out


__all__ = ["pad_to_rank", "padded_mean", "rank_of", "reprojected_mean", "truncate_to_rank"]
