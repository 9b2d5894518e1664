"""Routed rounds: each tensor aggregated over the clients that carried it (server/freshness.py)."""

from __future__ import annotations

import numpy as np
from fedquic.server.aggregation import LeaveOneOut, fedavg
from fedquic.server.freshness import FreshLeaveOneOut, fresh_mean
from fedquic.server.rules import RoundInputs, get_rule


def _states(n: int) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(0)
    return [
        {"x": rng.standard_normal(3).astype(np.float32), "y": rng.standard_normal(2).astype(np.float32)}
        for _ in range(n)
    ]


def test_a_tensor_is_averaged_over_the_clients_that_carried_it() -> None:
    states, w = _states(4), [1.0, 2.0, 1.0, 1.0]
    carried = [frozenset({"x", "y"}), frozenset({"y"}), frozenset({"x", "y"}), frozenset({"x", "y"})]  # 1 skipped x
    loo = FreshLeaveOneOut(states, w, carried, min_contributors=2)
    plain = LeaveOneOut(states, w)
    for k in range(4):
        row = loo.row(k)
        np.testing.assert_allclose(row["y"], plain.row(k)["y"], rtol=1e-6)  # everyone carried y: unchanged
        fresh = [j for j in (0, 2, 3) if j != k]
        want = sum(w[j] * states[j]["x"].astype(np.float64) for j in fresh) / sum(w[j] for j in fresh)
        np.testing.assert_allclose(row["x"], want, rtol=1e-6)  # client 1's stale x is left out


def test_a_tensor_too_few_carried_keeps_the_all_clients_row() -> None:
    states, w = _states(3), [1.0] * 3
    carried = [frozenset({"x", "y"}), frozenset({"y"}), frozenset({"y"})]  # only client 0 carried x
    loo, plain = FreshLeaveOneOut(states, w, carried, min_contributors=2), LeaveOneOut(states, w)
    for k in range(3):  # one fresh copy of x is never a row of its own (the privacy floor, per tensor)
        np.testing.assert_allclose(loo.row(k)["x"], plain.row(k)["x"], rtol=1e-6)


def test_the_shared_mean_and_the_rules_use_the_carriers() -> None:
    states, w = _states(3), [1.0, 1.0, 2.0]
    carried = [frozenset({"x", "y"}), frozenset({"y"}), None]  # None: every tensor
    mean = fresh_mean(states, w, carried)
    np.testing.assert_allclose(mean["x"], (states[0]["x"] + 2 * states[2]["x"]) / 3, rtol=1e-6)
    np.testing.assert_allclose(mean["y"], fedavg(states, w)["y"], rtol=1e-6)
    inp = RoundInputs(["a", "b", "c"], states, w, ["idle"], carried=carried, min_contributors=1)
    fed = get_rule("fedavg").targets(inp)
    np.testing.assert_allclose(fed["a"].make()["x"], mean["x"], rtol=1e-6)
    row = get_rule("loo-factor-mean").targets(inp)
    np.testing.assert_allclose(row["b"].make()["x"], (states[0]["x"] + 2 * states[2]["x"]) / 3, rtol=1e-6)
    np.testing.assert_allclose(row["idle"].make()["x"], mean["x"], rtol=1e-6)


def test_a_weighted_row_renormalises_its_shares_over_the_carriers() -> None:
    from fedquic.server.freshness import fresh_weighted_row

    states = _states(4)
    shares = np.array([0.0, 0.5, 0.3, 0.2])  # client 0's row over the others (relevance weights)
    carried = [frozenset({"x", "y"}), frozenset({"y"}), frozenset({"x", "y"}), frozenset({"x", "y"})]
    row = fresh_weighted_row(states, shares, 0, carried, min_contributors=2)
    np.testing.assert_allclose(row["y"], sum(shares[j] * states[j]["y"] for j in range(4)), rtol=1e-6)
    want_x = (0.3 * states[2]["x"] + 0.2 * states[3]["x"]) / 0.5  # client 1's stale x out, the rest rescaled
    np.testing.assert_allclose(row["x"], want_x, rtol=1e-6)
    # with a floor of 3 others, two fresh copies are too few: x keeps the all-clients weighted row
    floor3 = fresh_weighted_row(states, shares, 0, carried, min_contributors=3)
    np.testing.assert_allclose(floor3["x"], sum(shares[j] * states[j]["x"] for j in range(4)), rtol=1e-6)


def test_the_relevance_rules_use_the_carriers_in_a_routed_round() -> None:
    states = _states(4)
    carried = [frozenset({"x", "y"}), frozenset({"y"}), frozenset({"x", "y"}), frozenset({"x", "y"})]
    init = {k: np.zeros_like(v) for k, v in states[0].items()}
    for name in ("loo-simgrad", "loo-mosaic"):
        rule = get_rule(name)
        plain = rule.targets(RoundInputs(list("abcd"), states, [1.0] * 4, [], init_state=init))
        routed = rule.targets(RoundInputs(list("abcd"), states, [1.0] * 4, [], init_state=init, carried=carried))
        row, shares = routed["a"].make(), plain["a"].weights
        assert shares is not None and routed["a"].weights == shares
        np.testing.assert_allclose(row["y"], plain["a"].make()["y"], rtol=1e-5)  # carried by all: unchanged
        mass = shares["c"] + shares["d"]
        want = (shares["c"] * states[2]["x"] + shares["d"] * states[3]["x"]) / mass
        np.testing.assert_allclose(row["x"], want, rtol=1e-4, atol=1e-6)  # b's stale x left out
