"""``fedquic model import`` refuses what it cannot import before the slow part, with the choices named."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from fedquic.client.gguf_import import inspect_gguf
from fedquic.common.errors import ConfigError

gguf = pytest.importorskip("gguf")


def _write(path: Path, arch: str) -> Path:
    w = gguf.GGUFWriter(str(path), arch)
    w.add_name("tiny")
    w.add_tensor("token_embd.weight", np.zeros((4, 8), dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def test_a_supported_header_is_summarised(tmp_path: Path) -> None:
    s = inspect_gguf(_write(tmp_path / "m.gguf", "llama"))
    assert s.architecture == "llama" and s.tensors == 1 and s.quant_types == {"F32": 1}


def test_unsupported_architecture_lists_the_supported_ones(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as err:
        inspect_gguf(_write(tmp_path / "m.gguf", "rwkv6"))
    assert "rwkv6" in str(err.value) and "llama" in str(err.value) and "qwen2" in str(err.value)


def test_not_a_gguf_file(tmp_path: Path) -> None:
    bad = tmp_path / "x.gguf"
    bad.write_bytes(b"not a gguf file at all")
    with pytest.raises(ConfigError, match="not a readable GGUF"):
        inspect_gguf(bad)
    with pytest.raises(ConfigError, match="no such file"):
        inspect_gguf(tmp_path / "missing.gguf")
