"""Scoring entry points: point estimates, noise ceilings and bootstrap CIs of one method.

Combines the cross-fitted scores (:mod:`benchmark.scores.cross_fit`) and the fixed-seed scores
(:mod:`benchmark.scores.fixed_seed`) of the method and of the oracle ``removed − full[:, None, :]`` over
the splits and replicates of one :class:`~benchmark.scores.resampling.ResamplingPlan`.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import partial
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
    CI_METHODS,
    FloatArray,
    _crossfit_metrics,
    _fixed_seed_metrics,
    _regime,
    metric_names,
)
from benchmark.scores.resampling import (
    BootstrapReplicate,
    ResamplingPlan,
    _centre_replicates,
    _percentile_ci,
    make_resampling_plan,
)
from benchmark.scores.validation import _validate_scored
from benchmark.store.keys import content_key


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


def _run_jobs(jobs: Sequence[Callable[[], Any]], n_workers: int) -> list[Any]:
    """Results of ``jobs`` in order: in the calling thread, or in ``n_workers > 1`` threads."""
    if n_workers <= 1:
        return [job() for job in jobs]
    with ThreadPoolExecutor(max_workers=n_workers) as pool:
        futures = [pool.submit(job) for job in jobs]
        return [f.result() for f in futures]


def _evaluate(
    full: FloatArray,
    removed: FloatArray,
    delta: FloatArray,
    *,
    is_distributional: bool,
    plan: ResamplingPlan,
    n_workers: int = 1,
    oracle_key: str | None = None,
) -> _Evaluation:
    """Point estimates, ceilings and replicates; replicate chunks may run in ``n_workers`` threads.

    Every replicate is computed independently from its own indices, so the result does not depend
    on ``n_workers`` (numpy releases the GIL in the heavy sorts, gathers and reductions). The oracle's
    values are taken from / stored in :data:`ORACLE_MEMO` under ``oracle_key`` (None: always computed).
    """
    cf_metrics = _crossfit_metrics(is_distributional)
    fs_metrics = _fixed_seed_metrics(is_distributional)
    keys = [None if oracle_key is None else f"{oracle_key}:{part}" for part in ("split", "boot")]
    cached = [ORACLE_MEMO.get(key) for key in keys]
    with_oracle = any(c is None for c in cached)
    problem, predictions = _method_and_oracle(full, removed, delta, is_distributional, with_oracle)
    n_boot = len(plan.replicates)
    fixed = _FixedSeed(full, removed, delta, fs_metrics) if fs_metrics else None

    def crossfit(items: Sequence[Any]) -> list[FloatArray]:
        return _crossfit_over(problem, predictions, cf_metrics, is_distributional, items)

    def fixed_seed(replicates: Sequence[BootstrapReplicate]) -> FloatArray:
        assert fixed is not None
        values = [fixed.replicate(r) for r in replicates]
        return np.array([[v[m] for m in fs_metrics] for v in values], dtype=np.float64).reshape(-1, len(fs_metrics))

    boot_chunks = _chunks(plan.replicates, n_workers)
    threaded = n_workers > 1 and n_boot > 1
    if threaded and fixed is not None:
        fixed.prepare()  # build the cached sorts once, before threads share them
    jobs = [partial(crossfit, plan.splits), *(partial(crossfit, chunk) for chunk in boot_chunks)]
    if fixed is not None:
        jobs += [partial(fixed_seed, chunk) for chunk in boot_chunks]
    per_split, *parts = _run_jobs(jobs, n_workers if threaded else 1)
    cf_parts, fs_parts = parts[: len(boot_chunks)], parts[len(boot_chunks) :]

    empty = np.full((0, len(cf_metrics)), np.nan)
    boot = [np.concatenate([part[j] for part in cf_parts]) if cf_parts else empty for j in range(len(predictions))]
    if with_oracle:
        ORACLE_MEMO.put(keys[0], per_split[1].copy())
        ORACLE_MEMO.put(keys[1], boot[1].copy())
    else:
        per_split, boot = [per_split[0], cached[0]], [boot[0], cached[1]]
    point, ceiling = _column_means(per_split[0], cf_metrics), _column_means(per_split[1], cf_metrics)
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


def _interval(
    replicates: FloatArray, value: float, metric: str, level: float, ci_method: str
) -> tuple[FloatArray, float, float]:
    """The replicates as reported (centred on ``value`` under ``"centered"``) and their percentile CI."""
    if ci_method == "centered":
        replicates = _centre_replicates(replicates, value, metric)
    lo, hi = _percentile_ci(replicates, level)
    return replicates, lo, hi


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

    See the :mod:`benchmark.scores` docstring for the formulas. Cross-fitted scores (see :func:`score_split`)
    are averaged (nan-mean) over ``n_splits`` random equal A/B splits of the seeds; fixed-seed scores use
    all seeds: per query ``q``, ``corr_{(s,k)}(delta[s,k,q], removed[s,k,q] − full[s,q])``, nan-mean over
    queries. The noise ceiling is the same score, same splits and replicates, of the oracle
    ``removed − full[:, None, :]``; for the fixed-seed scores it is exactly 1.0 by construction
    (the oracle's prediction equals the quantity it is correlated with), as are its CI ends.

    CIs are percentile intervals of the bootstrap replicates (:func:`make_resampling_plan`). Seed
    resampling within a half re-adds seed noise on top of the sample's own, so replicates of
    noise-limited scores sit systematically below the point estimate (e.g. 0.98 vs 0.99) and a raw
    percentile interval can exclude it. With ``ci_method="centered"`` (default) each metric's
    replicates are first shifted by ``value − mean(replicates)`` (correlations then clipped to
    ``[−1, 1]``; ``value − median(replicates)`` for the heavy-tailed ``distribution_skill``): the
    interval keeps the bootstrap spread but is centred on the point estimate, and the stored
    ``replicates`` are the shifted ones, so :func:`paired_difference_ci` is centred on the difference of
    point estimates (for ``distribution_skill``, of the replicates' means, which may differ).
    ``ci_method="percentile"`` uses the raw replicates. Where the
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
    full_a, removed_a, delta_a = _validate_scored(full, removed, delta, min_seeds=4)
    if not 0.0 < level < 1.0:
        raise ValueError(f"level must be in (0, 1); got {level}")
    if ci_method not in CI_METHODS:
        raise ValueError(f"ci_method must be one of {CI_METHODS}; got {ci_method!r}")
    n_seeds, n_targets, n_queries = removed_a.shape
    plan = make_resampling_plan(n_seeds, n_targets, n_queries, n_splits=n_splits, n_boot=n_boot, seed=seed)
    workers = _default_workers() if n_workers is None else int(n_workers)
    if workers < 1:
        raise ValueError(f"n_workers must be ≥ 1; got {n_workers}")
    oracle_key = content_key("score_method", truth_digest(full_a, removed_a), is_distributional, n_splits, n_boot, seed)
    ev = _evaluate(
        full_a,
        removed_a,
        delta_a,
        is_distributional=is_distributional,
        plan=plan,
        n_workers=workers,
        oracle_key=oracle_key,
    )
    results = []
    for metric in metric_names(is_distributional):
        value, ceiling = ev.point[metric], ev.ceiling[metric]
        reps, lo, hi = _interval(ev.reps[metric], value, metric, level, ci_method)
        _, c_lo, c_hi = _interval(ev.ceiling_reps[metric], ceiling, metric, level, ci_method)
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
