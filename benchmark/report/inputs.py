"""Loading and validating the result files the report is built from, and their vocabulary.

Every effect is **removed minus full**, ``Δm[s, k, q] = m_q(θ_s without k) − m_q(θ_s)``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from numpy.typing import NDArray

FloatArray = NDArray[np.float64]

#: Baseline rows that are drawn for comparison but never count as "the best method" or get plots.
REFERENCE_METHODS: frozenset[str] = frozenset({"zero", "random", "oracle"})

#: Reporting order of the known scores; unknown metrics follow alphabetically.
METRIC_ORDER: tuple[str, ...] = (
    "loo_mean_spearman",
    "loo_mean_pearson",
    "var_influence_spearman",
    "w2_influence_spearman",
    "distribution_skill",
    "loo_seed_pearson",
    "loo_seed_spearman",
    "lds_mean",
    "lds_mean_pearson",
    "lds_var",
    "lds_w2",
    "lds_distribution_skill",
    "lds_seed_pearson",
    "lds_seed_spearman",
)
PRIMARY_METRIC = "loo_mean_spearman"
PRIMARY_LDS_METRIC = "lds_mean"


def primary_metric(metrics: set[str] | pd.Series) -> str:
    """The metric tables are sorted by: ``loo_mean_spearman``, or ``lds_mean`` for group-removal rows."""
    return PRIMARY_METRIC if PRIMARY_METRIC in set(metrics) else PRIMARY_LDS_METRIC

_LEADERBOARD_TEXT = ("task", "scale", "method", "variant", "measurement", "metric", "regime", "coupling")
_LEADERBOARD_NUMBERS = ("value", "ci_low", "ci_high", "noise_ceiling", "runtime_s", "peak_rss_mb")


@dataclass(frozen=True)
class GroundTruth:
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


def require(path: Path, what: str) -> Path:
    """``path`` itself, if it is a file.

    Raises:
        FileNotFoundError: If it is not (the message names ``what`` and the path).
    """
    if not path.is_file():
        raise FileNotFoundError(f"{what} not found: {path}")
    return path


def _names(arr: NDArray[Any]) -> tuple[str, ...]:
    return tuple(str(x) for x in np.atleast_1d(arr).tolist())


def load_ground_truth(path: Path) -> GroundTruth:
    """Read ``ground_truth.npz``.

    Raises:
        FileNotFoundError: If the file does not exist (the message names the path).
        ValueError: If ``measurements`` is not 4-D or the names do not match its last axis.
    """
    require(path, "ground truth")
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
    return GroundTruth(meas, names, targets, queries, coupling, n_failed, diags)


def load_predictions(pred_dir: Path, gt: GroundTruth) -> tuple[dict[str, FloatArray], list[str]]:
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


def as_bool(value: Any) -> bool | None:
    """A CSV cell read as a boolean (``True``/``"yes"``/``1``…), or ``None`` if it is neither."""
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


def text_column(column: pd.Series) -> pd.Series:
    """``column`` as strings, with missing cells as ``""`` (not ``"nan"``)."""
    return column.astype(object).where(column.notna(), "").astype(str)


def load_leaderboard(path: Path, task: str, scale: str, coupling: str) -> pd.DataFrame:
    """The leaderboard rows of one (task, scale), de-duplicated (last row wins)."""
    frame = pd.read_csv(require(path, "leaderboard"))
    for col in _LEADERBOARD_TEXT:
        if col not in frame.columns:
            frame[col] = ""
        frame[col] = text_column(frame[col])
    for col in _LEADERBOARD_NUMBERS:
        if col not in frame.columns:
            frame[col] = np.nan
        frame[col] = pd.to_numeric(frame[col], errors="coerce")
    frame = frame[(frame["task"] == task) & (frame["scale"] == scale)]
    same_coupling = frame[frame["coupling"].isin([coupling, ""])]
    if not same_coupling.empty:
        frame = same_coupling
    keys = ["method", "variant", "measurement", "metric", "regime"]
    return frame.drop_duplicates(subset=keys, keep="last").reset_index(drop=True)


def read_optional_csv(path: Path) -> pd.DataFrame | None:
    """The CSV at ``path``, or ``None`` if it does not exist or has no rows."""
    if not path.is_file():
        return None
    frame = pd.read_csv(path)
    return frame if not frame.empty else None


def missing_columns(frame: pd.DataFrame, needed: set[str], name: str) -> str | None:
    """A sentence naming the columns of ``needed`` that the CSV file ``name`` lacks, or ``None``."""
    missing = needed - set(frame.columns)
    return f"`{name}` lacks columns {sorted(missing)}." if missing else None


def metric_sort_key(metric: str) -> tuple[int, str]:
    """Known metrics in :data:`METRIC_ORDER`, then unknown ones alphabetically."""
    return (METRIC_ORDER.index(metric), "") if metric in METRIC_ORDER else (len(METRIC_ORDER), metric)


def measurement_order(known: Sequence[str], seen: Sequence[str]) -> list[str]:
    """The ground truth's measurements in order, then any other measurement in ``seen``, sorted."""
    return [*known, *sorted(set(seen) - set(known))]
