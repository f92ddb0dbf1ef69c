"""Explicit registries for tasks and methods: one import line is the registration."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

T = TypeVar("T")


class UnknownNameError(ValueError):
    """A name that is not one of the allowed choices; the message lists the choices."""

    def __init__(self, kind: str, name: str, allowed: list[str]) -> None:
        self.kind, self.name, self.allowed = kind, name, allowed
        super().__init__(f"unknown {kind} {name!r}; allowed: {', '.join(allowed)}")


class Registry:
    """A name → class mapping with clear errors (kronfluence-style subclass registry)."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._items: dict[str, Any] = {}

    def register(self, name: str) -> Callable[[type[T]], type[T]]:
        def add(cls: type[T]) -> type[T]:
            if name in self._items:
                raise ValueError(f"{self.kind} {name!r} is registered twice")
            cls.name = name  # type: ignore[attr-defined]
            self._items[name] = cls
            return cls

        return add

    def get(self, name: str) -> Any:
        if name not in self._items:
            raise UnknownNameError(self.kind, name, self.names())
        return self._items[name]

    def names(self) -> list[str]:
        return sorted(self._items)


TASKS = Registry("task")
METHODS = Registry("method")
register_task = TASKS.register
register_method = METHODS.register
