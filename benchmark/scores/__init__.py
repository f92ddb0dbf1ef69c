"""Scores, noise ceilings and bootstrap confidence intervals for (distributional) TDA methods.

Conventions (shared with the rest of the suite)
-----------------------------------------------
Axes: ``S`` seeds, ``K`` removal targets, ``Q`` queries. Effects are **removed minus full**.
For ONE measurement (e.g. test loss) a method is scored from three float64 arrays:

* ``full``    ``[S, Q]``    true measurement of the full-data run of seed ``s``;
* ``removed`` ``[S, K, Q]`` true measurement of the run without target ``k`` for seed index ``s``
  (paired with ``full[s]`` under masked/deleted coupling, an independent seed under independent
  coupling; the code is the same either way);
* ``delta``   ``[S, K, Q]`` the method's per-seed prediction of ``removed − full``; the predicted
  leave-one-out (LOO) sample is ``full[s, q] + delta[s, k, q]`` (d-TDA, Alg. 1).

Two regimes
-----------
**Distributional, cross-fitted.** The seed indices are split at random into equal halves A and B
(``h = ⌊S/2⌋`` each; one seed is dropped when ``S`` is odd). The method's quantities come from half B
only (``full_B``, ``delta_B``), the truth from half A only (``full_A``, ``removed_A``), so the seed noise
of the truth is independent of everything the method is scored on. Per ``(k, q)``:

* mean effect: true ``mean_A(removed) − mean_A(full)``; predicted ``mean_B(delta)``;
* variance change: true ``var_A(removed) − var_A(full)`` (ddof=1); predicted
  ``var_B(full_B + delta_B) − var_B(full_B)``;
* W2 influence: true ``W̃2²(full_A, removed_A)``; predicted ``W̃2²(full_B, full_B + delta_B)``,

with ``W̃2²`` the debiased squared 1-D Wasserstein distance (:func:`debiased_w2_squared`). The scores
``loo_mean_spearman``, ``loo_mean_pearson``, ``var_influence_spearman`` and ``w2_influence_spearman``
correlate prediction and truth across targets ``k`` for each query, then average over queries;
``distribution_skill`` compares whole predicted LOO distributions with the true ones. Point
estimates average ``n_splits`` random splits.

**Fixed seed** (all seeds, no split). ``loo_seed_pearson`` / ``loo_seed_spearman`` correlate, per
query, ``delta[s, k, q]`` with the realised per-seed effect ``removed[s, k, q] − full[s, q]`` over all
``(s, k)`` pairs, then average over queries.

Noise ceiling
-------------
Every score is also computed, by the same procedure (same splits, same bootstrap indices), for the
oracle ``delta_oracle = removed − full[:, None, :]``, which knows each seed's realised effect. In the
cross-fitted regime the oracle is still limited by the finite number of seeds (its half-B
quantities are noisy estimates of the half-A truth), which is what the ceiling measures. In the
fixed-seed regime the oracle correlates its effect with itself, so the ceiling is exactly 1.0.
A method that knows the *expected* effect can score above the cross-fitted ceiling (it carries no
seed noise at all); the ceiling is the attainable score of a perfect per-seed predictor.

Bootstrap
---------
Percentile confidence intervals from ``n_boot`` replicates that resample seeds, targets and queries
jointly. Cross-fitted replicate: one fresh random A/B partition of the original seeds, then
resampling with replacement *within* A and *within* B (a seed never appears in both halves), plus
resampled target and query indices (the same for truth and prediction). Fixed-seed replicate:
seeds, targets and queries resampled with replacement. The indices depend only on
``(S, K, Q, seed)`` (:func:`make_resampling_plan`), so two methods scored with the same ``seed`` see
identical replicates and their difference can be bootstrapped replicate by replicate
(:func:`paired_difference_ci`). Because a replicate re-adds seed noise on top of the sample's own,
noise-limited scores are attenuated in the raw replicates relative to the point estimate (a raw
percentile interval can exclude it). By default (``ci_method="centered"``) each metric's replicates
are therefore shifted to have the point estimate as their mean before the percentile interval is
taken; ``ci_method="percentile"`` keeps them raw (see :func:`score_method`).

Everything is vectorised over targets and queries (loops only over splits and replicates).

Modules
-------
* :mod:`~benchmark.scores.metrics` — score names, regimes, :func:`metric_names`;
* :mod:`~benchmark.scores.validation` — shape and finiteness checks of ``full``, ``removed``, ``delta``;
* :mod:`~benchmark.scores.ranks` — average ranks, plain and under multiplicity weights;
* :mod:`~benchmark.scores.stats` — (debiased) W2², row-wise Pearson / Spearman, :func:`signal_to_noise`;
* :mod:`~benchmark.scores.resampling` — splits, bootstrap plans, percentile and paired-difference CIs;
* :mod:`~benchmark.scores.cross_fit` — the cross-fitted regime, :func:`score_split`;
* :mod:`~benchmark.scores.fixed_seed` — the fixed-seed regime;
* :mod:`~benchmark.scores.scoring` — :func:`score_method`, :func:`bootstrap_replicates`;
* :mod:`~benchmark.scores.seed_curves` — :func:`score_vs_seeds`.
"""

from __future__ import annotations

from benchmark.scores.cross_fit import score_split
from benchmark.scores.fixed_seed import _FixedSeed  # noqa: F401  (private; tests reach it as scores._FixedSeed)
from benchmark.scores.metrics import (
    CI_METHODS,
    REGIME_DISTRIBUTIONAL,
    REGIME_FIXED_SEED,
    SCORE_NAMES_DISTRIBUTIONAL,
    SCORE_NAMES_FIXED_SEED,
    SCORE_NAMES_RANKING_ONLY,
    metric_names,
)
from benchmark.scores.ranks import _average_ranks  # noqa: F401  (private; tests reach it as scores._average_ranks)
from benchmark.scores.resampling import (
    BootstrapReplicate,
    CrossFitSplit,
    ResamplingPlan,
    make_resampling_plan,
    paired_difference_ci,
)
from benchmark.scores.scoring import ScoreResult, bootstrap_replicates, score_method
from benchmark.scores.seed_curves import score_vs_seeds
from benchmark.scores.stats import (
    debiased_w2_squared,
    rowwise_pearson,
    rowwise_spearman,
    signal_to_noise,
    w2_squared,
)

__all__ = [
    "CI_METHODS",
    "REGIME_DISTRIBUTIONAL",
    "REGIME_FIXED_SEED",
    "SCORE_NAMES_DISTRIBUTIONAL",
    "SCORE_NAMES_FIXED_SEED",
    "SCORE_NAMES_RANKING_ONLY",
    "BootstrapReplicate",
    "CrossFitSplit",
    "ResamplingPlan",
    "ScoreResult",
    "bootstrap_replicates",
    "debiased_w2_squared",
    "make_resampling_plan",
    "metric_names",
    "paired_difference_ci",
    "rowwise_pearson",
    "rowwise_spearman",
    "score_method",
    "score_split",
    "score_vs_seeds",
    "signal_to_noise",
    "w2_squared",
]
