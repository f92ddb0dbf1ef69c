"""Average (mid-)ranks along the last axis, plain and under integer multiplicity weights."""

from __future__ import annotations

from typing import Any

import numpy as np
from numpy.typing import NDArray

from benchmark.scores.metrics import FloatArray, IntArray


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
