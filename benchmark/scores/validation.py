"""Shape and finiteness checks of the ``full [S, Q]``, ``removed [S, K, Q]``, ``delta [S, K, Q]`` inputs."""

from __future__ import annotations

import numpy as np
from numpy.typing import ArrayLike

from benchmark.scores.metrics import FloatArray


def _validate(
    full: ArrayLike, removed: ArrayLike, delta: ArrayLike | None, *, min_seeds: int
) -> tuple[FloatArray, FloatArray, FloatArray | None]:
    """Return ``full [S, Q]``, ``removed [S, K, Q]`` and ``delta [S, K, Q]`` (or None) as float64 arrays.

    Raises:
        ValueError: On inconsistent shapes, ``S < min_seeds``, ``K < 2``, ``Q < 1`` or non-finite values.
    """
    full_a = np.asarray(full, dtype=np.float64)
    removed_a = np.asarray(removed, dtype=np.float64)
    delta_a = None if delta is None else np.asarray(delta, dtype=np.float64)
    shapes = f"full {full_a.shape}, removed {removed_a.shape}" + ("" if delta_a is None else f", delta {delta_a.shape}")
    if full_a.ndim != 2:
        raise ValueError(f"`full` must have shape [S, Q]; got {shapes}")
    if removed_a.ndim != 3:
        raise ValueError(f"`removed` must have shape [S, K, Q]; got {shapes}")
    n_seeds, n_queries = full_a.shape
    if removed_a.shape[0] != n_seeds or removed_a.shape[2] != n_queries:
        raise ValueError(
            f"`removed` must have shape [S, K, Q] = [{n_seeds}, K, {n_queries}] to match `full`; got {shapes}"
        )
    if delta_a is not None and delta_a.shape != removed_a.shape:
        raise ValueError(f"`delta` must have the shape of `removed` [S, K, Q]; got {shapes}")
    if n_seeds < min_seeds:
        raise ValueError(
            f"need at least {min_seeds} seeds (axis 0 of `full`, `removed`, `delta`); got S={n_seeds} ({shapes})"
        )
    if removed_a.shape[1] < 2:
        raise ValueError(f"need at least 2 removal targets (axis 1 of `removed`, `delta`); got {shapes}")
    if n_queries < 1:
        raise ValueError(f"need at least 1 query (last axis of `full`, `removed`, `delta`); got {shapes}")
    for name, arr in (("full", full_a), ("removed", removed_a), ("delta", delta_a)):
        if arr is not None and not np.all(np.isfinite(arr)):
            raise ValueError(f"`{name}` contains non-finite values ({shapes})")
    return full_a, removed_a, delta_a


def _validate_scored(
    full: ArrayLike, removed: ArrayLike, delta: ArrayLike, *, min_seeds: int
) -> tuple[FloatArray, FloatArray, FloatArray]:
    """:func:`_validate` for a method's prediction: ``delta`` is required."""
    full_a, removed_a, delta_a = _validate(full, removed, delta, min_seeds=min_seeds)
    assert delta_a is not None
    return full_a, removed_a, delta_a
