"""The aggregation-rule registry and the built-in rules, against the aggregation maths they wrap."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
from fedquic.common.errors import ConfigError
from fedquic.common.messages import TrainSpec
from fedquic.server.aggregation import LeaveOneOut, exact_mean, fedavg, leave_one_out_exact
from fedquic.server.config import JobConfig
from fedquic.server.rules import (
    RoundInputs,
    Target,
    default_rule,
    get_rule,
    job_rule,
    load_plugins,
    register_rule,
    rule_names,
)


def _states(n: int, seed: int = 0) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    shapes = {"l.lora_A.weight": (2, 8), "l.lora_B.weight": (8, 2)}
    return [{k: rng.standard_normal(shape, np.float32) for k, shape in shapes.items()} for _ in range(n)]


def test_builtins_are_registered_and_defaults_follow_the_job() -> None:
    assert {"fedavg", "loo-factor-mean", "loo-exact"} <= set(rule_names())
    assert default_rule("fedavg") == "fedavg"
    assert default_rule("fedalt") == "loo-factor-mean" and default_rule("fedalt", "exact") == "loo-exact"
    assert job_rule(JobConfig(federation="local")) is None
    assert job_rule(JobConfig(federation="fedalt", row_mode="exact")).name == "loo-exact"  # type: ignore[union-attr]
    assert job_rule(JobConfig(federation="fedavg")).kind == "global"  # type: ignore[union-attr]


def test_a_rule_must_fit_the_federation_and_exist() -> None:
    with pytest.raises(ConfigError, match="federation='fedalt' needs 'row'"):
        job_rule(JobConfig(federation="fedalt", aggregation="fedavg"))
    with pytest.raises(ConfigError, match=r"unknown aggregation rule 'nope'; registered: \[.*'fedavg'"):
        get_rule("nope")


def test_registering_checks_the_rule() -> None:
    class Half:
        name, kind = "fedavg", "global"

        def targets(self, inp: RoundInputs) -> dict[str, Target]:
            return {}

    with pytest.raises(ConfigError, match="already registered"):
        register_rule(Half())
    bad = Half()
    bad.name, bad.kind = "test-bad-kind", "local"  # type: ignore[assignment]
    with pytest.raises(ConfigError, match="kind must be one of"):
        register_rule(bad)
    with pytest.raises(TypeError, match="not an aggregation rule"):
        register_rule(object())  # type: ignore[arg-type]


def test_fedavg_rule_sends_the_mean_to_contributors_and_listeners() -> None:
    states, w = _states(3), [1.0, 2.0, 3.0]
    out = get_rule("fedavg").targets(RoundInputs(["a", "b", "c"], states, w, ["idle"]))
    assert set(out) == {"a", "b", "c", "idle"}
    want = fedavg(states, w)
    for t in out.values():
        assert t.kind == "global" and t.contributors == 3
        for k in want:
            np.testing.assert_array_equal(t.make()[k], want[k])


@pytest.mark.parametrize("name", ["loo-factor-mean", "loo-exact"])
def test_leave_one_out_rules(name: str) -> None:
    states, w = _states(4, seed=1), [1.0] * 4
    out = get_rule(name).targets(RoundInputs(["a", "b", "c", "d"], states, w, ["idle"]))
    if name == "loo-factor-mean":
        loo = LeaveOneOut(states, w)
        rows, mean = [loo.row(k) for k in range(4)], fedavg(states, w)
    else:
        rows, mean = leave_one_out_exact(states, w), exact_mean(states, w)
    for k, cid in enumerate("abcd"):
        assert out[cid].kind == "row" and out[cid].contributors == 3
        for key in rows[k]:
            np.testing.assert_allclose(out[cid].make()[key], rows[k][key], rtol=1e-6, atol=1e-6)
    assert out["idle"].contributors == 4  # a listener gets every contributor's mean
    for key in mean:
        np.testing.assert_allclose(out["idle"].make()[key], mean[key], rtol=1e-6, atol=1e-6)


def test_plugins_register_rules_on_import(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "fq_test_plugin.py").write_text(
        "from fedquic.server.rules import Target, register_rule\n"
        "class Zero:\n"
        "    name, kind = 'test-plugin-zero', 'row'\n"
        "    def targets(self, inp):\n"
        "        return {}\n"
        "register_rule(Zero())\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "fq_test_plugin", raising=False)
    load_plugins(["fq_test_plugin"])
    assert get_rule("test-plugin-zero").kind == "row"
    assert job_rule(JobConfig(aggregation="test-plugin-zero")).name == "test-plugin-zero"  # type: ignore[union-attr]
    with pytest.raises(ConfigError, match="plugin module 'no_such_plugin_mod' cannot be imported"):
        load_plugins(["no_such_plugin_mod"])


def test_fedprox_averages_like_fedavg_and_needs_a_proximal_term() -> None:
    with pytest.raises(ConfigError, match="prox_mu"):
        job_rule(JobConfig(federation="fedavg", aggregation="fedprox"))
    job = JobConfig(federation="fedavg", aggregation="fedprox", train=TrainSpec(prox_mu=0.01))
    rule = job_rule(job)
    assert rule is not None and rule.name == "fedprox" and rule.kind == "global"
    states = _states(3)
    inp = RoundInputs(["a", "b", "c"], states, [1.0, 2.0, 1.0], ["d"])
    prox, avg = rule.targets(inp), get_rule("fedavg").targets(inp)
    assert sorted(prox) == ["a", "b", "c", "d"]
    for k in states[0]:
        np.testing.assert_array_equal(prox["d"].make()[k], avg["d"].make()[k])
