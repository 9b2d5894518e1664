"""The defaults the CLI's help states are the models' defaults: a flag's "(default X)" cannot drift from the
pydantic field it sets (SERVER_FLAGS / CLIENT_FLAGS map each flag to its key)."""

from __future__ import annotations

import argparse
import re
from typing import Any

import pytest
from fedquic.server.config import ServerConfig
from pydantic import BaseModel
from pydantic_core import PydanticUndefined

from fedquic.cli import CLIENT_FLAGS, SERVER_FLAGS, build_parser
from fedquic.settings import ClientProcessConfig

_DEFAULT = re.compile(r"\(default ([^;),]+)[;),]")
# Defaults computed from other values (fedquic.settings.derive_client_defaults: from the client id and --ca).
DERIVED = {"client.run_dir", "client.tls.ca", "client.tls.cert", "client.tls.key"}


def _field_default(model: type[BaseModel], key: str) -> Any:
    head, _, rest = key.partition(".")
    field = model.model_fields[head]
    if rest:
        sub = field.annotation
        assert isinstance(sub, type) and issubclass(sub, BaseModel), key
        return _field_default(sub, rest)
    return field.get_default(call_default_factory=True)


def _same(stated: str, value: Any) -> bool:
    parse = getattr(type(value), "parse", None)
    if isinstance(value, BaseModel) and parse is not None:  # EncodingSpec: its flag form
        return parse(stated) == value
    value = getattr(value, "value", value)  # enums
    try:
        return float(stated) == float(value)
    except (TypeError, ValueError):
        return stated.strip() == str(value)


def _stated(parser: argparse.ArgumentParser, command: str) -> dict[str, str]:
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    out = {}
    for action in sub.choices[command]._actions:
        m = _DEFAULT.search(action.help or "")
        if m:
            out[action.dest] = m.group(1).strip()
    return out


@pytest.mark.parametrize(
    ("command", "flags", "model"),
    [("server", SERVER_FLAGS, ServerConfig), ("client", CLIENT_FLAGS, ClientProcessConfig)],
)
def test_stated_defaults_are_the_model_defaults(command: str, flags: Any, model: type[BaseModel]) -> None:
    stated = _stated(build_parser(), command)
    checked, wrong = 0, {}
    for dest, key in flags:
        if dest not in stated or key in DERIVED:
            continue
        value = _field_default(model, key)
        assert value is not PydanticUndefined, f"--{dest}: help states a default for the required {key}"
        checked += 1
        if not _same(stated[dest], value):
            wrong[dest] = (stated[dest], value)
    assert checked >= 5, f"only {checked} flags checked: the pattern or the mappings changed"
    assert not wrong, f"help says (default X) but the model's default differs: {wrong}"
