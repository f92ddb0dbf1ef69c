"""Random cross-fitting splits, bootstrap resampling plans and percentile confidence intervals.

A plan depends only on ``(S, K, Q, seed)``, so two methods scored with the same ``seed`` see identical
splits and replicates and their difference can be bootstrapped replicate by replicate.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from numpy.typing import ArrayLike

from benchmark.scores.metrics import FloatArray, IntArray


@dataclass(frozen=True)
class CrossFitSplit:
    """Seed indices of the two halves of one cross-fitting split.

    Attributes:
        half_a: ``[h]`` seed indices of the truth half A, in their given (random) order; may contain
            repeats in a bootstrap replicate.
        half_b: ``[h]`` seed indices of the method half B; disjoint from ``half_a`` as sets.
    """

    half_a: IntArray
    half_b: IntArray


@dataclass(frozen=True)
class BootstrapReplicate:
    """The indices of one bootstrap replicate (shared by all methods scored with the same seed).

    Attributes:
        split: Cross-fitted regime: a fresh A/B partition, each half resampled with replacement.
        targets: ``[K]`` target indices drawn with replacement.
        queries: ``[Q]`` query indices drawn with replacement.
        seeds: ``[S]`` seed indices drawn with replacement (fixed-seed regime).
    """

    split: CrossFitSplit
    targets: IntArray
    queries: IntArray
    seeds: IntArray


@dataclass(frozen=True)
class ResamplingPlan:
    """All random indices used to score methods on one ``[S, K, Q]`` problem.

    Attributes:
        n_seeds: ``S``.
        n_targets: ``K``.
        n_queries: ``Q``.
        splits: The ``n_splits`` cross-fitting splits of the original seeds (point estimates).
        replicates: The ``n_boot`` bootstrap replicates.
    """

    n_seeds: int
    n_targets: int
    n_queries: int
    splits: tuple[CrossFitSplit, ...]
    replicates: tuple[BootstrapReplicate, ...]


def _draw_split(n_seeds: int, rng: np.random.Generator) -> CrossFitSplit:
    perm = rng.permutation(n_seeds)
    half = n_seeds // 2
    return CrossFitSplit(half_a=perm[:half], half_b=perm[half : 2 * half])


def _draw_splits(n_seeds: int, n_splits: int, rng: np.random.Generator) -> tuple[CrossFitSplit, ...]:
    return tuple(_draw_split(n_seeds, rng) for _ in range(n_splits))


def _draw_replicate(n_seeds: int, n_targets: int, n_queries: int, rng: np.random.Generator) -> BootstrapReplicate:
    """A fresh A/B partition resampled within each half, then targets, queries and seeds (in this order)."""
    part = _draw_split(n_seeds, rng)
    half = n_seeds // 2
    split = CrossFitSplit(
        half_a=part.half_a[rng.integers(0, half, size=half)],
        half_b=part.half_b[rng.integers(0, half, size=half)],
    )
    return BootstrapReplicate(
        split=split,
        targets=rng.integers(0, n_targets, size=n_targets),
        queries=rng.integers(0, n_queries, size=n_queries),
        seeds=rng.integers(0, n_seeds, size=n_seeds),
    )


def make_resampling_plan(
    n_seeds: int, n_targets: int, n_queries: int, *, n_splits: int = 20, n_boot: int = 200, seed: int = 0
) -> ResamplingPlan:
    """Draw the cross-fitting splits and bootstrap replicates used by :func:`score_method`.

    Splits and replicates come from independent child streams of ``np.random.SeedSequence(seed)``,
    so the replicates do not depend on ``n_splits`` (nor on ``is_distributional``): any two methods
    scored on an ``[S, K, Q]`` problem with the same ``seed`` share replicate ``r`` exactly.

    Args:
        n_seeds: ``S`` (≥ 2).
        n_targets: ``K`` (≥ 1).
        n_queries: ``Q`` (≥ 1).
        n_splits: Number of random A/B splits of the original seeds (≥ 1).
        n_boot: Number of bootstrap replicates (≥ 0).
        seed: Integer seed.

    Returns:
        The plan.
    """
    if n_seeds < 2 or n_targets < 1 or n_queries < 1:
        raise ValueError(f"need n_seeds ≥ 2, n_targets ≥ 1, n_queries ≥ 1; got {n_seeds}, {n_targets}, {n_queries}")
    if n_splits < 1 or n_boot < 0:
        raise ValueError(f"need n_splits ≥ 1 and n_boot ≥ 0; got n_splits={n_splits}, n_boot={n_boot}")
    split_ss, boot_ss = np.random.SeedSequence(seed).spawn(2)
    splits = _draw_splits(n_seeds, n_splits, np.random.default_rng(split_ss))
    rng = np.random.default_rng(boot_ss)
    replicates = tuple(_draw_replicate(n_seeds, n_targets, n_queries, rng) for _ in range(n_boot))
    return ResamplingPlan(n_seeds, n_targets, n_queries, splits, replicates)


# ----------------------------------------------------------------------------------------------
# Confidence intervals from replicates
# ----------------------------------------------------------------------------------------------


def _percentile_ci(values: FloatArray, level: float) -> tuple[float, float]:
    finite = values[np.isfinite(values)]
    if finite.size == 0:
        return math.nan, math.nan
    lo, hi = np.percentile(finite, [50.0 * (1.0 - level), 50.0 * (1.0 + level)])
    return float(lo), float(hi)


def _centre_replicates(replicates: FloatArray, value: float, metric: str) -> FloatArray:
    """Shift replicates so that their centre is the point estimate: their mean for the bounded correlations
    (then clipped to [−1, 1]), their median for the unbounded ``distribution_skill``, a ratio whose
    replicates are heavy-tailed where its denominator nears the noise floor: one wild replicate moved the mean
    far enough that the percentile interval excluded the estimate (−2.8 [8.8, 71.9] at ``small``); centred
    on the median, the interval always contains it."""
    finite = np.isfinite(replicates)
    if not finite.any() or not math.isfinite(value):
        return replicates.copy()
    if metric == "distribution_skill":
        return replicates + (value - float(np.median(replicates[finite])))
    return np.clip(replicates + (value - float(replicates[finite].mean())), -1.0, 1.0)


def paired_difference_ci(reps_a: ArrayLike, reps_b: ArrayLike, level: float = 0.95) -> tuple[float, float, float]:
    """Paired bootstrap difference of two methods' replicate values (same replicate indices).

    ``d_r = a_r − b_r`` for each replicate ``r``; replicates where either value is nan are dropped.

    Args:
        reps_a: ``[n_boot]`` replicate values of method A (e.g. :attr:`ScoreResult.replicates`).
        reps_b: ``[n_boot]`` replicate values of method B from the same ``seed``.
        level: Confidence level of the percentile interval.

    Returns:
        ``(mean_r d_r, lower percentile, upper percentile)``; all nan if no replicate is finite.

    Raises:
        ValueError: If the shapes differ or ``level`` is not in (0, 1).
    """
    a = np.asarray(reps_a, dtype=np.float64)
    b = np.asarray(reps_b, dtype=np.float64)
    if a.shape != b.shape:
        raise ValueError(f"reps_a and reps_b must have the same shape; got {a.shape} and {b.shape}")
    if not 0.0 < level < 1.0:
        raise ValueError(f"level must be in (0, 1); got {level}")
    diff = (a - b).ravel()
    diff = diff[np.isfinite(diff)]
    if diff.size == 0:
        return math.nan, math.nan, math.nan
    lo, hi = _percentile_ci(diff, level)
    return float(diff.mean()), lo, hi
