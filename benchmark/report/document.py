"""Assembling the markdown documents: a section per (task, scale) and the top-level index."""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import pandas as pd

from .diagnostics import diagnostics_section
from .inputs import (
    FloatArray,
    GroundTruth,
    load_ground_truth,
    load_leaderboard,
    load_predictions,
    measurement_order,
    missing_columns,
    read_optional_csv,
    require,
)
from .markdown import fmt, image, md_table, rel
from .output import write_markdown
from .plots import (
    FURTHER_TRAINING_COLUMNS,
    SCORE_VS_SEEDS_COLUMNS,
    plot_further_training_curves,
    plot_loo_law,
    plot_mean_effects,
    plot_score_vs_seeds,
)
from .replication import replication_lines
from .tables import (
    leaderboard_section,
    paired_section,
    provenance,
    ranking_only_methods,
    run_info_section,
    score_table,
)

_SIGN_SENTENCE = (
    "Sign convention: every effect is **removed minus full**, "
    "Δm[s, k, q] = m_q(θ_s without target k) − m_q(θ_s); e.g. a positive loss effect means that "
    "removing the target raises the query's loss."
)
_LINK_RE = re.compile(r"(!?\[[^\]]*\]\()([^)\s]+)(\))")


# ----------------------------------------------------------------------------------------------
# One (task, scale)
# ----------------------------------------------------------------------------------------------


def _header_lines(task: str, scale: str, gt: GroundTruth, methods: list[str]) -> list[str]:
    n_seeds, k1, n_queries, _ = gt.measurements.shape
    return [
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


def _mean_effect_lines(
    gt: GroundTruth, preds: Mapping[str, FloatArray], ranking_only: set[str], plot_dir: Path, base: Path
) -> list[str]:
    mean_plots = plot_mean_effects(gt, preds, ranking_only, plot_dir)
    if not mean_plots:
        return ["No predictions of non-reference methods were found.", ""]
    lines = [
        (
            "True: mean over seeds of `removed − full` per (target, query); predicted: mean over seeds "
            "of the method's `delta`. Dashed line: y = x (omitted for ranking-only methods, whose scale "
            "is arbitrary); r is Pearson's correlation over all (target, query) pairs."
        ),
        "",
    ]
    for meas, path, rs in mean_plots:
        summary = ", ".join(f"{m} r = {fmt(r)}" for m, r in rs.items())
        lines += [*image(f"mean effect {meas}", path, base), f"`{meas}`: {summary}.", ""]
    return lines


def _loo_law_lines(
    gt: GroundTruth, preds: Mapping[str, FloatArray], ranking_only: set[str], plot_dir: Path, base: Path
) -> list[str]:
    law = plot_loo_law(gt, preds, ranking_only, plot_dir)
    if law is None:
        return []
    path, meas, described = law
    return [
        "## LOO laws of the most-affected pairs",
        "",
        (
            f"The three (target, query) pairs with the largest |true mean effect| on `{meas}`: the "
            "full-run samples m_q(θ_s), the true removed samples, and each distributional method's "
            "predicted LOO samples m_q(θ_s) + delta[s, k, q]."
        ),
        "",
        *image(f"LOO law {meas}", path, base),
        "True mean effects: " + "; ".join(described) + ".",
        "",
    ]


def _score_vs_seeds_lines(svs: pd.DataFrame | None, gt: GroundTruth, plot_dir: Path, base: Path) -> list[str]:
    lines = ["## Score vs number of seeds", ""]
    if svs is None:
        return lines + ["`score_vs_seeds.csv` not found.", ""]
    note = missing_columns(svs, set(SCORE_VS_SEEDS_COLUMNS), "score_vs_seeds.csv")
    if note:
        return lines + [note, ""]
    lines += [
        (
            "Each score (mean ± SE over random seed subsets) against the number of seeds n it is "
            "computed from; dashed black: the noise ceiling (oracle) at the same n."
        ),
        "",
    ]
    for meas, path, sentence in plot_score_vs_seeds(svs, gt.measurement_names, plot_dir):
        lines += image(f"score vs seeds {meas}", path, base)
        if sentence:
            lines += [f"`{meas}`: {sentence}", ""]
    return lines


def _further_training_lines(curves: pd.DataFrame, gt: GroundTruth, plot_dir: Path, base: Path) -> list[str]:
    lines = ["## Agreement with the further-training gold standard (Wei et al. 2024)", ""]
    note = missing_columns(curves, set(FURTHER_TRAINING_COLUMNS), "further_training_curves.csv")
    if note:
        return lines + [note, ""]
    lines += [
        (
            "A second ground truth, final-model-only: each seed's final model further trained on D and on "
            "D \\ k (same batch order with k deleted) at lr/10, averaged over further-training seeds disjoint "
            "from the `further_training` method's, diff = LOO − full centred across targets (Wei et al.'s "
            "eqs. 17 and 13; settings under *Run settings*). Per (seed, query): cosine and Spearman over "
            "targets between the method's Δm and the gold diff; mean ± SEM over (seed, query) against "
            "further-training epochs (their Fig. 2). Dashed black: the gold standard's split-half agreement."
        ),
        "",
    ]
    for _, path in plot_further_training_curves(curves, gt.measurement_names, plot_dir):
        lines += image(f"further-training gold {path.stem}", path, base)
    cos = curves[curves["metric"].astype(str) == "cosine"]
    for meas, sub in cos.groupby(cos["measurement"].astype(str), sort=False):
        epochs = sorted({int(e) for e in sub["epoch"]})
        rows = []
        for method, d in sub.groupby(sub["method"].astype(str), sort=False):
            by_epoch = {int(r.epoch): f"{fmt(r.mean)} ± {fmt(r.sem)}" for r in d.itertuples()}
            rows.append([method, *(by_epoch.get(e, "") for e in epochs)])
        header = ["method", *(f"epoch {e}" for e in epochs)]
        lines += [f"Cosine to the gold standard, `{meas}`:", "", md_table(header, rows), ""]
    return lines


def _lds_lines(run_dir: Path, board: pd.DataFrame, measurements: tuple[str, ...], ranking_only: set[str],
               plot_dir: Path, base: Path) -> list[str]:
    """``## Group removal``: the LDS / distributional-LDS tables with ceilings, methods not run, curves."""
    path = run_dir / "lds_ground_truth.npz"
    if not path.is_file() or board.empty:
        return []
    with np.load(path, allow_pickle=False) as z:
        r_seeds, m1, n_q, _ = z["measurements"].shape
        alpha, coupling = float(z["alpha"]), str(z["coupling"][()])
        n_train = int(z["keep"].shape[1])
    lines = [
        "## Group removal: LDS and distributional LDS",
        "",
        (
            f"M = {m1 - 1} random subsets each keeping α = {alpha:g} of the N = {n_train} training examples, "
            f"trained with R = {r_seeds} seeds (coupling **{coupling}**) beside R full-data runs; Q = {n_q} queries. "
            "A method's prediction for a subset is the **sum of its per-example removal effects over the "
            "removed examples** (additivity is the method's assumption). `lds_mean` is the Spearman over "
            "subsets of the predicted and retrained mean effect per query, averaged over queries (the LDS of "
            "TRAK / SOURCE); `lds_var` and `lds_w2` are the distributional LDS of d-TDA eq. 11 (variance "
            "change, debiased W2² between the subset's and the full-data law). Cross-fitting, ceilings and "
            "bootstrap CIs as for LOO, with subsets in the place of targets."
        ),
        "",
    ]
    for meas in measurement_order(measurements, board["measurement"]):
        rows_m = board[(board["measurement"] == meas) & board["regime"].isin(["distributional", "fixed_seed"])]
        if not rows_m.empty:
            lines += [f"### LDS, `{meas}`", "", score_table(rows_m, meas, ranking_only), ""]
    info_path = run_dir / "run_info.json"
    if info_path.is_file():
        lds_info = json.loads(info_path.read_text()).get("lds", {})
        skipped = {m: v["skipped"] for m, v in lds_info.get("methods", {}).items() if "skipped" in v}
        if skipped:
            lines += ["Not run for LDS (it needs Δm for all N training examples):", ""]
            lines += [f"- `{m}`: {why}" for m, why in skipped.items()] + [""]
    svs = read_optional_csv(run_dir / "lds_score_vs_seeds.csv")
    if svs is not None and not missing_columns(svs, set(SCORE_VS_SEEDS_COLUMNS), "lds_score_vs_seeds.csv"):
        lines += ["LDS scores against the number of seeds (mean ± SE over seed subsets; dashed: ceiling).", ""]
        for meas, png, sentence in plot_score_vs_seeds(svs, measurements, plot_dir, prefix="lds_"):
            lines += image(f"LDS score vs seeds {meas}", png, base)
            if sentence:
                lines += [f"`{meas}`: {sentence}", ""]
    return lines


def write_report(out_dir: Path, task: str, scale: str) -> Path:
    """Write the plots and the markdown section of one (task, scale).

    Reads only files the harness has already written under ``out_dir`` (see the package docstring),
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
    if not (run_dir / "ground_truth.npz").is_file() and (run_dir / "pruning_summary.csv").is_file():
        from .pruning_section import write_pruning_report

        return write_pruning_report(out_dir, task, scale)
    if not (run_dir / "ground_truth.npz").is_file() and (run_dir / "lds_ground_truth.npz").is_file():
        return _write_lds_only_report(out_dir, task, scale)
    gt = load_ground_truth(run_dir / "ground_truth.npz")
    board = load_leaderboard(out_dir / "leaderboard.csv", task, scale, gt.coupling)
    is_lds = board["metric"].str.startswith("lds_")
    board, lds_board = board[~is_lds].reset_index(drop=True), board[is_lds].reset_index(drop=True)
    preds, pred_notes = load_predictions(run_dir / "predictions", gt)
    ranking_only = ranking_only_methods(board)
    plot_dir = run_dir / "plots"
    plot_dir.mkdir(parents=True, exist_ok=True)
    md_path = run_dir / "report.md"
    base = md_path.parent

    lines = _header_lines(task, scale, gt, list(dict.fromkeys([*board["method"], *preds])))
    prov = provenance(board)
    if prov:
        lines += [prov, ""]
    lines += leaderboard_section(board, gt.measurement_names, ranking_only)
    lines += ["## Predicted vs true mean effect", ""]
    lines += [f"- {note}" for note in pred_notes] + ([""] if pred_notes else [])
    lines += _mean_effect_lines(gt, preds, ranking_only, plot_dir, base)
    lines += _loo_law_lines(gt, preds, ranking_only, plot_dir, base)
    lines += _score_vs_seeds_lines(read_optional_csv(run_dir / "score_vs_seeds.csv"), gt, plot_dir, base)
    gold_curves = read_optional_csv(run_dir / "further_training_curves.csv")
    if gold_curves is not None:
        lines += _further_training_lines(gold_curves, gt, plot_dir, base)
    lines += _lds_lines(run_dir, lds_board, gt.measurement_names, ranking_only, plot_dir, base)
    if (run_dir / "mechanism.csv").is_file():
        from .mechanism_section import mechanism_report_lines

        lines += mechanism_report_lines(run_dir, plot_dir, base)
    lines += replication_lines(run_dir)
    lines += diagnostics_section(gt, plot_dir, base)
    paired_df = read_optional_csv(run_dir / "paired_differences.csv")
    if paired_df is not None:
        lines += paired_section(paired_df)
    if (run_dir / "run_info.json").is_file():
        lines += run_info_section(run_dir / "run_info.json")

    write_markdown(md_path, lines)
    return md_path


def _write_lds_only_report(out_dir: Path, task: str, scale: str) -> Path:
    """The section of a run with ``--eval lds`` only (no leave-one-out ground truth)."""
    run_dir = out_dir / task / scale
    lds_gt = load_ground_truth(run_dir / "lds_ground_truth.npz")
    board = load_leaderboard(out_dir / "leaderboard.csv", task, scale, lds_gt.coupling)
    board = board[board["metric"].str.startswith("lds_")].reset_index(drop=True)
    plot_dir = run_dir / "plots"
    plot_dir.mkdir(parents=True, exist_ok=True)
    md_path = run_dir / "report.md"
    lines = [f"# {task} / {scale}", "", _SIGN_SENTENCE, ""]
    lines += _lds_lines(run_dir, board, lds_gt.measurement_names, ranking_only_methods(board), plot_dir, md_path.parent)
    if (run_dir / "run_info.json").is_file():
        lines += run_info_section(run_dir / "run_info.json")
    write_markdown(md_path, lines)
    return md_path


# ----------------------------------------------------------------------------------------------
# The index
# ----------------------------------------------------------------------------------------------


def _rebase_links(text: str, src_dir: Path, dst_dir: Path) -> str:
    """Rewrite relative markdown links in ``text`` (relative to ``src_dir``) to be relative to ``dst_dir``."""

    def repl(m: re.Match[str]) -> str:
        target = m.group(2)
        if re.match(r"^[a-zA-Z][a-zA-Z0-9+.-]*:", target) or target.startswith(("/", "#")):
            return m.group(0)
        resolved = os.path.normpath(os.path.join(os.path.abspath(src_dir), target))
        return m.group(1) + rel(Path(resolved), Path(os.path.abspath(dst_dir))) + m.group(3)

    return _LINK_RE.sub(repl, text)


def _intro_lines() -> list[str]:
    return [
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
    ]


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
        require(section, "report section")
        body = _rebase_links(section.read_text(encoding="utf-8"), section.parent, out_dir)
        body = re.sub(r"^(#{1,5}) ", r"#\1 ", body, flags=re.MULTILINE)
        texts.append((section, body.strip()))
    contents = [f"- {rel(s.parent, out_dir)}" for s, _ in texts]
    lines = [*_intro_lines(), "## Contents", "", *(contents or ["(no sections)"]), ""]
    for _, body in texts:
        lines += ["---", "", body, ""]
    path = out_dir / "report.md"
    write_markdown(path, lines)
    return path
