"""Markdown report and plots for one (task, scale), built only from files the harness has written.

Inputs, all under ``out_dir`` (see the README for their schemas), read by :mod:`.inputs`:

* ``leaderboard.csv`` — the tidy leaderboard (may hold several tasks/scales; filtered here);
* ``<task>/<scale>/ground_truth.npz`` — ``measurements [S, 1+K, Q, M]`` (column 0 = full run),
  ``measurement_names``, ``targets``, ``queries``, ``coupling``, ``n_failed`` and ``diag_*`` arrays;
* ``<task>/<scale>/predictions/<method>.npz`` — ``delta [S, K, Q, M]`` and ``measurement_names``;
* ``<task>/<scale>/score_vs_seeds.csv`` — scores and noise ceilings against the number of seeds;
* ``<task>/<scale>/paired_differences.csv`` (optional) — bootstrap CIs of method differences;
* ``<task>/<scale>/further_training_curves.csv`` (optional) — every method's cosine and Spearman to the
  further-training gold standard (Wei et al. 2024) per further-training epoch;
* ``<task>/<scale>/run_info.json`` (optional) — wall times per stage and method settings.

Outputs: PNGs in ``<task>/<scale>/plots/``, the section ``<task>/<scale>/report.md``
(:func:`write_report`) and the top-level ``report.md`` (:func:`write_index`). Every file is
written atomically and figures are drawn on explicit Agg canvases, never through ``pyplot``
(:mod:`.output`).

Modules: :mod:`.inputs` (loading and validating the result files), :mod:`.markdown` (number
formatting, tables, links), :mod:`.tables` (leaderboard, cost, paired-difference and wall-time
tables), :mod:`.plots` (effect, score-vs-seeds and further-training figures), :mod:`.diagnostics`
(signal to noise and training diagnostics), :mod:`.output` (atomic files, figures) and :mod:`.document`
(assembling the section and the index).

Sign convention: every effect is **removed minus full**, ``Δm[s, k, q] = m_q(θ_s without k) − m_q(θ_s)``.
"""

from __future__ import annotations

from .document import write_index, write_report
from .inputs import REFERENCE_METHODS

__all__ = [
    "REFERENCE_METHODS",
    "write_index",
    "write_report",
]
