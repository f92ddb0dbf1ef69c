"""Canonical JSON and content keys: the same config always gives the same key, whatever the dict order."""

from __future__ import annotations

import dataclasses
import enum
import hashlib
import json
from collections.abc import Mapping
from pathlib import PurePath
from typing import Any

import numpy as np
import torch

__all__ = ["canonical_json", "content_key"]


def _json_key(key: Any) -> str:
    """Converts a mapping key to the string JSON would use for it."""
    key = _normalize(key)
    if isinstance(key, str):
        return key
    if key is None or isinstance(key, bool | int | float):
        return json.dumps(key)
    raise TypeError(f"cannot use {type(key).__name__} as a JSON object key: {key!r}")


def _normalize(obj: Any) -> Any:
    """Recursively converts ``obj`` to plain JSON types (dict/list/str/int/float/bool/None)."""
    if obj is None:
        return None
    if isinstance(obj, enum.Enum):
        return _normalize(obj.value)
    if isinstance(obj, bool | np.bool_):
        return bool(obj)
    if isinstance(obj, int | np.integer):
        return int(obj)
    if isinstance(obj, float | np.floating):
        return float(obj)
    if isinstance(obj, str):
        return str(obj)
    if isinstance(obj, torch.dtype | torch.device):
        return str(obj)
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return _normalize(dataclasses.asdict(obj))
    if isinstance(obj, Mapping):
        out: dict[str, Any] = {}
        for k, v in obj.items():
            jk = _json_key(k)
            if jk in out:
                raise ValueError(f"mapping keys collide after JSON conversion: {jk!r}")
            out[jk] = _normalize(v)
        return out
    if isinstance(obj, list | tuple):
        return [_normalize(v) for v in obj]
    if isinstance(obj, set | frozenset):
        items = [_normalize(v) for v in obj]
        return sorted(items, key=lambda v: json.dumps(v, sort_keys=True, separators=(",", ":")))
    if isinstance(obj, np.generic):
        return _normalize(obj.item())
    if isinstance(obj, np.ndarray):
        return _normalize(obj.tolist())
    if isinstance(obj, PurePath):
        return obj.as_posix()
    raise TypeError(f"object of type {type(obj).__name__} is not canonically JSON-serialisable: {obj!r}")


def canonical_json(obj: Any) -> str:
    """Serialises ``obj`` to canonical JSON (sorted keys, compact separators, ASCII).

    Dataclasses are converted with ``dataclasses.asdict``, enums by their ``.value``, tuples/lists to lists,
    sets to sorted lists, numpy scalars/arrays to Python values/lists, ``torch.dtype``/``torch.device`` and
    paths via ``str``. Mapping keys are converted the way ``json`` converts them (``1`` -> ``"1"``).

    Args:
        obj: The object to serialise.

    Returns:
        The canonical JSON text.

    Raises:
        TypeError: If ``obj`` contains an unsupported type.
        ValueError: If two mapping keys collide after conversion to strings.
    """
    return json.dumps(_normalize(obj), sort_keys=True, separators=(",", ":"), ensure_ascii=True)


def content_key(*parts: Any) -> str:
    """Returns a stable 20-hex-digit content key: ``sha256(canonical_json(list(parts)))[:20]``.

    Args:
        *parts: Anything :func:`canonical_json` accepts.

    Returns:
        The key, independent of dict ordering.
    """
    return hashlib.sha256(canonical_json(list(parts)).encode("utf-8")).hexdigest()[:20]
