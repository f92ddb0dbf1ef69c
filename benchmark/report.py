"""Markdown report and plots for one (task, scale), built only from files the harness has written.

Inputs, all under ``out_dir`` (see the README for their schemas):

* ``leaderboard.csv`` — the tidy leaderboard (may hold several tasks/scales; filtered here);
* ``<task>/<scale>/ground_truth.npz`` — ``measurements [S, 1+K, Q, M]`` (column 0 = full run),
  ``measurement_names``, ``targets``, ``queries``, ``coupling``, ``n_failed`` and ``diag_*`` arrays;
* ``<task>/<scale>/predictions/<method>.npz`` — ``delta [S, K, Q, M]`` and ``measurement_names``;
* ``<task>/<scale>/score_vs_seeds.csv`` — scores and noise ceilings against the number of seeds;
* ``<task>/<scale>/paired_differences.csv`` (optional) — bootstrap CIs of method differences;
* ``<task>/<scale>/run_info.json`` (optional) — wall times per stage and method settings.

Outputs: PNGs in ``<task>/<scale>/plots/``, the section ``<task>/<scale>/report.md``
(:func:`write_report`) and the top-level ``report.md`` (:func:`write_index`). Every file is
written atomically (temporary file in the same directory, then :func:`os.replace`). Figures are
drawn on explicit Agg canvases (:class:`~matplotlib.backends.backend_agg.FigureCanvasAgg`), never
through ``pyplot``, so no global backend state is touched and nothing needs closing.

Sign convention: every effect is **removed minus full**, ``Δm[s, k, q] = m_q(θ_s without k) − m_q(θ_s)``.
"""

from __future__ import annotations

import json
import math
import os
import re
import tempfile
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import matplotlib
import numpy as np
import pandas as pd
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from numpy.typing import NDArray

matplotlib.use("Agg")  # headless (pyplot is never imported; the figures use explicit Agg canvases)

FloatArray = NDArray[np.float64]

__all__ = [
    "REFERENCE_METHODS",
    "write_index",
    "write_report",
]

#: Baseline rows that are drawn for comparison but never count as "the best method" or get plots.
REFERENCE_METHODS: frozenset[str] = frozenset({"zero", "random", "oracle"})

#: Reporting order of the known scores; unknown metrics follow alphabetically.
_METRIC_ORDER: tuple[str, ...] = (
    "loo_mean_spearman",
    "loo_mean_pearson",
    "var_influence_spearman",
    "w2_influence_spearman",
    "distribution_skill",
    "loo_seed_pearson",
    "loo_seed_spearman",
)
_SCORE_REGIMES: tuple[str, ...] = ("distributional", "fixed_seed")
_PRIMARY_METRIC = "loo_mean_spearman"
_DASH = "—"
_REF_GREYS: tuple[str, ...] = ("0.35", "0.55", "0.7")
_DPI = 100
_FILE_MODE = 0o644  # mkstemp creates 0o600; outputs are meant to be shared
_SNR_THRESHOLD = 2.0
_SIGN_SENTENCE = (
    "Sign convention: every effect is **removed minus full**, "
    "Δm[s, k, q] = m_q(θ_s without target k) − m_q(θ_s); e.g. a positive loss effect means that "
    "removing the target raises the query's loss."
)
_LINK_RE = re.compile(r"(!?\[[^\]]*\]\()([^)\s]+)(\))")


# ----------------------------------------------------------------------------------------------
# Atomic file output
# ----------------------------------------------------------------------------------------------


def _atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` via a temporary file in the same directory and :func:`os.replace`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
        os.chmod(tmp, _FILE_MODE)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _atomic_write_text(path: Path, text: str) -> None:
    """Write UTF-8 ``text`` to ``path`` atomically."""
    _atomic_write_bytes(path, text.encode("utf-8"))


def _new_figure(
    n_panels: int, ncols_max: int = 4, panel: tuple[float, float] = (3.8, 3.3)
) -> tuple[Figure, list[Axes]]:
    """A figure with an Agg canvas and ``n_panels`` axes on a grid (surplus grid cells are hidden)."""
    ncols = max(1, min(ncols_max, n_panels))
    nrows = max(1, math.ceil(n_panels / ncols))
    fig = Figure(figsize=(panel[0] * ncols, panel[1] * nrows), dpi=_DPI)
    FigureCanvasAgg(fig)
    axes = [fig.add_subplot(nrows, ncols, i + 1) for i in range(nrows * ncols)]
    for ax in axes[n_panels:]:
        ax.set_visible(False)
    return fig, axes[:n_panels]


def _save_figure(fig: Figure, path: Path) -> None:
    """Render ``fig`` as PNG and write it atomically to ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        fig.savefig(tmp, format="png", dpi=_DPI)
        os.chmod(tmp, _FILE_MODE)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


# ----------------------------------------------------------------------------------------------
# Inputs
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _GroundTruth:
    """The arrays of ``ground_truth.npz`` needed by the report."""

    measurements: FloatArray  # [S, 1+K, Q, M]
    measurement_names: tuple[str, ...]
    targets: NDArray[Any]
    queries: NDArray[Any]
    coupling: str
    n_failed: int
    diagnostics: dict[str, FloatArray] = field(default_factory=dict)

    @property
    def full(self) -> FloatArray:
        """``[S, Q, M]`` full-data measurements."""
        return self.measurements[:, 0]

    @property
    def removed(self) -> FloatArray:
        """``[S, K, Q, M]`` removal measurements."""
        return self.measurements[:, 1:]

    @property
    def effect(self) -> FloatArray:
        """``[S, K, Q, M]`` per-seed effects ``removed − full`` (paired by seed index)."""
        return self.removed - self.full[:, None]


def _require(path: Path, what: str) -> Path:
    if not path.is_file():
        raise FileNotFoundError(f"{what} not found: {path}")
    return path


def _names(arr: NDArray[Any]) -> tuple[str, ...]:
    return tuple(str(x) for x in np.atleast_1d(arr).tolist())


def _load_ground_truth(path: Path) -> _GroundTruth:
    """Read ``ground_truth.npz``.

    Raises:
        FileNotFoundError: If the file does not exist (the message names the path).
        ValueError: If ``measurements`` is not 4-D or the names do not match its last axis.
    """
    _require(path, "ground truth")
    with np.load(path, allow_pickle=False) as z:
        meas = np.asarray(z["measurements"], dtype=np.float64)
        names = _names(z["measurement_names"]) if "measurement_names" in z.files else ()
        if meas.ndim != 4:
            raise ValueError(f"{path}: measurements must be [S, 1+K, Q, M]; got shape {meas.shape}")
        if not names:
            names = tuple(f"m{i}" for i in range(meas.shape[3]))
        if len(names) != meas.shape[3]:
            raise ValueError(f"{path}: {len(names)} measurement names for M={meas.shape[3]}")
        coupling = str(z["coupling"][()]) if "coupling" in z.files else "unknown"
        n_failed = int(z["n_failed"]) if "n_failed" in z.files else 0
        k, q = meas.shape[1] - 1, meas.shape[2]
        targets = np.asarray(z["targets"]) if "targets" in z.files else np.arange(k)
        queries = np.asarray(z["queries"]) if "queries" in z.files else np.arange(q)
        diags = {
            key[len("diag_") :]: np.asarray(z[key], dtype=np.float64).ravel()
            for key in z.files
            if key.startswith("diag_")
        }
    return _GroundTruth(meas, names, targets, queries, coupling, n_failed, diags)


def _load_predictions(pred_dir: Path, gt: _GroundTruth) -> tuple[dict[str, FloatArray], list[str]]:
    """Every ``predictions/<method>.npz``, reordered to the ground truth's measurement order.

    Returns:
        ``({method: delta [S', K, Q, M]}, notes)`` where notes explain skipped files.
    """
    preds: dict[str, FloatArray] = {}
    notes: list[str] = []
    if not pred_dir.is_dir():
        return preds, notes
    _, k, q, m = gt.removed.shape
    for path in sorted(pred_dir.glob("*.npz")):
        with np.load(path, allow_pickle=False) as z:
            delta = np.asarray(z["delta"], dtype=np.float64)
            names = _names(z["measurement_names"]) if "measurement_names" in z.files else gt.measurement_names
        if delta.ndim != 4 or delta.shape[1:3] != (k, q) or len(names) != delta.shape[3]:
            notes.append(f"`{path.name}` skipped: delta shape {delta.shape} does not match K={k}, Q={q}.")
            continue
        out = np.full(delta.shape[:3] + (m,), np.nan)
        for j, name in enumerate(gt.measurement_names):
            if name in names:
                out[..., j] = delta[..., names.index(name)]
        preds[path.stem] = out
    return preds, notes


def _as_bool(value: Any) -> bool | None:
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return None
    text = str(value).strip().lower()
    if text in {"true", "1", "yes", "t"}:
        return True
    if text in {"false", "0", "no", "f"}:
        return False
    return None


def _load_leaderboard(path: Path, task: str, scale: str, coupling: str) -> pd.DataFrame:
    """The leaderboard rows of one (task, scale), de-duplicated (last row wins)."""
    frame = pd.read_csv(_require(path, "leaderboard"))
    for col in ("task", "scale", "method", "variant", "measurement", "metric", "regime", "coupling"):
        if col not in frame.columns:
            frame[col] = ""
        frame[col] = frame[col].astype(object).where(frame[col].notna(), "").astype(str)
    for col in ("value", "ci_low", "ci_high", "noise_ceiling", "runtime_s", "peak_rss_mb"):
        if col not in frame.columns:
            frame[col] = np.nan
        frame[col] = pd.to_numeric(frame[col], errors="coerce")
    frame = frame[(frame["task"] == task) & (frame["scale"] == scale)]
    same_coupling = frame[frame["coupling"].isin([coupling, ""])]
    if not same_coupling.empty:
        frame = same_coupling
    keys = ["method", "variant", "measurement", "metric", "regime"]
    return frame.drop_duplicates(subset=keys, keep="last").reset_index(drop=True)


def _read_optional_csv(path: Path) -> pd.DataFrame | None:
    if not path.is_file():
        return None
    frame = pd.read_csv(path)
    return frame if not frame.empty else None


# ----------------------------------------------------------------------------------------------
# Formatting helpers
# ----------------------------------------------------------------------------------------------


def _finite(x: Any) -> bool:
    try:
        return math.isfinite(float(x))
    except (TypeError, ValueError):
        return False


def _fmt(x: Any, digits: int = 3) -> str:
    return f"{float(x):.{digits}f}" if _finite(x) else _DASH


def _fmt_t(x: float) -> str:
    """A |t| statistic: two decimals, three significant digits when large, ∞ when infinite."""
    if math.isinf(x):
        return "∞"
    if not math.isfinite(x):
        return _DASH
    return f"{x:.2f}" if abs(x) < 1000 else f"{x:.3g}"


def _fmt_ci(value: Any, lo: Any, hi: Any, digits: int = 3) -> str:
    if not _finite(value):
        return _DASH
    if _finite(lo) and _finite(hi):
        return f"{float(value):.{digits}f} [{float(lo):.{digits}f}, {float(hi):.{digits}f}]"
    return f"{float(value):.{digits}f}"


def _cell(text: Any) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def _md_table(
    header: Sequence[str], rows: Iterable[Sequence[Any]], align: Sequence[str] | None = None
) -> str:
    """A GitHub-flavoured markdown table; ``align`` entries are ``"l"`` or ``"r"``."""
    align = align or ["l"] + ["r"] * (len(header) - 1)
    lines = [
        "| " + " | ".join(_cell(h) for h in header) + " |",
        "|" + "|".join(":---" if a == "l" else "---:" for a in align) + "|",
    ]
    lines += ["| " + " | ".join(_cell(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def _slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name).strip("_") or "x"


def _metric_sort_key(metric: str) -> tuple[int, str]:
    return (_METRIC_ORDER.index(metric), "") if metric in _METRIC_ORDER else (len(_METRIC_ORDER), metric)


def _pearson(x: FloatArray, y: FloatArray) -> float:
    mask = np.isfinite(x) & np.isfinite(y)
    if mask.sum() < 2:
        return math.nan
    xc, yc = x[mask] - x[mask].mean(), y[mask] - y[mask].mean()
    denom = math.sqrt(float(xc @ xc) * float(yc @ yc))
    return float(xc @ yc) / denom if denom > 0 else math.nan


def _label(method: str, variant: str) -> str:
    return f"{method} ({variant})" if variant else method


# ----------------------------------------------------------------------------------------------
# Leaderboard tables
# ----------------------------------------------------------------------------------------------


def _ranking_only(board: pd.DataFrame) -> set[str]:
    """Methods whose leaderboard rows say ``distributional = False``."""
    if "distributional" not in board.columns:
        return set()
    flags = board.groupby("method")["distributional"].agg(lambda s: [_as_bool(v) for v in s])
    return {str(m) for m, vals in flags.items() if any(v is False for v in vals)}


def _row_order(board: pd.DataFrame, measurement: str) -> list[tuple[str, str]]:
    """(method, variant) pairs: real methods by the primary metric (best first), then references."""
    pairs = list(dict.fromkeys(zip(board["method"], board["variant"])))
    primary = board[(board["measurement"] == measurement) & (board["metric"] == _PRIMARY_METRIC)]
    score = {(r.method, r.variant): float(r.value) for r in primary.itertuples() if _finite(r.value)}

    def key(p: tuple[str, str]) -> tuple[int, float, str, str]:
        return (int(p[0] in REFERENCE_METHODS), -score.get(p, -math.inf), p[0], p[1])

    return sorted(pairs, key=key)


def _ceiling_text(values: Sequence[float]) -> tuple[str, bool]:
    """The ceiling row's text for one metric and whether all methods share one ceiling."""
    finite = [v for v in values if _finite(v)]
    if not finite:
        return _DASH, True
    lo, hi = min(finite), max(finite)
    if hi - lo <= 1e-9 * max(1.0, abs(hi)):
        return _fmt(lo), True
    return f"{lo:.3f}–{hi:.3f}", False


def _leaderboard_section(
    board: pd.DataFrame, measurements: Sequence[str], ranking_only: set[str]
) -> list[str]:
    out = ["## Leaderboard", ""]
    scores = board[board["regime"].isin(_SCORE_REGIMES)]
    if scores.empty:
        out += ["No score rows for this task and scale in `leaderboard.csv`.", ""]
    else:
        out += [
            (
                "Cells are `value [bootstrap CI]`; the **noise ceiling** row is the same score for the "
                "oracle `removed − full`, which knows each seed's realised effect (fixed-seed ceilings "
                "are 1 by construction). `—` marks a score that is not defined for the method "
                "(ranking-only methods have no distributional scores). Bold: best non-reference method "
                "per column; references "
                f"({', '.join(sorted(REFERENCE_METHODS))}) are listed last."
            ),
            "",
        ]
    for meas in [*measurements, *sorted(set(scores["measurement"]) - set(measurements))]:
        rows_m = scores[scores["measurement"] == meas]
        if rows_m.empty:
            continue
        metrics = sorted(set(rows_m["metric"]), key=_metric_sort_key)
        ceilings = {
            m: _ceiling_text(rows_m.loc[rows_m["metric"] == m, "noise_ceiling"].tolist()) for m in metrics
        }
        best: dict[str, float] = {}
        for metric in metrics:
            real = rows_m[(rows_m["metric"] == metric) & ~rows_m["method"].isin(list(REFERENCE_METHODS))]
            vals = [float(v) for v in real["value"] if _finite(v)]
            if vals:
                best[metric] = max(vals)
        lookup = {(r.method, r.variant, r.metric): r for r in rows_m.itertuples()}
        table_rows: list[list[str]] = []
        for method, variant in _row_order(rows_m, meas):
            label = _label(method, variant) + (" †" if method in ranking_only else "")
            cells = [label]
            for metric in metrics:
                r = lookup.get((method, variant, metric))
                if r is None:
                    cells.append(_DASH)
                    continue
                text = _fmt_ci(r.value, r.ci_low, r.ci_high)
                if not ceilings[metric][1] and _finite(r.noise_ceiling):
                    text += f" (ceil {float(r.noise_ceiling):.3f})"
                if (
                    method not in REFERENCE_METHODS
                    and metric in best
                    and _finite(r.value)
                    and float(r.value) == best[metric]
                ):
                    text = f"**{text}**"
                cells.append(text)
            table_rows.append(cells)
        table_rows.append(["noise ceiling (oracle)"] + [ceilings[m][0] for m in metrics])
        out += [f"### Measurement `{meas}`", "", _md_table(["method", *metrics], table_rows), ""]
    if ranking_only:
        out += ["† ranking-only method (no distributional predictions).", ""]
    out += _cost_table(board, measurements[0] if measurements else "")
    return out


def _first_finite(frames: Sequence[pd.DataFrame], col: str) -> float:
    """The first finite value of ``col`` in the first frame that has one (nan if none does)."""
    for frame in frames:
        vals = [float(v) for v in frame[col] if _finite(v)]
        if vals:
            return vals[0]
    return math.nan


def _cost_table(board: pd.DataFrame, order_by: str) -> list[str]:
    if board.empty:
        return []
    cost = board[board["regime"] == "cost"]
    cost_metrics = sorted(set(cost["metric"]))
    rows: list[list[str]] = []
    for method, variant in _row_order(board, order_by):
        mine = board[(board["method"] == method) & (board["variant"] == variant)]
        mine_cost = mine[mine["regime"] == "cost"]
        frames = (mine_cost, mine)
        cells = [
            _label(method, variant),
            _fmt(_first_finite(frames, "runtime_s"), 2),
            _fmt(_first_finite(frames, "peak_rss_mb"), 0),
        ]
        for metric in cost_metrics:
            r = mine_cost[mine_cost["metric"] == metric]
            cells.append(
                _fmt_ci(r["value"].iloc[0], r["ci_low"].iloc[0], r["ci_high"].iloc[0], 3) if len(r) else _DASH
            )
        rows.append(cells)
    if not rows:
        return []
    return [
        "### Cost",
        "",
        "`runtime_rel_training` is the method's time divided by the time of one plain training run.",
        "",
        _md_table(["method", "runtime_s", "peak_rss_mb", *cost_metrics], rows),
        "",
    ]


def _provenance(board: pd.DataFrame) -> str:
    parts = []
    for col in ("version", "commit", "config_hash", "device", "torch_version", "schema_version"):
        if col in board.columns:
            vals = sorted({str(v) for v in board[col] if pd.notna(v) and str(v) != ""})
            if vals:
                parts.append(f"{col} `{', '.join(vals)}`")
    return "Provenance: " + "; ".join(parts) + "." if parts else ""


# ----------------------------------------------------------------------------------------------
# Plots
# ----------------------------------------------------------------------------------------------


def _plot_mean_effects(
    gt: _GroundTruth, preds: Mapping[str, FloatArray], ranking_only: set[str], plot_dir: Path
) -> list[tuple[str, Path, dict[str, float]]]:
    """Plot 1: predicted vs true mean effect over all (k, q); one figure per measurement.

    Returns:
        ``[(measurement, png path, {method: pearson r})]``.
    """
    methods = [m for m in preds if m not in REFERENCE_METHODS]
    if not methods:
        return []
    true_mean = gt.effect.mean(axis=0)  # [K, Q, M]
    out = []
    for j, meas in enumerate(gt.measurement_names):
        fig, axes = _new_figure(len(methods))
        rs: dict[str, float] = {}
        truth = true_mean[..., j].ravel()
        for ax, method in zip(axes, methods):
            pred = (
                np.nanmean(preds[method][..., j], axis=0).ravel()
                if preds[method].shape[0]
                else truth * np.nan
            )
            r = _pearson(truth, pred)
            rs[method] = r
            ax.scatter(truth, pred, s=9, alpha=0.5, color="C0", edgecolors="none")
            if method in ranking_only:
                ax.set_title(f"{method} (ranking-only): r = {_fmt(r)}", fontsize=10)
            else:
                both = np.concatenate([truth, pred])
                both = both[np.isfinite(both)]
                if both.size:
                    lo, hi = float(both.min()), float(both.max())
                    pad = 0.05 * (hi - lo) if hi > lo else 1e-12 + 0.05 * abs(hi)
                    ax.plot([lo - pad, hi + pad], [lo - pad, hi + pad], color="k", lw=0.8, ls="--")
                ax.set_title(f"{method}: r = {_fmt(r)}", fontsize=10)
            ax.axhline(0, color="0.8", lw=0.5, zorder=0)
            ax.axvline(0, color="0.8", lw=0.5, zorder=0)
            ax.set_xlabel("true mean effect (removed − full)")
            ax.set_ylabel("predicted mean effect")
        fig.suptitle(f"Mean LOO effect on `{meas}`: each point is one (target, query)", fontsize=11)
        fig.tight_layout()
        path = plot_dir / f"mean_effect_{_slug(meas)}.png"
        _save_figure(fig, path)
        out.append((meas, path, rs))
    return out


def _plot_loo_law(
    gt: _GroundTruth, preds: Mapping[str, FloatArray], ranking_only: set[str], plot_dir: Path
) -> tuple[Path, str, list[str]] | None:
    """Plot 2: samples of the full, true LOO and predicted LOO laws for the 3 most-affected (k, q).

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
    fig, axes = _new_figure(n_top, ncols_max=3, panel=(4.6, 1.2 + 0.55 * (2 + len(methods))))
    for ax, (k, q) in zip(axes, pairs):
        rows: list[tuple[str, FloatArray, str]] = [
            ("full  m_q(θ_s)", full[:, q], "0.45"),
            ("true removed", removed[:, k, q], "k"),
        ]
        for i, method in enumerate(methods):
            delta = preds[method][:, k, q, j]
            s = min(delta.shape[0], full.shape[0])
            rows.append((f"{method} predicted", full[:s, q] + delta[:s], f"C{i}"))
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
        ax.set_xlabel(names[j])
        ax.set_title(
            f"target {_id(gt.targets, k)}, query {_id(gt.queries, q)}\n"
            f"true mean effect {true_mean[k, q]:+.3g}",
            fontsize=9,
        )
    fig.suptitle(
        f"LOO law of `{names[j]}` for the most-affected (target, query) pairs "
        "(points: seeds; bar: 10–90 %; |: median; ◇: mean)",
        fontsize=10,
    )
    fig.tight_layout()
    path = plot_dir / f"loo_law_{_slug(names[j])}.png"
    _save_figure(fig, path)
    described = [
        f"target {_id(gt.targets, k)} / query {_id(gt.queries, q)}: {true_mean[k, q]:+.3g}" for k, q in pairs
    ]
    return path, names[j], described


def _plot_score_vs_seeds(
    svs: pd.DataFrame, measurements: Sequence[str], plot_dir: Path
) -> list[tuple[str, Path, str]]:
    """Plot 3: score and noise ceiling vs number of seeds; one figure per measurement.

    Returns:
        ``[(measurement, png path, sentence reading off the primary metric)]``.
    """
    svs = svs.copy()
    svs["measurement"] = svs["measurement"].astype(object).where(svs["measurement"].notna(), "").astype(str)
    svs["method"] = svs["method"].astype(str)
    svs["metric"] = svs["metric"].astype(str)
    for col in ("n_seeds", "value_mean", "value_se", "ceiling_mean", "ceiling_se"):
        svs[col] = pd.to_numeric(svs[col], errors="coerce")
    order = [*measurements, *sorted(set(svs["measurement"]) - set(measurements))]
    out = []
    for meas in order:
        sub = svs[svs["measurement"] == meas]
        if sub.empty:
            continue
        metrics = sorted(set(sub["metric"]), key=_metric_sort_key)
        methods = list(dict.fromkeys(sub["method"]))
        real = [m for m in methods if m not in REFERENCE_METHODS]
        refs = [m for m in methods if m in REFERENCE_METHODS]
        fig, axes = _new_figure(len(metrics), ncols_max=4, panel=(3.6, 3.0))
        for ax, metric in zip(axes, metrics):
            sm = sub[sub["metric"] == metric]
            for i, method in enumerate(real + refs):
                d = sm[sm["method"] == method].sort_values("n_seeds")
                if d.empty:
                    continue
                is_ref = method in REFERENCE_METHODS
                ax.errorbar(
                    d["n_seeds"],
                    d["value_mean"],
                    yerr=d["value_se"].fillna(0.0).clip(lower=0.0),
                    marker="o",
                    ms=3.5,
                    capsize=2,
                    lw=1.0 if is_ref else 1.5,
                    ls=":" if is_ref else "-",
                    color=_REF_GREYS[refs.index(method) % len(_REF_GREYS)] if is_ref else f"C{i}",
                    label=method,
                )
            ceil = sm.groupby("n_seeds")[["ceiling_mean", "ceiling_se"]].mean().sort_index()
            ceil = ceil[np.isfinite(ceil["ceiling_mean"])]
            if not ceil.empty:
                x = ceil.index.to_numpy(dtype=float)
                c, se = ceil["ceiling_mean"].to_numpy(), ceil["ceiling_se"].fillna(0.0).to_numpy()
                ax.plot(x, c, color="k", ls="--", lw=1.5, label="noise ceiling (oracle)")
                ax.fill_between(x, c - se, c + se, color="k", alpha=0.08, lw=0)
            ns = sorted({int(n) for n in sm["n_seeds"] if _finite(n) and n > 0})
            if ns:
                ax.set_xscale("log", base=2)
                ax.set_xticks(ns)
                ax.set_xticklabels([str(n) for n in ns], fontsize=8)
                ax.minorticks_off()
            ax.axhline(0, color="0.85", lw=0.6, zorder=0)
            ax.set_title(metric, fontsize=10)
            ax.set_xlabel("number of seeds n")
        if axes:
            axes[0].set_ylabel("score (mean ± SE over subsets)")
            axes[0].legend(fontsize=7, loc="best")
        fig.suptitle(f"Scores vs number of seeds, `{meas}`", fontsize=11)
        fig.tight_layout()
        path = plot_dir / f"score_vs_seeds_{_slug(meas)}.png"
        _save_figure(fig, path)
        out.append((meas, path, _read_off_score_vs_seeds(sub)))
    return out


def _read_off_score_vs_seeds(sub: pd.DataFrame) -> str:
    """One sentence on the primary metric at the smallest and largest number of seeds."""
    metric = _PRIMARY_METRIC if _PRIMARY_METRIC in set(sub["metric"]) else None
    if metric is None:
        return ""
    sm = sub[sub["metric"] == metric]
    ns = sorted({int(n) for n in sm["n_seeds"] if _finite(n)})
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
    text = f"At n = {n_hi} seeds the noise ceiling of `{metric}` is {_fmt(c_hi)}"
    if not at_hi.empty:
        best = at_hi.loc[at_hi["value_mean"].idxmax()]
        text += (
            f" and the best method, {best['method']}, reaches "
            f"{_fmt(best['value_mean'])} ± {_fmt(best['value_se'])}"
        )
    text += "."
    if n_lo < n_hi and _finite(c_lo) and _finite(c_hi):
        trend = "rises" if c_hi > c_lo else "does not rise"
        text += (
            f" The ceiling {trend} from {_fmt(c_lo)} at n = {n_lo}: a perfect per-seed predictor scores "
            "low with few seeds only because the truth is estimated from noisy seeds — leave-one-out is not "
            "broken, just noisy, and scores must be read against the ceiling at the same n."
        )
    return text


def _signal_to_noise(gt: _GroundTruth) -> dict[str, FloatArray]:
    """``|t|[k, q]`` of the paired effect per measurement: ``|mean_s e| / (sd_s(e) / √S)``."""
    effect = gt.effect
    n_seeds = effect.shape[0]
    if n_seeds < 2:
        return {}
    mean = effect.mean(axis=0)
    se = effect.std(axis=0, ddof=1) / math.sqrt(n_seeds)
    with np.errstate(divide="ignore", invalid="ignore"):
        t = np.where(se > 0, np.abs(mean) / se, np.where(mean == 0, 0.0, np.inf))
    return {name: t[..., j] for j, name in enumerate(gt.measurement_names)}


def _plot_snr(snr: Mapping[str, FloatArray], plot_dir: Path) -> Path | None:
    if not snr:
        return None
    fig, axes = _new_figure(len(snr), ncols_max=4, panel=(3.8, 3.0))
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
    fig.tight_layout()
    path = plot_dir / "signal_to_noise.png"
    _save_figure(fig, path)
    return path


def _plot_diagnostics(diags: Mapping[str, FloatArray], plot_dir: Path) -> Path | None:
    items = [(k, v[np.isfinite(v)]) for k, v in diags.items()]
    items = [(k, v) for k, v in items if v.size]
    if not items:
        return None
    fig, axes = _new_figure(len(items), ncols_max=3, panel=(3.6, 2.8))
    for ax, (name, v) in zip(axes, items):
        ax.hist(v, bins=min(30, max(5, v.size // 4)), color="C2", alpha=0.8)
        ax.set_title(f"{name} (per seed, full run)", fontsize=10)
        ax.set_xlabel(name)
        ax.set_ylabel("seeds")
    fig.tight_layout()
    path = plot_dir / "diagnostics.png"
    _save_figure(fig, path)
    return path


# ----------------------------------------------------------------------------------------------
# Smaller sections
# ----------------------------------------------------------------------------------------------


def _id(ids: NDArray[Any], i: int) -> str:
    """The dataset index stored at position ``i`` of ``targets``/``queries`` (``i`` itself if absent)."""
    flat = ids.ravel()
    return str(flat[i]) if flat.size > i else str(i)


def _rel(path: Path, base: Path) -> str:
    return Path(os.path.relpath(path, base)).as_posix()


def _paired_section(frame: pd.DataFrame) -> list[str]:
    cols = {"measurement", "metric", "method_a", "method_b", "diff", "ci_low", "ci_high"}
    missing = cols - set(frame.columns)
    if missing:
        return ["## Paired differences", "", f"`paired_differences.csv` lacks columns {sorted(missing)}.", ""]
    frame = frame.copy()
    frame["measurement"] = (
        frame["measurement"].astype(object).where(frame["measurement"].notna(), "").astype(str)
    )
    out = [
        "## Paired differences",
        "",
        (
            "Score of method A minus method B, with a paired bootstrap CI (both methods scored on the same "
            "replicates). `*` marks a CI that excludes 0."
        ),
        "",
    ]
    for meas, sub in frame.groupby("measurement", sort=False):
        rows = []
        for r in sorted(sub.itertuples(), key=lambda r: (_metric_sort_key(str(r.metric)), str(r.method_a))):
            sig = _finite(r.ci_low) and _finite(r.ci_high) and (float(r.ci_low) > 0 or float(r.ci_high) < 0)
            rows.append(
                [
                    str(r.metric),
                    f"{r.method_a} − {r.method_b}",
                    _fmt_ci(r.diff, r.ci_low, r.ci_high) + (" *" if sig else ""),
                ]
            )
        out += [
            f"### Measurement `{meas}`",
            "",
            _md_table(["metric", "A − B", "difference [CI]"], rows, "llr"),
            "",
        ]
    return out


def _flatten(obj: Any, prefix: str = "") -> list[tuple[str, Any]]:
    if isinstance(obj, Mapping):
        items: list[tuple[str, Any]] = []
        for key, val in obj.items():
            items += _flatten(val, f"{prefix} / {key}" if prefix else str(key))
        return items
    return [(prefix, obj)]


def _is_time_key(key: str) -> bool:
    last = key.rsplit(" / ", 1)[-1].lower()
    return last.endswith(("_s", "_sec", "_seconds")) or "time" in last


def _fmt_value(val: Any) -> str:
    if isinstance(val, bool) or val is None:
        return str(val)
    if isinstance(val, int):
        return str(val)
    if isinstance(val, float):
        return f"{val:.4g}" if math.isfinite(val) else _DASH
    if isinstance(val, (list, tuple)):
        text = json.dumps(val)
        return text if len(text) <= 80 else text[:77] + "..."
    return str(val)


def _run_info_section(path: Path) -> list[str]:
    try:
        info = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        return ["## Wall time", "", f"Could not read `{path.name}`: {exc}.", ""]
    flat = _flatten(info) if isinstance(info, Mapping) else [("run_info", info)]
    times = [(k, v) for k, v in flat if _is_time_key(k) and _finite(v) and not isinstance(v, bool)]
    other = [(k, v) for k, v in flat if (k, v) not in times]
    out = ["## Wall time", ""]
    if times:
        out += [_md_table(["stage", "seconds"], [[k, f"{float(v):.2f}"] for k, v in times]), ""]
    else:
        out += ["`run_info.json` records no wall times.", ""]
    if other:
        out += [
            "### Run settings",
            "",
            _md_table(["key", "value"], [[k, _fmt_value(v)] for k, v in other], "ll"),
            "",
        ]
    return out


# ----------------------------------------------------------------------------------------------
# Public API
# ----------------------------------------------------------------------------------------------


def write_report(out_dir: Path, task: str, scale: str) -> Path:
    """Write the plots and the markdown section of one (task, scale).

    Reads only files the harness has already written under ``out_dir`` (see the module docstring),
    writes PNGs to ``out_dir/<task>/<scale>/plots/`` and the section to ``out_dir/<task>/<scale>/report.md``.
    Image links in the section are relative to the section file.

    Args:
        out_dir: The results directory (holds ``leaderboard.csv`` and ``<task>/<scale>/``).
        task: Task name, as in the leaderboard's ``task`` column.
        scale: Scale name, as in the leaderboard's ``scale`` column.

    Returns:
        The path of the written section ``out_dir/<task>/<scale>/report.md``.

    Raises:
        FileNotFoundError: If ``ground_truth.npz`` or ``leaderboard.csv`` is missing (the message
            names the path).
        ValueError: If ``ground_truth.npz`` is malformed.
    """
    out_dir = Path(out_dir)
    run_dir = out_dir / task / scale
    gt = _load_ground_truth(run_dir / "ground_truth.npz")
    board = _load_leaderboard(out_dir / "leaderboard.csv", task, scale, gt.coupling)
    preds, pred_notes = _load_predictions(run_dir / "predictions", gt)
    ranking_only = _ranking_only(board)
    plot_dir = run_dir / "plots"
    plot_dir.mkdir(parents=True, exist_ok=True)
    md_path = run_dir / "report.md"
    base = md_path.parent

    n_seeds, k1, n_queries, _ = gt.measurements.shape
    methods = list(dict.fromkeys([*board["method"], *preds]))
    lines = [
        f"# {task} / {scale}",
        "",
        (
            f"Coupling **{gt.coupling}**; S = {n_seeds} seeds, K = {k1 - 1} removal targets, Q = {n_queries} "
            f"queries, measurements {', '.join(f'`{m}`' for m in gt.measurement_names)}; "
            f"{gt.n_failed} seed(s) dropped because a run diverged (n_failed)."
        ),
        "",
        _SIGN_SENTENCE,
        "",
        f"Methods: {', '.join(methods) if methods else 'none'}.",
        "",
    ]
    prov = _provenance(board)
    if prov:
        lines += [prov, ""]
    lines += _leaderboard_section(board, gt.measurement_names, ranking_only)

    # Plot 1: mean effects.
    lines += ["## Predicted vs true mean effect", ""]
    lines += [f"- {note}" for note in pred_notes] + ([""] if pred_notes else [])
    mean_plots = _plot_mean_effects(gt, preds, ranking_only, plot_dir)
    if mean_plots:
        lines += [
            (
                "True: mean over seeds of `removed − full` per (target, query); predicted: mean over seeds "
                "of the method's `delta`. Dashed line: y = x (omitted for ranking-only methods, whose scale "
                "is arbitrary); r is Pearson's correlation over all (target, query) pairs."
            ),
            "",
        ]
        for meas, path, rs in mean_plots:
            summary = ", ".join(f"{m} r = {_fmt(r)}" for m, r in rs.items())
            lines += [f"![mean effect {meas}]({_rel(path, base)})", "", f"`{meas}`: {summary}.", ""]
    else:
        lines += ["No predictions of non-reference methods were found.", ""]

    # Plot 2: LOO laws.
    law = _plot_loo_law(gt, preds, ranking_only, plot_dir)
    if law is not None:
        path, meas, described = law
        lines += [
            "## LOO laws of the most-affected pairs",
            "",
            (
                f"The three (target, query) pairs with the largest |true mean effect| on `{meas}`: the "
                "full-run samples m_q(θ_s), the true removed samples, and each distributional method's "
                "predicted LOO samples m_q(θ_s) + delta[s, k, q]."
            ),
            "",
            f"![LOO law {meas}]({_rel(path, base)})",
            "",
            "True mean effects: " + "; ".join(described) + ".",
            "",
        ]

    # Plot 3: score vs seeds.
    lines += ["## Score vs number of seeds", ""]
    svs = _read_optional_csv(run_dir / "score_vs_seeds.csv")
    needed = {
        "method",
        "measurement",
        "metric",
        "n_seeds",
        "value_mean",
        "value_se",
        "ceiling_mean",
        "ceiling_se",
    }
    if svs is None:
        lines += ["`score_vs_seeds.csv` not found.", ""]
    elif not needed <= set(svs.columns):
        lines += [f"`score_vs_seeds.csv` lacks columns {sorted(needed - set(svs.columns))}.", ""]
    else:
        lines += [
            (
                "Each score (mean ± SE over random seed subsets) against the number of seeds n it is "
                "computed from; dashed black: the noise ceiling (oracle) at the same n."
            ),
            "",
        ]
        for meas, path, sentence in _plot_score_vs_seeds(svs, gt.measurement_names, plot_dir):
            lines += [f"![score vs seeds {meas}]({_rel(path, base)})", ""]
            if sentence:
                lines += [f"`{meas}`: {sentence}", ""]

    # Diagnostics.
    lines += ["## Diagnostics", "", "### Signal to noise of the true effects", ""]
    snr = _signal_to_noise(gt)
    if snr:
        paired = (
            ""
            if gt.coupling.lower() != "independent"
            else " (under independent coupling the pairing is nominal)"
        )
        lines += [
            (
                "Per (target, query): |t| = |mean_s(removed − full)| / (sd_s / √S) of the paired "
                f"effect{paired}. "
                f"A pair is detectable at 2 SE when |t| > {_SNR_THRESHOLD:g}."
            ),
            "",
            _md_table(
                ["measurement", "median |t|", "detectable (|t| > 2)", "pairs"],
                [
                    [
                        name,
                        _fmt_t(float(np.nanmedian(t)))
                        if np.isfinite(t).any() or np.isinf(t).any()
                        else _DASH,
                        f"{100 * float(np.mean(t > _SNR_THRESHOLD)):.1f}%",
                        str(t.size),
                    ]
                    for name, t in snr.items()
                ],
            ),
            "",
        ]
        snr_path = _plot_snr(snr, plot_dir)
        if snr_path is not None:
            lines += [f"![signal to noise]({_rel(snr_path, base)})", ""]
    else:
        lines += ["Fewer than 2 seeds: the signal-to-noise ratio is undefined.", ""]
    lines += ["### Training diagnostics (full runs)", ""]
    if gt.diagnostics:
        rows = []
        for name, v in gt.diagnostics.items():
            f = v[np.isfinite(v)]
            rows.append(
                [
                    name,
                    _fmt(f.mean(), 4) if f.size else _DASH,
                    _fmt(f.min(), 4) if f.size else _DASH,
                    _fmt(f.max(), 4) if f.size else _DASH,
                    str(int(v.size - f.size)),
                ]
            )
        lines += [_md_table(["diagnostic", "mean", "min", "max", "non-finite"], rows), ""]
        diag_path = _plot_diagnostics(gt.diagnostics, plot_dir)
        if diag_path is not None:
            lines += [f"![diagnostics]({_rel(diag_path, base)})", ""]
    else:
        lines += ["`ground_truth.npz` holds no diagnostics.", ""]

    paired_df = _read_optional_csv(run_dir / "paired_differences.csv")
    if paired_df is not None:
        lines += _paired_section(paired_df)
    if (run_dir / "run_info.json").is_file():
        lines += _run_info_section(run_dir / "run_info.json")

    _atomic_write_text(md_path, "\n".join(lines).rstrip() + "\n")
    return md_path


def _rebase_links(text: str, src_dir: Path, dst_dir: Path) -> str:
    """Rewrite relative markdown links in ``text`` (relative to ``src_dir``) to be relative to ``dst_dir``."""

    def repl(m: re.Match[str]) -> str:
        target = m.group(2)
        if re.match(r"^[a-zA-Z][a-zA-Z0-9+.-]*:", target) or target.startswith(("/", "#")):
            return m.group(0)
        resolved = os.path.normpath(os.path.join(os.path.abspath(src_dir), target))
        return m.group(1) + Path(os.path.relpath(resolved, os.path.abspath(dst_dir))).as_posix() + m.group(3)

    return _LINK_RE.sub(repl, text)


def write_index(out_dir: Path, sections: list[Path]) -> Path:
    """Write ``out_dir/report.md``: an introduction followed by every section, in the given order.

    Section headings are demoted by one level and relative links (images included) are rewritten
    to be relative to ``out_dir``.

    Args:
        out_dir: The results directory.
        sections: Section files written by :func:`write_report`.

    Returns:
        The path of ``out_dir/report.md``.

    Raises:
        FileNotFoundError: If a section file does not exist (the message names the path).
    """
    out_dir = Path(out_dir)
    texts = []
    for section in sections:
        section = Path(section)
        _require(section, "report section")
        body = _rebase_links(section.read_text(encoding="utf-8"), section.parent, out_dir)
        body = re.sub(r"^(#{1,5}) ", r"#\1 ", body, flags=re.MULTILINE)
        texts.append((section, body.strip()))
    contents = [f"- {_rel(s.parent, out_dir)}" for s, _ in texts]
    lines = [
        "# dtda-bench report",
        "",
        (
            "Benchmark of distributional training-data attribution (d-TDA): how well methods predict the "
            "distribution over training seeds of a measurement after removing one training example."
        ),
        "",
        _SIGN_SENTENCE,
        "",
        (
            "Two scoring regimes: **distributional** scores are cross-fitted (the truth from one half of "
            "the seeds, the method from the other), **fixed-seed** scores correlate per-seed predictions "
            "with the realised per-seed effects. Every score comes with its **noise ceiling**, the same "
            "score for the oracle `removed − full`, which bounds what any per-seed predictor can reach "
            "with this many seeds. "
            "The raw data are in `leaderboard.csv` and under `<task>/<scale>/`."
        ),
        "",
        "## Contents",
        "",
        *(contents or ["(no sections)"]),
        "",
    ]
    for _, body in texts:
        lines += ["---", "", body, ""]
    path = out_dir / "report.md"
    _atomic_write_text(path, "\n".join(lines).rstrip() + "\n")
    return path
