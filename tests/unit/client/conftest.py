"""Shared fixtures: one code-built tiny Llama per test session, loaded fresh (4-bit NF4) where needed."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("torch")
pytest.importorskip("peft")
pytest.importorskip("bitsandbytes")

from fedquic.client.model import LoadSpec, build_tiny_llama, load_base_model

Loader = Callable[..., tuple[Any, Any]]


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_llama(tmp_path_factory.mktemp("models") / "tiny-llama", seed=0)


@pytest.fixture(scope="session")
def load_tiny(tiny_model_dir: Path) -> Loader:
    """A fresh (model, tokenizer) per call: peft wraps a base model in place, so FedALTModels cannot share."""

    def load(**spec: Any) -> tuple[Any, Any]:
        return load_base_model(tiny_model_dir, LoadSpec(**spec))

    return load
