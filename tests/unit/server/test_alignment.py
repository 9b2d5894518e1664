"""Data-free geometric alignment (server/alignment.py) and the rules that use it."""

from __future__ import annotations

import numpy as np
import pytest
from fedquic.common.adapter import init_lora_state
from fedquic.server.aggregation import LeaveOneOut, fedavg, leave_one_out, lora_pairs, product_rel_error
from fedquic.server.alignment import align_state, align_states, procrustes_rotation
from fedquic.server.config import JobConfig
from fedquic.server.rules import RoundInputs, get_rule, job_rule

from testkit.synthetic import lora_schema

RANK = 4


def _rotation(rng: np.random.Generator, r: int = RANK) -> np.ndarray:
    q, _ = np.linalg.qr(rng.standard_normal((r, r)))
    return q


def _clients(n: int, rotated: bool, seed: int = 0) -> tuple[list[dict[str, np.ndarray]], dict[str, np.ndarray]]:
    """n clients that started from the job's init (the anchor) and learned nearly the same products; with
    ``rotated`` each factorises them in its own basis."""
    rng = np.random.default_rng(seed)
    schema = lora_schema(layers=2, dim=32, rank=RANK)
    anchor = init_lora_state(schema, seed=7)
    base = {  # A: the init plus a drift all share; B (zero at the init): what they learned
        k: (
            v + 0.1 * rng.standard_normal(v.shape) * np.abs(v).max()
            if ".lora_A." in k
            else rng.standard_normal(v.shape)
        )
        for k, v in anchor.items()
    }
    states = []
    for _ in range(n):
        s = {k: (v + 0.05 * np.abs(v).max() * rng.standard_normal(v.shape)).astype(np.float32) for k, v in base.items()}
        if rotated:
            for a, b in lora_pairs(s):
                q = _rotation(rng)
                s[a], s[b] = (q @ s[a]).astype(np.float32), (s[b] @ q.T).astype(np.float32)
        states.append(s)
    return states, anchor


def _loo_error(states: list[dict[str, np.ndarray]], rows: list[dict[str, np.ndarray]]) -> float:
    n = len(states)
    others = [[s for m, s in enumerate(states) if m != k] for k in range(n)]
    return float(np.mean([product_rel_error(rows[k], others[k], [1 / (n - 1)] * (n - 1)) for k in range(n)]))


def test_the_rotation_is_orthogonal_and_recovers_a_known_one() -> None:
    rng = np.random.default_rng(1)
    a = rng.standard_normal((RANK, 50))
    q = _rotation(rng)
    r = procrustes_rotation(a, q @ a)  # the rotation that takes q·a back to a
    np.testing.assert_allclose(r @ r.T, np.eye(RANK), atol=1e-12)
    np.testing.assert_allclose(r, q.T, atol=1e-10)


def test_alignment_keeps_every_product_and_leaves_the_input_alone() -> None:
    states, anchor = _clients(3, rotated=True)
    before = {k: v.copy() for k, v in states[0].items()}
    out = align_state(states[0], anchor)
    for k in before:  # the client's own arrays are not written to
        np.testing.assert_array_equal(states[0][k], before[k])
    for a, b in lora_pairs(out):
        assert out[a].dtype == np.float32 and out[a] is not states[0][a]
        np.testing.assert_allclose(out[b] @ out[a], states[0][b] @ states[0][a], rtol=1e-4, atol=1e-5)


def test_rotated_bases_are_brought_together_and_the_factor_mean_recovers_the_mean_product() -> None:
    states, anchor = _clients(6, rotated=True)
    w = [1.0] * len(states)
    plain = _loo_error(states, leave_one_out(states, w))
    aligned = _loo_error(states, leave_one_out(align_states(states, anchor), w))
    assert plain > 0.5  # averaging factors in different bases: far from the mean product
    assert aligned < plain / 10


def test_clients_in_one_basis_are_not_made_worse() -> None:
    states, anchor = _clients(6, rotated=False)
    w = [1.0] * len(states)
    plain = _loo_error(states, leave_one_out(states, w))
    aligned = _loo_error(states, leave_one_out(align_states(states, anchor), w))
    assert aligned <= plain * 1.05 + 1e-6


def test_the_anchor_keeps_the_basis_fixed_from_round_to_round() -> None:
    """A client already aligned is not moved again: the aligned factors of an unchanged adapter do not change,
    so the downlink (the change against what a client holds) pays nothing for alignment."""
    states, anchor = _clients(2, rotated=True)
    once = align_state(states[0], anchor)
    twice = align_state(once, anchor)
    for k in once:
        np.testing.assert_allclose(twice[k], once[k], atol=1e-5)


def test_tensors_that_are_not_lora_pairs_pass_through() -> None:
    states, anchor = _clients(1, rotated=True)
    s = {**states[0], "mixer.weight": np.ones(3, np.float32)}
    out = align_state(s, anchor)
    assert out["mixer.weight"] is s["mixer.weight"]


@pytest.mark.parametrize(("name", "plain"), [("loo-aligned", "loo-factor-mean"), ("fedavg-aligned", "fedavg")])
def test_the_aligned_rules_average_aligned_factors(name: str, plain: str) -> None:
    states, anchor = _clients(4, rotated=True)
    w = [1.0, 2.0, 1.0, 3.0]
    inp = RoundInputs(["a", "b", "c", "d"], states, w, ["idle"], init_state=anchor)
    out = get_rule(name).targets(inp)
    assert get_rule(name).kind == get_rule(plain).kind and set(out) == {"a", "b", "c", "d", "idle"}
    aligned = align_states(states, anchor)
    if name == "loo-aligned":
        loo = LeaveOneOut(aligned, w)
        want = {cid: loo.row(k) for k, cid in enumerate("abcd")} | {"idle": fedavg(aligned, w)}
    else:
        want = dict.fromkeys("abcd", fedavg(aligned, w)) | {"idle": fedavg(aligned, w)}
    for cid, t in out.items():
        got = t.make()
        for k in want[cid]:
            np.testing.assert_allclose(got[k], want[cid][k], rtol=1e-5, atol=1e-6)


def test_a_job_can_name_the_aligned_rules() -> None:
    assert job_rule(JobConfig(federation="fedalt", aggregation="loo-aligned")).kind == "row"  # type: ignore[union-attr]
    assert job_rule(JobConfig(federation="fedavg", aggregation="fedavg-aligned")).kind == "global"  # type: ignore[union-attr]
