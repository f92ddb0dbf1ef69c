"""Which stored units a current configuration still uses (for ``python -m benchmark.store gc``).

A unit is *in use* when its config was written by this cache version and still names something the
code can request:

- ``version`` equals :data:`benchmark.config.CACHE_VERSION` (an older cache cannot be read back);
- its ``task`` is registered, and its ``scale`` settings equal one of that task's current scales (the seed
  count, coupling and target choice live in the ground-truth part, which is not compared, so runs with
  ``--seeds``/``--coupling`` overrides stay in use);
- mechanism-study units (which train at their own learning rates and lengths) carry the current
  ``MECHANISM_VERSION`` instead of a matching scale;
- method predictions name a registered method and are per-seed-chunk work units (``benchmark.method_units``).

Anything else (an older version, a removed task or method, a scale whose settings changed) no current
configuration can ask for, and ``gc`` removes it.
"""

from __future__ import annotations

import json
from dataclasses import asdict
from functools import cache
from typing import Any

from benchmark.config import CACHE_VERSION
from benchmark.store.keys import canonical_json


@cache
def _current_scales(task_name: str) -> tuple[str, ...]:
    """Canonical JSON of each current scale of ``task_name`` without its ground-truth part."""
    from benchmark.registry import TASKS

    out = []
    for scale in TASKS.get(task_name).scales.values():
        d = asdict(scale)
        d.pop("ground_truth")
        out.append(canonical_json(d))
    return tuple(out)


def unit_use(config: dict[str, Any] | None) -> tuple[bool, str]:
    """(in use, why not) for a stored unit's config."""
    import methods  # noqa: F401  (registers the methods)
    import tasks  # noqa: F401  (registers the tasks)
    from benchmark.mechanism import MECHANISM_VERSION
    from benchmark.registry import METHODS, TASKS

    if not config:
        return False, "no config"
    if config.get("version") != CACHE_VERSION:
        return False, f"cache version {config.get('version')!r} (current {CACHE_VERSION})"
    task = config.get("task")
    if task is not None and task not in TASKS.names():
        return False, f"task {task!r} is no longer registered"
    if "mechanism_version" in config:
        ok = config["mechanism_version"] == MECHANISM_VERSION
        return ok, "" if ok else f"mechanism version {config['mechanism_version']!r} (current {MECHANISM_VERSION})"
    if task is not None and "scale" in config:
        stored = canonical_json(json.loads(canonical_json(config["scale"])))
        if stored not in _current_scales(task):
            return False, f"scale settings of {task!r} that no current scale uses"
    method = config.get("method")
    if config.get("kind") == "prediction" and method not in METHODS.names():
        return False, f"method {method!r} is no longer registered"
    if config.get("kind") == "prediction" and "sources" not in config:
        return False, "an all-seed prediction from before method work units (benchmark.method_units)"
    return True, ""
