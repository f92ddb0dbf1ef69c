"""Elementary vectorised statistics: (debiased) 1-D W2², row-wise Pearson / Spearman, signal-to-noise.

All functions work along one axis for every other index at once; rounding-noise differences are
snapped to exactly 0 (see :func:`_snap`) so that constant rows stay constant.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from numpy.typing import ArrayLike

from benchmark.scores.metrics import FloatArray
from benchmark.scores.ranks import _average_ranks
from benchmark.scores.validation import _validate

_EPS = float(np.finfo(np.float64).eps)
_SNAP_ULPS = 64.0  # |a − b| ≤ 64·eps·(|a| + |b|) is treated as an exact zero difference
_CONST_ULPS = 16.0  # a row whose spread is below 16·eps·max|x| counts as constant


# ----------------------------------------------------------------------------------------------
# Wasserstein-2 between 1-D samples
# ----------------------------------------------------------------------------------------------


def _sorted_w2(xs: FloatArray, ys: FloatArray) -> FloatArray:
    """``mean((xs − ys)²)`` over the last axis of two already sorted (broadcastable) arrays."""
    n = xs.shape[-1]
    if n == 0:
        return np.full(np.broadcast_shapes(xs.shape[:-1], ys.shape[:-1]), np.nan)
    diff = xs - ys
    return np.einsum("...i,...i->...", diff, diff) / n


def _samples_last(x: ArrayLike, y: ArrayLike, axis: int, caller: str) -> tuple[FloatArray, FloatArray]:
    """``x`` and ``y`` as float64 with the sample ``axis`` moved last; raises if the sample sizes differ."""
    xa = np.moveaxis(np.asarray(x, dtype=np.float64), axis, -1)
    ya = np.moveaxis(np.asarray(y, dtype=np.float64), axis, -1)
    if xa.shape[-1] != ya.shape[-1]:
        raise ValueError(
            f"{caller} needs equal sample sizes along axis {axis}; got x {np.shape(x)} and y {np.shape(y)}"
        )
    return xa, ya


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
    xa, ya = _samples_last(x, y, axis, "w2_squared")
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
    xa, ya = _samples_last(x, y, axis, "debiased_w2_squared")
    return _summary_w2(_summarise(xa.copy()), _summarise(ya.copy()))


def _debias(raw: FloatArray, half_x: FloatArray, half_y: FloatArray) -> FloatArray:
    bias = (half_x + half_y) / 4.0
    return _snap(raw - bias, np.abs(raw) + np.abs(bias))


def _snap(diff: FloatArray, scale: FloatArray) -> FloatArray:
    """Set differences that are pure rounding noise (``|d| ≤ 64·eps·scale``) to exactly 0."""
    with np.errstate(invalid="ignore"):
        return np.where(np.abs(diff) <= _SNAP_ULPS * _EPS * scale, 0.0, diff)


# ----------------------------------------------------------------------------------------------
# Per-row sample summaries (variance, sorted sample, half-vs-half W2²)
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


def _summarise(values: FloatArray) -> _Summary:
    """Summarise ``values [..., n]`` (an owned array; it is sorted in place)."""
    n = values.shape[-1]
    half = n // 2
    if half >= 1:
        half_w2 = _sorted_w2(np.sort(values[..., :half], axis=-1), np.sort(values[..., half : 2 * half], axis=-1))
    else:
        half_w2 = np.full(values.shape[:-1], np.nan)
    values.sort(axis=-1)
    var = values.var(axis=-1, ddof=1) if n >= 2 else np.full(values.shape[:-1], np.nan)
    return _Summary(var=var, sorted=values, half_w2=half_w2)


def _summary_w2(x: _Summary, y: _Summary) -> FloatArray:
    """Debiased ``W̃2²`` of two summarised samples (see :func:`debiased_w2_squared`)."""
    return _debias(_sorted_w2(x.sorted, y.sorted), x.half_w2, y.half_w2)


def _var_change(after: _Summary, before: _Summary) -> FloatArray:
    """``var(after) − var(before)``, with differences at rounding-noise level set to exactly 0."""
    return _snap(after.var - before.var, after.var_scale + before.var_scale)


# ----------------------------------------------------------------------------------------------
# Row-wise correlations
# ----------------------------------------------------------------------------------------------


def _rows_last(x: ArrayLike, y: ArrayLike, axis: int) -> tuple[FloatArray, FloatArray]:
    """``x`` and ``y`` as float64, broadcast against each other, with ``axis`` moved last."""
    xa, ya = np.broadcast_arrays(np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64))
    return np.moveaxis(xa, axis, -1), np.moveaxis(ya, axis, -1)


def _is_constant(sum_sq: FloatArray, max_abs: FloatArray | float, weight: FloatArray | float) -> FloatArray:
    """True where a centred sum of squares is indistinguishable from rounding noise."""
    with np.errstate(invalid="ignore", over="ignore"):
        return sum_sq <= weight * (_CONST_ULPS * _EPS * max_abs) ** 2


def _clipped_corr(cov: FloatArray, var_x: FloatArray, var_y: FloatArray, const: FloatArray) -> FloatArray:
    """``cov / sqrt(var_x · var_y)`` clipped to ``[−1, 1]``; nan where ``const``. Call under ``np.errstate``."""
    return np.where(const, np.nan, np.clip(cov / np.sqrt(var_x * var_y), -1.0, 1.0))


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
    xa, ya = _rows_last(x, y, axis)
    n = xa.shape[-1]
    if n < 2:
        return np.full(xa.shape[:-1], np.nan)
    with np.errstate(invalid="ignore", divide="ignore", over="ignore"):
        xc = xa - xa.mean(axis=-1, keepdims=True)
        yc = ya - ya.mean(axis=-1, keepdims=True)
        sxx = np.einsum("...i,...i->...", xc, xc)
        syy = np.einsum("...i,...i->...", yc, yc)
        sxy = np.einsum("...i,...i->...", xc, yc)
        const = _is_constant(sxx, np.max(np.abs(xa), axis=-1), n) | _is_constant(syy, np.max(np.abs(ya), axis=-1), n)
        return _clipped_corr(sxy, sxx, syy, const)


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
    xa, ya = _rows_last(x, y, axis)
    if xa.shape[-1] < 2:
        return np.full(xa.shape[:-1], np.nan)
    return rowwise_pearson(_average_ranks(xa), _average_ranks(ya), axis=-1)


# ----------------------------------------------------------------------------------------------
# Means that skip non-finite values, and signal-to-noise
# ----------------------------------------------------------------------------------------------


def _nanmean(values: FloatArray) -> float:
    """Mean of the finite entries; nan (and no warning) when there are none."""
    finite = values[np.isfinite(values)]
    return float(finite.mean()) if finite.size else math.nan


def _row_nanmean(values: FloatArray) -> FloatArray:
    """Mean of the finite entries along the last axis; nan where there are none (no warning)."""
    finite = np.isfinite(values)
    count = finite.sum(axis=-1)
    total = np.where(finite, values, 0.0).sum(axis=-1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(count > 0, total / np.maximum(count, 1), np.nan)


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
