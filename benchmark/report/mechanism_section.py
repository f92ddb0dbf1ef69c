"""The report's mechanism section: UD → IF over training, the column-space fraction, the downweighted truth.

Reads ``<run_dir>/mechanism.csv`` written by :func:`benchmark.mechanism.run_mechanism` (columns section, lr,
epoch, time = η·t, method, variant, measurement, metric, value, ci_low, ci_high, se, n). Every effect is
**removed − full**. Verdicts are computed from the numbers with the thresholds below (d-TDA Fig. 3 reports
≈ 0.9 late in training, higher for smaller η, and a column-space fraction ≈ 1); :func:`claims_from` states
the rules. Plots are drawn on Agg canvases (``.output``) and linked relative to the markdown's directory.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd

from .markdown import fmt, fmt_ci, image, md_table
from .output import new_figure, save_figure

UD_IF_HIGH = 0.8  # late-training UD–IF Pearson (loss, undamped IF, best lr) that counts as "high" (paper ≈ 0.9)
COLSPACE_HIGH = 0.95  # column-space fraction that counts as "≈ 1"
COLSPACE_LOW = 0.8
SCORE_MARGIN = 0.02  # a score difference smaller than this counts as equal in the verdict
VARIANT_STYLE = {"undamped": "-", "damped": "--", "time_damped": ":"}
TRUTHS = ("downweighted", "retraining_loo")
METHODS = ("unroll", "influence_damped", "influence_undamped")


def load_mechanism(run_dir: Path) -> pd.DataFrame | None:
    path = run_dir / "mechanism.csv"
    if not path.is_file():
        return None
    frame = pd.read_csv(path, keep_default_na=False, na_values=["", "nan", "NaN"])
    return frame.astype({c: float for c in ("value", "ci_low", "ci_high", "se", "lr", "epoch", "time") if c in frame})


def _pick(frame: pd.DataFrame, **eq: object) -> pd.DataFrame:
    mask = np.ones(len(frame), dtype=bool)
    for col, val in eq.items():
        mask &= (frame[col] == val).to_numpy()
    return frame[mask]


def _ud_if(frame: pd.DataFrame, metric: str = "pearson", measurement: str = "loss") -> pd.DataFrame:
    return _pick(frame, section="ud_vs_if", method="influence", metric=metric, measurement=measurement)


def _colspace_variant(frame: pd.DataFrame) -> str | None:
    """The most inclusive numerical column space (smallest rtol), else ``mu=wd``."""
    variants = set(_pick(frame, section="colspace", metric="colspace_fraction")["variant"])
    rtols = sorted((float(v.split("=")[1]), v) for v in variants if v.startswith("rtol="))
    return rtols[0][1] if rtols else ("mu=wd" if "mu=wd" in variants else None)


# ---------------------------------------------------------------------------------------------- plots
def plot_ud_if(frame: pd.DataFrame, plot_dir: Path) -> Path | None:
    """UD vs IF on the test loss: Pearson vs epochs and vs gradient-flow time η·t, Spearman and ‖Δ_IF‖/‖Δ_UD‖ vs
    η·t; one line per (lr, IF variant), mean ± SE over seeds."""
    ud = _pick(frame, section="ud_vs_if", method="influence", measurement="loss")
    if ud.empty:
        return None
    panels = [("pearson", "epoch"), ("pearson", "time"), ("spearman", "time"), ("norm_ratio", "time")]
    fig, axes = new_figure(len(panels), ncols_max=2)
    for ax, (metric, xcol) in zip(axes, panels):
        for i, lr in enumerate(sorted(set(ud["lr"]))):
            for variant, style in VARIANT_STYLE.items():
                d = _pick(ud, metric=metric, lr=lr, variant=variant).sort_values(xcol)
                if len(d):
                    ax.errorbar(
                        d[xcol],
                        d["value"],
                        yerr=d["se"].fillna(0.0),
                        color=f"C{i}",
                        ls=style,
                        marker="o",
                        ms=3.5,
                        capsize=2,
                        label=f"η = {lr:g}, IF {variant}",
                    )
        ax.set_xscale("log")
        ax.set_xlabel("training epochs E" if xcol == "epoch" else "gradient-flow time η·t")
        ax.set_ylabel("‖Δ_IF‖ / ‖Δ_UD‖" if metric == "norm_ratio" else f"UD–IF {metric} over (k, q)")
        if metric == "norm_ratio":
            ax.set_yscale("log")
            ax.axhline(1.0, color="0.7", lw=0.8, ls=":")
        else:
            ax.axhline(0.9, color="0.7", lw=0.8, ls=":")
    axes[0].legend(fontsize=6, loc="best")
    fig.suptitle("UD vs IF over training, test loss (d-TDA Fig. 3 top; dotted: the paper's ≈ 0.9)", fontsize=10)
    return save_figure(fig, plot_dir / "mechanism_ud_vs_if.png")


def plot_colspace(frame: pd.DataFrame, plot_dir: Path) -> Path | None:
    cs = _pick(frame, section="colspace", metric="colspace_fraction", measurement="loss")
    if cs.empty:
        return None
    fig, axes = new_figure(1, panel=(5.0, 3.6))
    for i, lr in enumerate(sorted(set(cs["lr"]))):
        for j, variant in enumerate(sorted(set(cs["variant"]))):
            d = _pick(cs, lr=lr, variant=variant).sort_values("epoch")
            axes[0].errorbar(
                d["epoch"],
                d["value"],
                yerr=d["se"].fillna(0.0),
                color=f"C{i}",
                ls=["-", "--", ":"][j % 3],
                marker="o",
                ms=3.5,
                capsize=2,
                label=f"η = {lr:g}, {variant}",
            )
    axes[0].set_xscale("log")
    axes[0].set_xlabel("training epochs E")
    axes[0].set_ylabel("‖P_col ∇m‖ / ‖∇m‖ (test loss)")
    axes[0].legend(fontsize=7, loc="best")
    axes[0].set_title("∇m in col(G_data) (d-TDA Fig. 3 bottom)", fontsize=10)
    return save_figure(fig, plot_dir / "mechanism_colspace.png")


def plot_downweighting(frame: pd.DataFrame, plot_dir: Path) -> Path | None:
    dw = _pick(frame, section="downweighting", metric="loo_mean_spearman")
    measurements = [m for m in ("loss", "margin") if m in set(dw["measurement"])]
    if dw.empty or not measurements:
        return None
    fig, axes = new_figure(len(measurements), ncols_max=2, panel=(4.6, 3.4))
    x = np.arange(len(METHODS))
    for ax, meas in zip(axes, measurements):
        for i, truth in enumerate(TRUTHS):
            d = _pick(dw, measurement=meas, variant=truth).set_index("method")
            vals = d.reindex(list(METHODS))
            err = np.vstack([vals["value"] - vals["ci_low"], vals["ci_high"] - vals["value"]]).clip(min=0)
            ax.bar(
                x + (i - 0.5) * 0.38,
                vals["value"],
                width=0.38,
                yerr=np.nan_to_num(err),
                capsize=3,
                color=f"C{i}",
                label=truth,
            )
            if "noise_ceiling" in d.index:
                ax.axhline(float(d.loc["noise_ceiling", "value"]), color=f"C{i}", ls="--", lw=1)
        ax.set_xticks(x, [m.replace("influence_", "IF ") for m in METHODS], fontsize=8)
        ax.set_ylabel("loo_mean_spearman (cross-fitted)")
        ax.set_title(f"`{meas}` (dashed: noise ceiling)", fontsize=10)
    axes[0].legend(fontsize=7, loc="best")
    return save_figure(fig, plot_dir / "mechanism_downweighting.png")


# ---------------------------------------------------------------------------------------------- verdicts
def _curves(frame: pd.DataFrame, variant: str = "undamped") -> dict[float, pd.DataFrame]:
    """{lr: UD–IF Pearson rows (loss, IF ``variant``) sorted by epoch}."""
    d = _pick(_ud_if(frame), variant=variant)
    return {lr: _pick(d, lr=lr).sort_values("epoch") for lr in sorted(set(d["lr"]))}


def _smaller_lr_higher(curves: dict[float, pd.DataFrame]) -> tuple[bool, str]:
    """Whether the smallest lr's curve lies above the largest lr's at matched gradient-flow time η·t (log-linear
    interpolation over the overlap), else at matched epochs; and a description."""
    small, big = curves[min(curves)], curves[max(curves)]
    if "time" in small and len(small) > 1:
        t = big["time"][(big["time"] >= small["time"].min()) & (big["time"] <= small["time"].max())]
        if len(t):
            interp = np.interp(np.log(t), np.log(small["time"]), small["value"])
            higher = bool((interp > big.set_index("time").loc[t, "value"].to_numpy()).all())
            return higher, f"at matched η·t ∈ {{{', '.join(f'{x:g}' for x in t)}}}"
    merged = small.merge(big, on="epoch", suffixes=("_s", "_b"))
    return bool((merged["value_s"] > merged["value_b"]).all()) and len(merged) > 0, "at matched epochs"


def _ud_if_claim(frame: pd.DataFrame) -> dict | None:
    curves = _curves(frame)
    if not curves or any(len(c) < 2 for c in curves.values()):
        return None
    rises = {lr: c["value"].iloc[-1] > c["value"].iloc[0] for lr, c in curves.items()}
    best_lr = max(curves, key=lambda lr: curves[lr]["value"].iloc[-1])
    late = curves[best_lr].iloc[-1]
    ordered, how = _smaller_lr_higher(curves) if len(curves) > 1 else (True, "")
    if late["value"] >= UD_IF_HIGH and all(rises.values()) and ordered:
        verdict = "reproduced"
    elif not any(rises.values()):
        verdict = "not reproduced"
    else:
        verdict = "inconclusive at this scale"
    value = "; ".join(
        f"η={lr:g}: {fmt(c['value'].iloc[0], 2)} → {fmt(c['value'].iloc[-1], 2)} "
        f"(E={int(c['epoch'].iloc[0])}→{int(c['epoch'].iloc[-1])})"
        for lr, c in curves.items()
    )
    value += f"; smaller η {'higher' if ordered else 'not higher'} {how}".rstrip()
    return {
        "claim": "UD → IF (correlation rises with training, higher for smaller lr)",
        "figure": "d-TDA Fig. 3 (top), Thm. 2",
        "value": value,
        "ci": fmt_ci(late["value"], late["ci_low"], late["ci_high"]),
        "verdict": verdict,
    }


def mechanism_claims(run_dir: Path) -> list[dict]:
    """Rows {claim, figure, value, ci, verdict} for the replication table (verdict: reproduced,
    not reproduced, inconclusive at this scale); [] without ``mechanism.csv``."""
    frame = load_mechanism(run_dir)
    return [] if frame is None else claims_from(frame)


def claims_from(frame: pd.DataFrame) -> list[dict]:
    """:func:`mechanism_claims` of a loaded ``mechanism.csv``. UD → IF (Pearson, test loss, undamped IF):
    reproduced if the best lr's last value ≥ UD_IF_HIGH, every lr's curve rises (last > first) and the
    smallest lr lies above the largest at matched η·t; not reproduced if no curve rises; else inconclusive.
    Null space: the smallest value over (η, E) of the numerical column-space fraction ≥ COLSPACE_HIGH →
    reproduced, < COLSPACE_LOW → not reproduced."""
    rows = [row for row in [_ud_if_claim(frame)] if row is not None]
    variant = _colspace_variant(frame)
    if variant is not None:
        cs = _pick(frame, section="colspace", metric="colspace_fraction", measurement="loss", variant=variant)
        worst = cs.loc[cs["value"].idxmin()]
        verdict = (
            "reproduced"
            if worst["value"] >= COLSPACE_HIGH
            else "not reproduced"
            if worst["value"] < COLSPACE_LOW
            else "inconclusive at this scale"
        )
        rows.append(
            {
                "claim": "nullspace term small (column-space fraction ≈ 1)",
                "figure": "d-TDA Fig. 3 (bottom)",
                "value": f"min over (η, E) {fmt(worst['value'])} ({variant}, η={worst['lr']:g}, "
                f"E={int(worst['epoch'])})",
                "ci": fmt_ci(worst["value"], worst["ci_low"], worst["ci_high"]),
                "verdict": verdict,
            }
        )
    return rows


def _downweighting_verdict(frame: pd.DataFrame) -> str:
    dw = _pick(frame, section="downweighting", metric="loo_mean_spearman", measurement="loss").set_index(
        ["variant", "method"]
    )["value"]
    if dw.empty or ("downweighted", "noise_ceiling") not in dw.index:
        return ""
    ceil_dw, ceil_loo = dw[("downweighted", "noise_ceiling")], dw.get(("retraining_loo", "noise_ceiling"), math.nan)
    diff = {m: dw.get(("downweighted", m), math.nan) - dw.get(("retraining_loo", m), math.nan) for m in METHODS}
    better = [m for m, d in diff.items() if d > SCORE_MARGIN]
    worse = [m for m, d in diff.items() if d < -SCORE_MARGIN]
    return (
        f"The expected-loss downweighted truth {'is' if ceil_dw > ceil_loo + SCORE_MARGIN else 'is not'} less noisy "
        f"than retraining LOO on the same seeds (split-half ceiling of loo_mean_spearman, loss: {fmt(ceil_dw)} vs "
        f"{fmt(ceil_loo)}); against it {', '.join(better) or 'no method'} score(s) higher by more than "
        f"{SCORE_MARGIN}, {', '.join(worse) or 'none'} lower, the rest within {SCORE_MARGIN}."
    )


def _time_damping_sentence(frame: pd.DataFrame) -> str:
    """UD after t steps inverts only directions with curvature ≳ 1/(η·t): compare the IF damped by that."""
    ud = _ud_if(frame)
    pairs, gains = [], []
    for _, row in _pick(ud, variant="time_damped").sort_values(["lr", "epoch"]).iterrows():
        und = _pick(ud, variant="undamped", lr=row["lr"], epoch=row["epoch"])
        if len(und):
            pairs.append(
                f"η={row['lr']:g}, E={int(row['epoch'])}: {fmt(row['value'], 2)} vs {fmt(und['value'].iloc[0], 2)}"
            )
            gains.append(row["value"] - und["value"].iloc[0])
    if not pairs:
        return ""
    better = "better" if np.mean(gains) > 0 else "no better"
    ratio = _pick(frame, section="ud_vs_if", metric="norm_ratio", measurement="loss", variant="undamped")
    tail = ""
    if len(ratio):
        last = ratio.sort_values("time").iloc[-1]
        tail = f"; ‖Δ_IF‖/‖Δ_UD‖ of the undamped IF is {fmt(last['value'], 2)} at the longest run (η={last['lr']:g})"
    return (
        f"The IF damped by λ = 1/(η·t) (UD's effective curvature cutoff after t steps) correlates {better} with UD "
        f"than the undamped IF (Pearson, loss, time-damped vs undamped: {'; '.join(pairs)}){tail}."
    )


def _verdict_paragraph(frame: pd.DataFrame) -> str:
    parts = []
    for row in claims_from(frame):
        parts.append(f"**{row['claim']}**: {row['verdict']} ({row['value']}).")
    parts += [_time_damping_sentence(frame), _downweighting_verdict(frame)]
    return " ".join(p for p in parts if p)


# ---------------------------------------------------------------------------------------------- tables
def _mean_se(value: float, se: float) -> str:
    return f"{fmt(value)} ± {fmt(se)}" if np.isfinite(se) else fmt(value)


def _grid_table(d: pd.DataFrame, label: str) -> str:
    epochs = sorted(set(d["epoch"]))
    rows = []
    for (lr, variant), g in d.groupby(["lr", "variant"], sort=True):
        cells = g.set_index("epoch")
        rows.append(
            [f"η = {lr:g}, {label} {variant}"]
            + [_mean_se(cells.loc[e, "value"], cells.loc[e, "se"]) if e in cells.index else "—" for e in epochs]
        )
    return md_table(["", *(f"E = {int(e)}" for e in epochs)], rows)


def _downweighting_table(frame: pd.DataFrame) -> str:
    dw = _pick(frame, section="downweighting", metric="loo_mean_spearman", measurement="loss")
    rows = []
    for method in (*METHODS, "noise_ceiling"):
        cells = []
        for truth in TRUTHS:
            r = _pick(dw, method=method, variant=truth)
            cells.append(fmt_ci(*r[["value", "ci_low", "ci_high"]].iloc[0]) if len(r) else "—")
        rows.append([method, *cells])
    return md_table(["method (loss, loo_mean_spearman)", *TRUTHS], rows)


def mechanism_report_lines(run_dir: Path, plot_dir: Path, base: Path) -> list[str]:
    """Markdown lines: tables, plots (PNGs under ``plot_dir``, linked relative to ``base``) and a verdict."""
    frame = load_mechanism(run_dir)
    lines = ["## Mechanism: UD → IF, the null space, a low-noise truth", ""]
    if frame is None:
        return [*lines, f"`{run_dir / 'mechanism.csv'}` not found: run `python -m benchmark.mechanism`.", ""]
    seeds = _ud_if(frame)["n"].max() if len(_ud_if(frame)) else 0
    lines += [
        f"UD–IF Pearson over (target, query) per seed (test loss), mean ± SE over {int(seeds)} seeds:",
        "",
        _grid_table(_ud_if(frame), "IF"),
        "",
    ]
    variant = _colspace_variant(frame)
    if variant is not None:
        cs = _pick(frame, section="colspace", metric="colspace_fraction", measurement="loss")
        lines += [
            "Column-space fraction ‖P_col ∇m‖/‖∇m‖ of the test-loss gradient in the data GGN (mean ± SE over "
            "seeds × queries; `mu=wd`: curvature above weight decay, `rtol`: numerical column space):",
            "",
            _grid_table(cs, "GGN"),
            "",
        ]
    if len(_pick(frame, section="downweighting")):
        lines += [
            "Scores against the expected-loss downweighted truth and the retraining LOO truth, same seeds:",
            "",
            _downweighting_table(frame),
            "",
        ]
    for alt, path in (
        ("UD vs IF", plot_ud_if(frame, plot_dir)),
        ("column space", plot_colspace(frame, plot_dir)),
        ("downweighting", plot_downweighting(frame, plot_dir)),
    ):
        if path is not None:
            lines += image(alt, path, base)
    lines += [_verdict_paragraph(frame), ""]
    return lines
