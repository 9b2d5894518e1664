"""Flags generated from the settings models (fedquic.flags): type, choices, help and stated default follow the
field, so a new setting needs one Flag line, and a flag cannot disagree with the model it sets."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Literal

import pytest
from fedquic.common.names import FEDERATIONS
from pydantic import BaseModel, Field

from fedquic.cli import SERVER_FLAG_SPECS, build_parser
from fedquic.flags import Flag, add_flags, overrides


class Inner(BaseModel):
    depth: int = Field(default=3, ge=1, description="how deep")


class Demo(BaseModel):
    mode: Literal["a", "b"] = Field(default="a", description="which mode")
    ratio: float | None = Field(default=None, description="a ratio")
    out: Path = Field(default=Path("x"), description="where")
    names: tuple[str, ...] = Field(default=(), description="names")
    fast: bool = Field(default=False, description="go fast")
    inner: Inner = Inner()
    bare: int = 1


def parser(*flags: Flag) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser()
    add_flags(p, Demo, flags)
    return p


def test_types_choices_and_defaults_come_from_the_fields() -> None:
    flags = [Flag("mode", "mode"), Flag("ratio", "ratio"), Flag("out", "out"), Flag("names", "names")]
    flags += [Flag("fast", "fast"), Flag("depth", "inner.depth")]
    p = parser(*flags)
    args = p.parse_args(["--mode", "b", "--ratio", "0.5", "--out", "y", "--names", "p, q", "--fast", "--depth", "7"])
    assert overrides(args, flags) == {
        "mode": "b",
        "ratio": 0.5,
        "out": Path("y"),
        "names": ["p", "q"],
        "fast": True,
        "inner.depth": 7,
    }
    assert overrides(p.parse_args([]), flags) == {}  # flags not given set nothing
    with pytest.raises(SystemExit):
        p.parse_args(["--mode", "c"])
    with pytest.raises(SystemExit):
        p.parse_args(["--depth", "deep"])
    helps = {a.dest: a.help for a in p._actions}
    assert helps["mode"] == "which mode (default a)" and helps["ratio"] == "a ratio"  # None states nothing
    assert helps["depth"] == "how deep (default 3)" and helps["fast"].startswith("go fast (default False)")


def test_a_flag_needs_a_described_field_that_exists() -> None:
    with pytest.raises(ValueError, match="no description"):
        parser(Flag("bare", "bare"))
    with pytest.raises(KeyError, match="nothing"):
        parser(Flag("nothing", "inner.nothing"))
    assert parser(Flag("ratio", "ratio", default="per profile"))._actions[-1].help == "a ratio (default: per profile)"


def test_server_flags_take_their_choices_from_the_job_model() -> None:
    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    actions = {a.dest: a for a in sub.choices["server"]._actions}
    assert tuple(actions["federation"].choices) == FEDERATIONS
    assert actions["rounds"].type is int and actions["run_dir"].type is Path
    assert all(f.dest in actions for f in SERVER_FLAG_SPECS)
    assert "(default int8)" in actions["uplink"].help
