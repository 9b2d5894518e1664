"""SimGrad-style relevance weighting of the Rest-of-World (FedMosaic-Adaptive).

Leave-one-out gives client k the plain mean of every other client's adapter, so a client with an unrelated task
counts as much as one with a related one. Relevance weighting gives it Σ_j r_kj·X_j instead, with

    r_kj ∝ w_j · exp(cos(s_k, s_j) / τ)  over j ≠ k,  then  r_k ← (1 − ρ)·r_k + ρ·(w_j / Σ_{j≠k} w_j)

where s_j is client j's signature, w_j its weight (uniform, or by samples), τ the temperature and ρ the floor:
every other contributor keeps at least ρ·w_j/Σw of the row, so the Rest-of-World stays a mixture of all of them
(the ``min_row_contributors`` privacy floor is about how many clients a row mixes; the floor keeps each of
them in it, and a row never collapses onto one other client). With ρ = 1 (or τ → ∞) it is exactly leave-one-out.

**The signature** is the direction of the client's drift from the job's shared initial adapter, s_j = X_j − X₀,
computed by the server from the adapters it already holds: stateless across rounds (nothing to persist or lose
in a crash), and an average of every update the client has made, which is the smoothed update direction that
SimGrad's EMA approximates. It needs nothing on the wire while the server sees the clients' adapters; a signature
the clients compute and send (a seeded random projection, optionally noised) is the form for when it does not
(updates masked by secure aggregation).

Cost: the N x N Gram matrix of the drifts (one BLAS product per tensor, O(N²·P)), and each row a weighted sum of
N − 1 adapters (O(N·P) per client, O(N²·P) per round, against O(N·P) for leave-one-out's shared total): meant
for tens of clients per round.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from ..common.errors import JobError


def drift_cosines(states: Sequence[Mapping[str, np.ndarray]], anchor: Mapping[str, np.ndarray]) -> np.ndarray:
    """N x N cosine similarities of the clients' drifts X_j − anchor (0 where a client has not moved)."""
    n = len(states)
    gram = np.zeros((n, n))
    for name in sorted(states[0]):
        base = np.asarray(anchor[name], dtype=np.float64).reshape(-1) if name in anchor else 0.0
        drift = np.stack([np.asarray(s[name], dtype=np.float64).reshape(-1) - base for s in states])
        gram += drift @ drift.T
    norms = np.sqrt(np.clip(np.diag(gram), 0.0, None))
    denom = np.outer(norms, norms)
    with np.errstate(invalid="ignore", divide="ignore"):
        cos = np.where(denom > 0, gram / np.where(denom > 0, denom, 1.0), 0.0)
    return np.clip(cos, -1.0, 1.0)


def relevance_matrix(cos: np.ndarray, weights: Sequence[float], temperature: float, floor: float) -> np.ndarray:
    """R (N x N): row k holds client k's weights on the others (zero diagonal, each row sums to 1)."""
    n = cos.shape[0]
    if n < 2:
        raise JobError("relevance weighting needs at least two contributing clients")
    if temperature <= 0 or not 0.0 <= floor <= 1.0:
        raise JobError(f"relevance: temperature must be > 0 and floor in [0, 1] (got {temperature}, {floor})")
    w = np.asarray(weights, dtype=np.float64)
    others = ~np.eye(n, dtype=bool)
    logits = np.where(others, cos / temperature, -np.inf)
    logits -= logits.max(axis=1, keepdims=True)  # stable softmax
    soft = np.where(others, w[None, :] * np.exp(logits), 0.0)
    uniform = np.where(others, w[None, :], 0.0)
    sums, usums = soft.sum(axis=1, keepdims=True), uniform.sum(axis=1, keepdims=True)
    if np.any(usums <= 0):
        raise JobError("a client holds all the weight: no other clients to average")
    soft = np.where(sums > 0, soft / np.where(sums > 0, sums, 1.0), uniform / usums)
    return (1.0 - floor) * soft + floor * uniform / usums


__all__ = ["drift_cosines", "relevance_matrix"]
