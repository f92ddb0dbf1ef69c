"""Cross-fitted (distributional) scores: the truth from seed half A, the method from seed half B.

Per ``(k, q)`` the half-A truth (mean effect, variance change, debiased W2²) is compared with the
method's half-B prediction; correlations run across targets ``k`` per query and are nan-averaged over
queries (see :func:`score_split` for the formulas). Arrays are held seeds-last (``[Q, S]``,
``[K, Q, S]``) so that gathers and sorts run along the last axis.
"""

from __future__ import annotations

import hashlib
import math
import threading
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from numpy.typing import ArrayLike

from benchmark.scores.metrics import FloatArray, IntArray, _crossfit_metrics
from benchmark.scores.ranks import _average_ranks
from benchmark.scores.resampling import BootstrapReplicate, CrossFitSplit
from benchmark.scores.stats import (
    _nanmean,
    _row_nanmean,
    _snap,
    _sorted_w2,
    _summarise,
    _Summary,
    _summary_w2,
    _var_change,
    rowwise_pearson,
)
from benchmark.scores.validation import _validate_scored


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


def _method_and_oracle(
    full: FloatArray, removed: FloatArray, delta: FloatArray, need_dist: bool, with_oracle: bool = True
) -> tuple[_Problem, list[_Prediction]]:
    """The truth, and the predictions ``[method, oracle]`` with the oracle ``removed − full[:, None, :]``
    (``[method]`` alone when ``with_oracle`` is False: its values are memoised, see :class:`OracleMemo`)."""
    predictions = [_make_prediction(full, delta, need_dist)]
    if with_oracle:
        predictions.append(_make_prediction(full, removed - full[:, None, :], need_dist))
    return _make_problem(full, removed), predictions


def truth_digest(full: FloatArray, removed: FloatArray) -> str:
    """A content hash of a ground truth's arrays (shapes, dtype and bytes)."""
    h = hashlib.sha1()
    for arr in (full, removed):
        arr = np.ascontiguousarray(arr)
        h.update(f"{arr.shape}{arr.dtype}".encode())
        h.update(arr.view(np.uint8).ravel())
    return h.hexdigest()


class OracleMemo:
    """The noise-ceiling oracle's cross-fitted values, memoised across methods.

    The oracle ``removed − full`` and hence every value it scores depend only on the ground truth, the
    seed subset, the splits / bootstrap replicates and ``need_dist``, never on the method, and every
    statistic is computed per prediction (ranks and correlations row by row), so the harness, which
    scores ~20 methods on one ground truth, computes the oracle once instead of once per method; the
    method's values are bit-identical either way (``tests/test_scores.py``). A bounded LRU of small
    arrays ([n_items, n_metrics]), thread-safe.
    """

    def __init__(self, max_entries: int = 8192) -> None:
        self.max_entries = max_entries
        self._values: OrderedDict[str, FloatArray] = OrderedDict()
        self._lock = threading.Lock()
        self.hits = 0

    def get(self, key: str | None) -> FloatArray | None:
        if key is None:
            return None
        with self._lock:
            value = self._values.get(key)
            if value is not None:
                self._values.move_to_end(key)
                self.hits += 1
            return value

    def put(self, key: str | None, value: FloatArray) -> None:
        if key is None:
            return
        with self._lock:
            self._values[key] = value
            self._values.move_to_end(key)
            while len(self._values) > self.max_entries:
                self._values.popitem(last=False)

    def clear(self) -> None:
        with self._lock:
            self._values.clear()
            self.hits = 0


ORACLE_MEMO = OracleMemo()


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
        w2 = _summary_w2(removed_a, full_a)
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
        w2 = _summary_w2(pred_b, full_b)
        skill_terms = _sorted_w2(pred_b.sorted, truth.removed_a_sorted) - truth.noise_floor
    return _PredStats(mean=mean, var=var, w2=w2, skill_terms=skill_terms)


#: Correlation metrics of the cross-fitted regime: metric -> (per-cell statistic, rank-based?).
_CORRELATION_METRICS: dict[str, tuple[str, bool]] = {
    "loo_mean_spearman": ("mean", True),
    "loo_mean_pearson": ("mean", False),
    "var_influence_spearman": ("var", True),
    "w2_influence_spearman": ("w2", True),
}


def _correlation_means(
    truth: _Truth, preds: Sequence[_PredStats], corr_metrics: Sequence[str], cells: _Cells
) -> FloatArray:
    """``[n_preds, n_metrics]`` correlations across targets per query, nan-averaged over queries.

    Rows are ``[Q, K]`` after :meth:`_Cells.expand`; all rankings and correlations run in one batch.
    """

    def cell_rows(source: _Truth | _PredStats, stat: str) -> FloatArray:
        values = getattr(source, stat)
        assert values is not None, stat
        return cells.expand(values).T  # [Q, K]

    stats_used = sorted({_CORRELATION_METRICS[m][0] for m in corr_metrics})
    ranked_stats = sorted({_CORRELATION_METRICS[m][0] for m in corr_metrics if _CORRELATION_METRICS[m][1]})
    truth_raw = {stat: cell_rows(truth, stat) for stat in stats_used}
    pred_raw = [{stat: cell_rows(pred, stat) for stat in stats_used} for pred in preds]
    truth_rank: dict[str, FloatArray] = {}
    pred_rank: list[dict[str, FloatArray]] = [{} for _ in preds]
    if ranked_stats:
        stacked = [truth_raw[s] for s in ranked_stats] + [raw[s] for raw in pred_raw for s in ranked_stats]
        ranks = iter(_average_ranks(np.stack(stacked)))
        truth_rank = {s: next(ranks) for s in ranked_stats}
        pred_rank = [{s: next(ranks) for s in ranked_stats} for _ in preds]
    xs, ys = [], []
    for j in range(len(preds)):
        for metric in corr_metrics:
            stat, rank = _CORRELATION_METRICS[metric]
            xs.append(pred_rank[j][stat] if rank else pred_raw[j][stat])
            ys.append(truth_rank[stat] if rank else truth_raw[stat])
    return _row_nanmean(rowwise_pearson(np.stack(xs), np.stack(ys))).reshape(len(preds), len(corr_metrics))


def _distribution_skills(truth: _Truth, preds: Sequence[_PredStats], cells: _Cells) -> list[float]:
    """``1 − Σ skill_terms / Σ base_terms`` per prediction (nan where the denominator is 0 or not finite)."""
    assert truth.base_terms is not None
    den_sum = float(cells.expand(truth.base_terms).sum())
    skills = []
    for pred in preds:
        assert pred.skill_terms is not None
        num_sum = float(cells.expand(pred.skill_terms).sum())
        ok = den_sum != 0.0 and math.isfinite(den_sum)
        skills.append(1.0 - num_sum / den_sum if ok else math.nan)
    return skills


def _crossfit_values(
    truth: _Truth, preds: Sequence[_PredStats], metrics: Sequence[str], cells: _Cells
) -> list[dict[str, float]]:
    """Scores of each prediction against one split's truth (one batched rank/correlation pass)."""
    out: list[dict[str, float]] = [{} for _ in preds]
    corr_metrics = [m for m in metrics if m in _CORRELATION_METRICS]
    if corr_metrics:
        means = _correlation_means(truth, preds, corr_metrics, cells)
        for j in range(len(preds)):
            out[j].update(zip(corr_metrics, means[j].tolist(), strict=True))
    if "distribution_skill" in metrics:
        for j, skill in enumerate(_distribution_skills(truth, preds, cells)):
            out[j]["distribution_skill"] = skill
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
    full_a, removed_a, delta_a = _validate_scored(full, removed, delta, min_seeds=2)
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


def _column_means(values: FloatArray, metrics: Sequence[str]) -> dict[str, float]:
    """``{metric: nan-mean of its column}`` of ``values [n_items, n_metrics]`` (point estimate over splits)."""
    return {metric: _nanmean(values[:, i]) for i, metric in enumerate(metrics)}
