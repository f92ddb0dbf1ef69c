"""The tidy leaderboard: schema defined once, atomic writes, and the CI regression check.

Every row is one (task, scale, method, variant, measurement, metric). Later work adds rows, never
ad-hoc columns; a change of columns bumps ``SCHEMA_VERSION``. Regimes: ``distributional`` and
``fixed_seed`` (scores, with ``noise_ceiling``), ``cost`` (``runtime_rel_training``) and ``info`` (what a
method logged for that run, e.g. influence's ``damping_mean`` = λ and ``damping_over_mean_eig``).
Group-removal rows (``benchmark.lds``) carry ``lds_*`` metrics; for them ``n_targets`` counts subsets.
Regime ``further_training``: Wei et al.'s cosine / Spearman to the further-training gold standard at the
first and last further-training epoch (``ft_gold_<metric>_e<E>``, CI ± 1.96 SEM, ceiling = the gold's
split-half agreement).
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from benchmark.scores.metrics import LDS_METRICS
from benchmark.store import atomic_write_bytes

SCHEMA_VERSION = 2  # 2: the ``seeds`` provenance column
COLUMNS: tuple[str, ...] = (
    "schema_version", "task", "scale", "method", "variant", "measurement", "metric", "regime", "coupling",
    "value", "ci_low", "ci_high", "noise_ceiling", "n_seeds", "seeds", "n_targets", "n_queries", "n_failed",
    "distributional", "runtime_s", "peak_rss_mb", "config_hash", "version", "commit", "device", "torch_version",
)
# Scores where higher is better; the regression check applies to these only (never to runtime).
HIGHER_IS_BETTER = set(LDS_METRICS) | set(LDS_METRICS.values())  # the LOO scores and their LDS twins
GOLD_PREFIX = "ft_gold_"  # Wei et al.'s metric against the further-training gold standard, higher is better


def higher_is_better(metric: str) -> bool:
    return metric in HIGHER_IS_BETTER or metric.startswith(GOLD_PREFIX)
KEY_COLUMNS = ("task", "scale", "method", "variant", "measurement", "metric", "coupling")


def seed_ranges(seeds: list[int]) -> str:
    """Compact seed list for provenance: ``[0, 1, 2, 5, 7, 8]`` → ``"0-2,5,7-8"``."""
    parts, run = [], []
    for s in seeds:
        if run and s == run[-1] + 1:
            run.append(s)
            continue
        if run:
            parts.append(f"{run[0]}-{run[-1]}" if len(run) > 1 else str(run[0]))
        run = [s]
    if run:
        parts.append(f"{run[0]}-{run[-1]}" if len(run) > 1 else str(run[0]))
    return ",".join(parts)


def to_frame(rows: list[dict]) -> pd.DataFrame:
    """Rows → a DataFrame with exactly ``COLUMNS`` (missing values NaN); raises on unknown columns."""
    extra = sorted({k for r in rows for k in r} - set(COLUMNS))
    if extra:
        raise ValueError(f"leaderboard rows have columns outside the schema: {extra}")
    frame = pd.DataFrame(rows, columns=list(COLUMNS))
    frame["schema_version"] = SCHEMA_VERSION
    return frame


def write_csv(frame: pd.DataFrame, path: Path) -> None:
    buf = io.StringIO()
    frame.to_csv(buf, index=False, float_format="%.6g")
    atomic_write_bytes(path, buf.getvalue().encode())


def merge_into(path: Path, frame: pd.DataFrame) -> pd.DataFrame:
    """Replace the rows of (task, scale) present in ``frame`` inside an existing leaderboard at ``path``."""
    if path.is_file():
        old = pd.read_csv(path)
        if "schema_version" in old and (old["schema_version"] != SCHEMA_VERSION).any():
            old = old.iloc[0:0]  # an older schema is not mixed in
        keys = set(zip(frame["task"], frame["scale"]))
        old = old[[(t, s) not in keys for t, s in zip(old["task"], old["scale"])]]
        frame = pd.concat([old, frame], ignore_index=True) if len(old) else frame
    write_csv(frame, path)
    return frame


@dataclass(frozen=True)
class Regression:
    key: tuple
    value: float
    baseline_ci_low: float
    threshold: float

    def __str__(self) -> str:
        return (f"{'/'.join(map(str, self.key))}: {self.value:.4f} < baseline ci_low {self.baseline_ci_low:.4f} "
                f"− tol = {self.threshold:.4f}")


# Scores are compared clipped from below at this floor. Correlations cannot go lower; for the unbounded
# ``distribution_skill`` −1 already means "predicted laws at least twice as far from the truth as predicting no
# change", and below it the value is ill-conditioned: a ratio whose denominator (the truth's own distance from
# no change) is near the noise floor at smoke scale, so float32 rounding on another CPU moved dattri_if_cg's
# loss skill from −116 to −336 with bit-identical code. A fall from above the floor to it is still caught.
SCORE_FLOOR = -1.0


def check_regression(current: pd.DataFrame, baseline_path: Path, tol: float = 0.05) -> list[Regression]:
    """Rows of ``current`` whose higher-is-better score fell below ``min(baseline ci_low, baseline value) − tol``,
    every score clipped from below at :data:`SCORE_FLOOR` first.

    A baseline row with no matching current row is a regression too (a method or metric disappeared).
    """
    if not baseline_path.is_file():
        raise FileNotFoundError(f"--check baseline {baseline_path} does not exist")
    base = pd.read_csv(baseline_path)
    base = base[base["metric"].map(higher_is_better) & base["ci_low"].notna()]
    cur = {tuple(r[c] for c in KEY_COLUMNS): r["value"] for _, r in current.iterrows()}
    out = []
    for _, row in base.iterrows():
        key = tuple(row[c] for c in KEY_COLUMNS)
        # a heavy-tailed bootstrap (e.g. distribution_skill at few seeds) can put ci_low above the point
        # estimate; the baseline's own value is never a regression
        threshold = max(min(float(row["ci_low"]), float(row["value"])), SCORE_FLOOR) - tol
        value = cur.get(key, np.nan)
        if not np.isfinite(value) or max(value, SCORE_FLOOR) < threshold:
            out.append(Regression(key, float(value), float(row["ci_low"]), threshold))
    return out
