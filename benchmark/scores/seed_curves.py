"""Scores and noise ceilings as a function of the number of seeds (random seed subsets)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
from numpy.typing import ArrayLike

from benchmark.scores.cross_fit import (
    ORACLE_MEMO,
    _column_means,
    _crossfit_over,
    _method_and_oracle,
    truth_digest,
)
from benchmark.scores.fixed_seed import _FixedSeed
from benchmark.scores.metrics import (
    REGIME_FIXED_SEED,
    FloatArray,
    IntArray,
    _crossfit_metrics,
    _fixed_seed_metrics,
    _regime,
    metric_names,
)
from benchmark.scores.resampling import CrossFitSplit, _draw_splits
from benchmark.scores.validation import _validate_scored
from benchmark.store.keys import content_key


def _default_seed_counts(n_seeds: int) -> list[int]:
    counts = []
    n = 2
    while n <= n_seeds:
        counts.append(n)
        n *= 2
    if counts[-1] != n_seeds:
        counts.append(n_seeds)
    return counts


def _mean_se(values: list[float]) -> tuple[float, float]:
    arr = np.asarray(values, dtype=np.float64)
    arr = arr[np.isfinite(arr)]
    if arr.size == 0:
        return math.nan, math.nan
    if arr.size >= 2:
        se = 0.0 if np.ptp(arr) == 0 else float(arr.std(ddof=1) / math.sqrt(arr.size))
    else:
        se = math.nan
    return float(arr.mean()), se


def _crossfit_on_subset(
    full: FloatArray,
    removed: FloatArray,
    delta: FloatArray,
    subset: IntArray,
    splits: Sequence[CrossFitSplit],
    is_distributional: bool,
    digest: str | None = None,
) -> tuple[dict[str, float], dict[str, float]]:
    """Cross-fitted scores of the method and of the oracle on the seeds ``subset``, averaged over ``splits``
    (the oracle's values memoised in :data:`ORACLE_MEMO` when ``digest``, the truth's content hash, is given)."""
    cf_metrics = _crossfit_metrics(is_distributional)
    key = (
        None
        if digest is None
        else content_key(
            "seed_subset", digest, is_distributional, subset, *(np.r_[sp.half_a, sp.half_b] for sp in splits)
        )
    )
    oracle_vals = ORACLE_MEMO.get(key)
    problem, predictions = _method_and_oracle(
        full[subset], removed[subset], delta[subset], is_distributional, with_oracle=oracle_vals is None
    )
    values = _crossfit_over(problem, predictions, cf_metrics, is_distributional, splits)
    if oracle_vals is None:
        oracle_vals = values[1]
        ORACLE_MEMO.put(key, oracle_vals.copy())
    return _column_means(values[0], cf_metrics), _column_means(oracle_vals, cf_metrics)


def _seed_curve_row(metric: str, n: int, values: list[float], ceilings: list[float]) -> dict[str, Any]:
    """The summary record of one metric at ``n`` seeds (fixed-seed ceilings are 1.0 with SE 0.0)."""
    value_mean, value_se = _mean_se(values)
    ceiling_mean, ceiling_se = _mean_se(ceilings)
    if _regime(metric) == REGIME_FIXED_SEED:
        ceiling_mean, ceiling_se = 1.0, 0.0
    return {
        "metric": metric,
        "regime": _regime(metric),
        "n_seeds": n,
        "n_subsets": int(np.isfinite(np.asarray(values)).sum()),
        "value_mean": value_mean,
        "value_se": value_se,
        "ceiling_mean": ceiling_mean,
        "ceiling_se": ceiling_se,
    }


def score_vs_seeds(
    full: ArrayLike,
    removed: ArrayLike,
    delta: ArrayLike,
    is_distributional: bool = True,
    seed_counts: Sequence[int] | None = None,
    n_subsets: int = 20,
    seed: int = 0,
    n_splits: int = 4,
) -> list[dict[str, Any]]:
    """Every score and its noise ceiling as a function of the number of seeds.

    For each ``n`` in ``seed_counts`` (default: 2, 4, 8, … ≤ S, plus S) draw ``n_subsets`` random
    subsets of ``n`` seeds without replacement (for ``n == S`` the full set each time, with
    different splits), score the method and the oracle on each subset (cross-fitting within the
    subset, halves of ``⌊n/2⌋`` seeds, ``n_splits`` splits per subset) and summarise across subsets.
    With ``n = 2`` the halves hold one seed, so variance and debiased-W2 scores are nan.

    Args:
        full: ``[S, Q]`` (S ≥ 2).
        removed: ``[S, K, Q]``.
        delta: ``[S, K, Q]``.
        is_distributional: As in :func:`score_method`.
        seed_counts: Subset sizes, each in ``[2, S]``.
        n_subsets: Subsets per size.
        seed: Seed of the subset and split draws.
        n_splits: Cross-fitting splits per subset.

    Returns:
        Records ``{"metric", "regime", "n_seeds", "n_subsets", "value_mean", "value_se",
        "ceiling_mean", "ceiling_se"}`` ordered by ``n_seeds`` then metric; ``*_mean`` / ``*_se``
        are the mean and standard error (``std/sqrt(m)``, nan if ``m < 2``) over the ``m`` subsets with a
        finite value. Fixed-seed ceilings are 1.0 with SE 0.0.
    """
    full_a, removed_a, delta_a = _validate_scored(full, removed, delta, min_seeds=2)
    n_seeds = full_a.shape[0]
    counts = _default_seed_counts(n_seeds) if seed_counts is None else [int(n) for n in seed_counts]
    bad = [n for n in counts if not 2 <= n <= n_seeds]
    if bad:
        raise ValueError(f"seed_counts must lie in [2, S={n_seeds}]; got {bad}")
    if n_subsets < 1 or n_splits < 1:
        raise ValueError(f"need n_subsets ≥ 1 and n_splits ≥ 1; got {n_subsets}, {n_splits}")
    metrics = metric_names(is_distributional)
    fs_metrics = _fixed_seed_metrics(is_distributional)
    rng = np.random.default_rng(seed)
    digest = truth_digest(full_a, removed_a)
    rows: list[dict[str, Any]] = []
    for n in counts:
        values: dict[str, list[float]] = {m: [] for m in metrics}
        ceilings: dict[str, list[float]] = {m: [] for m in metrics}
        fixed_full_set: dict[str, float] | None = None  # the full set's fixed-seed scores, computed once
        for _ in range(n_subsets):
            subset = np.arange(n_seeds) if n == n_seeds else np.sort(rng.choice(n_seeds, size=n, replace=False))
            splits = _draw_splits(n, n_splits, rng)
            method_cf, oracle_cf = _crossfit_on_subset(
                full_a, removed_a, delta_a, subset, splits, is_distributional, digest
            )
            for metric in method_cf:
                values[metric].append(method_cf[metric])
                ceilings[metric].append(oracle_cf[metric])
            if fs_metrics:
                if n == n_seeds and fixed_full_set is not None:
                    fixed_values = fixed_full_set
                else:
                    fixed_values = _FixedSeed(full_a[subset], removed_a[subset], delta_a[subset], fs_metrics).point()
                    if n == n_seeds:
                        fixed_full_set = fixed_values
                for metric in fs_metrics:
                    values[metric].append(fixed_values[metric])
                    ceilings[metric].append(1.0)
        rows.extend(_seed_curve_row(metric, n, values[metric], ceilings[metric]) for metric in metrics)
    return rows
