"""The report's markdown tables: leaderboard, cost, provenance, paired differences and wall time."""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import pandas as pd

from .inputs import (
    REFERENCE_METHODS,
    as_bool,
    measurement_order,
    metric_sort_key,
    missing_columns,
    primary_metric,
    text_column,
)
from .markdown import DASH, finite, fmt, fmt_ci, label, md_table

_SCORE_REGIMES: tuple[str, ...] = ("distributional", "fixed_seed")
_PROVENANCE_COLUMNS = ("version", "commit", "config_hash", "device", "torch_version", "schema_version")
_PAIRED_COLUMNS = {"measurement", "metric", "method_a", "method_b", "diff", "ci_low", "ci_high"}


# ----------------------------------------------------------------------------------------------
# Leaderboard
# ----------------------------------------------------------------------------------------------


def ranking_only_methods(board: pd.DataFrame) -> set[str]:
    """Methods whose leaderboard rows say ``distributional = False``."""
    if "distributional" not in board.columns:
        return set()
    flags = board.groupby("method")["distributional"].agg(lambda s: [as_bool(v) for v in s])
    return {str(m) for m, vals in flags.items() if any(v is False for v in vals)}


def _row_order(board: pd.DataFrame, measurement: str) -> list[tuple[str, str]]:
    """(method, variant) pairs: real methods by the primary metric (best first), then references."""
    pairs = list(dict.fromkeys(zip(board["method"], board["variant"])))
    primary = board[(board["measurement"] == measurement) & (board["metric"] == primary_metric(board["metric"]))]
    score = {(r.method, r.variant): float(r.value) for r in primary.itertuples() if finite(r.value)}

    def key(p: tuple[str, str]) -> tuple[int, float, str, str]:
        return (int(p[0] in REFERENCE_METHODS), -score.get(p, -math.inf), p[0], p[1])

    return sorted(pairs, key=key)


def _ceiling_text(values: Sequence[float]) -> tuple[str, bool]:
    """The ceiling row's text for one metric and whether all methods share one ceiling."""
    finite_values = [v for v in values if finite(v)]
    if not finite_values:
        return DASH, True
    lo, hi = min(finite_values), max(finite_values)
    if hi - lo <= 1e-9 * max(1.0, abs(hi)):
        return fmt(lo), True
    return f"{lo:.3f}–{hi:.3f}", False


def _best_values(rows_m: pd.DataFrame, metrics: Sequence[str]) -> dict[str, float]:
    """Per metric, the best finite value of a non-reference method (metrics without one are absent)."""
    best: dict[str, float] = {}
    for metric in metrics:
        real = rows_m[(rows_m["metric"] == metric) & ~rows_m["method"].isin(list(REFERENCE_METHODS))]
        vals = [float(v) for v in real["value"] if finite(v)]
        if vals:
            best[metric] = max(vals)
    return best


def score_table(rows_m: pd.DataFrame, meas: str, ranking_only: set[str]) -> str:
    """The score table of one measurement: a row per (method, variant), a column per metric."""
    metrics = sorted(set(rows_m["metric"]), key=metric_sort_key)
    ceilings = {m: _ceiling_text(rows_m.loc[rows_m["metric"] == m, "noise_ceiling"].tolist()) for m in metrics}
    best = _best_values(rows_m, metrics)
    lookup = {(r.method, r.variant, r.metric): r for r in rows_m.itertuples()}
    table_rows: list[list[str]] = []
    for method, variant in _row_order(rows_m, meas):
        cells = [label(method, variant) + (" †" if method in ranking_only else "")]
        for metric in metrics:
            r = lookup.get((method, variant, metric))
            if r is None:
                cells.append(DASH)
                continue
            text = fmt_ci(r.value, r.ci_low, r.ci_high)
            if not ceilings[metric][1] and finite(r.noise_ceiling):
                text += f" (ceil {float(r.noise_ceiling):.3f})"
            is_best = metric in best and finite(r.value) and float(r.value) == best[metric]
            if method not in REFERENCE_METHODS and is_best:
                text = f"**{text}**"
            cells.append(text)
        table_rows.append(cells)
    table_rows.append(["noise ceiling (oracle)"] + [ceilings[m][0] for m in metrics])
    return md_table(["method", *metrics], table_rows)


def leaderboard_section(board: pd.DataFrame, measurements: Sequence[str], ranking_only: set[str]) -> list[str]:
    """``## Leaderboard``: a score table per measurement, then the cost table."""
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
    for meas in measurement_order(measurements, scores["measurement"]):
        rows_m = scores[scores["measurement"] == meas]
        if not rows_m.empty:
            out += [f"### Measurement `{meas}`", "", score_table(rows_m, meas, ranking_only), ""]
    if ranking_only:
        out += ["† ranking-only method (no distributional predictions).", ""]
    out += _cost_table(board, measurements[0] if measurements else "")
    return out


def _first_finite(frames: Sequence[pd.DataFrame], col: str) -> float:
    """The first finite value of ``col`` in the first frame that has one (nan if none does)."""
    for frame in frames:
        vals = [float(v) for v in frame[col] if finite(v)]
        if vals:
            return vals[0]
    return math.nan


def _cost_table(board: pd.DataFrame, order_by: str) -> list[str]:
    if board.empty:
        return []
    cost_metrics = sorted(set(board.loc[board["regime"] == "cost", "metric"]))
    rows: list[list[str]] = []
    for method, variant in _row_order(board, order_by):
        mine = board[(board["method"] == method) & (board["variant"] == variant)]
        mine_cost = mine[mine["regime"] == "cost"]
        frames = (mine_cost, mine)
        cells = [
            label(method, variant),
            fmt(_first_finite(frames, "runtime_s"), 2),
            fmt(_first_finite(frames, "peak_rss_mb"), 0),
        ]
        for metric in cost_metrics:
            r = mine_cost[mine_cost["metric"] == metric]
            cells.append(fmt_ci(r["value"].iloc[0], r["ci_low"].iloc[0], r["ci_high"].iloc[0]) if len(r) else DASH)
        rows.append(cells)
    if not rows:
        return []
    return [
        "### Cost",
        "",
        "`runtime_rel_training` is the method's time divided by the time of one plain training run.",
        "",
        md_table(["method", "runtime_s", "peak_rss_mb", *cost_metrics], rows),
        "",
    ]


def provenance(board: pd.DataFrame) -> str:
    """One sentence listing the distinct versions, commits, … in the rows (empty if none)."""
    parts = []
    for col in _PROVENANCE_COLUMNS:
        if col in board.columns:
            vals = sorted({str(v) for v in board[col] if pd.notna(v) and str(v) != ""})
            if vals:
                parts.append(f"{col} `{', '.join(vals)}`")
    return "Provenance: " + "; ".join(parts) + "." if parts else ""


# ----------------------------------------------------------------------------------------------
# Paired differences
# ----------------------------------------------------------------------------------------------


def paired_section(frame: pd.DataFrame) -> list[str]:
    """``## Paired differences`` from ``paired_differences.csv``: a table per measurement."""
    note = missing_columns(frame, _PAIRED_COLUMNS, "paired_differences.csv")
    if note:
        return ["## Paired differences", "", note, ""]
    frame = frame.copy()
    frame["measurement"] = text_column(frame["measurement"])
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
        for r in sorted(sub.itertuples(), key=lambda r: (metric_sort_key(str(r.metric)), str(r.method_a))):
            sig = finite(r.ci_low) and finite(r.ci_high) and (float(r.ci_low) > 0 or float(r.ci_high) < 0)
            diff = fmt_ci(r.diff, r.ci_low, r.ci_high) + (" *" if sig else "")
            rows.append([str(r.metric), f"{r.method_a} − {r.method_b}", diff])
        out += [f"### Measurement `{meas}`", "", md_table(["metric", "A − B", "difference [CI]"], rows, "llr"), ""]
    return out


# ----------------------------------------------------------------------------------------------
# Wall time and run settings
# ----------------------------------------------------------------------------------------------


def _flatten(obj: Any, prefix: str = "") -> list[tuple[str, Any]]:
    """Nested mappings as ``("a / b / c", leaf)`` pairs, in order."""
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
        return f"{val:.4g}" if math.isfinite(val) else DASH
    if isinstance(val, (list, tuple)):
        text = json.dumps(val)
        return text if len(text) <= 80 else text[:77] + "..."
    return str(val)


def run_info_section(path: Path) -> list[str]:
    """``## Wall time`` (and ``### Run settings``) from ``run_info.json``."""
    try:
        info = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        return ["## Wall time", "", f"Could not read `{path.name}`: {exc}.", ""]
    flat = _flatten(info) if isinstance(info, Mapping) else [("run_info", info)]
    times = [(k, v) for k, v in flat if _is_time_key(k) and finite(v) and not isinstance(v, bool)]
    other = [(k, v) for k, v in flat if (k, v) not in times]
    out = ["## Wall time", ""]
    if times:
        out += [md_table(["stage", "seconds"], [[k, f"{float(v):.2f}"] for k, v in times]), ""]
    else:
        out += ["`run_info.json` records no wall times.", ""]
    if other:
        rows = [[k, _fmt_value(v)] for k, v in other]
        out += ["### Run settings", "", md_table(["key", "value"], rows, "ll"), ""]
    return out
