"""Data-free geometric alignment of LoRA factors before they are averaged (FedMosaic-Adaptive).

A LoRA module's update is the product B·A (B: out x r, A: r x in), and B·A = (B·Rᵀ)(R·A) for every orthogonal
r x r matrix R: the same update has many factorisations, one per basis of the rank space. Averaging A and B
separately (FedAvg, FedALT's factor-mean Rest-of-World) is only meaningful when the clients' factors share a
basis; where they do not, mean(B)·mean(A) can be far from mean(B·A) even when every client learned the same
product. Alignment rotates each client's factors into one basis first, sharing no data: client m's rotation is
the orthogonal Procrustes solution R_m = U·Vᵀ from the SVD U·Σ·Vᵀ = A_ref·A_mᵀ, which minimises
‖R_m·A_m − A_ref‖_F; then A_m → R_m·A_m and B_m → B_m·R_mᵀ, leaving every client's product exactly as it was.

Two choices, both measured (docs/benchmarks.md, the aggregation section):

* **The reference is a fixed anchor**, the job's seeded initial A (the server derives it from ``init_seed``; no
  client data). Every client is aligned to it independently, so the cost is O(N) small SVDs and the common basis
  does not move from round to round. A basis that moved (a reference taken from the round's own mean) would
  change the factors of an unchanged Rest-of-World, and the downlink, which sends the change against what the
  client holds, would pay for a pure change of basis. The anchor must be one the clients' A's are near: R_m
  is the polar factor of A_ref·A_mᵀ, which an unrelated anchor leaves ill-conditioned, and then small
  differences between clients turn into different rotations (measured at rank 4: an unrelated random anchor
  took the error of clients in one basis from 0.006 to 0.15). Every client's A starts from the job's init, so that is
  the anchor.
* **Only A decides the rotation.** A starts from the shared seeded init in every client and keeps its subspace;
  B starts at zero and is what differs most between clients. Stacking B into the Procrustes problem let clients'
  disagreeing B's turn their (agreeing) A's apart: on the benchmark's shared-init clients the factor-mean error
  went from 0.27 to 0.86 with [A; Bᵀ], and stayed at 0.27 with A alone.

Pure numpy, float64 inside (r x r SVDs are cheap), float32 out; tensors that are not LoRA pairs pass through.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from ..common.adapter import TensorDict
from .aggregation import lora_pairs


def procrustes_rotation(reference: np.ndarray, a: np.ndarray) -> np.ndarray:
    """The orthogonal R (r x r) that minimises ‖R·a − reference‖_F, for r x n matrices ``a`` and ``reference``."""
    u, _, vt = np.linalg.svd(np.asarray(reference, np.float64) @ np.asarray(a, np.float64).T)
    return u @ vt


def align_state(state: Mapping[str, np.ndarray], anchor: Mapping[str, np.ndarray]) -> TensorDict:
    """``state`` with each LoRA pair rotated so that its A is as close as a rotation makes it to ``anchor``'s A.

    New arrays for the pairs (the input is never written to); B·A of every pair is unchanged up to float32
    rounding."""
    out: TensorDict = dict(state)
    for a_name, b_name in lora_pairs(state):
        a, b = state[a_name], state[b_name]
        if a.ndim != 2 or b.ndim != 2 or a_name not in anchor or anchor[a_name].shape != a.shape:
            continue  # not a plain (r x in, out x r) pair, or no anchor for it: left as it is
        r = procrustes_rotation(anchor[a_name], a)
        out[a_name] = (r @ a.astype(np.float64)).astype(np.float32)
        out[b_name] = (b.astype(np.float64) @ r.T).astype(np.float32)
    return out


def align_states(states: Sequence[Mapping[str, np.ndarray]], anchor: Mapping[str, np.ndarray]) -> list[TensorDict]:
    """Every state aligned to the one anchor (one extra adapter-sized copy per state)."""
    return [align_state(s, anchor) for s in states]


__all__ = ["align_state", "align_states", "procrustes_rotation"]
