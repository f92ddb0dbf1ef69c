"""Errors and warnings raised by the unit store."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

__all__ = [
    "ConfigMismatchError",
    "CorruptUnitError",
    "CorruptUnitWarning",
    "IncompatibleStoreError",
    "UnitConflictWarning",
]


class ConfigMismatchError(ValueError):
    """The config stored with a unit differs from the config the caller asked for.

    Attributes:
        key: The unit key.
        differences: ``(dotted_path, stored_value, requested_value)`` for every differing field; a field
            absent on one side is reported as ``"<missing>"``.
    """

    def __init__(self, key: str, differences: Sequence[tuple[str, Any, Any]]) -> None:
        """Builds the error.

        Args:
            key: The unit key.
            differences: ``(dotted_path, stored_value, requested_value)`` triples.
        """
        self.key = key
        self.differences = [tuple(d) for d in differences]
        parts = [
            f"{path}: stored={stored!r} requested={requested!r}" for path, stored, requested in differences
        ]
        super().__init__(
            f"config mismatch for unit {key} ({len(parts)} differing field(s)): " + "; ".join(parts)
        )

    def __reduce__(self) -> tuple[Any, ...]:
        """Keeps the error picklable (e.g. across multiprocessing)."""
        return (type(self), (self.key, self.differences))


class CorruptUnitWarning(RuntimeWarning):
    """A unit file failed its checksum/metadata checks or could not be read and was quarantined."""


class UnitConflictWarning(RuntimeWarning):
    """``put`` found an existing valid unit with the same key and config but different tensor content."""


class CorruptUnitError(Exception):
    """Internal to the store: a unit file is unreadable or inconsistent; ``args[0]`` describes the problem.

    It never escapes the public API: the store turns it into a :class:`CorruptUnitWarning` and quarantines the
    file (``get``/``put``/``rebuild_index``) or reports it (``verify``).
    """


class IncompatibleStoreError(ValueError):
    """The store root was written by another store format version (``<root>/store.json``)."""
