"""Aggregation rules: pure numpy functions over named tensors (``dict[str, np.ndarray]``).

Leave-one-out (FedALT's Rest-of-World): client k receives the weighted mean of every *other*
client's adapter. Computed for all N clients from one weighted total S = Σ w_m X_m as
RoW_k = (S − w_k X_k) / (W − w_k): O(N·P) work instead of the naive O(N²·P).
Factors A and B are averaged separately, as the FedALT paper does ("factor-mean").
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

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


# Elements per step of the fused loops: big enough that numpy's per-call cost vanishes, small enough that the
# temporaries stay in cache, so each pass streams its inputs from memory once.
CHUNK = 1 << 18


# Clients summed in float32 before each float64 accumulation: float32 SIMD adds with no casts in the inner loop,
# and a rounding error of at most GROUP·eps32 per partial sum, which the float64 total then carries exactly.
GROUP = 16


def _weighted_total(states: Sequence[Mapping[str, np.ndarray]], weights: Sequence[float], name: str) -> np.ndarray:
    """Σ w_m X_m[name]: float32 partial sums of up to GROUP equally weighted clients (one add per client, the
    weight applied once per partial), accumulated in float64, rounded once to float32."""
    shape = states[0][name].shape
    n = int(np.prod(shape))
    out = np.empty(n, dtype=np.float32)
    c = min(CHUNK, n)
    acc, part = np.empty(c, dtype=np.float64), np.empty(c, dtype=np.float32)
    flats = [np.asarray(s[name], dtype=np.float32).reshape(-1) for s in states]
    by_weight: dict[float, list[np.ndarray]] = {}
    for x, w in zip(flats, weights, strict=True):
        if w:
            by_weight.setdefault(float(w), []).append(x)
    groups = [(np.float32(w), xs[g : g + GROUP]) for w, xs in by_weight.items() for g in range(0, len(xs), GROUP)]
    for i in range(0, n, CHUNK):
        j = min(i + CHUNK, n)
        a, p = acc[: j - i], part[: j - i]
        a.fill(0.0)
        for w, xs in groups:
            np.copyto(p, xs[0][i:j])
            for x in xs[1:]:
                p += x[i:j]
            p *= w
            a += p
        out[i:j] = a
    return out.reshape(shape)


def weighted_sum(states: Sequence[Mapping[str, np.ndarray]], weights: Sequence[float]) -> TensorDict:
    _check(states, weights)
    return {name: _weighted_total(states, weights, name) for name in states[0]}


def fedavg(states: Sequence[Mapping[str, np.ndarray]], weights: Sequence[float]) -> TensorDict:
    """Weighted mean of all states (one shared payload)."""
    total = weighted_sum(states, weights)
    scale = np.float32(1.0 / float(sum(weights)))
    for v in total.values():
        v *= scale
    return total


class LeaveOneOut:
    """Every client's Rest-of-World from one weighted total: RoW_k = (S − w_k X_k) / (W − w_k).

    ``S`` costs one pass over all states; each row is then one fused pass (read S and X_k, write the row) done
    on demand, so a server can compute, encode and send one client's RoW at a time in O(P) extra memory.
    """

    def __init__(self, states: Sequence[Mapping[str, np.ndarray]], weights: Sequence[float]) -> None:
        _check(states, weights)
        if len(states) < 2:
            raise JobError("leave-one-out needs at least two contributing clients")
        self.states = states
        self.weights = [float(w) for w in weights]
        self.w_total = float(sum(self.weights))
        if any(self.w_total - w <= 0 for w in self.weights):
            raise JobError("a client holds all the weight: no other clients to average")
        self.total = weighted_sum(states, self.weights)
        self._scaled: dict[float, TensorDict] = {}

    def __len__(self) -> int:
        return len(self.states)

    def _scaled_total(self, rest: float) -> TensorDict:
        """S / rest, cached per distinct weight (uniform weights: one copy for every client)."""
        cached = self._scaled.get(rest)
        if cached is None:
            if len(self._scaled) >= 4:  # bounded: each entry is one more adapter-sized array
                self._scaled.pop(next(iter(self._scaled)))
            b = np.float32(1.0 / rest)
            cached = self._scaled[rest] = {k: v * b for k, v in self.total.items()}
        return cached

    def row(self, k: int, out: TensorDict | None = None) -> TensorDict:
        """Client k's Rest-of-World; written into ``out`` (same names and shapes) when given, else new arrays."""
        rest = self.w_total - self.weights[k]
        scaled = self._scaled_total(rest)
        a = np.float32(-self.weights[k] / rest)
        result: TensorDict = {}
        for name, total in scaled.items():
            s = total.reshape(-1)
            x = np.asarray(self.states[k][name], dtype=np.float32).reshape(-1)
            o = np.empty_like(s) if out is None else out[name].reshape(-1)
            for i in range(0, s.size, CHUNK):  # o = S/rest − (w_k/rest)·X_k, the chunk of o stays in cache
                j = min(i + CHUNK, s.size)
                np.multiply(x[i:j], a, out=o[i:j])
                np.add(o[i:j], s[i:j], out=o[i:j])
            result[name] = o.reshape(total.shape)
        return result


def leave_one_out(states: Sequence[Mapping[str, np.ndarray]], weights: Sequence[float]) -> list[TensorDict]:
    """For each client k, the weighted mean of all other clients' states (see :class:`LeaveOneOut`).

    The total is accumulated in float64 and rounded once, so subtracting a client's own share loses at most
    float32 rounding of S relative to the rest's weight.
    """
    loo = LeaveOneOut(states, weights)
    return [loo.row(k) for k in range(len(loo))]


def lora_pairs(names: Iterable[str]) -> list[tuple[str, str]]:
    """(A name, B name) for every LoRA module: peft names its factors ``<module>.lora_A.weight`` / ``lora_B``."""
    names = set(names)
    pairs = []
    for a in sorted(n for n in names if ".lora_A." in n):
        b = a.replace(".lora_A.", ".lora_B.")
        if b not in names:
            raise ValueError(f"{a} has no matching lora_B tensor")
        pairs.append((a, b))
    return pairs


def _low_rank_mean(
    bs: Sequence[np.ndarray], as_: Sequence[np.ndarray], coeffs: Sequence[float], rank: int
) -> tuple[np.ndarray, np.ndarray]:
    """Best rank-``rank`` factors (B', A') of Σ c_m B_m A_m, without forming the out x in product.

    Σ c_m B_m A_m = [c_1 B_1 ... c_n B_n] [A_1; ...; A_n] = Qb (Rb Ra^T) Qa^T after two thin QRs, so one SVD of a
    small (n·r x n·r) core gives the truncated SVD; the singular values are split evenly between the factors.
    """
    b_stack = np.concatenate([c * b.astype(np.float64) for c, b in zip(coeffs, bs, strict=True)], axis=1)
    a_stack = np.concatenate([a.astype(np.float64) for a in as_], axis=0)
    qb, rb = np.linalg.qr(b_stack)
    qa, ra = np.linalg.qr(a_stack.T)
    u, s, vt = np.linalg.svd(rb @ ra.T)
    k = min(rank, s.size)
    root = np.sqrt(s[:k])
    b_new = np.zeros((b_stack.shape[0], rank))
    a_new = np.zeros((rank, a_stack.shape[1]))
    b_new[:, :k] = (qb @ u[:, :k]) * root
    a_new[:k] = (root[:, None] * vt[:k]) @ qa.T
    return b_new.astype(np.float32), a_new.astype(np.float32)


def leave_one_out_exact(states: Sequence[Mapping[str, np.ndarray]], weights: Sequence[float]) -> list[TensorDict]:
    """Leave-one-out on LoRA *products*: client k gets the best rank-r factors of mean_{m≠k} B_m A_m.

    ``factor-mean`` averages A and B separately, so its product is not the mean of the products
    (mean(B)·mean(A) ≠ mean(B·A)); this is the exact mean, truncated back to the job's rank r by SVD.
    Cost per client grows with ((N−1)·r)² · (in + out): meant for tens of clients, not hundreds.
    """
    _check(states, weights)
    if len(states) < 2:
        raise JobError("leave-one-out needs at least two contributing clients")
    w_total = float(sum(weights))
    out: list[TensorDict] = []
    for k in range(len(states)):
        if w_total - weights[k] <= 0:
            raise JobError("a client holds all the weight: no other clients to average")
        others = [m for m in range(len(states)) if m != k]
        out.append(exact_mean([states[m] for m in others], [weights[m] for m in others]))
    return out


def exact_mean(states: Sequence[Mapping[str, np.ndarray]], weights: Sequence[float]) -> TensorDict:
    """Best rank-r factors of the weighted mean of the clients' products B_m·A_m (r: each A's row count)."""
    _check(states, weights)
    w = float(sum(weights))
    coeffs = [wi / w for wi in weights]
    out: TensorDict = {}
    for a_name, b_name in lora_pairs(states[0]):
        rank = states[0][a_name].shape[0]
        out[b_name], out[a_name] = _low_rank_mean(
            [s[b_name] for s in states], [s[a_name] for s in states], coeffs, rank
        )
    return out


def product_rel_error(
    approx: Mapping[str, np.ndarray], states: Sequence[Mapping[str, np.ndarray]], coeffs: Sequence[float]
) -> float:
    """‖Σ_pairs (B'A' − Σ c_m B_m A_m)‖_F / ‖Σ c_m B_m A_m‖_F: how far ``approx`` is from the exact mean product."""
    num = den = 0.0
    for a_name, b_name in lora_pairs(approx):
        exact = sum(
            c * (s[b_name].astype(np.float64) @ s[a_name].astype(np.float64))
            for c, s in zip(coeffs, states, strict=True)
        )
        diff = approx[b_name].astype(np.float64) @ approx[a_name].astype(np.float64) - exact
        num += float(np.square(diff).sum())
        den += float(np.square(exact).sum())
    return float(np.sqrt(num / den)) if den > 0 else 0.0


def clip_deviation(state: Mapping[str, np.ndarray], reference: Mapping[str, np.ndarray], max_norm: float) -> TensorDict:
    """reference + (state − reference) scaled down to global L2 norm ``max_norm`` if larger (robust aggregation).

    Applied to what a client contributes to an aggregate, never to the server's copy of its adapter, which
    must stay exactly what the client holds.
    """
    dev = {k: state[k] - reference[k] for k in state}
    norm = float(np.sqrt(sum(float(np.square(v, dtype=np.float64).sum()) for v in dev.values())))
    if norm <= max_norm or norm == 0.0:
        return dict(state)
    scale = np.float32(max_norm / norm)
    return {k: reference[k] + dev[k] * scale for k in state}
