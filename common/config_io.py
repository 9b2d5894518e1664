"""Configuration loading: a TOML file, then ``FEDQUIC_*`` environment variables, then command-line flags.

Every process has one pydantic settings model; this module fills it from the three sources in that order
(later wins) and turns a validation failure into one :class:`ConfigError` that names the key and where its
value came from. Environment variables name nested keys with ``__``: ``FEDQUIC_POLICY__ROUNDS=5`` sets
``policy.rounds``. Only variables whose first part is a field of the model are read, so a server and a
client started from the same shell do not trip over each other's variables. Values are strings that
pydantic converts (``"5"`` → 5, ``"true"`` → True); a value starting with ``[`` or ``{`` is parsed as JSON.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, TypeVar

from pydantic import BaseModel, ValidationError

from .errors import ConfigError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

M = TypeVar("M", bound=BaseModel)
ENV_PREFIX = "FEDQUIC_"


def _set(tree: dict[str, Any], dotted: tuple[str, ...], value: Any) -> None:
    node = tree
    for part in dotted[:-1]:
        nxt = node.get(part)
        if not isinstance(nxt, dict):
            nxt = node[part] = {}
        node = nxt
    node[dotted[-1]] = value


def read_toml(path: Path) -> dict[str, Any]:
    try:
        with open(path, "rb") as f:
            return tomllib.load(f)
    except FileNotFoundError:
        raise ConfigError(f"config file {path} not found") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from None


def load_config(
    model: type[M],
    *,
    path: Path | None = None,
    env: Mapping[str, str] | None = None,
    overrides: Mapping[str, Any] | None = None,
    defaults: Mapping[str, Any] | None = None,
    finalize: Callable[[dict[str, Any]], None] | None = None,
) -> M:
    """Build ``model`` from defaults < TOML file < environment < overrides (dotted keys, e.g. ``policy.rounds``)."""
    tree: dict[str, Any] = {}
    source: dict[tuple[str, ...], str] = {}
    for key, value in (defaults or {}).items():
        _set(tree, tuple(key.split(".")), value)
    if path is not None:
        for top, value in read_toml(path).items():
            tree[top] = value
        source[()] = str(path)
    for name, raw in sorted((env or {}).items()):
        if not name.startswith(ENV_PREFIX):
            continue
        dotted = tuple(p.lower() for p in name[len(ENV_PREFIX) :].split("__"))
        if not dotted[0] or dotted[0] not in model.model_fields:
            continue
        value: Any = raw
        if raw.strip().startswith(("[", "{")):
            try:
                value = json.loads(raw)
            except json.JSONDecodeError:
                raise ConfigError(f"{name}: not valid JSON: {raw!r}") from None
        _set(tree, dotted, value)
        source[dotted] = name
    for key, value in (overrides or {}).items():
        dotted = tuple(key.split("."))
        _set(tree, dotted, value)
        source[dotted] = "--" + dotted[-1].replace("_", "-")
    if finalize is not None:  # defaults derived from other values (e.g. file paths from an id)
        finalize(tree)
    try:
        return model.model_validate(tree)
    except ValidationError as exc:
        err = exc.errors()[0]
        loc = tuple(str(p) for p in err.get("loc", ()))
        where = next((source[loc[:i]] for i in range(len(loc), -1, -1) if loc[:i] in source), "defaults")
        msg = err.get("msg", "invalid")
        if err.get("type") == "missing":
            where = "not set in the config file, the environment or the flags"
        else:
            where = f"from {where}"
        raise ConfigError(f"{'.'.join(loc) or 'config'}: {msg} ({where})") from None


def to_toml(data: Mapping[str, Any]) -> str:
    """Render a nested mapping of scalars and lists as TOML (what ``fedquic config show`` prints)."""
    lines: list[str] = []
    tables: list[tuple[str, Mapping[str, Any]]] = []
    for key, value in data.items():
        if isinstance(value, Mapping):
            tables.append((key, value))
        elif value is not None:
            lines.append(f"{key} = {_toml_value(value)}")
    for name, table in tables:
        body = to_toml(table)
        sub = [ln for ln in body.splitlines()]
        lines.append("")
        lines.append(f"[{name}]")
        for ln in sub:
            lines.append(ln.replace("[", f"[{name}.", 1) if ln.startswith("[") else ln)
    return "\n".join(lines).strip() + "\n"


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    return json.dumps(str(v))
