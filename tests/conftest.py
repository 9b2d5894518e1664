"""Shared fixtures: a tiny Llama model on disk and a development PKI, built once per session."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

# Subprocesses started by tests (`python -m testkit.synthetic`, light clients) import testkit/ from the
# checkout's root, wherever pytest was started from.
_ROOT = str(Path(__file__).resolve().parents[1])
os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [_ROOT, os.environ.get("PYTHONPATH")]))


def _backend_params() -> list[object]:
    from fedquic.transport.backend import BACKENDS, installed

    return [
        pytest.param(b, marks=pytest.mark.skipif(not installed(b), reason=f"{b} is not installed")) for b in BACKENDS
    ]


@pytest.fixture(params=_backend_params())
def quic_backend(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Run a test once per QUIC backend: ``auto`` means this one here and in every process the test starts."""
    from fedquic.transport.backend import ENV_VAR

    monkeypatch.setenv(ENV_VAR, request.param)
    return str(request.param)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    pytest.importorskip("torch")
    from fedquic.client.model import build_tiny_llama

    return build_tiny_llama(tmp_path_factory.mktemp("tiny-llama") / "model", seed=0)


@pytest.fixture(scope="session")
def dev_pki(tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    from fedquic.transport.pki import init_dev_pki

    return init_dev_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture
def loopback_server(dev_pki, tmp_path: Path):  # type: ignore[no-untyped-def]
    """Factory: an AggregationServer on 127.0.0.1, port 0, the dev PKI, no metrics endpoint, run dir in tmp_path."""
    from fedquic.server.config import MetricsSettings, ServerConfig
    from fedquic.server.daemon import AggregationServer
    from fedquic.transport.settings import TlsFiles

    def make(**cfg: object) -> AggregationServer:
        return AggregationServer(
            ServerConfig(
                host="127.0.0.1",
                port=0,
                tls=TlsFiles(ca=dev_pki.ca_cert, cert=dev_pki.server_cert, key=dev_pki.server_key),
                metrics=MetricsSettings(enabled=False),
                run_dir=tmp_path / "server",
                **cfg,  # type: ignore[arg-type]
            )
        )

    return make


@pytest.fixture
def light_client(dev_pki, tmp_path: Path):  # type: ignore[no-untyped-def]
    """Factory: a FederatedClient with its own client certificate, dialing 127.0.0.1:port, around ``learner``."""
    from fedquic.client.config import ClientConfig
    from fedquic.client.runner import FederatedClient
    from fedquic.transport.pki import issue_client_cert
    from fedquic.transport.settings import TlsFiles

    def make(cid: str, port: int, learner: object, **cfg: object) -> FederatedClient:
        cert, key = issue_client_cert(dev_pki, cid)
        config = ClientConfig(
            client_id=cid,
            port=port,
            server_name="localhost",
            tls=TlsFiles(ca=dev_pki.ca_cert, cert=cert, key=key),
            run_dir=tmp_path / cid,
            **cfg,  # type: ignore[arg-type]
        )
        return FederatedClient(config, learner)  # type: ignore[arg-type]

    return make
