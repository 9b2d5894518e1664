"""Shared fixtures: a tiny Llama model on disk and a development PKI, built once per session."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    pytest.importorskip("torch")
    from fedquic.client.model import build_tiny_llama

    return build_tiny_llama(tmp_path_factory.mktemp("tiny-llama") / "model", seed=0)


@pytest.fixture(scope="session")
def dev_pki(tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    from fedquic.transport.pki import init_dev_pki

    return init_dev_pki(tmp_path_factory.mktemp("pki"))
