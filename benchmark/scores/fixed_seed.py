"""Fixed-seed scores: per-query correlation of ``delta[s, k, q]`` with the realised ``removed − full``.

All seeds are used (no split); correlations run over the ``(s, k)`` pairs of each query and are
nan-averaged over queries. Bootstrap replicates are scored by integer multiplicity weights, so the
per-query sorts are done once.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import cached_property

import numpy as np
from numpy.typing import NDArray

from benchmark.scores.metrics import FloatArray, IntArray
from benchmark.scores.ranks import _WeightedRanker
from benchmark.scores.resampling import BootstrapReplicate
from benchmark.scores.stats import _clipped_corr, _is_constant, _nanmean, rowwise_pearson, rowwise_spearman


class _FixedSeed:
    """Fixed-seed correlations per query between ``x = delta`` and ``y = removed − full``.

    Rows are queries, columns the ``N = S·K`` pairs ``(s, k)`` flattened seed-major. A bootstrap
    replicate that resamples seeds and targets is the same data with integer multiplicities
    ``w[s, k] = c_s · c_k``, so weighted Pearson of the values (of the weighted mid-ranks) equals the
    Pearson (Spearman) correlation on the resampled data, without materialising or re-sorting it.
    """

    def __init__(self, full: FloatArray, removed: FloatArray, delta: FloatArray, metrics: Sequence[str]) -> None:
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
        out: dict[str, FloatArray] = {}
        if "loo_seed_pearson" in self.metrics:
            out["loo_seed_pearson"] = self._weighted_pearson(weights, rows)
        if "loo_seed_spearman" in self.metrics:
            out["loo_seed_spearman"] = self._weighted_spearman(weights_int, weights, rows)
        return out

    def _weighted_pearson(self, weights: FloatArray, rows: IntArray) -> FloatArray:
        """Pearson of x and y per query in ``rows`` with multiplicities ``weights [N]``, from the moments."""
        total = float(weights.sum())
        with np.errstate(invalid="ignore", divide="ignore"):
            moments, max_abs_x, max_abs_y = self._pearson_prep
            sx, sy, sxx, syy, sxy = (moments @ weights)[:, rows]
            mx, my = sx / total, sy / total
            vx, vy, cov = sxx - total * mx * mx, syy - total * my * my, sxy - total * mx * my
            const = _is_constant(vx, max_abs_x[rows], total) | _is_constant(vy, max_abs_y[rows], total)
            return _clipped_corr(cov, vx, vy, const)

    def _weighted_spearman(self, weights_int: NDArray[np.int64], weights: FloatArray, rows: IntArray) -> FloatArray:
        """Spearman of x and y per query in ``rows``: weighted Pearson of the weighted mid-ranks.

        ``weights_int`` and ``weights`` are the same multiplicities ``[N]``, as integers and as floats.
        """
        total = float(weights.sum())
        with np.errstate(invalid="ignore", divide="ignore"):
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
            return _clipped_corr(cov, vx, vy, const)

    def replicate(self, replicate: BootstrapReplicate) -> dict[str, float]:
        """Scores of one bootstrap replicate (seeds, targets and queries resampled)."""
        rows, query_pos = np.unique(replicate.queries, return_inverse=True)
        per_query = self.per_query(replicate.seeds, replicate.targets, rows)
        return {m: _nanmean(v[query_pos]) for m, v in per_query.items()}
