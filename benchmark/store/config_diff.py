"""Field-by-field comparison of a stored config with a requested one (for :class:`ConfigMismatchError`)."""

from __future__ import annotations

import math
from typing import Any

__all__ = ["MISSING", "config_diff"]

MISSING = "<missing>"  # stands for a field that is absent on one side


def _leaf_equal(a: Any, b: Any) -> bool:
    """Equality for JSON leaves that keeps bools distinct from ints and treats NaN == NaN."""
    if isinstance(a, bool) or isinstance(b, bool):
        return type(a) is type(b) and a == b
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b):
        return True
    return a == b


def config_diff(stored: Any, requested: Any, prefix: str = "") -> list[tuple[str, Any, Any]]:
    """Lists ``(dotted_path, stored, requested)`` for every differing leaf of two JSON values.

    Args:
        stored: The decoded config stored with a unit.
        requested: The canonicalised config the caller asked for.
        prefix: Dotted path of ``stored``/``requested`` inside the whole config (for recursion).

    Returns:
        The differences, dict keys in sorted order; ``[]`` when the values are equal. A field absent on one
        side is reported as :data:`MISSING`.
    """
    if isinstance(stored, dict) and isinstance(requested, dict):
        out: list[tuple[str, Any, Any]] = []
        for k in sorted(set(stored) | set(requested)):
            path = f"{prefix}.{k}" if prefix else str(k)
            out += config_diff(stored.get(k, MISSING), requested.get(k, MISSING), path)
        return out
    if isinstance(stored, list) and isinstance(requested, list) and len(stored) == len(requested):
        out = []
        for i, (s, r) in enumerate(zip(stored, requested, strict=True)):
            out += config_diff(s, r, f"{prefix}[{i}]")
        return out
    if isinstance(stored, dict | list) or isinstance(requested, dict | list):
        same = type(stored) is type(requested) and stored == requested
    else:
        same = _leaf_equal(stored, requested)
    return [] if same else [(prefix or "<root>", stored, requested)]
