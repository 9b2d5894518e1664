"""Aggregation benchmark: the server's time to close a round, leave-one-out vs FedAvg, against a copy floor.

What it measures
----------------
For N clients with P-parameter LoRA states (rank-16 A/B pairs of width 2048, as peft names them), in one run:

* ``copy floor``: a warm ``np.copyto`` over all N·P float32 values (source and destination preallocated);
* ``loo``: every client's fp32 leave-one-out Rest-of-World (:class:`fedquic.server.aggregation.LeaveOneOut`:
  one float64-accumulated total, then one fused pass per client, each row produced then dropped, as the
  daemon does it: compute, encode, send, next), into one reused row buffer as the copy floor reuses its
  destination;
* ``loo+enc``: the same plus encoding each client's row as its downlink payload (INT8 per rank + LZ4, the
  default), i.e. the N different payloads a leave-one-out round must produce;
* ``fedavg`` / ``fedavg+enc``: the weighted mean and its one shared payload;
* ``exact`` (N ≤ 16 only; its SVD cost grows with N²): leave-one-out on the products B·A, re-factored by SVD.

With ``--disk`` states of the largest N live in ``np.memmap`` files (the per-client store the daemon keeps),
read back through the page cache. ``factor_mean_rel_err`` is ‖B̄Ā − mean(B_m A_m)‖/‖mean(B_m A_m)‖ for the
leave-one-out rows of 8 heterogeneous clients (each its own random low-rank adapter), i.e. how far FedALT's
factor-mean RoW is from the exact mean product.

Keys: ``loo_vs_copy_floor`` (N=64, P=10M, fp32 LOO without encoding / copy floor; target ≤ 3),
``loo_encoded_vs_copy_floor``, ``loo_vs_fedavg_time`` (round close with encoding, N=64, P=10M),
``loo_per_client_ms_n8``/``_n256`` (P=10M; O(N·P) means flat per client), ``peak_rss_mb``, ``factor_mean_rel_err``,
``hetero_rank_rel_err_padded``/``_svd`` (clients of ranks 4/8/16, each handed an aggregate of its own rank by
zero-padding or by SVD re-projection: server/ranks.py; ``_independent`` for unrelated factors) and
``hetero_rank_svd_ms``.

Run
---
::

    .venv/bin/python bench/aggregate.py --json          # N ∈ {8, 64, 256}, P ∈ {1M, 10M} (~5 min, ~14 GB disk)
    .venv/bin/python bench/aggregate.py --quick --json  # small sizes: smoke test

The 256 × 10M case keeps its states on disk (``--tmp DIR``, default the system temp dir; ~10 GB, removed after).
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from fedquic.common.codec import EncodingSpec, encode_payload
from fedquic.server.aggregation import (
    LeaveOneOut,
    fedavg,
    leave_one_out,
    leave_one_out_exact,
    lora_pairs,
    product_rel_error,
)
from fedquic.server.alignment import align_states
from fedquic.server.ranks import padded_mean, reprojected_mean, truncate_to_rank

# testkit/ (the test doubles) lives in the checkout, not in the installed package.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from testkit.synthetic import lora_schema

DIM, RANK = 2048, 16


def schema_for(p: int):  # type: ignore[no-untyped-def]
    per_layer = 2 * 2 * RANK * DIM  # q and v, A and B
    return lora_schema(max(1, round(p / per_layer)), DIM, RANK)


def make_states(n: int, p: int, disk: Path | None) -> list[dict[str, np.ndarray]]:
    """N states sharing one random base, each scaled differently (cheap to build, distinct per client)."""
    schema = schema_for(p)
    rng = np.random.default_rng(0)
    base = {t.name: rng.standard_normal(t.shape, dtype=np.float32) for t in schema.tensors}
    total = sum(int(np.prod(t.shape)) for t in schema.tensors)
    states = []
    for k in range(n):
        if disk is not None:
            flat = np.memmap(disk / f"client{k}.f32", dtype=np.float32, mode="w+", shape=(total,))
        else:
            flat = np.empty(total, dtype=np.float32)
        state, off = {}, 0
        for t in schema.tensors:
            size = int(np.prod(t.shape))
            view = flat[off : off + size].reshape(t.shape)
            np.multiply(base[t.name], np.float32(1.0 + 0.01 * k), out=view)
            state[t.name], off = view, off + size
        if disk is not None:
            flat.flush()
        states.append(state)
    return states


def best(fn: Callable[[], object], reps: int) -> float:
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def copy_floor(states: list[dict[str, np.ndarray]], reps: int) -> float:
    dst = [{k: np.empty_like(v) for k, v in s.items()} for s in states]

    def run() -> None:
        for s, d in zip(states, dst, strict=True):
            for k, v in s.items():
                np.copyto(d[k], v)

    run()  # warm: fault the destination in
    return best(run, reps)


def loo_all(states: list[dict[str, np.ndarray]], weights: list[float], encode: bool) -> None:
    loo = LeaveOneOut(states, weights)
    spec = EncodingSpec()
    # One reused row buffer, as the copy floor reuses its destination: fresh pages would add the kernel's
    # page-zeroing to every row (the daemon, which encodes rows concurrently, does pay that).
    buf = {k: np.empty_like(v) for k, v in states[0].items()}
    for k in range(len(loo)):
        row = loo.row(k, out=buf)
        if encode:
            encode_payload(row, spec)


def fedavg_close(states: list[dict[str, np.ndarray]], weights: list[float], encode: bool) -> None:
    g = fedavg(states, weights)
    if encode:
        encode_payload(g, EncodingSpec())


def factor_mean_error(
    shared_init: bool,
    n: int = 8,
    layers: int = 4,
    dim: int = 256,
    rank: int = 8,
    *,
    rotated: bool = False,
    aligned: bool = False,
) -> float:
    """Mean over clients of the relative error of the factor-mean RoW's product vs the exact mean product.

    ``shared_init``: as in a FedALT job, every client's A starts from the same init and drifts (A = A0 + 0.3·δ);
    otherwise every client's factors are independent (the worst case for averaging factors). ``rotated``: each
    client's pairs are then put in a basis of its own (A → Q·A, B → B·Qᵀ, Q random orthogonal: the same products,
    as clients whose training turned their rank space would have). ``aligned``: the rows are computed the way
    ``loo-aligned`` does, over factors aligned to the shared init A0 (server/alignment.py).
    """
    rng = np.random.default_rng(1)
    schema = lora_schema(layers, dim, rank)
    a0 = {t.name: rng.standard_normal(t.shape, dtype=np.float32) / np.sqrt(t.shape[-1]) for t in schema.tensors}
    states = []
    for _ in range(n):
        s = {}
        for t in schema.tensors:
            noise = rng.standard_normal(t.shape, dtype=np.float32) / np.sqrt(t.shape[-1])
            s[t.name] = a0[t.name] + 0.3 * noise if shared_init and ".lora_A." in t.name else noise
        if rotated:
            for a_name, b_name in lora_pairs(s):
                q, _ = np.linalg.qr(rng.standard_normal((rank, rank)))
                s[a_name], s[b_name] = (q @ s[a_name]).astype(np.float32), (s[b_name] @ q.T).astype(np.float32)
        states.append(s)
    w = [1.0] * n
    rows = leave_one_out(align_states(states, a0) if aligned else states, w)
    errs = []
    for k, row in enumerate(rows):
        others = [s for m, s in enumerate(states) if m != k]
        errs.append(product_rel_error(row, others, [1.0 / (n - 1)] * (n - 1)))
    return float(np.mean(errs))


def hetero_rank_errors(
    shared_init: bool, ranks: tuple[int, ...] = (4, 8, 16, 4, 8, 16), layers: int = 4, dim: int = 256
) -> dict[str, float]:
    """Clients of ranks 4/8/16 (NVIDIA FLARE's heterogeneous-rank setting): the mean over clients of the relative
    product error of what each gets back at its own rank, against the exact weighted mean of every client's
    product (FedAvg's target), for zero-padding (HetLoRA: factor mean at the largest rank, then the first r
    components) and SVD re-projection (FlexLoRA), with the time of one re-projection of all modules.
    ``shared_init``: every client's A starts from the first r rows of one rank-16 init and drifts (A = A0[:r] +
    0.3·δ), as a job's seeded init gives them; otherwise every client's factors are independent."""
    rng = np.random.default_rng(2)
    top = max(ranks)
    schema = lora_schema(layers, dim, top)
    a0 = {t.name: rng.standard_normal(t.shape, dtype=np.float32) / np.sqrt(t.shape[-1]) for t in schema.tensors}
    states = []
    for r in ranks:
        s = {}
        for t in schema.tensors:
            shape = (r, t.shape[1]) if ".lora_A." in t.name else (t.shape[0], r)
            noise = rng.standard_normal(shape, dtype=np.float32) / np.sqrt(shape[-1])
            s[t.name] = a0[t.name][:r] + 0.3 * noise if shared_init and ".lora_A." in t.name else noise
        states.append(s)
    w = [1.0] * len(states)
    coeffs = [1.0 / len(states)] * len(states)
    padded = padded_mean(states, w)
    t0 = time.perf_counter()
    by_rank = {r: reprojected_mean(states, w, r) for r in sorted(set(ranks))}
    svd_ms = (time.perf_counter() - t0) * 1000 / len(by_rank)
    pad_err = [product_rel_error(truncate_to_rank(padded, r), states, coeffs) for r in ranks]
    svd_err = [product_rel_error(by_rank[r], states, coeffs) for r in ranks]
    return {"padded": float(np.mean(pad_err)), "svd": float(np.mean(svd_err)), "svd_ms": svd_ms}


def align_ms_per_client(n: int, p: int, reps: int) -> float:
    """Time to align one client's P-parameter state to the anchor (what ``loo-aligned`` adds per contributor)."""
    states = make_states(n, p, None)
    anchor = states[0]
    return 1000 * best(lambda: align_states(states, anchor), reps) / n


def measure(n: int, p: int, disk: Path | None, reps: int) -> dict[str, Any]:
    states = make_states(n, p, disk)
    w = [1.0 + (k % 3) for k in range(n)]
    # The copy floor needs a second N·P buffer: measured where states are in memory, not for the disk case.
    floor = copy_floor(states, reps) if disk is None else float("nan")
    reps = 1 if n * p >= 1e9 else reps
    loo_s = best(lambda: loo_all(states, w, False), reps)
    encode = n * p <= 64 * 10_000_000  # encoding 256 rows of 10M values adds minutes and no information
    loo_enc_s = best(lambda: loo_all(states, w, True), 1) if encode else float("nan")
    return {
        "n": n,
        "p_nominal": p,
        "p": sum(v.size for v in states[0].values()),
        "store": "disk" if disk else "memory",
        "copy_s": floor,
        "loo_s": loo_s,
        "loo_encoded_s": loo_enc_s,
        "fedavg_s": best(lambda: fedavg_close(states, w, False), reps),
        "fedavg_encoded_s": best(lambda: fedavg_close(states, w, True), reps),
        "loo_vs_copy": loo_s / floor,
        "loo_per_client_ms": 1000 * loo_s / n,
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--quick", action="store_true", help="small sizes (smoke test)")
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--tmp", type=Path, default=None, help="where on-disk states go (default: system temp)")
    args = ap.parse_args(argv)
    if args.quick:
        grid = [(4, 200_000), (8, 200_000)]
        main_case, disk_case, exact_ns = (8, 200_000), (0, 0), (4,)
    else:
        grid = [(8, 1_000_000), (64, 1_000_000), (256, 1_000_000), (8, 10_000_000), (64, 10_000_000), (256, 10_000_000)]
        main_case, disk_case, exact_ns = (64, 10_000_000), (256, 10_000_000), (8, 16)
    rows: list[dict[str, Any]] = []
    print(
        f"{'N':>4} {'P':>10} {'store':>6} {'copy s':>8} {'loo s':>8} {'loo+enc s':>10} {'fedavg s':>9} "
        f"{'fedavg+enc':>10} {'loo/copy':>8} {'ms/client':>9}"
    )
    for n, p in grid:
        tmpdir = None
        if (n, p) == disk_case and not args.quick:
            tmpdir = Path(tempfile.mkdtemp(prefix="fedquic-agg-", dir=args.tmp))
        try:
            row = measure(n, p, tmpdir, args.reps)
        finally:
            if tmpdir is not None:
                shutil.rmtree(tmpdir, ignore_errors=True)
        rows.append(row)
        print(
            f"{n:>4} {row['p']:>10} {row['store']:>6} {row['copy_s']:>8.3f} {row['loo_s']:>8.3f} "
            f"{row['loo_encoded_s']:>10.3f} {row['fedavg_s']:>9.3f} {row['fedavg_encoded_s']:>10.3f} "
            f"{row['loo_vs_copy']:>8.2f} {row['loo_per_client_ms']:>9.2f}",
            flush=True,
        )
    exact_rows = []
    for n in exact_ns:
        p = 1_000_000 if not args.quick else 200_000
        states = make_states(n, p, None)
        # heterogeneous products: scaled copies would make the exact mean trivial
        rng = np.random.default_rng(n)
        for s in states:
            for v in s.values():
                v += rng.standard_normal(v.shape, dtype=np.float32)
        w = [1.0] * n
        ex = best(lambda: leave_one_out_exact(states, w), 1)  # noqa: B023
        fm = best(lambda: loo_all(states, w, False), 1)  # noqa: B023
        exact_rows.append({"n": n, "p": p, "exact_s": ex, "factor_mean_s": fm, "exact_vs_factor_mean": ex / fm})
        print(f"exact N={n} P={p}: {ex:.2f} s ({ex / fm:.0f}x factor-mean)")

    def case(n: int, p: int) -> dict[str, Any]:
        return next(r for r in rows if (r["n"], r["p_nominal"]) == (n, p))

    key_case = case(*main_case)
    n_small, n_large = (grid[0][0], grid[-1][0]) if args.quick else (8, 256)
    n8, n256 = case(n_small, main_case[1]), case(n_large, main_case[1])
    err = factor_mean_error(shared_init=True)
    err_indep = factor_mean_error(shared_init=False)
    errs_aligned = {
        "factor_mean_rel_err_aligned": factor_mean_error(shared_init=True, aligned=True),
        "factor_mean_rel_err_independent_aligned": factor_mean_error(shared_init=False, aligned=True),
        "factor_mean_rel_err_rotated": factor_mean_error(shared_init=True, rotated=True),
        "factor_mean_rel_err_rotated_aligned": factor_mean_error(shared_init=True, rotated=True, aligned=True),
    }
    align_ms = align_ms_per_client(8, 200_000 if args.quick else 10_000_000, args.reps)
    hetero = hetero_rank_errors(shared_init=True)
    hetero_indep = hetero_rank_errors(shared_init=False)
    result = {
        "bench": "aggregate",
        "quick": args.quick,
        "python": platform.python_version(),
        "numpy": np.__version__,
        "loo_vs_copy_floor": key_case["loo_vs_copy"],
        "loo_encoded_vs_copy_floor": key_case["loo_encoded_s"] / key_case["copy_s"],
        "loo_vs_fedavg_time": key_case["loo_encoded_s"] / key_case["fedavg_encoded_s"],
        "loo_per_client_ms_n8": n8["loo_per_client_ms"],
        "loo_per_client_ms_n256": n256["loo_per_client_ms"],
        "per_client_flatness": n256["loo_per_client_ms"] / n8["loo_per_client_ms"],
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "factor_mean_rel_err": err,
        "factor_mean_rel_err_independent": err_indep,
        **errs_aligned,
        "align_ms_per_client": align_ms,
        "hetero_rank_rel_err_padded": hetero["padded"],
        "hetero_rank_rel_err_svd": hetero["svd"],
        "hetero_rank_rel_err_padded_independent": hetero_indep["padded"],
        "hetero_rank_rel_err_svd_independent": hetero_indep["svd"],
        "hetero_rank_svd_ms": hetero["svd_ms"],
        "rows": rows,
        "exact": exact_rows,
    }
    print(
        f"\nloo/copy floor {result['loo_vs_copy_floor']:.2f} (target <= 3), with encoding "
        f"{result['loo_encoded_vs_copy_floor']:.1f}; loo/fedavg round close {result['loo_vs_fedavg_time']:.1f}x; "
        f"per client {result['loo_per_client_ms_n8']:.1f} ms (N small) vs {result['loo_per_client_ms_n256']:.1f} ms "
        f"(N large); factor-mean rel. error {err:.3f} (shared init), {err_indep:.3f} (independent); "
        f"peak RSS {result['peak_rss_mb']:.0f} MB"
    )
    print(
        "aligned to the shared init (loo-aligned): "
        + ", ".join(f"{k.removeprefix('factor_mean_rel_err_')} {v:.3f}" for k, v in errs_aligned.items())
        + f"; {align_ms:.1f} ms per client"
    )
    print(
        f"ranks 4/8/16, each client at its own rank vs the exact mean product: zero-padding "
        f"{hetero['padded']:.3f}, SVD re-projection {hetero['svd']:.3f} (shared init; independent "
        f"{hetero_indep['padded']:.3f} / {hetero_indep['svd']:.3f}); {hetero['svd_ms']:.1f} ms per recipient rank"
    )
    if args.json:
        print(json.dumps(result, default=lambda x: None if x != x else x))
    return 0


if __name__ == "__main__":
    sys.exit(main())
