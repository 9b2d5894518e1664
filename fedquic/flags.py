"""Command-line flags generated from the pydantic settings models: one source for each setting.

A :class:`Flag` names a dotted key of a settings model (``policy.min_clients`` of
:class:`~fedquic.server.config.ServerConfig`); :func:`add_flags` builds the argparse option from that field:
its type (int, float, a path, a comma list), its choices (a ``Literal`` or an enum), booleans as
``--x/--no-x``, its help (the field's ``description``) and the default the help states (the field's default, as a
flag would write it). Flags default to None, so only the ones given override the config file and environment
(:func:`overrides`).
"""

from __future__ import annotations

import argparse
import enum
import types
import typing
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel
from pydantic.fields import FieldInfo
from pydantic_core import PydanticUndefined


@dataclass(frozen=True)
class Flag:
    """One option: ``--dest-with-dashes`` sets ``key`` of the model."""

    dest: str
    key: str
    flag: str | None = None  # the option string when it is not --DEST (--round-timeout for round_timeout_s)
    metavar: str | None = None
    default: str | None = None  # how the help states a default the model does not hold (derived, per profile)
    note: str | None = None  # said instead of a default ("required here or in the config")
    action: str | None = None  # "append": repeatable, a list
    group: str | None = None  # flags of one mutually exclusive group share its name

    @property
    def option(self) -> str:
        return self.flag or "--" + self.dest.replace("_", "-")


def field_of(model: type[BaseModel], key: str) -> FieldInfo:
    """The field a dotted key names (``job.lora.rank``), through nested models."""
    head, _, rest = key.partition(".")
    if head not in model.model_fields:
        raise KeyError(f"{model.__name__} has no field {head!r} (flag key {key!r})")
    field = model.model_fields[head]
    if not rest:
        return field
    sub = _plain(field.annotation)
    if not (isinstance(sub, type) and issubclass(sub, BaseModel)):
        raise KeyError(f"{model.__name__}.{head} is not a settings model (flag key {key!r})")
    return field_of(sub, rest)


def _plain(annotation: Any) -> Any:
    """``X | None`` -> ``X``."""
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        if len(args) == 1:
            return args[0]
    return annotation


def _comma_list(text: str) -> list[str]:
    return [x.strip() for x in text.split(",") if x.strip()]


def _key_values(text: str) -> dict[str, str]:
    """``name=value,name=value`` (a dict field; pydantic converts the values)."""
    out: dict[str, str] = {}
    for item in _comma_list(text):
        name, eq, value = item.partition("=")
        if not eq or not name.strip() or not value.strip():
            raise argparse.ArgumentTypeError(f"expected NAME=VALUE[,NAME=VALUE...], got {item!r}")
        out[name.strip()] = value.strip()
    return out


def _argparse_kind(annotation: Any) -> dict[str, Any]:
    ann = _plain(annotation)
    origin = typing.get_origin(ann)
    if ann is bool:
        return {"action": argparse.BooleanOptionalAction}
    if origin is Literal:
        choices = typing.get_args(ann)
        kind: Callable[[str], Any] | None = type(choices[0]) if isinstance(choices[0], int | float) else None
        return {"choices": choices, **({"type": kind} if kind else {})}
    if isinstance(ann, type) and issubclass(ann, enum.Enum):
        return {"choices": [e.value for e in ann]}
    if ann in (int, float, Path):
        return {"type": ann}
    if origin in (tuple, list):
        return {"type": _comma_list}
    if origin is dict:
        return {"type": _key_values}
    return {}  # str, and models with a short string form (EncodingSpec): pydantic parses them


def default_text(value: Any) -> str | None:
    """A default as the flag would be written, or None when there is none worth stating."""
    if value is None or value is PydanticUndefined:
        return None
    short = getattr(value, "short", None)
    if callable(short):
        return str(short())
    if isinstance(value, enum.Enum):
        return str(value.value)
    if isinstance(value, tuple | list):
        return ",".join(map(str, value)) or None
    if isinstance(value, dict):
        return ",".join(f"{k}={v}" for k, v in value.items()) or None
    return str(value)


def help_text(flag: Flag, field: FieldInfo) -> str:
    if not field.description:
        raise ValueError(f"{flag.key}: the field has no description for the {flag.option} help")
    if flag.note is not None:
        return f"{field.description} ({flag.note})"
    if flag.default is not None:  # derived elsewhere (per architecture, per profile): said in words
        return f"{field.description} (default: {flag.default})"
    stated = default_text(field.get_default(call_default_factory=True))
    return field.description if stated is None else f"{field.description} (default {stated})"


def add_flags(parser: argparse.ArgumentParser, model: type[BaseModel], flags: Iterable[Flag]) -> None:
    groups: dict[str, Any] = {}
    for flag in flags:
        field = field_of(model, flag.key)
        kwargs: dict[str, Any] = {"dest": flag.dest, "default": None, "help": help_text(flag, field)}
        kwargs |= _argparse_kind(field.annotation)
        if flag.action == "append":
            kwargs.pop("type", None)
            kwargs["action"] = "append"
        if flag.metavar:
            kwargs["metavar"] = flag.metavar
        target: Any = parser
        if flag.group is not None:
            if flag.group not in groups:
                groups[flag.group] = parser.add_mutually_exclusive_group()
            target = groups[flag.group]
        target.add_argument(flag.option, **kwargs)


def overrides(args: argparse.Namespace, flags: Sequence[Flag]) -> dict[str, object]:
    """The dotted keys the given flags set (a flag not given sets nothing)."""
    return {f.key: getattr(args, f.dest) for f in flags if getattr(args, f.dest, None) is not None}


__all__ = ["Flag", "add_flags", "default_text", "field_of", "help_text", "overrides"]
