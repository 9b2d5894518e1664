from __future__ import annotations

from pathlib import Path

import pytest
from fedquic.common.codec import Encoding, EncodingSpec
from fedquic.common.config_io import load_config, to_toml
from fedquic.common.errors import ConfigError
from fedquic.server.config import ServerConfig

TLS = {"tls.ca": "ca.pem"}


def test_precedence_is_defaults_then_file_then_env_then_flags(tmp_path: Path) -> None:
    f = tmp_path / "s.toml"
    f.write_text('port = 5000\n[policy]\nrounds = 4\nmin_clients = 3\n[job]\nuplink = "topk10"\n')
    env = {"FEDQUIC_POLICY__ROUNDS": "6", "FEDQUIC_JOB__LORA__RANK": "4", "PATH": "/bin", "FEDQUIC_MODEL": "x"}
    cfg = load_config(ServerConfig, path=f, env=env, overrides={"policy.min_clients": 5}, defaults=TLS)
    assert cfg.port == 5000  # file
    assert cfg.policy.rounds == 6  # env beats file
    assert cfg.policy.min_clients == 5  # flag beats file
    assert cfg.job.lora.rank == 4  # nested env
    assert cfg.job.uplink == EncodingSpec.parse("topk10")  # short form in a file
    assert cfg.tls.ca == Path("ca.pem")  # FEDQUIC_MODEL is not a server key: ignored


def test_errors_name_the_key_and_its_source(tmp_path: Path) -> None:
    f = tmp_path / "s.toml"
    f.write_text("[job]\nfedration = 'fedalt'\n")
    with pytest.raises(ConfigError, match=r"job\.fedration: Extra inputs are not permitted \(from .*s\.toml\)"):
        load_config(ServerConfig, path=f, defaults=TLS)
    with pytest.raises(ConfigError, match=r"policy\.rounds: .* \(from FEDQUIC_POLICY__ROUNDS\)"):
        load_config(ServerConfig, env={"FEDQUIC_POLICY__ROUNDS": "zero"}, defaults=TLS)
    with pytest.raises(ConfigError, match=r"job\.uplink: .*unknown encoding .* \(from --uplink\)"):
        load_config(ServerConfig, overrides={"job.uplink": "int9"}, defaults=TLS)
    with pytest.raises(ConfigError, match="not found"):
        load_config(ServerConfig, path=tmp_path / "missing.toml")
    f.write_text("port = = 1")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(ServerConfig, path=f)


def test_shown_config_reads_back_identically(tmp_path: Path) -> None:
    cfg = load_config(
        ServerConfig,
        overrides={
            "job.uplink": "topk1-fp16+nolz4",
            "job.lora.target_modules": ["q_proj", "v_proj"],
            "job.clip_norm": 2.5,
        },
        defaults=TLS,
    )
    f = tmp_path / "shown.toml"
    f.write_text(to_toml(cfg.model_dump(mode="json")))
    again = load_config(ServerConfig, path=f)
    assert again == cfg
    assert again.job.uplink.encoding is Encoding.TOPK and again.job.lora.target_modules == ("q_proj", "v_proj")


def test_client_settings_derive_certificate_paths_and_round_trip(tmp_path: Path) -> None:
    from fedquic.settings import ClientProcessConfig, derive_client_defaults

    f = tmp_path / "client.toml"
    f.write_text(
        '[client]\nclient_id = "edge-7"\n[client.tls]\nca = "pki/ca.pem"\n[learner]\nmodel_path = "m"\ntask = "copy"\n'
    )
    cfg = load_config(
        ClientProcessConfig, path=f, env={"FEDQUIC_LEARNER__PROFILE": "edge"}, finalize=derive_client_defaults
    )
    assert cfg.client.tls.cert == Path("pki/clients/edge-7.pem") and cfg.client.tls.key == Path(
        "pki/clients/edge-7.key"
    )
    assert cfg.client.run_dir == Path("runs/edge-7")
    assert cfg.learner.profile == "edge"
    shown = tmp_path / "shown.toml"
    shown.write_text(to_toml(cfg.model_dump(mode="json")))
    assert load_config(ClientProcessConfig, path=shown, finalize=derive_client_defaults) == cfg
    with pytest.raises(ConfigError, match=r"client\.client_id: Field required \(not set"):
        load_config(
            ClientProcessConfig,
            overrides={"learner.model_path": "m", "learner.task": "copy"},
            finalize=derive_client_defaults,
        )
    with pytest.raises(ConfigError, match="exactly one of task"):
        load_config(
            ClientProcessConfig, path=f, overrides={"learner.data_path": "d.jsonl"}, finalize=derive_client_defaults
        )
