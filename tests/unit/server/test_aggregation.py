import numpy as np
import pytest
from fedquic.common.errors import JobError
from fedquic.server.aggregation import fedavg, leave_one_out


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
