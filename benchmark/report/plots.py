"""The report's figures of effects and scores: predicted vs true mean effect, LOO laws, score vs seeds.

Every effect is **removed minus full**, ``Δm[s, k, q] = m_q(θ_s without k) − m_q(θ_s)``.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from matplotlib.axes import Axes
from numpy.typing import NDArray

from .inputs import (
    PRIMARY_METRIC,
    REFERENCE_METHODS,
    FloatArray,
    GroundTruth,
    measurement_order,
    metric_sort_key,
    primary_metric,
    text_column,
)
from .markdown import finite, fmt
from .output import new_figure, save_figure

#: Columns of ``score_vs_seeds.csv`` that :func:`plot_score_vs_seeds` reads.
SCORE_VS_SEEDS_COLUMNS = frozenset(
    {"method", "measurement", "metric", "n_seeds", "value_mean", "value_se", "ceiling_mean", "ceiling_se"}
)
_REF_GREYS: tuple[str, ...] = ("0.35", "0.55", "0.7")


def _slug(name: str) -> str:
    """``name`` made safe for a file name."""
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name).strip("_") or "x"


def _id(ids: NDArray[Any], i: int) -> str:
    """The dataset index stored at position ``i`` of ``targets``/``queries`` (``i`` itself if absent)."""
    flat = ids.ravel()
    return str(flat[i]) if flat.size > i else str(i)


def _pearson(x: FloatArray, y: FloatArray) -> float:
    """Pearson's r over the positions where both are finite (nan with fewer than 2 or no spread)."""
    mask = np.isfinite(x) & np.isfinite(y)
    if mask.sum() < 2:
        return math.nan
    xc, yc = x[mask] - x[mask].mean(), y[mask] - y[mask].mean()
    denom = math.sqrt(float(xc @ xc) * float(yc @ yc))
    return float(xc @ yc) / denom if denom > 0 else math.nan


# ----------------------------------------------------------------------------------------------
# Plot 1: predicted vs true mean effect
# ----------------------------------------------------------------------------------------------


def _draw_identity(ax: Axes, truth: FloatArray, pred: FloatArray) -> None:
    """The dashed line y = x over the finite range of both axes, padded by 5 %."""
    both = np.concatenate([truth, pred])
    both = both[np.isfinite(both)]
    if both.size:
        lo, hi = float(both.min()), float(both.max())
        pad = 0.05 * (hi - lo) if hi > lo else 1e-12 + 0.05 * abs(hi)
        ax.plot([lo - pad, hi + pad], [lo - pad, hi + pad], color="k", lw=0.8, ls="--")


def plot_mean_effects(
    gt: GroundTruth, preds: Mapping[str, FloatArray], ranking_only: set[str], plot_dir: Path
) -> list[tuple[str, Path, dict[str, float]]]:
    """Plot 1: predicted vs true mean effect over all (k, q); one figure per measurement.

    Truth: ``mean_s effect[s, k, q]``; prediction: ``nanmean_s delta[s, k, q]``. Ranking-only
    methods get no y = x line (their scale is arbitrary).

    Returns:
        ``[(measurement, png path, {method: pearson r})]``.
    """
    methods = [m for m in preds if m not in REFERENCE_METHODS]
    if not methods:
        return []
    true_mean = gt.effect.mean(axis=0)  # [K, Q, M]
    out = []
    for j, meas in enumerate(gt.measurement_names):
        fig, axes = new_figure(len(methods))
        rs: dict[str, float] = {}
        truth = true_mean[..., j].ravel()  # [K·Q]
        for ax, method in zip(axes, methods):
            delta = preds[method][..., j]  # [S', K, Q]
            pred = np.nanmean(delta, axis=0).ravel() if delta.shape[0] else truth * np.nan
            r = rs[method] = _pearson(truth, pred)
            ax.scatter(truth, pred, s=9, alpha=0.5, color="C0", edgecolors="none")
            if method in ranking_only:
                ax.set_title(f"{method} (ranking-only): r = {fmt(r)}", fontsize=10)
            else:
                _draw_identity(ax, truth, pred)
                ax.set_title(f"{method}: r = {fmt(r)}", fontsize=10)
            ax.axhline(0, color="0.8", lw=0.5, zorder=0)
            ax.axvline(0, color="0.8", lw=0.5, zorder=0)
            ax.set_xlabel("true mean effect (removed − full)")
            ax.set_ylabel("predicted mean effect")
        fig.suptitle(f"Mean LOO effect on `{meas}`: each point is one (target, query)", fontsize=11)
        out.append((meas, save_figure(fig, plot_dir / f"mean_effect_{_slug(meas)}.png"), rs))
    return out


# ----------------------------------------------------------------------------------------------
# Plot 2: LOO laws of the most-affected pairs
# ----------------------------------------------------------------------------------------------


def _draw_laws(ax: Axes, rows: Sequence[tuple[str, FloatArray, str]], rng: np.random.Generator) -> None:
    """One jittered strip per ``(label, samples [S], colour)`` row with its 10–90 % bar, median and mean."""
    for y, (_, samples, color) in enumerate(rows):
        samples = samples[np.isfinite(samples)]
        if samples.size == 0:
            continue
        jitter = rng.uniform(-0.18, 0.18, size=samples.size)
        ax.scatter(samples, y + jitter, s=10, alpha=0.45, color=color, edgecolors="none")
        q10, q50, q90 = np.quantile(samples, [0.1, 0.5, 0.9])
        ax.plot([q10, q90], [y, y], color=color, lw=2.5, alpha=0.9)
        ax.plot([q50], [y], marker="|", ms=16, mew=2.5, color=color)
        ax.plot([samples.mean()], [y], marker="D", ms=6, color="white", mec=color, mew=1.5)
    ax.set_yticks(range(len(rows)))
    ax.set_yticklabels([r[0] for r in rows], fontsize=8)
    ax.set_ylim(len(rows) - 0.5, -0.5)


def plot_loo_law(
    gt: GroundTruth, preds: Mapping[str, FloatArray], ranking_only: set[str], plot_dir: Path
) -> tuple[Path, str, list[str]] | None:
    """Plot 2: samples of the full, true LOO and predicted LOO laws for the 3 most-affected (k, q).

    The measurement is ``loss`` if there is one, else the first. A method's predicted LOO samples
    are ``m_q(θ_s) + delta[s, k, q]``; reference and ranking-only methods are left out.

    Returns:
        ``(png path, measurement, ["target t / query q: effect", ...])`` or ``None`` if nothing to plot.
    """
    names = gt.measurement_names
    j = names.index("loss") if "loss" in names else 0
    true_mean = gt.effect[..., j].mean(axis=0)  # [K, Q]
    score = np.where(np.isfinite(true_mean), np.abs(true_mean), -np.inf)
    n_top = min(3, score.size)
    if n_top == 0:
        return None
    flat = np.argsort(-score, axis=None, kind="stable")[:n_top]
    pairs = [(int(f // true_mean.shape[1]), int(f % true_mean.shape[1])) for f in flat]
    methods = [m for m in preds if m not in REFERENCE_METHODS and m not in ranking_only]
    full = gt.full[..., j]  # [S, Q]
    removed = gt.removed[..., j]  # [S, K, Q]
    rng = np.random.default_rng(0)
    fig, axes = new_figure(n_top, ncols_max=3, panel=(4.6, 1.2 + 0.55 * (2 + len(methods))))
    for ax, (k, q) in zip(axes, pairs):
        rows: list[tuple[str, FloatArray, str]] = [
            ("full  m_q(θ_s)", full[:, q], "0.45"),
            ("true removed", removed[:, k, q], "k"),
        ]
        for i, method in enumerate(methods):
            delta = preds[method][:, k, q, j]  # [S']
            s = min(delta.shape[0], full.shape[0])
            rows.append((f"{method} predicted", full[:s, q] + delta[:s], f"C{i}"))
        _draw_laws(ax, rows, rng)
        ax.set_xlabel(names[j])
        ax.set_title(
            f"target {_id(gt.targets, k)}, query {_id(gt.queries, q)}\ntrue mean effect {true_mean[k, q]:+.3g}",
            fontsize=9,
        )
    fig.suptitle(
        f"LOO law of `{names[j]}` for the most-affected (target, query) pairs "
        "(points: seeds; bar: 10–90 %; |: median; ◇: mean)",
        fontsize=10,
    )
    path = save_figure(fig, plot_dir / f"loo_law_{_slug(names[j])}.png")
    described = [f"target {_id(gt.targets, k)} / query {_id(gt.queries, q)}: {true_mean[k, q]:+.3g}" for k, q in pairs]
    return path, names[j], described


# ----------------------------------------------------------------------------------------------
# Plot 3: score vs number of seeds
# ----------------------------------------------------------------------------------------------


def _method_errorbar(ax: Axes, x: pd.Series, y: pd.Series, err: pd.Series, method: str, i: int,
                     refs: Sequence[str]) -> None:
    """One method's line ± error bars; reference methods dotted grey, real methods solid colour C{i}."""
    is_ref = method in REFERENCE_METHODS
    ax.errorbar(x, y, yerr=err.fillna(0.0).clip(lower=0.0), marker="o", ms=3.5, capsize=2,
                lw=1.0 if is_ref else 1.5, ls=":" if is_ref else "-",
                color=_REF_GREYS[refs.index(method) % len(_REF_GREYS)] if is_ref else f"C{i}", label=method)


def _draw_score_panel(ax: Axes, sm: pd.DataFrame, real: Sequence[str], refs: Sequence[str]) -> None:
    """One metric's panel: each method's score ± SE against n, and the noise ceiling (dashed black)."""
    for i, method in enumerate([*real, *refs]):
        d = sm[sm["method"] == method].sort_values("n_seeds")
        if d.empty:
            continue
        _method_errorbar(ax, d["n_seeds"], d["value_mean"], d["value_se"], method, i, refs)
    ceil = sm.groupby("n_seeds")[["ceiling_mean", "ceiling_se"]].mean().sort_index()
    ceil = ceil[np.isfinite(ceil["ceiling_mean"])]
    if not ceil.empty:
        x = ceil.index.to_numpy(dtype=float)
        c, se = ceil["ceiling_mean"].to_numpy(), ceil["ceiling_se"].fillna(0.0).to_numpy()
        ax.plot(x, c, color="k", ls="--", lw=1.5, label="noise ceiling (oracle)")
        ax.fill_between(x, c - se, c + se, color="k", alpha=0.08, lw=0)
    ns = sorted({int(n) for n in sm["n_seeds"] if finite(n) and n > 0})
    if ns:
        ax.set_xscale("log", base=2)
        ax.set_xticks(ns)
        ax.set_xticklabels([str(n) for n in ns], fontsize=8)
        ax.minorticks_off()
    ax.axhline(0, color="0.85", lw=0.6, zorder=0)
    ax.set_xlabel("number of seeds n")


def plot_score_vs_seeds(svs: pd.DataFrame, measurements: Sequence[str], plot_dir: Path, prefix: str = ""
                        ) -> list[tuple[str, Path, str]]:
    """Plot 3: score and noise ceiling vs number of seeds; one figure per measurement.

    Args:
        svs: ``score_vs_seeds.csv``, with at least :data:`SCORE_VS_SEEDS_COLUMNS`.
        measurements: The ground truth's measurement names (drawn first, in this order).
        plot_dir: Where the PNGs go.
        prefix: Prepended to the PNG names (``lds_`` for the group-removal curves).

    Returns:
        ``[(measurement, png path, sentence reading off the primary metric)]``.
    """
    svs = svs.copy()
    svs["measurement"] = text_column(svs["measurement"])
    svs["method"] = svs["method"].astype(str)
    svs["metric"] = svs["metric"].astype(str)
    for col in ("n_seeds", "value_mean", "value_se", "ceiling_mean", "ceiling_se"):
        svs[col] = pd.to_numeric(svs[col], errors="coerce")
    out = []
    for meas in measurement_order(measurements, svs["measurement"]):
        sub = svs[svs["measurement"] == meas]
        if sub.empty:
            continue
        metrics = sorted(set(sub["metric"]), key=metric_sort_key)
        methods = list(dict.fromkeys(sub["method"]))
        real = [m for m in methods if m not in REFERENCE_METHODS]
        refs = [m for m in methods if m in REFERENCE_METHODS]
        fig, axes = new_figure(len(metrics), ncols_max=4, panel=(3.6, 3.0))
        for ax, metric in zip(axes, metrics):
            _draw_score_panel(ax, sub[sub["metric"] == metric], real, refs)
            ax.set_title(metric, fontsize=10)
        if axes:
            axes[0].set_ylabel("score (mean ± SE over subsets)")
            axes[0].legend(fontsize=7, loc="best")
        fig.suptitle(f"Scores vs number of seeds, `{meas}`", fontsize=11)
        path = save_figure(fig, plot_dir / f"{prefix}score_vs_seeds_{_slug(meas)}.png")
        out.append((meas, path, _read_off_score_vs_seeds(sub)))
    return out


def _read_off_score_vs_seeds(sub: pd.DataFrame) -> str:
    """One sentence on the primary metric at the smallest and largest number of seeds."""
    metric = primary_metric(sub["metric"])
    if metric not in set(sub["metric"]):
        return ""
    sm = sub[sub["metric"] == metric]
    ns = sorted({int(n) for n in sm["n_seeds"] if finite(n)})
    if not ns:
        return ""
    n_lo, n_hi = ns[0], ns[-1]

    def ceiling_at(n: int) -> float:
        vals = sm.loc[sm["n_seeds"] == n, "ceiling_mean"]
        vals = vals[np.isfinite(vals)]
        return float(vals.mean()) if len(vals) else math.nan

    at_hi = sm[(sm["n_seeds"] == n_hi) & ~sm["method"].isin(list(REFERENCE_METHODS))]
    at_hi = at_hi[np.isfinite(at_hi["value_mean"])]
    c_lo, c_hi = ceiling_at(n_lo), ceiling_at(n_hi)
    text = f"At n = {n_hi} seeds the noise ceiling of `{metric}` is {fmt(c_hi)}"
    if not at_hi.empty:
        best = at_hi.loc[at_hi["value_mean"].idxmax()]
        text += f" and the best method, {best['method']}, reaches {fmt(best['value_mean'])} ± {fmt(best['value_se'])}"
    text += "."
    if n_lo < n_hi and finite(c_lo) and finite(c_hi) and metric == PRIMARY_METRIC:
        trend = "rises" if c_hi > c_lo else "does not rise"
        text += (
            f" The ceiling {trend} from {fmt(c_lo)} at n = {n_lo}: a perfect per-seed predictor scores "
            "low with few seeds only because the truth is estimated from noisy seeds — leave-one-out is not "
            "broken, just noisy, and scores must be read against the ceiling at the same n."
        )
    return text


# ----------------------------------------------------------------------------------------------
# Plot 4: agreement with the further-training gold standard (Wei et al. 2024, Fig. 2)
# ----------------------------------------------------------------------------------------------

#: Columns of ``further_training_curves.csv`` that :func:`plot_further_training_curves` reads.
FURTHER_TRAINING_COLUMNS = frozenset({"method", "measurement", "epoch", "metric", "mean", "sem", "n"})
SPLIT_HALF = "gold_split_half"  # the gold standard's own split-half agreement (drawn dashed black)


def _draw_gold_panel(ax: Axes, sub: pd.DataFrame) -> None:
    """One measurement's panel: each method's score ± SEM against further-training epochs."""
    methods = [m for m in dict.fromkeys(sub["method"]) if m != SPLIT_HALF]
    refs = [m for m in methods if m in REFERENCE_METHODS]
    for i, method in enumerate(methods):
        d = sub[sub["method"] == method].sort_values("epoch")
        _method_errorbar(ax, d["epoch"], d["mean"], d["sem"], method, i, refs)
    half = sub[sub["method"] == SPLIT_HALF].sort_values("epoch")
    if not half.empty:
        ax.plot(half["epoch"], half["mean"], color="k", ls="--", lw=1.5, label="gold split-half")
    epochs = sorted({int(e) for e in sub["epoch"] if finite(e)})
    if epochs:
        ax.set_xticks(epochs)
    ax.axhline(0, color="0.85", lw=0.6, zorder=0)
    ax.set_xlabel("further-training epochs")


def plot_further_training_curves(
    curves: pd.DataFrame, measurements: Sequence[str], plot_dir: Path
) -> list[tuple[str, Path]]:
    """Plot 4: each method's agreement with the further-training gold standard vs further-training epochs.

    One figure per metric (``cosine``, ``spearman``), one panel per measurement: mean ± SEM over
    (seed, query) of the per-(seed, query) score over targets; dashed black: the gold standard's split-half
    agreement.

    Returns:
        ``[(metric, png path)]``.
    """
    curves = curves.copy()
    for col in ("method", "measurement", "metric"):
        curves[col] = text_column(curves[col])
    for col in ("epoch", "mean", "sem"):
        curves[col] = pd.to_numeric(curves[col], errors="coerce")
    out = []
    for metric in sorted(set(curves["metric"]), key=lambda m: (m != "cosine", m)):
        sm = curves[curves["metric"] == metric]
        meas_list = [m for m in measurement_order(measurements, sm["measurement"]) if (sm["measurement"] == m).any()]
        fig, axes = new_figure(len(meas_list), ncols_max=4, panel=(4.2, 3.4))
        for ax, meas in zip(axes, meas_list):
            _draw_gold_panel(ax, sm[sm["measurement"] == meas])
            ax.set_title(meas, fontsize=10)
        if axes:
            axes[0].set_ylabel(f"{metric} to gold (mean ± SEM)")
            axes[0].legend(fontsize=7, loc="best")
        fig.suptitle(f"Agreement with the further-training gold standard (Wei et al. 2024): {metric}", fontsize=11)
        out.append((metric, save_figure(fig, plot_dir / f"further_training_{_slug(metric)}.png")))
    return out
