"""Score names, scoring regimes and the array aliases shared by the ``benchmark.scores`` modules."""

from __future__ import annotations

import numpy as np
from numpy.typing import NDArray

FloatArray = NDArray[np.float64]
IntArray = NDArray[np.intp]

SCORE_NAMES_DISTRIBUTIONAL: tuple[str, ...] = (
    "loo_mean_spearman",
    "loo_mean_pearson",
    "var_influence_spearman",
    "w2_influence_spearman",
    "distribution_skill",
)
SCORE_NAMES_FIXED_SEED: tuple[str, ...] = ("loo_seed_pearson", "loo_seed_spearman")
#: The scores reported for ranking-only (``is_distributional=False``) methods.
SCORE_NAMES_RANKING_ONLY: tuple[str, ...] = ("loo_mean_spearman", "loo_seed_spearman")

#: The LDS twin of each score (``benchmark.lds``): the same estimator with subsets in the place of targets.
LDS_METRICS: dict[str, str] = {
    "loo_mean_spearman": "lds_mean",
    "loo_mean_pearson": "lds_mean_pearson",
    "var_influence_spearman": "lds_var",
    "w2_influence_spearman": "lds_w2",
    "distribution_skill": "lds_distribution_skill",
    "loo_seed_pearson": "lds_seed_pearson",
    "loo_seed_spearman": "lds_seed_spearman",
}

REGIME_DISTRIBUTIONAL = "distributional"
REGIME_FIXED_SEED = "fixed_seed"
#: Ways to turn bootstrap replicates into an interval (see :func:`score_method`).
CI_METHODS: tuple[str, ...] = ("centered", "percentile")


def metric_names(is_distributional: bool = True) -> tuple[str, ...]:
    """Return the score names reported for a method, in reporting order.

    Args:
        is_distributional: ``False`` for ranking-only methods, which get only
            ``loo_mean_spearman`` and ``loo_seed_spearman``.

    Returns:
        The distributional names followed by the fixed-seed names, or :data:`SCORE_NAMES_RANKING_ONLY`.
    """
    if is_distributional:
        return SCORE_NAMES_DISTRIBUTIONAL + SCORE_NAMES_FIXED_SEED
    return SCORE_NAMES_RANKING_ONLY


def _regime(metric: str) -> str:
    return REGIME_FIXED_SEED if metric in SCORE_NAMES_FIXED_SEED else REGIME_DISTRIBUTIONAL


def _crossfit_metrics(is_distributional: bool) -> tuple[str, ...]:
    return tuple(m for m in metric_names(is_distributional) if _regime(m) == REGIME_DISTRIBUTIONAL)


def _fixed_seed_metrics(is_distributional: bool) -> tuple[str, ...]:
    return tuple(m for m in metric_names(is_distributional) if _regime(m) == REGIME_FIXED_SEED)
