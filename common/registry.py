"""A registry of named extensions (aggregation rules, local objectives...): one place for the checks and the
error messages every extension point shares."""

from __future__ import annotations

from collections.abc import Callable
from typing import Generic, TypeVar

from .errors import ConfigError

T = TypeVar("T")


class Registry(Generic[T]):
    """Items with a ``name`` attribute, registered once each. ``protocol`` is a runtime-checkable Protocol the
    items must satisfy (its members are listed in the error), ``check`` any further test (raise ConfigError)."""

    def __init__(self, what: str, protocol: type, members: str, check: Callable[[T], None] | None = None) -> None:
        self.what = what
        self.protocol = protocol
        self.members = members
        self.check = check
        self._items: dict[str, T] = {}

    def register(self, item: T, *, replace: bool = False) -> T:
        """Make ``item`` available as ``item.name``; a taken name is an error unless ``replace``."""
        if not isinstance(item, self.protocol):
            article = "an" if self.what[:1] in "aeiou" else "a"
            raise TypeError(f"{item!r} is not {article} {self.what} ({self.members})")
        if self.check is not None:
            self.check(item)
        name = item.name  # type: ignore[attr-defined]
        if name in self._items and not replace:
            raise ConfigError(f"a {self.what} named {name!r} is already registered")
        self._items[name] = item
        return item

    def get(self, name: str) -> T:
        try:
            return self._items[name]
        except KeyError:
            raise ConfigError(f"unknown {self.what} {name!r}; registered: {self.names()}") from None

    def names(self) -> list[str]:
        return sorted(self._items)

    def __contains__(self, name: object) -> bool:
        return name in self._items


__all__ = ["Registry"]
