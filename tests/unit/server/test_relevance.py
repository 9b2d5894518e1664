"""SimGrad-style relevance weighting (server/relevance.py) and the ``loo-simgrad`` rule."""

from __future__ import annotations

import numpy as np
import pytest
from fedquic.common.errors import ConfigError
from fedquic.server.aggregation import LeaveOneOut, weighted_sum
from fedquic.server.alignment import align_states
from fedquic.server.config import JobConfig
from fedquic.server.relevance import drift_cosines, relevance_matrix
from fedquic.server.rules import RoundInputs, get_rule, job_rule

SHAPES = {"l.lora_A.weight": (2, 16), "l.lora_B.weight": (16, 2)}


def _clusters(sizes: tuple[int, ...], seed: int = 0) -> tuple[list[dict[str, np.ndarray]], dict[str, np.ndarray]]:
    """Clients in groups: each group drifts from the shared init in a direction of its own, plus a little noise."""
    rng = np.random.default_rng(seed)
    init = {k: rng.standard_normal(s).astype(np.float32) for k, s in SHAPES.items()}
    states = []
    for size in sizes:
        direction = {k: rng.standard_normal(s) for k, s in SHAPES.items()}
        for _ in range(size):
            states.append(
                {k: (init[k] + direction[k] + 0.1 * rng.standard_normal(SHAPES[k])).astype(np.float32) for k in init}
            )
    return states, init


def test_cosines_of_drifts() -> None:
    init = {"w": np.zeros(3, np.float32)}
    states = [{"w": np.array(v, np.float32)} for v in ([1, 0, 0], [2, 0, 0], [-1, 0, 0], [0, 0, 0], [0, 1, 0])]
    cos = drift_cosines(states, init)
    assert cos[0, 1] == pytest.approx(1.0) and cos[0, 2] == pytest.approx(-1.0) and cos[0, 4] == pytest.approx(0.0)
    assert cos[0, 3] == 0.0 and cos[3, 3] == 0.0  # a client that has not moved is related to no one
    np.testing.assert_allclose(cos, cos.T)


def test_rows_are_distributions_over_the_others_and_keep_the_floor() -> None:
    rng = np.random.default_rng(3)
    cos = np.clip(rng.uniform(-1, 1, (5, 5)), -1, 1)
    cos = (cos + cos.T) / 2
    w = [1.0, 2.0, 1.0, 3.0, 1.0]
    r = relevance_matrix(cos, w, temperature=0.05, floor=0.3)
    np.testing.assert_allclose(r.sum(axis=1), 1.0)
    assert np.all(np.diag(r) == 0)
    for k in range(5):
        rest = sum(w) - w[k]
        for j in range(5):
            if j != k:
                assert r[k, j] >= 0.3 * w[j] / rest - 1e-12  # every other contributor keeps its floor share


def test_a_floor_of_one_is_plain_leave_one_out() -> None:
    states, init = _clusters((2, 3))
    w = [1.0, 2.0, 1.0, 1.0, 3.0]
    r = relevance_matrix(drift_cosines(states, init), w, temperature=0.1, floor=1.0)
    loo = LeaveOneOut(states, w)
    for k in range(len(states)):
        row, want = weighted_sum(states, r[k]), loo.row(k)
        for name in want:
            np.testing.assert_allclose(row[name], want[name], rtol=1e-5, atol=1e-6)


def test_related_clients_weigh_more_than_unrelated_ones() -> None:
    states, init = _clusters((3, 3))
    out = get_rule("loo-simgrad").targets(RoundInputs(list("abcdef"), states, [1.0] * 6, ["idle"], init_state=init))
    for cid, group in zip("abcdef", ("abc", "abc", "abc", "def", "def", "def"), strict=True):
        share = out[cid].weights
        assert share is not None and set(share) == set("abcdef") - {cid}
        assert sum(share.values()) == pytest.approx(1.0, abs=1e-5)
        mine = min(v for k, v in share.items() if k in group)
        theirs = max(v for k, v in share.items() if k not in group)
        assert mine > 3 * theirs
        assert theirs >= 0.25 / 5 - 1e-6  # the default floor keeps every other client in the row
        assert out[cid].contributors == 5 and out[cid].kind == "row"
    assert out["idle"].weights is None and out["idle"].contributors == 6  # a listener gets the mean of all


def test_the_rule_checks_its_options() -> None:
    rule = job_rule(JobConfig(federation="fedalt", aggregation="loo-simgrad", rule_options={"temperature": 0.5}))
    assert rule is not None and rule.name == "loo-simgrad"
    with pytest.raises(ConfigError, match="does not read rule_options"):
        job_rule(JobConfig(federation="fedalt", aggregation="loo-simgrad", rule_options={"temp": 0.5}))
    with pytest.raises(ConfigError, match="does not read rule_options"):
        job_rule(JobConfig(federation="fedalt", rule_options={"temperature": 0.5}))  # loo-factor-mean has none
    with pytest.raises(ConfigError, match="temperature must be > 0"):
        job_rule(JobConfig(federation="fedalt", aggregation="loo-simgrad", rule_options={"temperature": 0.0}))


def test_mosaic_finds_related_clients_that_factorise_in_bases_of_their_own() -> None:
    """Two groups near the init's basis; each client then rotates its (A, B) pairs by its own orthogonal R, which
    leaves every product B·A as it was. Drift cosines of the raw factors lose the groups; aligned first, the
    relevance matrix finds them again (loo-mosaic = loo-aligned's rotation, then loo-simgrad's weights)."""
    rng = np.random.default_rng(5)
    rank, dim = 4, 48
    init = {"l.lora_A.weight": rng.standard_normal((rank, dim)), "l.lora_B.weight": np.zeros((dim, rank))}
    states = []
    for _group in range(2):
        da = 0.2 * rng.standard_normal((rank, dim))
        db = rng.standard_normal((dim, rank))
        for _ in range(3):
            a = init["l.lora_A.weight"] + da + 0.02 * rng.standard_normal((rank, dim))
            b = db + 0.05 * rng.standard_normal((dim, rank))
            q, _ = np.linalg.qr(rng.standard_normal((rank, rank)))
            states.append(
                {"l.lora_A.weight": (q @ a).astype(np.float32), "l.lora_B.weight": (b @ q.T).astype(np.float32)}
            )
    init32 = {k: v.astype(np.float32) for k, v in init.items()}
    inp = RoundInputs(list("abcdef"), states, [1.0] * 6, [], init_state=init32)

    def separation(rule: str) -> float:
        out = get_rule(rule).targets(inp)
        ratios = []
        for cid, group in zip("abcdef", ("abc",) * 3 + ("def",) * 3, strict=True):
            share = out[cid].weights
            assert share is not None
            ratios.append(
                min(v for k, v in share.items() if k in group) / max(v for k, v in share.items() if k not in group)
            )
        return min(ratios)

    assert separation("loo-mosaic") > 3.0  # its own group weighs more than 3x the other one, for every client
    assert separation("loo-simgrad") < separation("loo-mosaic") / 2  # the rotations hide the groups from simgrad
    # its rows are loo-simgrad's over the aligned factors
    aligned = RoundInputs(list("abcdef"), align_states(states, init32), [1.0] * 6, [], init_state=init32)
    mosaic, simgrad = get_rule("loo-mosaic").targets(inp), get_rule("loo-simgrad").targets(aligned)
    for cid in "abcdef":
        assert mosaic[cid].weights == simgrad[cid].weights
        got, want = mosaic[cid].make(), simgrad[cid].make()
        for name in want:
            np.testing.assert_allclose(got[name], want[name], rtol=1e-5, atol=1e-6)
