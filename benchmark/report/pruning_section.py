"""The report's pruning section (d-TDA Fig. 6 layout) and the pruning replication claim.

Reads ``pruning_per_seed.csv`` and ``pruning_summary.csv`` from a pruning task's run folder
(``benchmark.pruning``); draws, per fraction, test accuracy and test loss per arm: one dot per seed and a
diamond at the arm's mean with ± 1 SE.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd

from .markdown import md_table

ARM_ORDER = ("full", "random", "fixed_seed", "distributional", "distributional_var")
CLAIM = "data pruning with distributional influence beats fixed-seed influence (Fig. 6)"
RULE = ("reproduced if distributional − fixed_seed test accuracy has a 95 % CI above 0 (or test loss below 0); "
        "not reproduced if the CI is on the other side; else inconclusive")


def pruning_plot(per_seed: pd.DataFrame, path: Path) -> None:
    """Dots per seed, a diamond per arm mean (± 1 SE), test accuracy and loss, one row per fraction."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    reported = per_seed[per_seed["reported"]]
    fractions = sorted(reported["fraction"].unique())
    fig, axes = plt.subplots(len(fractions), 2, figsize=(10, 3.4 * len(fractions)), squeeze=False)
    rng = np.random.default_rng(0)
    for row, fraction in enumerate(fractions):
        part = reported[reported["fraction"] == fraction]
        arms = [a for a in ARM_ORDER if a in set(part["arm"])]
        for col, metric in enumerate(("test_acc", "test_loss")):
            ax = axes[row, col]
            for i, arm in enumerate(arms):
                v = part[part["arm"] == arm][metric].to_numpy()
                ax.scatter(i + rng.uniform(-0.12, 0.12, len(v)), v, s=14, alpha=0.6, color=f"C{i}")
                se = v.std(ddof=1) / math.sqrt(len(v)) if len(v) > 1 else 0.0
                ax.errorbar(i, v.mean(), yerr=se, fmt="D", color="black", markersize=7, capsize=4)
            ax.set_xticks(range(len(arms)), [a.replace("_", "\n") for a in arms], fontsize=8)
            ax.set_ylabel(metric.replace("_", " "))
            ax.set_title(f"{int(round(fraction * 100))} % pruned: {metric.replace('_', ' ')}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def pruning_claim(summary: pd.DataFrame) -> dict[str, str]:
    """The replication row from the distributional − fixed_seed paired differences (every fraction)."""
    rows = summary[(summary["arm"] == "distributional") & summary["metric"].isin(["test_acc", "test_loss"])]
    if rows.empty or "diff_vs_fixed_seed" not in rows:
        return {"value": "—", "CI": "—", "verdict": "not tested"}
    values, cis, verdicts = [], [], []
    for r in rows.itertuples():
        sign = 1.0 if r.metric == "test_acc" else -1.0  # improvement: accuracy up, loss down
        lo, hi = sign * r.diff_vs_fixed_seed_ci_low, sign * r.diff_vs_fixed_seed_ci_high
        lo, hi = min(lo, hi), max(lo, hi)
        values.append(f"{r.metric} {r.fraction:g}: {r.diff_vs_fixed_seed:+.4f}")
        cis.append(f"[{r.diff_vs_fixed_seed_ci_low:+.4f}, {r.diff_vs_fixed_seed_ci_high:+.4f}]")
        verdicts.append("reproduced" if lo > 0 else ("not reproduced" if hi < 0 else "inconclusive"))
    verdict = ("reproduced" if "reproduced" in verdicts and "not reproduced" not in verdicts
               else "not reproduced" if "not reproduced" in verdicts and "reproduced" not in verdicts
               else "inconclusive")
    return {"value": "; ".join(values), "CI": "; ".join(cis), "verdict": verdict}


def pruning_report_lines(run_dir: Path, plot_dir: Path, base: Path) -> list[str]:
    """``## Data pruning``: the figure, the summary table and the verdict."""
    per_seed = pd.read_csv(run_dir / "pruning_per_seed.csv")
    summary = pd.read_csv(run_dir / "pruning_summary.csv")
    plot = plot_dir / "pruning.png"
    pruning_plot(per_seed, plot)
    seeds = int(summary["n_seeds"].max())
    header = ["fraction", "arm", "metric", "mean ± SE", "Δ vs full [95 % CI]", "Δ vs fixed_seed [95 % CI]",
              "MDE vs fixed_seed"]
    table = []
    for r in summary.itertuples():
        def diff(ref: str, row: object = r) -> str:
            d = getattr(row, f"diff_vs_{ref}", float("nan"))
            if not isinstance(d, float) or not math.isfinite(d):
                return "—"
            return (f"{d:+.4f} [{getattr(row, f'diff_vs_{ref}_ci_low'):+.4f}, "
                    f"{getattr(row, f'diff_vs_{ref}_ci_high'):+.4f}]")

        mde = getattr(r, "mde_vs_fixed_seed", float("nan"))
        arm = r.arm + (f" (c = {r.c:g})" if r.arm == "distributional_var" else "")
        table.append([f"{r.fraction:g}", arm, r.metric, f"{r.mean:.4f} ± {r.se:.4f}", diff("full"),
                      diff("fixed_seed"), f"{mde:.4f}" if isinstance(mde, float) and math.isfinite(mde) else "—"])
    claim = pruning_claim(summary)
    rel = plot.relative_to(base).as_posix()
    return ["## Data pruning (d-TDA Fig. 6)", "",
            (f"{seeds} seeds trained on the pool; each example scored by the predicted change of the mean "
             "validation loss on its removal; every arm retrained on its pruned set (re-batched) with the same "
             "seeds. Dots: one seed; diamonds: the arm's mean ± 1 SE. The risk-averse arm's c was chosen on the "
             "validation loss. Differences are paired by seed; MDE is the minimum detectable paired difference "
             "at 80 % power with these seeds."), "",
            f"![pruning]({rel})", "", md_table(header, table), "",
            f"**Verdict** ({RULE}): {claim['verdict']} — distributional − fixed_seed: {claim['value']}, "
            f"95 % CI {claim['CI']}.", ""]


def pruning_replication_row(out_dir: Path, scale: str) -> dict[str, str] | None:
    """The claim's figures from ``<out>/vit_pruning/<scale>/pruning_summary.csv`` when that run exists."""
    path = out_dir / "vit_pruning" / scale / "pruning_summary.csv"
    if not path.is_file():
        return None
    claim = pruning_claim(pd.read_csv(path))
    return {"paper": "d-TDA", "claim": CLAIM, "figure here": f"vit_pruning/{scale}/pruning_summary.csv",
            "value": claim["value"], "CI": claim["CI"], "verdict": claim["verdict"], "rule": RULE}


def write_pruning_report(out_dir: Path, task: str, scale: str) -> Path:
    """The section of a pruning task (no LOO ground truth)."""
    from .output import write_markdown
    from .tables import run_info_section

    run_dir = out_dir / task / scale
    plot_dir = run_dir / "plots"
    plot_dir.mkdir(parents=True, exist_ok=True)
    md_path = run_dir / "report.md"
    lines = [f"# {task} / {scale}", ""] + pruning_report_lines(run_dir, plot_dir, md_path.parent)
    if (run_dir / "run_info.json").is_file():
        lines += run_info_section(run_dir / "run_info.json")
    write_markdown(md_path, lines)
    return md_path
