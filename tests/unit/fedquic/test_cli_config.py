"""`fedquic config show client` prints a starting file even with nothing set; `fedquic server --on-finished`."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from fedquic.common.config_io import tomllib  # tomllib, or tomli on Python 3.10

from fedquic.cli import CLIENT_PLACEHOLDERS, build_parser

ENV = {k: v for k, v in os.environ.items() if not k.startswith("FEDQUIC_")}


def fedquic(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "fedquic", *args], capture_output=True, text=True, cwd=cwd, env=ENV, timeout=60
    )


def test_config_show_client_with_nothing_set_prints_a_file_with_marked_placeholders(tmp_path: Path) -> None:
    proc = fedquic("config", "show", "client", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    text = proc.stdout
    data = tomllib.loads(text)  # valid TOML as printed
    lines = text.splitlines()
    for p in CLIENT_PLACEHOLDERS:
        table, _, key = p.key.rpartition(".")
        assert data[table.split(".")[0]][key] == p.value
        at = lines.index(f'{key} = "{p.value}"')
        assert lines[at - 1].startswith("# REQUIRED"), lines[at - 1]  # the user is told to fill it in
    assert "CLIENT_ID.pem" not in text and "runs/CLIENT_ID" not in text  # derived paths follow the real id
    assert data["client"]["tls"]["ca"] == "certs/dev/ca.pem"


def test_the_printed_file_with_its_placeholders_filled_loads(tmp_path: Path) -> None:
    text = fedquic("config", "show", "client", cwd=tmp_path).stdout
    filled = text.replace('"CLIENT_ID"', '"edge-7"').replace("/path/to/local/model", str(tmp_path / "model"))
    filled = filled.replace("/path/to/data.jsonl", str(tmp_path / "data.jsonl"))
    cfg = tmp_path / "client.toml"
    cfg.write_text(filled)
    proc = fedquic("config", "show", "client", "--config", str(cfg), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "REQUIRED" not in proc.stdout  # nothing left to fill in
    data = tomllib.loads(proc.stdout)
    assert data["client"]["client_id"] == "edge-7"
    assert data["client"]["tls"]["cert"] == "certs/dev/clients/edge-7.pem"
    assert data["client"]["run_dir"] == "runs/edge-7"
    assert data["learner"]["data_path"] == str(tmp_path / "data.jsonl")


def test_a_task_instead_of_data_needs_no_data_placeholder(tmp_path: Path) -> None:
    proc = fedquic("config", "show", "client", "--task", "copy", "--client-id", "c1", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    data = tomllib.loads(proc.stdout)
    assert data["learner"]["task"] == "copy" and "data_path" not in data["learner"]
    assert data["learner"]["model_path"] == "/path/to/local/model" and data["client"]["client_id"] == "c1"


@pytest.mark.parametrize("choice", ["exit", "restart"])
def test_server_on_finished_flag_maps_to_the_server_setting(tmp_path: Path, choice: str) -> None:
    from fedquic.server.config import ServerConfig

    if "on_finished" not in ServerConfig.model_fields:
        pytest.skip("ServerConfig.on_finished is not in server/config.py yet")
    from fedquic.cli import _server_settings

    args = build_parser().parse_args(["server", "--certs", str(tmp_path), "--on-finished", choice])
    assert _server_settings(args).on_finished == choice
    with pytest.raises(SystemExit):
        build_parser().parse_args(["server", "--on-finished", "resume"])


def test_rule_options_flag_sets_the_rules_settings(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from fedquic.cli import _server_settings

    argv = ["server", "--certs", str(tmp_path), "--federation", "fedalt", "--aggregation", "loo-simgrad"]
    args = build_parser().parse_args([*argv, "--rule-options", "temperature=0.2, floor=0.5"])
    job = _server_settings(args).job
    assert job.aggregation == "loo-simgrad" and job.rule_options == {"temperature": 0.2, "floor": 0.5}
    with pytest.raises(SystemExit):
        build_parser().parse_args([*argv, "--rule-options", "temperature"])
    assert "NAME=VALUE" in capsys.readouterr().err
