"""Scores, noise ceilings and bootstrap confidence intervals for (distributional) TDA methods.

Conventions (shared with the rest of the suite)
-----------------------------------------------
Axes: ``S`` seeds, ``K`` removal targets, ``Q`` queries. Effects are **removed minus full**.
For ONE measurement (e.g. test loss) a method is scored from three float64 arrays:

* ``full``    ``[S, Q]``    true measurement of the full-data run of seed ``s``;
* ``removed`` ``[S, K, Q]`` true measurement of the run without target ``k`` for seed index ``s``
  (paired with ``full[s]`` under masked/deleted coupling, an independent seed under independent
  coupling; the code is the same either way);
* ``delta``   ``[S, K, Q]`` the method's per-seed prediction of ``removed − full``; the predicted
  leave-one-out (LOO) sample is ``full[s, q] + delta[s, k, q]`` (d-TDA, Alg. 1).

Two regimes
-----------
**Distributional, cross-fitted.** The seed indices are split at random into equal halves A and B
(``h = ⌊S/2⌋`` each; one seed is dropped when ``S`` is odd). The method's quantities come from half B
only (``full_B``, ``delta_B``), the truth from half A only (``full_A``, ``removed_A``), so the seed noise
of the truth is independent of everything the method is scored on. Per ``(k, q)``:

* mean effect: true ``mean_A(removed) − mean_A(full)``; predicted ``mean_B(delta)``;
* variance change: true ``var_A(removed) − var_A(full)`` (ddof=1); predicted
  ``var_B(full_B + delta_B) − var_B(full_B)``;
* W2 influence: true ``W̃2²(full_A, removed_A)``; predicted ``W̃2²(full_B, full_B + delta_B)``,

with ``W̃2²`` the debiased squared 1-D Wasserstein distance (:func:`debiased_w2_squared`). The scores
``loo_mean_spearman``, ``loo_mean_pearson``, ``var_influence_spearman`` and ``w2_influence_spearman``
correlate prediction and truth across targets ``k`` for each query, then average over queries;
``distribution_skill`` compares whole predicted LOO distributions with the true ones. Point
estimates average ``n_splits`` random splits.

**Fixed seed** (all seeds, no split). ``loo_seed_pearson`` / ``loo_seed_spearman`` correlate, per
query, ``delta[s, k, q]`` with the realised per-seed effect ``removed[s, k, q] − full[s, q]`` over all
``(s, k)`` pairs, then average over queries.

Noise ceiling
-------------
Every score is also computed, by the same procedure (same splits, same bootstrap indices), for the
oracle ``delta_oracle = removed − full[:, None, :]``, which knows each seed's realised effect. In the
cross-fitted regime the oracle is still limited by the finite number of seeds (its half-B
quantities are noisy estimates of the half-A truth), which is what the ceiling measures. In the
fixed-seed regime the oracle correlates its effect with itself, so the ceiling is exactly 1.0.
A method that knows the *expected* effect can score above the cross-fitted ceiling (it carries no
seed noise at all); the ceiling is the attainable score of a perfect per-seed predictor.

Bootstrap
---------
Percentile confidence intervals from ``n_boot`` replicates that resample seeds, targets and queries
jointly. Cross-fitted replicate: one fresh random A/B partition of the original seeds, then
resampling with replacement *within* A and *within* B (a seed never appears in both halves), plus
resampled target and query indices (the same for truth and prediction). Fixed-seed replicate:
seeds, targets and queries resampled with replacement. The indices depend only on
``(S, K, Q, seed)`` (:func:`make_resampling_plan`), so two methods scored with the same ``seed`` see
identical replicates and their difference can be bootstrapped replicate by replicate
(:func:`paired_difference_ci`). Because a replicate re-adds seed noise on top of the sample's own,
noise-limited scores are attenuated in the raw replicates relative to the point estimate (a raw
percentile interval can exclude it). By default (``ci_method="centered"``) each metric's replicates
are therefore shifted to have the point estimate as their mean before the percentile interval is
taken; ``ci_method="percentile"`` keeps them raw (see :func:`score_method`).

Everything is vectorised over targets and queries (loops only over splits and replicates).
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

import numpy as np
from numpy.typing import ArrayLike, NDArray

FloatArray = NDArray[np.float64]
IntArray = NDArray[np.intp]

__all__ = [
    "CI_METHODS",
    "REGIME_DISTRIBUTIONAL",
    "REGIME_FIXED_SEED",
    "SCORE_NAMES_DISTRIBUTIONAL",
    "SCORE_NAMES_FIXED_SEED",
    "SCORE_NAMES_RANKING_ONLY",
    "BootstrapReplicate",
    "CrossFitSplit",
    "ResamplingPlan",
    "ScoreResult",
    "bootstrap_replicates",
    "debiased_w2_squared",
    "make_resampling_plan",
    "metric_names",
    "paired_difference_ci",
    "rowwise_pearson",
    "rowwise_spearman",
    "score_method",
    "score_split",
    "score_vs_seeds",
    "signal_to_noise",
    "w2_squared",
]

SCORE_NAMES_DISTRIBUTIONAL: tuple[str, ...] = (
    "loo_mean_spearman",
    "loo_mean_pearson",
    "var_influence_spearman",
    "w2_influence_spearman",
    "distribution_skill",
)
SCORE_NAMES_FIXED_SEED: tuple[str, ...] = ("loo_seed_pearson", "loo_seed_spearman")
#: The scores reported for ranking-only (``is_distributional=False``) methods.
SCORE_NAMES_RANKING_ONLY: tuple[str, ...] = ("loo_mean_spearman", "loo_seed_spearman")

REGIME_DISTRIBUTIONAL = "distributional"
REGIME_FIXED_SEED = "fixed_seed"
#: Ways to turn bootstrap replicates into an interval (see :func:`score_method`).
CI_METHODS: tuple[str, ...] = ("centered", "percentile")

_EPS = float(np.finfo(np.float64).eps)
_SNAP_ULPS = 64.0  # |a − b| ≤ 64·eps·(|a| + |b|) is treated as an exact zero difference
_CONST_ULPS = 16.0  # a row whose spread is below 16·eps·max|x| counts as constant


# ----------------------------------------------------------------------------------------------
# Public result types
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ScoreResult:
    """One score of one method for one measurement.

    Attributes:
        metric: Score name, one of :data:`SCORE_NAMES_DISTRIBUTIONAL` or :data:`SCORE_NAMES_FIXED_SEED`.
        regime: ``"distributional"`` (cross-fitted) or ``"fixed_seed"``.
        value: Point estimate (cross-fitted: mean over ``n_splits`` splits of the original data).
        ci_low: Lower end of the percentile bootstrap CI of the method's score.
        ci_high: Upper end of that CI.
        noise_ceiling: The same score for the oracle ``removed − full`` (1.0 exactly for fixed-seed).
        ceiling_ci_low: Lower end of the oracle's bootstrap CI (same replicates).
        ceiling_ci_high: Upper end of the oracle's bootstrap CI.
        replicates: ``[n_boot]`` the method's bootstrap replicate values (nan where undefined), in
            the order of :attr:`ResamplingPlan.replicates` (shifted to mean ``value`` under
            ``ci_method="centered"``); subtract another method's replicates from the same ``seed``
            for a paired difference (:func:`paired_difference_ci`).
    """

    metric: str
    regime: str
    value: float
    ci_low: float
    ci_high: float
    noise_ceiling: float
    ceiling_ci_low: float
    ceiling_ci_high: float
    replicates: FloatArray = field(repr=False, compare=False)

    def as_record(self) -> dict[str, Any]:
        """Return the scalar fields as a plain dict (no replicates), e.g. for JSON/CSV output."""
        return {
            "metric": self.metric,
            "regime": self.regime,
            "value": self.value,
            "ci_low": self.ci_low,
            "ci_high": self.ci_high,
            "noise_ceiling": self.noise_ceiling,
            "ceiling_ci_low": self.ceiling_ci_low,
            "ceiling_ci_high": self.ceiling_ci_high,
        }


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


def metric_names(is_distributional: bool = True) -> tuple[str, ...]:
    """Return the score names reported for a method, in reporting order.

    Args:
        is_distributional: ``False`` for ranking-only methods, which get only
            ``loo_mean_spearman`` and ``loo_seed_spearman``.

    Returns:
        The distributional names followed by the fixed-seed names, or :data:`SCORE_NAMES_RANKING_ONLY`.
    """
    if is_distributional:
        return SCORE_NAMES_DISTRIBUTIONAL + SCORE_NAMES_FIXED_SEED
    return SCORE_NAMES_RANKING_ONLY


def _regime(metric: str) -> str:
    return REGIME_FIXED_SEED if metric in SCORE_NAMES_FIXED_SEED else REGIME_DISTRIBUTIONAL


# ----------------------------------------------------------------------------------------------
# Elementary vectorised statistics
# ----------------------------------------------------------------------------------------------


def _sorted_w2(xs: FloatArray, ys: FloatArray) -> FloatArray:
    """``mean((xs − ys)²)`` over the last axis of two already sorted (broadcastable) arrays."""
    n = xs.shape[-1]
    if n == 0:
        return np.full(np.broadcast_shapes(xs.shape[:-1], ys.shape[:-1]), np.nan)
    diff = xs - ys
    return np.einsum("...i,...i->...", diff, diff) / n


def w2_squared(x: ArrayLike, y: ArrayLike, axis: int = 0) -> FloatArray:
    """Squared 2-Wasserstein distance between two equal-size 1-D empirical samples.

    For samples ``x_1..x_n`` and ``y_1..y_n`` (each with mass 1/n per point) the optimal 1-D coupling
    matches order statistics, so ``W2²(x, y) = (1/n) Σ_i (x_(i) − y_(i))²``.

    Args:
        x: Array with the sample along ``axis``; other axes broadcast against ``y``'s.
        y: Array with a sample of the same size ``n`` along ``axis``.
        axis: The sample axis.

    Returns:
        Array of the broadcast shape of ``x`` and ``y`` without ``axis`` (nan where ``n == 0``).

    Raises:
        ValueError: If the sample sizes differ.
    """
    xa = np.moveaxis(np.asarray(x, dtype=np.float64), axis, -1)
    ya = np.moveaxis(np.asarray(y, dtype=np.float64), axis, -1)
    if xa.shape[-1] != ya.shape[-1]:
        raise ValueError(
            f"w2_squared needs equal sample sizes along axis {axis}; got x {np.shape(x)} and y {np.shape(y)}"
        )
    return _sorted_w2(np.sort(xa, axis=-1), np.sort(ya, axis=-1))


def debiased_w2_squared(x: ArrayLike, y: ArrayLike, axis: int = 0) -> FloatArray:
    """Squared W2 between equal-size 1-D samples, minus an estimate of its finite-sample bias.

    ``W̃2²(x, y) = W2²(x, y) − [W2²(x1, x2) + W2²(y1, y2)] / 4`` where ``x1, x2`` (``y1, y2``) are the
    first and second halves (``⌊n/2⌋`` points each, in the given order; a last odd point is left out)
    of ``x`` (``y``). Rationale: between two independent ``n``-samples of one law, ``E W2² ≈ a/n`` for
    a law-dependent constant ``a`` (for smooth laws; heavier tails decay slower), so two half-samples
    give ``E W2²(x1, x2) ≈ 2a_x/n``, and ``[2a_x/n + 2a_y/n]/4 = (a_x + a_y)/(2n)`` estimates the
    positive bias of ``W2²(x, y)`` that sampling noise alone produces (``a/n`` when the laws agree).
    The result can be negative when the laws are (nearly) equal. The halves are taken in the given
    order, so pass samples whose order is random with respect to their values.

    Args:
        x: Array with the sample along ``axis``.
        y: Array with a sample of the same size ``n`` along ``axis``.
        axis: The sample axis.

    Returns:
        Array of the broadcast shape without ``axis``; nan where ``n < 2``.
    """
    xa = np.moveaxis(np.asarray(x, dtype=np.float64), axis, -1)
    ya = np.moveaxis(np.asarray(y, dtype=np.float64), axis, -1)
    if xa.shape[-1] != ya.shape[-1]:
        raise ValueError(
            f"debiased_w2_squared needs equal sample sizes along axis {axis}; "
            f"got x {np.shape(x)} and y {np.shape(y)}"
        )
    sx, sy = _summarise(xa.copy()), _summarise(ya.copy())
    return _debias(_sorted_w2(sx.sorted, sy.sorted), sx.half_w2, sy.half_w2)


def _debias(raw: FloatArray, half_x: FloatArray, half_y: FloatArray) -> FloatArray:
    bias = (half_x + half_y) / 4.0
    return _snap(raw - bias, np.abs(raw) + np.abs(bias))


def _snap(diff: FloatArray, scale: FloatArray) -> FloatArray:
    """Set differences that are pure rounding noise (``|d| ≤ 64·eps·scale``) to exactly 0."""
    with np.errstate(invalid="ignore"):
        return np.where(np.abs(diff) <= _SNAP_ULPS * _EPS * scale, 0.0, diff)


def rowwise_pearson(x: ArrayLike, y: ArrayLike, axis: int = -1) -> FloatArray:
    """Pearson correlation of ``x`` and ``y`` along ``axis``, for every other index at once.

    ``r = Σ (x − x̄)(y − ȳ) / sqrt(Σ (x − x̄)² · Σ (y − ȳ)²)``, clipped to ``[−1, 1]``.

    Args:
        x: Array ``[..., n]`` (``n`` along ``axis``); broadcast against ``y``.
        y: Array ``[..., n]``.
        axis: The axis to correlate along.

    Returns:
        ``[...]`` correlations; nan where either row is constant (spread below ``16·eps·max|x|``),
        contains nan, or ``n < 2``.
    """
    xa, ya = np.broadcast_arrays(np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64))
    xa = np.moveaxis(xa, axis, -1)
    ya = np.moveaxis(ya, axis, -1)
    n = xa.shape[-1]
    if n < 2:
        return np.full(xa.shape[:-1], np.nan)
    with np.errstate(invalid="ignore", divide="ignore", over="ignore"):
        xc = xa - xa.mean(axis=-1, keepdims=True)
        yc = ya - ya.mean(axis=-1, keepdims=True)
        sxx = np.einsum("...i,...i->...", xc, xc)
        syy = np.einsum("...i,...i->...", yc, yc)
        sxy = np.einsum("...i,...i->...", xc, yc)
        const = _is_constant(sxx, np.max(np.abs(xa), axis=-1), n) | _is_constant(
            syy, np.max(np.abs(ya), axis=-1), n
        )
        r = np.clip(sxy / np.sqrt(sxx * syy), -1.0, 1.0)
    return np.where(const, np.nan, r)


def _is_constant(sum_sq: FloatArray, max_abs: FloatArray | float, weight: FloatArray | float) -> FloatArray:
    """True where a centred sum of squares is indistinguishable from rounding noise."""
    with np.errstate(invalid="ignore", over="ignore"):
        return sum_sq <= weight * (_CONST_ULPS * _EPS * max_abs) ** 2


def rowwise_spearman(x: ArrayLike, y: ArrayLike, axis: int = -1) -> FloatArray:
    """Spearman rank correlation of ``x`` and ``y`` along ``axis``, for every other index at once.

    Pearson correlation of the average ranks (ties share their mean rank), as :func:`scipy.stats.spearmanr`.

    Args:
        x: Array ``[..., n]`` (``n`` along ``axis``); broadcast against ``y``.
        y: Array ``[..., n]``.
        axis: The axis to correlate along.

    Returns:
        ``[...]`` correlations; nan where either row is constant, contains nan, or ``n < 2``.
    """
    xa, ya = np.broadcast_arrays(np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64))
    xa = np.moveaxis(xa, axis, -1)
    ya = np.moveaxis(ya, axis, -1)
    if xa.shape[-1] < 2:
        return np.full(xa.shape[:-1], np.nan)
    return rowwise_pearson(_average_ranks(xa), _average_ranks(ya), axis=-1)


def _nanmean(values: FloatArray) -> float:
    """Mean of the finite entries; nan (and no warning) when there are none."""
    finite = values[np.isfinite(values)]
    return float(finite.mean()) if finite.size else math.nan


def _percentile_ci(values: FloatArray, level: float) -> tuple[float, float]:
    finite = values[np.isfinite(values)]
    if finite.size == 0:
        return math.nan, math.nan
    lo, hi = np.percentile(finite, [50.0 * (1.0 - level), 50.0 * (1.0 + level)])
    return float(lo), float(hi)


def paired_difference_ci(
    reps_a: ArrayLike, reps_b: ArrayLike, level: float = 0.95
) -> tuple[float, float, float]:
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


# ----------------------------------------------------------------------------------------------
# Input validation and signal-to-noise
# ----------------------------------------------------------------------------------------------


def _validate(
    full: ArrayLike, removed: ArrayLike, delta: ArrayLike | None, *, min_seeds: int
) -> tuple[FloatArray, FloatArray, FloatArray | None]:
    full_a = np.asarray(full, dtype=np.float64)
    removed_a = np.asarray(removed, dtype=np.float64)
    delta_a = None if delta is None else np.asarray(delta, dtype=np.float64)
    shapes = f"full {full_a.shape}, removed {removed_a.shape}" + (
        "" if delta_a is None else f", delta {delta_a.shape}"
    )
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
            f"need at least {min_seeds} seeds (axis 0 of `full`, `removed`, `delta`); "
            f"got S={n_seeds} ({shapes})"
        )
    if removed_a.shape[1] < 2:
        raise ValueError(f"need at least 2 removal targets (axis 1 of `removed`, `delta`); got {shapes}")
    if n_queries < 1:
        raise ValueError(f"need at least 1 query (last axis of `full`, `removed`, `delta`); got {shapes}")
    for name, arr in (("full", full_a), ("removed", removed_a), ("delta", delta_a)):
        if arr is not None and not np.all(np.isfinite(arr)):
            raise ValueError(f"`{name}` contains non-finite values ({shapes})")
    return full_a, removed_a, delta_a


def signal_to_noise(full: ArrayLike, removed: ArrayLike) -> tuple[FloatArray, float]:
    """How detectable each true removal effect is with the available seeds.

    With ``e[s, k, q] = removed[s, k, q] − full[s, q]`` (paired by seed index):
    ``snr[k, q] = |mean_s e| / (std_s(e, ddof=1) / sqrt(S))``; where the standard error is 0 the
    ratio is +inf for a non-zero mean and 0 for a zero mean.

    Args:
        full: ``[S, Q]`` full-data measurements.
        removed: ``[S, K, Q]`` removal measurements.

    Returns:
        ``(snr [K, Q], fraction of (k, q) with snr ≥ 2)`` — the latter a Python float.

    Raises:
        ValueError: On inconsistent shapes or ``S < 2``.
    """
    full_a, removed_a, _ = _validate(full, removed, None, min_seeds=2)
    effect = removed_a - full_a[:, None, :]
    n_seeds = effect.shape[0]
    mean = effect.mean(axis=0)
    se = effect.std(axis=0, ddof=1) / math.sqrt(n_seeds)
    with np.errstate(divide="ignore", invalid="ignore"):
        snr = np.where(se > 0, np.abs(mean) / se, np.where(mean == 0, 0.0, np.inf))
    return snr, float(np.mean(snr >= 2.0))


# ----------------------------------------------------------------------------------------------
# Resampling plan
# ----------------------------------------------------------------------------------------------


def _draw_split(n_seeds: int, rng: np.random.Generator) -> CrossFitSplit:
    perm = rng.permutation(n_seeds)
    half = n_seeds // 2
    return CrossFitSplit(half_a=perm[:half], half_b=perm[half : 2 * half])


def _draw_splits(n_seeds: int, n_splits: int, rng: np.random.Generator) -> tuple[CrossFitSplit, ...]:
    return tuple(_draw_split(n_seeds, rng) for _ in range(n_splits))


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
        raise ValueError(
            f"need n_seeds ≥ 2, n_targets ≥ 1, n_queries ≥ 1; got {n_seeds}, {n_targets}, {n_queries}"
        )
    if n_splits < 1 or n_boot < 0:
        raise ValueError(f"need n_splits ≥ 1 and n_boot ≥ 0; got n_splits={n_splits}, n_boot={n_boot}")
    split_ss, boot_ss = np.random.SeedSequence(seed).spawn(2)
    splits = _draw_splits(n_seeds, n_splits, np.random.default_rng(split_ss))
    rng = np.random.default_rng(boot_ss)
    half = n_seeds // 2
    replicates = []
    for _ in range(n_boot):
        part = _draw_split(n_seeds, rng)
        split = CrossFitSplit(
            half_a=part.half_a[rng.integers(0, half, size=half)],
            half_b=part.half_b[rng.integers(0, half, size=half)],
        )
        replicates.append(
            BootstrapReplicate(
                split=split,
                targets=rng.integers(0, n_targets, size=n_targets),
                queries=rng.integers(0, n_queries, size=n_queries),
                seeds=rng.integers(0, n_seeds, size=n_seeds),
            )
        )
    return ResamplingPlan(n_seeds, n_targets, n_queries, splits, tuple(replicates))


# ----------------------------------------------------------------------------------------------
# Cross-fitted regime
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Summary:
    """Per-row summary of a sample along the last axis: variance, sorted sample, half-vs-half W2²."""

    var: FloatArray
    sorted: FloatArray
    half_w2: FloatArray

    @property
    def var_scale(self) -> FloatArray:
        """Magnitude of the variance's rounding error: ``var + max|x|·sd`` (deviations err by eps·max|x|)."""
        max_abs = np.maximum(np.abs(self.sorted[..., 0]), np.abs(self.sorted[..., -1]))
        return np.abs(self.var) + max_abs * np.sqrt(np.abs(self.var))


def _var_change(after: _Summary, before: _Summary) -> FloatArray:
    """``var(after) − var(before)``, with differences at rounding-noise level set to exactly 0."""
    return _snap(after.var - before.var, after.var_scale + before.var_scale)


def _summarise(values: FloatArray) -> _Summary:
    """Summarise ``values [..., n]`` (an owned array; it is sorted in place)."""
    n = values.shape[-1]
    half = n // 2
    if half >= 1:
        half_w2 = _sorted_w2(
            np.sort(values[..., :half], axis=-1), np.sort(values[..., half : 2 * half], axis=-1)
        )
    else:
        half_w2 = np.full(values.shape[:-1], np.nan)
    values.sort(axis=-1)
    var = values.var(axis=-1, ddof=1) if n >= 2 else np.full(values.shape[:-1], np.nan)
    return _Summary(var=var, sorted=values, half_w2=half_w2)


@dataclass(frozen=True)
class _Problem:
    """The truth in a seeds-last layout (fast gathers and sorts along the last axis)."""

    full_t: FloatArray  # [Q, S]
    removed_t: FloatArray  # [K, Q, S]


@dataclass(frozen=True)
class _Prediction:
    delta_t: FloatArray  # [K, Q, S]
    pred_t: FloatArray | None  # [K, Q, S] = full + delta (None when only means are needed)


def _make_problem(full: FloatArray, removed: FloatArray) -> _Problem:
    return _Problem(
        full_t=np.ascontiguousarray(full.T), removed_t=np.ascontiguousarray(np.transpose(removed, (1, 2, 0)))
    )


def _make_prediction(full: FloatArray, delta: FloatArray, need_dist: bool) -> _Prediction:
    delta_t = np.ascontiguousarray(np.transpose(delta, (1, 2, 0)))
    pred_t = full.T[None, :, :] + delta_t if need_dist else None
    return _Prediction(delta_t=delta_t, pred_t=pred_t)


@dataclass(frozen=True)
class _Cells:
    """The (target, query) cells a split is evaluated on.

    A bootstrap replicate only needs the distinct resampled targets ``K'`` and queries ``Q'`` (about
    63% of each); its resampled indices are then positions into those (``target_pos``, ``query_pos``).
    ``targets is None`` means all cells, in order.
    """

    targets: IntArray | None = None
    queries: IntArray | None = None
    target_pos: IntArray | None = None
    query_pos: IntArray | None = None

    @staticmethod
    def for_replicate(replicate: BootstrapReplicate) -> _Cells:
        targets, target_pos = np.unique(replicate.targets, return_inverse=True)
        queries, query_pos = np.unique(replicate.queries, return_inverse=True)
        return _Cells(targets, queries, target_pos, query_pos)

    def take_full(self, full_t: FloatArray, seeds: IntArray) -> FloatArray:
        """``[Q', n]`` gathered copy of ``full_t [Q, S]``."""
        rows = full_t if self.queries is None else full_t.take(self.queries, axis=0)
        return rows.take(seeds, axis=1)

    def take_cells(self, arr: FloatArray, seeds: IntArray) -> FloatArray:
        """``[K', Q', n]`` gathered copy of ``arr [K, Q, S]``."""
        if self.targets is None or self.queries is None:
            return arr.take(seeds, axis=2)
        n_targets, n_queries, n_seeds = arr.shape
        cells = (self.targets[:, None] * n_queries + self.queries[None, :]).ravel()
        rows = arr.reshape(n_targets * n_queries, n_seeds).take(cells, axis=0)
        return rows.take(seeds, axis=1).reshape(self.targets.size, self.queries.size, seeds.size)

    def expand(self, values: FloatArray) -> FloatArray:
        """Map ``[K', Q']`` cell values to the replicate's resampled ``[K, Q]`` grid."""
        if self.target_pos is None or self.query_pos is None:
            return values
        return values[np.ix_(self.target_pos, self.query_pos)]


@dataclass(frozen=True)
class _Truth:
    """Half-A truth (and method-independent half-B quantities) for one split, ``[K', Q']`` or ``[Q']``."""

    mean: FloatArray  # [K', Q'] mean_A(removed) − mean_A(full)
    var: FloatArray | None = None  # [K', Q'] var_A(removed) − var_A(full)
    w2: FloatArray | None = None  # [K', Q'] debiased W2²(full_A, removed_A)
    full_b: _Summary | None = None  # [Q', h]
    removed_a_sorted: FloatArray | None = None  # [K', Q', h]
    noise_floor: FloatArray | None = None  # [Q'] b_q = W2²(full_B, full_A)
    base_terms: FloatArray | None = None  # [K', Q'] W2²(full_B, removed_A) − b_q


@dataclass(frozen=True)
class _PredStats:
    mean: FloatArray  # [K', Q'] mean_B(delta)
    var: FloatArray | None = None  # [K', Q'] var_B(full_B + delta_B) − var_B(full_B)
    w2: FloatArray | None = None  # [K', Q'] debiased W2²(full_B, full_B + delta_B)
    skill_terms: FloatArray | None = None  # [K', Q'] W2²(full_B + delta_B, removed_A) − b_q


def _truth(problem: _Problem, split: CrossFitSplit, cells: _Cells, need_dist: bool) -> _Truth:
    a, b = split.half_a, split.half_b
    full_a_raw = cells.take_full(problem.full_t, a)
    removed_a_raw = cells.take_cells(problem.removed_t, a)
    mean_full, mean_removed = full_a_raw.mean(axis=-1), removed_a_raw.mean(axis=-1)
    mean = _snap(mean_removed - mean_full, np.abs(mean_removed) + np.abs(mean_full))
    if not need_dist:
        return _Truth(mean=mean)
    with np.errstate(invalid="ignore", divide="ignore"):
        full_a = _summarise(full_a_raw)
        removed_a = _summarise(removed_a_raw)
        full_b = _summarise(cells.take_full(problem.full_t, b))
        var = _var_change(removed_a, full_a)
        w2 = _debias(_sorted_w2(removed_a.sorted, full_a.sorted), removed_a.half_w2, full_a.half_w2)
        noise_floor = _sorted_w2(full_b.sorted, full_a.sorted)
        base_terms = _sorted_w2(full_b.sorted, removed_a.sorted) - noise_floor
    return _Truth(
        mean=mean,
        var=var,
        w2=w2,
        full_b=full_b,
        removed_a_sorted=removed_a.sorted,
        noise_floor=noise_floor,
        base_terms=base_terms,
    )


def _pred_stats(pred: _Prediction, truth: _Truth, split: CrossFitSplit, cells: _Cells) -> _PredStats:
    b = split.half_b
    mean = cells.take_cells(pred.delta_t, b).mean(axis=-1)
    if pred.pred_t is None or truth.full_b is None:
        return _PredStats(mean=mean)
    full_b = truth.full_b
    with np.errstate(invalid="ignore", divide="ignore"):
        pred_b = _summarise(cells.take_cells(pred.pred_t, b))
        var = _var_change(pred_b, full_b)
        w2 = _debias(_sorted_w2(pred_b.sorted, full_b.sorted), pred_b.half_w2, full_b.half_w2)
        skill_terms = _sorted_w2(pred_b.sorted, truth.removed_a_sorted) - truth.noise_floor
    return _PredStats(mean=mean, var=var, w2=w2, skill_terms=skill_terms)


#: Correlation metrics of the cross-fitted regime: metric -> (per-cell statistic, rank-based?).
_CORRELATION_METRICS: dict[str, tuple[str, bool]] = {
    "loo_mean_spearman": ("mean", True),
    "loo_mean_pearson": ("mean", False),
    "var_influence_spearman": ("var", True),
    "w2_influence_spearman": ("w2", True),
}


def _row_nanmean(values: FloatArray) -> FloatArray:
    """Mean of the finite entries along the last axis; nan where there are none (no warning)."""
    finite = np.isfinite(values)
    count = finite.sum(axis=-1)
    total = np.where(finite, values, 0.0).sum(axis=-1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(count > 0, total / np.maximum(count, 1), np.nan)


def _crossfit_values(
    truth: _Truth, preds: Sequence[_PredStats], metrics: Sequence[str], cells: _Cells
) -> list[dict[str, float]]:
    """Scores of each prediction against one split's truth (one batched rank/correlation pass).

    Correlations are across targets for each query (rows ``[Q, K]`` after :meth:`_Cells.expand`),
    nan-averaged over queries.
    """
    out: list[dict[str, float]] = [{} for _ in preds]
    corr_metrics = [m for m in metrics if m in _CORRELATION_METRICS]
    if corr_metrics:

        def cell_rows(source: _Truth | _PredStats, stat: str) -> FloatArray:
            values = getattr(source, stat)
            assert values is not None, stat
            return cells.expand(values).T  # [Q, K]

        stats_used = sorted({_CORRELATION_METRICS[m][0] for m in corr_metrics})
        ranked_stats = sorted(
            {_CORRELATION_METRICS[m][0] for m in corr_metrics if _CORRELATION_METRICS[m][1]}
        )
        truth_raw = {stat: cell_rows(truth, stat) for stat in stats_used}
        pred_raw = [{stat: cell_rows(pred, stat) for stat in stats_used} for pred in preds]
        truth_rank: dict[str, FloatArray] = {}
        pred_rank: list[dict[str, FloatArray]] = [{} for _ in preds]
        if ranked_stats:
            stacked = [truth_raw[s] for s in ranked_stats] + [
                raw[s] for raw in pred_raw for s in ranked_stats
            ]
            ranks = iter(_average_ranks(np.stack(stacked)))
            truth_rank = {s: next(ranks) for s in ranked_stats}
            pred_rank = [{s: next(ranks) for s in ranked_stats} for _ in preds]
        xs, ys = [], []
        for j in range(len(preds)):
            for metric in corr_metrics:
                stat, rank = _CORRELATION_METRICS[metric]
                xs.append(pred_rank[j][stat] if rank else pred_raw[j][stat])
                ys.append(truth_rank[stat] if rank else truth_raw[stat])
        means = _row_nanmean(rowwise_pearson(np.stack(xs), np.stack(ys))).reshape(
            len(preds), len(corr_metrics)
        )
        for j in range(len(preds)):
            out[j].update(zip(corr_metrics, means[j].tolist(), strict=True))
    if "distribution_skill" in metrics:
        assert truth.base_terms is not None
        den_sum = float(cells.expand(truth.base_terms).sum())
        for j, pred in enumerate(preds):
            assert pred.skill_terms is not None
            num_sum = float(cells.expand(pred.skill_terms).sum())
            ok = den_sum != 0.0 and math.isfinite(den_sum)
            out[j]["distribution_skill"] = 1.0 - num_sum / den_sum if ok else math.nan
    return out


def score_split(
    full: ArrayLike,
    removed: ArrayLike,
    delta: ArrayLike,
    half_a: ArrayLike,
    half_b: ArrayLike,
    *,
    is_distributional: bool = True,
) -> dict[str, float]:
    """Cross-fitted scores for ONE split (truth from ``half_a``, method from ``half_b``).

    Per ``(k, q)``, with ``P_B = full_B + delta_B`` the predicted LOO sample and ``R_A = removed_A``:

    * ``loo_mean_spearman`` / ``loo_mean_pearson``: correlation over ``k`` of ``mean_B(delta)`` with
      ``mean_A(removed) − mean_A(full)``, per query, nan-mean over queries (constant rows ignored);
    * ``var_influence_spearman``: same with ``var_B(P) − var_B(full_B)`` vs ``var_A(R) − var_A(full_A)``;
    * ``w2_influence_spearman``: same with ``W̃2²(full_B, P_B)`` vs ``W̃2²(full_A, R_A)``;
    * ``distribution_skill = 1 − Σ_{k,q} [W2²(P_B, R_A) − b_q] / Σ_{k,q} [W2²(full_B, R_A) − b_q]`` with the
      same-law noise floor ``b_q = W2²(full_B[:, q], full_A[:, q])`` (raw W2²). Positive: closer to
      the true LOO distributions than predicting "no change"; ``delta ≡ 0`` gives exactly 0.

    Differences that are pure floating-point rounding noise (``|a − b| ≤ 64·eps·scale``, with ``scale``
    ``|a| + |b|`` for means and W2², and ``Σ (var + max|x|·sd)`` over both samples for variances) are
    set to exactly 0, so e.g. a pure location-shift prediction has an exactly constant variance
    change and its ``var_influence_spearman`` is nan rather than a ranking of rounding noise.

    Args:
        full: ``[S, Q]``.
        removed: ``[S, K, Q]``.
        delta: ``[S, K, Q]``.
        half_a: ``[h]`` seed indices of the truth half (repeats allowed).
        half_b: ``[h]`` seed indices of the method half (same size as ``half_a``).
        is_distributional: If False only ``loo_mean_spearman`` is computed.

    Returns:
        ``{metric: value}`` for the cross-fitted metrics of the method.
    """
    full_a, removed_a, delta_a = _validate(full, removed, delta, min_seeds=2)
    assert delta_a is not None
    split = CrossFitSplit(np.asarray(half_a, dtype=np.intp), np.asarray(half_b, dtype=np.intp))
    if split.half_a.ndim != 1 or split.half_a.shape != split.half_b.shape or split.half_a.size < 1:
        raise ValueError(
            "half_a and half_b must be non-empty 1-D index arrays of equal size; "
            f"got shapes {split.half_a.shape}, {split.half_b.shape}"
        )
    problem = _make_problem(full_a, removed_a)
    prediction = _make_prediction(full_a, delta_a, is_distributional)
    cells = _Cells()
    truth = _truth(problem, split, cells, is_distributional)
    stats_ = _pred_stats(prediction, truth, split, cells)
    return _crossfit_values(truth, [stats_], _crossfit_metrics(is_distributional), cells)[0]


def _crossfit_metrics(is_distributional: bool) -> tuple[str, ...]:
    return tuple(m for m in metric_names(is_distributional) if _regime(m) == REGIME_DISTRIBUTIONAL)


def _fixed_seed_metrics(is_distributional: bool) -> tuple[str, ...]:
    return tuple(m for m in metric_names(is_distributional) if _regime(m) == REGIME_FIXED_SEED)


def _crossfit_over(
    problem: _Problem,
    predictions: Sequence[_Prediction],
    metrics: Sequence[str],
    need_dist: bool,
    items: Sequence[CrossFitSplit] | Sequence[BootstrapReplicate],
) -> list[FloatArray]:
    """Evaluate each prediction on each split/replicate; returns per prediction ``[n_items, n_metrics]``."""
    out = [np.full((len(items), len(metrics)), np.nan) for _ in predictions]
    for i, item in enumerate(items):
        if isinstance(item, BootstrapReplicate):
            split, cells = item.split, _Cells.for_replicate(item)
        else:
            split, cells = item, _Cells()
        truth = _truth(problem, split, cells, need_dist)
        pred_stats = [_pred_stats(prediction, truth, split, cells) for prediction in predictions]
        for j, values in enumerate(_crossfit_values(truth, pred_stats, metrics, cells)):
            out[j][i] = [values[m] for m in metrics]
    return out


# ----------------------------------------------------------------------------------------------
# Fixed-seed regime
# ----------------------------------------------------------------------------------------------


def _tie_bounds(sorted_values: FloatArray) -> tuple[FloatArray, FloatArray] | None:
    """For rows sorted along the last axis: first and last position of each element's tie group."""
    n = sorted_values.shape[-1]
    if n < 2:
        return None
    new_group = np.empty(sorted_values.shape, dtype=bool)
    new_group[..., 0] = True
    np.not_equal(sorted_values[..., 1:], sorted_values[..., :-1], out=new_group[..., 1:])
    if new_group.all():
        return None
    pos = np.arange(n, dtype=np.float64)
    start = np.maximum.accumulate(np.where(new_group, pos, 0.0), axis=-1)
    group_end = np.empty_like(new_group)
    group_end[..., -1] = True
    group_end[..., :-1] = new_group[..., 1:]
    end = np.flip(np.minimum.accumulate(np.flip(np.where(group_end, pos, n - 1.0), -1), axis=-1), -1)
    return start, end


def _average_ranks(x: FloatArray) -> FloatArray:
    """Average ranks (1-based, ties share their mean rank) along the last axis; nan rows stay nan."""
    n = x.shape[-1]
    order = np.argsort(x, axis=-1)
    ties = _tie_bounds(np.sort(x, axis=-1))
    ranks_sorted = np.arange(1.0, n + 1.0) if ties is None else (ties[0] + ties[1]) / 2.0 + 1.0
    ranks = np.empty(x.shape, dtype=np.float64)
    np.put_along_axis(ranks, order, np.broadcast_to(ranks_sorted, x.shape), axis=-1)
    has_nan = np.isnan(x).any(axis=-1)
    if has_nan.any():
        ranks[has_nan] = np.nan
    return ranks


class _WeightedRanker:
    """Mid-ranks of fixed rows ``[R, N]`` under integer multiplicity weights, without re-sorting.

    The mid-rank of element ``i`` in the multiset where element ``j`` appears ``w_j`` times is
    ``C(group(i)) + (W(group(i)) + 1) / 2``, with ``C`` the total weight of strictly smaller values and
    ``W`` the weight of ``i``'s tie group; rows are sorted once, so a replicate costs a cumulative sum.
    """

    def __init__(self, rows: FloatArray) -> None:
        order = np.argsort(rows, axis=1, kind="stable")
        self.ties = _tie_bounds(np.take_along_axis(rows, order, axis=1))
        index_type = np.int32 if rows.shape[1] < 2**31 else np.intp
        self.inverse = np.argsort(order, axis=1).astype(index_type)
        self.order = order.astype(index_type)  # [R, N]

    def centred_midranks(self, rows: IntArray, weights: NDArray[np.int64]) -> tuple[NDArray[Any], FloatArray]:
        """Weights and centred mid-ranks ``r − (W + 1)/2``, both ``[R', N]`` in each row's sorted order.

        Args:
            rows: Row indices to compute.
            weights: ``[N]`` integer multiplicities of the elements (original order).

        Returns:
            ``(weights_sorted, centred_ranks)``; the weighted mean of the mid-ranks is ``(W + 1)/2``.
        """
        weights_sorted = weights.take(self.order[rows])
        cum = np.cumsum(weights_sorted, axis=1)  # integer: exact and faster than float
        half_total = 0.5 * float(weights.sum())
        if self.ties is None:
            return weights_sorted, cum - (0.5 * weights_sorted + half_total)
        start = self.ties[0][rows].astype(np.intp)
        end = self.ties[1][rows].astype(np.intp)
        cum0 = np.concatenate([np.zeros((cum.shape[0], 1), dtype=cum.dtype), cum], axis=1)
        before = np.take_along_axis(cum0, start, axis=1)
        through = np.take_along_axis(cum0, end + 1, axis=1)
        return weights_sorted, 0.5 * (before + through) - half_total


class _FixedSeed:
    """Fixed-seed correlations per query between ``x = delta`` and ``y = removed − full``.

    Rows are queries, columns the ``N = S·K`` pairs ``(s, k)`` flattened seed-major. A bootstrap
    replicate that resamples seeds and targets is the same data with integer multiplicities
    ``w[s, k] = c_s · c_k``, so weighted Pearson of the values (of the weighted mid-ranks) equals the
    Pearson (Spearman) correlation on the resampled data, without materialising or re-sorting it.
    """

    def __init__(
        self, full: FloatArray, removed: FloatArray, delta: FloatArray, metrics: Sequence[str]
    ) -> None:
        n_seeds, n_targets, n_queries = removed.shape
        self.metrics = tuple(metrics)
        self.shape = (n_seeds, n_targets)
        self.x = np.ascontiguousarray(np.transpose(delta, (2, 0, 1)).reshape(n_queries, -1))
        effect = removed - full[:, None, :]
        self.y = np.ascontiguousarray(np.transpose(effect, (2, 0, 1)).reshape(n_queries, -1))

    @cached_property
    def _pearson_prep(self) -> tuple[FloatArray, FloatArray, FloatArray]:
        """``[5, Q, N]`` centred moments (x, y, x², y², xy) and the rows' max |x|, max |y|."""
        xc = self.x - self.x.mean(axis=1, keepdims=True)
        yc = self.y - self.y.mean(axis=1, keepdims=True)
        moments = np.stack([xc, yc, xc * xc, yc * yc, xc * yc])
        return moments, np.max(np.abs(xc), axis=1), np.max(np.abs(yc), axis=1)

    @cached_property
    def _rankers(self) -> tuple[_WeightedRanker, _WeightedRanker, IntArray]:
        """Rankers of x and y, and the y-sorted position of the element at each x-sorted position."""
        rank_x, rank_y = _WeightedRanker(self.x), _WeightedRanker(self.y)
        return rank_x, rank_y, np.take_along_axis(rank_y.inverse, rank_x.order, axis=1)

    def prepare(self) -> None:
        """Build the cached per-query sorts / moments the replicates need (once, up front)."""
        if "loo_seed_pearson" in self.metrics:
            _ = self._pearson_prep
        if "loo_seed_spearman" in self.metrics:
            _ = self._rankers

    def point(self) -> dict[str, float]:
        """Scores on all seeds, targets and queries."""
        out: dict[str, float] = {}
        for metric in self.metrics:
            corr = rowwise_spearman if metric == "loo_seed_spearman" else rowwise_pearson
            out[metric] = _nanmean(corr(self.x, self.y))
        return out

    def per_query(self, seeds: IntArray, targets: IntArray, rows: IntArray) -> dict[str, FloatArray]:
        """Per-query correlations ``[len(rows)]`` on the data resampled by ``seeds`` and ``targets``."""
        n_seeds, n_targets = self.shape
        c_s = np.bincount(seeds, minlength=n_seeds).astype(np.int64)
        c_k = np.bincount(targets, minlength=n_targets).astype(np.int64)
        weights_int = np.outer(c_s, c_k).ravel()  # [N] multiplicity of each (s, k) pair
        weights = weights_int.astype(np.float64)
        total = float(weights.sum())
        out: dict[str, FloatArray] = {}
        with np.errstate(invalid="ignore", divide="ignore"):
            if "loo_seed_pearson" in self.metrics:
                moments, max_abs_x, max_abs_y = self._pearson_prep
                sx, sy, sxx, syy, sxy = (moments @ weights)[:, rows]
                mx, my = sx / total, sy / total
                vx, vy, cov = sxx - total * mx * mx, syy - total * my * my, sxy - total * mx * my
                const = _is_constant(vx, max_abs_x[rows], total) | _is_constant(vy, max_abs_y[rows], total)
                out["loo_seed_pearson"] = np.where(const, np.nan, np.clip(cov / np.sqrt(vx * vy), -1.0, 1.0))
            if "loo_seed_spearman" in self.metrics:
                rank_x, rank_y, y_pos_in_x = self._rankers
                w_x, rx = rank_x.centred_midranks(rows, weights_int)  # x-sorted order
                w_y, ry_sorted = rank_y.centred_midranks(rows, weights_int)  # y-sorted order
                flat = y_pos_in_x[rows] + (np.arange(rows.size) * weights.size)[:, None]
                ry = ry_sorted.ravel().take(flat)  # y mid-ranks in x-sorted order (paired with rx)
                wrx = w_x * rx
                cov = np.einsum("qi,qi->q", wrx, ry)
                # without ties within a row, Σ w (r − r̄)² = (W³ − W − Σ_i (w_i³ − w_i)) / 12 for every row
                no_ties = np.full(rows.size, (total**3 - total - float(np.sum(weights**3 - weights))) / 12.0)
                vx = no_ties if rank_x.ties is None else np.einsum("qi,qi->q", wrx, rx)
                if rank_y.ties is None:
                    vy = no_ties
                else:
                    ry_sorted *= np.sqrt(w_y)
                    vy = np.einsum("qi,qi->q", ry_sorted, ry_sorted)
                const = (vx <= 0.25) | (vy <= 0.25)  # non-constant mid-ranks have Σ w (r − r̄)² ≥ 1/2
                out["loo_seed_spearman"] = np.where(const, np.nan, np.clip(cov / np.sqrt(vx * vy), -1.0, 1.0))
        return out

    def replicate(self, replicate: BootstrapReplicate) -> dict[str, float]:
        """Scores of one bootstrap replicate (seeds, targets and queries resampled)."""
        rows, query_pos = np.unique(replicate.queries, return_inverse=True)
        per_query = self.per_query(replicate.seeds, replicate.targets, rows)
        return {m: _nanmean(v[query_pos]) for m, v in per_query.items()}


# ----------------------------------------------------------------------------------------------
# Scoring entry points
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Evaluation:
    point: dict[str, float]
    ceiling: dict[str, float]
    reps: dict[str, FloatArray]
    ceiling_reps: dict[str, FloatArray]


def _default_workers() -> int:
    return max(1, min(4, os.cpu_count() or 1))


def _chunks(items: Sequence[Any], n_chunks: int) -> list[Sequence[Any]]:
    size = max(1, math.ceil(len(items) / max(1, n_chunks)))
    return [items[i : i + size] for i in range(0, len(items), size)]


def _evaluate(
    full: FloatArray,
    removed: FloatArray,
    delta: FloatArray,
    *,
    is_distributional: bool,
    plan: ResamplingPlan,
    n_workers: int = 1,
) -> _Evaluation:
    """Point estimates, ceilings and replicates; replicate chunks may run in ``n_workers`` threads.

    Every replicate is computed independently from its own indices, so the result does not depend
    on ``n_workers`` (numpy releases the GIL in the heavy sorts, gathers and reductions).
    """
    cf_metrics = _crossfit_metrics(is_distributional)
    fs_metrics = _fixed_seed_metrics(is_distributional)
    problem = _make_problem(full, removed)
    predictions = [
        _make_prediction(full, delta, is_distributional),
        _make_prediction(full, removed - full[:, None, :], is_distributional),  # the oracle
    ]
    n_boot = len(plan.replicates)
    fixed = _FixedSeed(full, removed, delta, fs_metrics) if fs_metrics else None

    def crossfit(items: Sequence[Any]) -> list[FloatArray]:
        return _crossfit_over(problem, predictions, cf_metrics, is_distributional, items)

    def fixed_seed(replicates: Sequence[BootstrapReplicate]) -> FloatArray:
        assert fixed is not None
        values = [fixed.replicate(r) for r in replicates]
        return np.array([[v[m] for m in fs_metrics] for v in values], dtype=np.float64).reshape(
            -1, len(fs_metrics)
        )

    boot_chunks = _chunks(plan.replicates, n_workers)
    if n_workers > 1 and n_boot > 1:
        if fixed is not None:
            fixed.prepare()  # build the cached sorts once, before threads share them
        with ThreadPoolExecutor(max_workers=n_workers) as pool:
            split_future = pool.submit(crossfit, plan.splits)
            cf_futures = [pool.submit(crossfit, chunk) for chunk in boot_chunks]
            fs_futures = (
                [pool.submit(fixed_seed, chunk) for chunk in boot_chunks] if fixed is not None else []
            )
            per_split = split_future.result()
            cf_parts = [f.result() for f in cf_futures]
            fs_parts = [f.result() for f in fs_futures]
    else:
        per_split = crossfit(plan.splits)
        cf_parts = [crossfit(chunk) for chunk in boot_chunks]
        fs_parts = [fixed_seed(chunk) for chunk in boot_chunks] if fixed is not None else []

    point = {metric: _nanmean(per_split[0][:, i]) for i, metric in enumerate(cf_metrics)}
    ceiling = {metric: _nanmean(per_split[1][:, i]) for i, metric in enumerate(cf_metrics)}
    empty = np.full((0, len(cf_metrics)), np.nan)
    boot = [np.concatenate([part[j] for part in cf_parts]) if cf_parts else empty for j in range(2)]
    reps = {metric: boot[0][:, i] for i, metric in enumerate(cf_metrics)}
    ceiling_reps = {metric: boot[1][:, i] for i, metric in enumerate(cf_metrics)}
    if fixed is not None:
        point.update(fixed.point())
        ceiling.update(dict.fromkeys(fs_metrics, 1.0))
        fs_reps = np.concatenate(fs_parts) if fs_parts else np.full((0, len(fs_metrics)), np.nan)
        for i, metric in enumerate(fs_metrics):
            reps[metric] = fs_reps[:, i]
            ceiling_reps[metric] = np.ones(n_boot)
    return _Evaluation(point=point, ceiling=ceiling, reps=reps, ceiling_reps=ceiling_reps)


def _centre_replicates(replicates: FloatArray, value: float, metric: str) -> FloatArray:
    """Shift replicates so that their mean is the point estimate (correlations clipped to [−1, 1])."""
    finite = np.isfinite(replicates)
    if not finite.any() or not math.isfinite(value):
        return replicates.copy()
    shifted = replicates + (value - float(replicates[finite].mean()))
    return shifted if metric == "distribution_skill" else np.clip(shifted, -1.0, 1.0)


def score_method(
    full: ArrayLike,
    removed: ArrayLike,
    delta: ArrayLike,
    *,
    is_distributional: bool = True,
    n_splits: int = 20,
    n_boot: int = 200,
    seed: int = 0,
    level: float = 0.95,
    ci_method: str = "centered",
    n_workers: int | None = None,
) -> list[ScoreResult]:
    """Score one method on one measurement: point estimates, noise ceilings and bootstrap CIs.

    See the module docstring for the formulas. Cross-fitted scores (see :func:`score_split`) are
    averaged (nan-mean) over ``n_splits`` random equal A/B splits of the seeds; fixed-seed scores use
    all seeds: per query ``q``, ``corr_{(s,k)}(delta[s,k,q], removed[s,k,q] − full[s,q])``, nan-mean over
    queries. The noise ceiling is the same score, same splits and replicates, of the oracle
    ``removed − full[:, None, :]``; for the fixed-seed scores it is exactly 1.0 by construction
    (the oracle's prediction equals the quantity it is correlated with), as are its CI ends.

    CIs are percentile intervals of the bootstrap replicates (:func:`make_resampling_plan`). Seed
    resampling within a half re-adds seed noise on top of the sample's own, so replicates of
    noise-limited scores sit systematically below the point estimate (e.g. 0.98 vs 0.99) and a raw
    percentile interval can exclude it. With ``ci_method="centered"`` (default) each metric's
    replicates are first shifted by ``value − mean(replicates)`` (correlations then clipped to
    ``[−1, 1]``): the interval keeps the bootstrap spread but is centred on the point estimate, and
    the stored ``replicates`` are the shifted ones, so :func:`paired_difference_ci` is centred on the
    difference of point estimates. ``ci_method="percentile"`` uses the raw replicates. Where the
    point estimate is nan the raw replicates are used.

    Args:
        full: ``[S, Q]`` full-data measurements (S ≥ 4).
        removed: ``[S, K, Q]`` removal measurements (K ≥ 2).
        delta: ``[S, K, Q]`` the method's predicted ``removed − full`` per seed.
        is_distributional: If False (ranking-only method) only ``loo_mean_spearman`` and
            ``loo_seed_spearman`` are computed; the other scores are omitted.
        n_splits: Number of cross-fitting splits averaged for the point estimates.
        n_boot: Number of bootstrap replicates (0: CIs are nan and ``replicates`` is empty).
        seed: Seed of :func:`make_resampling_plan`; use the same value for methods to be compared.
        level: Confidence level of the percentile intervals.
        ci_method: ``"centered"`` or ``"percentile"`` (see above).
        n_workers: Threads for the bootstrap (default ``min(4, cpu_count)``); results do not
            depend on it.

    Returns:
        One :class:`ScoreResult` per metric, in the order of :func:`metric_names`.

    Raises:
        ValueError: On inconsistent shapes, S < 4, K < 2, non-finite inputs or bad options.
    """
    full_a, removed_a, delta_a = _validate(full, removed, delta, min_seeds=4)
    assert delta_a is not None
    if not 0.0 < level < 1.0:
        raise ValueError(f"level must be in (0, 1); got {level}")
    if ci_method not in CI_METHODS:
        raise ValueError(f"ci_method must be one of {CI_METHODS}; got {ci_method!r}")
    n_seeds, n_targets, n_queries = removed_a.shape
    plan = make_resampling_plan(n_seeds, n_targets, n_queries, n_splits=n_splits, n_boot=n_boot, seed=seed)
    workers = _default_workers() if n_workers is None else int(n_workers)
    if workers < 1:
        raise ValueError(f"n_workers must be ≥ 1; got {n_workers}")
    ev = _evaluate(
        full_a, removed_a, delta_a, is_distributional=is_distributional, plan=plan, n_workers=workers
    )
    results = []
    for metric in metric_names(is_distributional):
        value, ceiling = ev.point[metric], ev.ceiling[metric]
        reps, ceiling_reps = ev.reps[metric], ev.ceiling_reps[metric]
        if ci_method == "centered":
            reps = _centre_replicates(reps, value, metric)
            ceiling_reps = _centre_replicates(ceiling_reps, ceiling, metric)
        lo, hi = _percentile_ci(reps, level)
        c_lo, c_hi = _percentile_ci(ceiling_reps, level)
        results.append(
            ScoreResult(
                metric=metric,
                regime=_regime(metric),
                value=value,
                ci_low=lo,
                ci_high=hi,
                noise_ceiling=ceiling,
                ceiling_ci_low=c_lo,
                ceiling_ci_high=c_hi,
                replicates=reps,
            )
        )
    return results


def bootstrap_replicates(
    full: ArrayLike,
    removed: ArrayLike,
    delta: ArrayLike,
    *,
    is_distributional: bool = True,
    n_splits: int = 20,
    n_boot: int = 200,
    seed: int = 0,
    ci_method: str = "centered",
) -> dict[str, FloatArray]:
    """``{metric: [n_boot] replicates}`` exactly as in the results of :func:`score_method`.

    A convenience for paired comparisons: ``paired_difference_ci(reps_a[m], reps_b[m])`` for two
    methods scored with the same ``seed``, ``n_boot`` (and ``n_splits`` when centred).

    Args:
        full: ``[S, Q]``.
        removed: ``[S, K, Q]``.
        delta: ``[S, K, Q]``.
        is_distributional: As in :func:`score_method`.
        n_splits: As in :func:`score_method`.
        n_boot: Number of replicates.
        seed: Seed of the resampling plan.
        ci_method: As in :func:`score_method`.

    Returns:
        ``{metric: replicate values}``.
    """
    results = score_method(
        full,
        removed,
        delta,
        is_distributional=is_distributional,
        n_splits=n_splits,
        n_boot=n_boot,
        seed=seed,
        ci_method=ci_method,
    )
    return {r.metric: r.replicates for r in results}


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
    full_a, removed_a, delta_a = _validate(full, removed, delta, min_seeds=2)
    assert delta_a is not None
    n_seeds = full_a.shape[0]
    counts = _default_seed_counts(n_seeds) if seed_counts is None else [int(n) for n in seed_counts]
    bad = [n for n in counts if not 2 <= n <= n_seeds]
    if bad:
        raise ValueError(f"seed_counts must lie in [2, S={n_seeds}]; got {bad}")
    if n_subsets < 1 or n_splits < 1:
        raise ValueError(f"need n_subsets ≥ 1 and n_splits ≥ 1; got {n_subsets}, {n_splits}")
    metrics = metric_names(is_distributional)
    cf_metrics = _crossfit_metrics(is_distributional)
    fs_metrics = _fixed_seed_metrics(is_distributional)
    rng = np.random.default_rng(seed)
    oracle = removed_a - full_a[:, None, :]
    rows: list[dict[str, Any]] = []
    for n in counts:
        values: dict[str, list[float]] = {m: [] for m in metrics}
        ceilings: dict[str, list[float]] = {m: [] for m in metrics}
        fixed_full_set: dict[str, float] | None = None
        for _ in range(n_subsets):
            subset = (
                np.arange(n_seeds) if n == n_seeds else np.sort(rng.choice(n_seeds, size=n, replace=False))
            )
            sub_full, sub_removed = full_a[subset], removed_a[subset]
            problem = _make_problem(sub_full, sub_removed)
            predictions = [
                _make_prediction(sub_full, delta_a[subset], is_distributional),
                _make_prediction(sub_full, oracle[subset], is_distributional),
            ]
            splits = _draw_splits(n, n_splits, rng)
            method_vals, oracle_vals = _crossfit_over(
                problem, predictions, cf_metrics, is_distributional, splits
            )
            for i, metric in enumerate(cf_metrics):
                values[metric].append(_nanmean(method_vals[:, i]))
                ceilings[metric].append(_nanmean(oracle_vals[:, i]))
            if fs_metrics:
                if n == n_seeds and fixed_full_set is not None:
                    fixed_values = fixed_full_set
                else:
                    fixed_values = _FixedSeed(sub_full, sub_removed, delta_a[subset], fs_metrics).point()
                    if n == n_seeds:
                        fixed_full_set = fixed_values
                for metric in fs_metrics:
                    values[metric].append(fixed_values[metric])
                    ceilings[metric].append(1.0)
        for metric in metrics:
            value_mean, value_se = _mean_se(values[metric])
            ceiling_mean, ceiling_se = _mean_se(ceilings[metric])
            if _regime(metric) == REGIME_FIXED_SEED:
                ceiling_mean, ceiling_se = 1.0, 0.0
            rows.append(
                {
                    "metric": metric,
                    "regime": _regime(metric),
                    "n_seeds": n,
                    "n_subsets": int(np.isfinite(np.asarray(values[metric])).sum()),
                    "value_mean": value_mean,
                    "value_se": value_se,
                    "ceiling_mean": ceiling_mean,
                    "ceiling_se": ceiling_se,
                }
            )
    return rows
