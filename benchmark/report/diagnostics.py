"""The report's diagnostics section: signal to noise of the true effects and training diagnostics.

Every effect is **removed minus full**, ``Δm[s, k, q] = m_q(θ_s without k) − m_q(θ_s)``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from .inputs import FloatArray, GroundTruth
from .markdown import DASH, fmt, fmt_t, image, md_table
from .output import new_figure, save_figure

_SNR_THRESHOLD = 2.0  # |t| > 2: the mean effect is 2 standard errors from 0


def signal_to_noise(gt: GroundTruth) -> dict[str, FloatArray]:
    """``|t|[k, q]`` of the paired effect per measurement (empty with fewer than 2 seeds).

        |t|[k, q] = |mean_s e[s, k, q]| / (sd_s(e[:, k, q]) / √S),   e = removed − full

    A pair with no spread gets 0 if its mean is 0 and ∞ otherwise.

    Returns:
        ``{measurement: |t| [K, Q]}``.
    """
    effect = gt.effect  # [S, K, Q, M]
    n_seeds = effect.shape[0]
    if n_seeds < 2:
        return {}
    mean = effect.mean(axis=0)  # [K, Q, M]
    se = effect.std(axis=0, ddof=1) / math.sqrt(n_seeds)  # [K, Q, M]
    with np.errstate(divide="ignore", invalid="ignore"):
        t = np.where(se > 0, np.abs(mean) / se, np.where(mean == 0, 0.0, np.inf))
    return {name: t[..., j] for j, name in enumerate(gt.measurement_names)}


def _plot_snr(snr: Mapping[str, FloatArray], plot_dir: Path) -> Path | None:
    """Histograms of |t| on a log axis, one panel per measurement, with the threshold dashed."""
    if not snr:
        return None
    fig, axes = new_figure(len(snr), ncols_max=4, panel=(3.8, 3.0))
    for ax, (name, t) in zip(axes, snr.items()):
        vals = t[~np.isnan(t)].ravel()
        positive = vals[np.isfinite(vals) & (vals > 0)]
        lo = min(float(positive.min()), 0.5 * _SNR_THRESHOLD) if positive.size else 0.1 * _SNR_THRESHOLD
        hi = max(float(positive.max()), 2.0 * _SNR_THRESHOLD) if positive.size else 10.0 * _SNR_THRESHOLD
        if vals.size:  # zeros and infinities are clipped into the outermost bins
            ax.hist(np.clip(vals, lo, hi), bins=np.geomspace(lo, hi * 1.0001, 31), color="C0", alpha=0.8)
        ax.set_xscale("log")
        ax.axvline(_SNR_THRESHOLD, color="k", ls="--", lw=1)
        frac = float(np.mean(t > _SNR_THRESHOLD)) if t.size else math.nan
        ax.set_title(f"{name}: {100 * frac:.0f}% with |t| > {_SNR_THRESHOLD:g}", fontsize=10)
        ax.set_xlabel("|t| of the paired effect per (target, query)")
        ax.set_ylabel("count")
    return save_figure(fig, plot_dir / "signal_to_noise.png")


def _plot_diagnostics(diags: Mapping[str, FloatArray], plot_dir: Path) -> Path | None:
    """Histograms over seeds of each training diagnostic's finite values."""
    items = [(k, v[np.isfinite(v)]) for k, v in diags.items()]
    items = [(k, v) for k, v in items if v.size]
    if not items:
        return None
    fig, axes = new_figure(len(items), ncols_max=3, panel=(3.6, 2.8))
    for ax, (name, v) in zip(axes, items):
        ax.hist(v, bins=min(30, max(5, v.size // 4)), color="C2", alpha=0.8)
        ax.set_title(f"{name} (per seed, full run)", fontsize=10)
        ax.set_xlabel(name)
        ax.set_ylabel("seeds")
    return save_figure(fig, plot_dir / "diagnostics.png")


def _snr_lines(gt: GroundTruth, plot_dir: Path, base: Path) -> list[str]:
    snr = signal_to_noise(gt)
    if not snr:
        return ["Fewer than 2 seeds: the signal-to-noise ratio is undefined.", ""]
    paired = "" if gt.coupling.lower() != "independent" else " (under independent coupling the pairing is nominal)"
    rows = [
        [
            name,
            fmt_t(float(np.nanmedian(t))) if not np.isnan(t).all() else DASH,
            f"{100 * float(np.mean(t > _SNR_THRESHOLD)):.1f}%",
            str(t.size),
        ]
        for name, t in snr.items()
    ]
    lines = [
        (
            "Per (target, query): |t| = |mean_s(removed − full)| / (sd_s / √S) of the paired "
            f"effect{paired}. "
            f"A pair is detectable at 2 SE when |t| > {_SNR_THRESHOLD:g}."
        ),
        "",
        md_table(["measurement", "median |t|", "detectable (|t| > 2)", "pairs"], rows),
        "",
    ]
    path = _plot_snr(snr, plot_dir)
    return lines + (image("signal to noise", path, base) if path is not None else [])


def _training_lines(gt: GroundTruth, plot_dir: Path, base: Path) -> list[str]:
    if not gt.diagnostics:
        return ["`ground_truth.npz` holds no diagnostics.", ""]
    rows = []
    for name, v in gt.diagnostics.items():
        f = v[np.isfinite(v)]
        stats = [fmt(x, 4) for x in (f.mean(), f.min(), f.max())] if f.size else [DASH] * 3
        rows.append([name, *stats, str(int(v.size - f.size))])
    lines = [md_table(["diagnostic", "mean", "min", "max", "non-finite"], rows), ""]
    path = _plot_diagnostics(gt.diagnostics, plot_dir)
    return lines + (image("diagnostics", path, base) if path is not None else [])


def diagnostics_section(gt: GroundTruth, plot_dir: Path, base: Path) -> list[str]:
    """``## Diagnostics``: the |t| table and histogram, then the training diagnostics of the full runs.

    Args:
        gt: The ground truth.
        plot_dir: Where the PNGs go.
        base: The directory of the markdown file (image links are relative to it).
    """
    lines = ["## Diagnostics", "", "### Signal to noise of the true effects", ""]
    lines += _snr_lines(gt, plot_dir, base)
    lines += ["### Training diagnostics (full runs)", ""]
    return lines + _training_lines(gt, plot_dir, base)
