import numpy as np
import pytest
from fedquic.common.errors import JobError
from fedquic.server.aggregation import (
    clip_deviation,
    fedavg,
    leave_one_out,
    leave_one_out_exact,
    product_rel_error,
)


def three_clients() -> list[dict[str, np.ndarray]]:
    return [
        {"A": np.array([[1.0, 2.0]], np.float32), "B": np.array([[3.0]], np.float32)},
        {"A": np.array([[3.0, 6.0]], np.float32), "B": np.array([[0.0]], np.float32)},
        {"A": np.array([[5.0, -2.0]], np.float32), "B": np.array([[6.0]], np.float32)},
    ]


def test_leave_one_out_three_clients_by_hand() -> None:
    rows = leave_one_out(three_clients(), [1.0, 1.0, 1.0])
    # client 0 gets mean(client 1, client 2), and so on
    np.testing.assert_array_equal(rows[0]["A"], [[4.0, 2.0]])
    np.testing.assert_array_equal(rows[0]["B"], [[3.0]])
    np.testing.assert_array_equal(rows[1]["A"], [[3.0, 0.0]])
    np.testing.assert_array_equal(rows[1]["B"], [[4.5]])
    np.testing.assert_array_equal(rows[2]["A"], [[2.0, 4.0]])
    np.testing.assert_array_equal(rows[2]["B"], [[1.5]])
    assert all(r["A"].dtype == np.float32 for r in rows)


def test_weighted_leave_one_out_by_hand() -> None:
    rows = leave_one_out(three_clients(), [1.0, 2.0, 1.0])
    # client 0: (2*[3,6] + 1*[5,-2]) / 3 = [11/3, 10/3]
    np.testing.assert_allclose(rows[0]["A"], [[11 / 3, 10 / 3]], rtol=1e-6)
    # client 1: ([1,2] + [5,-2]) / 2
    np.testing.assert_allclose(rows[1]["A"], [[3.0, 0.0]])


def test_fast_leave_one_out_equals_the_naive_loop() -> None:
    rng = np.random.default_rng(0)
    states = [{"x": rng.normal(size=(5, 3)).astype(np.float32)} for _ in range(6)]
    weights = list(rng.uniform(0.5, 3.0, size=6))
    rows = leave_one_out(states, weights)
    for k in range(6):
        others = [m for m in range(6) if m != k]
        naive = sum(weights[m] * states[m]["x"].astype(np.float64) for m in others) / sum(weights[m] for m in others)
        np.testing.assert_allclose(rows[k]["x"], naive, rtol=1e-5, atol=1e-6)


def test_two_clients_swap_adapters() -> None:
    a, b = three_clients()[:2]
    rows = leave_one_out([a, b], [1.0, 1.0])
    np.testing.assert_array_equal(rows[0]["A"], b["A"])
    np.testing.assert_array_equal(rows[1]["A"], a["A"])


def test_leave_one_out_needs_two_clients() -> None:
    with pytest.raises(JobError):
        leave_one_out(three_clients()[:1], [1.0])


def test_fedavg_by_hand() -> None:
    g = fedavg(three_clients(), [1.0, 1.0, 2.0])
    np.testing.assert_allclose(g["A"], [[(1 + 3 + 10) / 4, (2 + 6 - 4) / 4]])


def test_mismatched_names_are_refused() -> None:
    s = three_clients()
    s[1] = {"A": s[1]["A"]}
    with pytest.raises(ValueError):
        fedavg(s, [1.0, 1.0, 1.0])


def lora_states(n: int, r: int, seed: int = 0) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    return [
        {
            "m.lora_A.weight": rng.normal(size=(r, 7)).astype(np.float32),
            "m.lora_B.weight": rng.normal(size=(5, r)).astype(np.float32),
        }
        for _ in range(n)
    ]


def product(s: dict[str, np.ndarray]) -> np.ndarray:
    return s["m.lora_B.weight"].astype(np.float64) @ s["m.lora_A.weight"].astype(np.float64)


def test_exact_with_two_clients_hands_each_the_others_product() -> None:
    a, b = lora_states(2, r=3)
    rows = leave_one_out_exact([a, b], [1.0, 1.0])
    np.testing.assert_allclose(product(rows[0]), product(b), atol=1e-5)
    np.testing.assert_allclose(product(rows[1]), product(a), atol=1e-5)


def test_exact_is_the_best_rank_r_approximation_of_the_mean_product() -> None:
    states = lora_states(4, r=2, seed=3)
    weights = [1.0, 2.0, 1.0, 3.0]
    rows = leave_one_out_exact(states, weights)
    for k, row in enumerate(rows):
        others = [m for m in range(4) if m != k]
        mean = sum(weights[m] * product(states[m]) for m in others) / sum(weights[m] for m in others)
        u, s, vt = np.linalg.svd(mean)
        best = (u[:, :2] * s[:2]) @ vt[:2]
        np.testing.assert_allclose(product(row), best, atol=1e-5)
        assert row["m.lora_A.weight"].shape == (2, 7) and row["m.lora_B.weight"].shape == (5, 2)
        # and factor-mean is measurably farther from the mean product than the exact mode
        coeffs = [weights[m] / sum(weights[i] for i in others) for m in others]
        fm = leave_one_out(states, weights)[k]
        sub = [states[m] for m in others]
        assert product_rel_error(row, sub, coeffs) < product_rel_error(fm, sub, coeffs)


def test_clip_deviation_by_hand() -> None:
    ref = {"x": np.zeros(2, np.float32)}
    clipped = clip_deviation({"x": np.array([3.0, 4.0], np.float32)}, ref, 1.0)  # norm 5 -> 1
    np.testing.assert_allclose(clipped["x"], [0.6, 0.8], rtol=1e-6)
    small = clip_deviation({"x": np.array([0.3, 0.4], np.float32)}, ref, 1.0)
    np.testing.assert_array_equal(small["x"], np.array([0.3, 0.4], np.float32))


def test_leave_one_out_row_into_a_reused_buffer_equals_fresh_rows() -> None:
    from fedquic.server.aggregation import LeaveOneOut

    rng = np.random.default_rng(3)
    states = [
        {"a": rng.standard_normal((3, 100_000), dtype=np.float32), "b": rng.standard_normal(5, dtype=np.float32)}
        for _ in range(4)
    ]
    weights = [1.0, 2.0, 2.0, 0.5]
    loo = LeaveOneOut(states, weights)
    buf = {k: np.empty_like(v) for k, v in states[0].items()}
    for k in range(4):
        fresh = loo.row(k)
        into = loo.row(k, out=buf)
        assert all(into[n] is not fresh[n] and np.array_equal(into[n], fresh[n]) for n in fresh)
        others = [m for m in range(4) if m != k]
        expect = sum(weights[m] * states[m]["a"].astype(np.float64) for m in others) / sum(weights[m] for m in others)
        np.testing.assert_allclose(fresh["a"], expect, rtol=1e-5, atol=1e-6)
