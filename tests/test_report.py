"""Tests of benchmark.report on a small synthetic results directory (no training, no torch)."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from benchmark.report import write_index, write_report

TASK, SCALE = "toy_task", "tiny"
S, K, Q = 8, 6, 5
MEASUREMENTS = ("loss", "margin")
METHODS = ("unroll", "influence", "zero", "random")
DIST_METRICS = (
    "loo_mean_spearman",
    "loo_mean_pearson",
    "var_influence_spearman",
    "w2_influence_spearman",
    "distribution_skill",
)
FIXED_METRICS = ("loo_seed_pearson", "loo_seed_spearman")
RANKING_ONLY = {"influence"}
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
IMAGE_RE = re.compile(r"!\[[^\]]*\]\(([^)\s]+)\)")
LEADERBOARD_COLUMNS = [
    "schema_version", "task", "scale", "method", "variant", "measurement", "metric", "regime", "coupling",
    "value", "ci_low", "ci_high", "noise_ceiling", "n_seeds", "n_targets", "n_queries", "n_failed",
    "distributional", "runtime_s", "peak_rss_mb", "config_hash", "version", "commit", "device",
    "torch_version",
]  # fmt: skip


def _lb_row(method: str, measurement: str, metric: str, regime: str, value: float, task: str = TASK) -> dict:
    ceiling = math.nan if regime == "cost" else (1.0 if regime == "fixed_seed" else 0.8)
    variant = "reference" if method in ("zero", "random") else ""
    return {
        "schema_version": 1, "task": task, "scale": SCALE, "method": method, "variant": variant,
        "measurement": measurement, "metric": metric, "regime": regime, "coupling": "masked",
        "value": value, "ci_low": value - 0.1, "ci_high": value + 0.1, "noise_ceiling": ceiling,
        "n_seeds": S, "n_targets": K, "n_queries": Q, "n_failed": 1,
        "distributional": method not in RANKING_ONLY, "runtime_s": 1.5, "peak_rss_mb": 321.0,
        "config_hash": "abc123", "version": "0.1.0", "commit": "deadbeef", "device": "cpu",
        "torch_version": "2.x",
    }  # fmt: skip


def _write_leaderboard(out_dir: Path, rng: np.random.Generator) -> None:
    rows = []
    for method in METHODS:
        for meas in MEASUREMENTS:
            for metric in DIST_METRICS:
                defined = method not in RANKING_ONLY or metric == "loo_mean_spearman"
                value = float(rng.uniform(0.1, 0.7)) if defined else math.nan
                rows.append(_lb_row(method, meas, metric, "distributional", value))
            for metric in FIXED_METRICS:
                defined = method not in RANKING_ONLY or metric == "loo_seed_spearman"
                rows.append(
                    _lb_row(
                        method,
                        meas,
                        metric,
                        "fixed_seed",
                        float(rng.uniform(0, 0.5)) if defined else math.nan,
                    )
                )
        rows.append(_lb_row(method, "all", "runtime_rel_training", "cost", float(rng.uniform(0.5, 5))))
    rows.append(_lb_row("othermethod", "loss", "loo_mean_spearman", "distributional", 0.9, task="other_task"))
    pd.DataFrame(rows, columns=LEADERBOARD_COLUMNS).to_csv(out_dir / "leaderboard.csv", index=False)


def _make_out_dir(root: Path, optional: bool = True) -> Path:
    """A results directory with every input of write_report (optional ones only if ``optional``)."""
    rng = np.random.default_rng(0)
    out_dir = root / "results"
    run_dir = out_dir / TASK / SCALE
    (run_dir / "predictions").mkdir(parents=True)
    m = len(MEASUREMENTS)
    full = rng.normal(size=(S, 1, Q, m))
    true_effect = rng.normal(scale=0.5, size=(1, K, Q, m))
    removed = full + true_effect + rng.normal(scale=0.2, size=(S, K, Q, m))
    measurements = np.concatenate([full, removed], axis=1)
    np.savez(
        run_dir / "ground_truth.npz",
        measurements=measurements,
        measurement_names=np.array(MEASUREMENTS),
        targets=np.arange(10, 10 + K),
        queries=np.arange(100, 100 + Q),
        seeds=np.arange(S),
        coupling=np.array("masked"),
        n_failed=np.array(1),
        diag_train_acc=rng.uniform(0.9, 1.0, size=S),
        diag_test_acc=rng.uniform(0.8, 0.9, size=S),
        diag_grad_norm=rng.uniform(0.0, 0.1, size=S),
    )
    deltas = {
        "unroll": (removed - full) + rng.normal(scale=0.1, size=(S, K, Q, m)),
        "influence": np.broadcast_to(true_effect * 3.0, (S, K, Q, m)),
        "zero": np.zeros((S, K, Q, m)),
        "random": rng.normal(size=(S, K, Q, m)),
    }
    for method, delta in deltas.items():
        np.savez(
            run_dir / "predictions" / f"{method}.npz", delta=delta, measurement_names=np.array(MEASUREMENTS)
        )
    _write_leaderboard(out_dir, rng)
    svs = []
    for method in METHODS:
        for meas in MEASUREMENTS:
            metrics = ("loo_mean_spearman", "loo_seed_spearman") if method in RANKING_ONLY else DIST_METRICS
            for metric in metrics:
                for n in (2, 4, 8):
                    value = math.nan if (n == 2 and metric.startswith(("var_", "w2_"))) else 0.05 * n
                    svs.append(
                        {
                            "method": method, "measurement": meas, "metric": metric, "n_seeds": n,
                            "value_mean": value, "value_se": math.nan if n == 8 else 0.02,
                            "ceiling_mean": 0.1 * n, "ceiling_se": 0.01,
                        }
                    )  # fmt: skip
    pd.DataFrame(svs).to_csv(run_dir / "score_vs_seeds.csv", index=False)
    if optional:
        pd.DataFrame(
            [
                {"measurement": "loss", "metric": "loo_mean_spearman", "method_a": "unroll",
                 "method_b": "influence", "diff": 0.2, "ci_low": 0.05, "ci_high": 0.35},
                {"measurement": "margin", "metric": "loo_mean_spearman", "method_a": "unroll",
                 "method_b": "random", "diff": 0.1, "ci_low": -0.05, "ci_high": 0.25},
            ]
        ).to_csv(run_dir / "paired_differences.csv", index=False)  # fmt: skip
        info = {
            "ground_truth_s": 12.5,
            "train_one_s": 0.25,
            "methods": {"unroll": {"runtime_s": 3.0}, "influence": {"runtime_s": 1.0, "damping": 0.001}},
        }
        (run_dir / "run_info.json").write_text(json.dumps(info))
    return out_dir


def _linked_images(md_path: Path) -> list[Path]:
    links = IMAGE_RE.findall(md_path.read_text(encoding="utf-8"))
    return [md_path.parent / link for link in links]


def _assert_images_ok(md_path: Path) -> list[Path]:
    images = _linked_images(md_path)
    assert images, f"no images linked from {md_path}"
    for image in images:
        assert image.is_file(), f"{md_path} links to missing {image}"
        data = image.read_bytes()
        assert len(data) > 1000 and data.startswith(PNG_MAGIC), image
    return images


@pytest.fixture(scope="module")
def report(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    out_dir = _make_out_dir(tmp_path_factory.mktemp("report"))
    section = write_report(out_dir, TASK, SCALE)
    index = write_index(out_dir, [section])
    return out_dir, section, index


def test_section_content(report: tuple[Path, Path, Path]) -> None:
    out_dir, section, _ = report
    assert section == out_dir / TASK / SCALE / "report.md"
    text = section.read_text(encoding="utf-8")
    for method in METHODS:
        assert method in text
    for metric in (*DIST_METRICS, *FIXED_METRICS, "runtime_rel_training", "runtime_s", "peak_rss_mb"):
        assert metric in text
    assert "othermethod" not in text  # another task's rows are filtered out
    assert "removed minus full" in text
    assert "masked" in text and f"S = {S}" in text and f"K = {K}" in text and f"Q = {Q}" in text
    assert "noise ceiling" in text
    assert "—" in text  # ranking-only methods lack distributional scores
    assert "## Paired differences" in text and "unroll − influence" in text
    assert "## Wall time" in text and "ground_truth_s" in text and "damping" in text
    assert "train_acc" in text and "grad_norm" in text
    assert "At n = 8 seeds" in text


def test_section_images(report: tuple[Path, Path, Path]) -> None:
    _, section, _ = report
    images = _assert_images_ok(section)
    names = {p.name for p in images}
    for meas in MEASUREMENTS:
        assert f"mean_effect_{meas}.png" in names
        assert f"score_vs_seeds_{meas}.png" in names
    assert {"loo_law_loss.png", "signal_to_noise.png", "diagnostics.png"} <= names
    assert all(p.parent == section.parent / "plots" for p in images)


def test_index(report: tuple[Path, Path, Path]) -> None:
    out_dir, _, index = report
    assert index == out_dir / "report.md"
    text = index.read_text(encoding="utf-8")
    assert text.startswith("# ")
    assert f"## {TASK} / {SCALE}" in text  # section headings are demoted one level
    links = IMAGE_RE.findall(text)
    assert links and all(link.startswith(f"{TASK}/{SCALE}/plots/") for link in links)
    _assert_images_ok(index)


def test_no_temporary_files_left(report: tuple[Path, Path, Path]) -> None:
    out_dir, _, _ = report
    assert not [p for p in out_dir.rglob("*") if p.name.endswith(".tmp")]


def test_optional_inputs_absent(tmp_path: Path) -> None:
    out_dir = _make_out_dir(tmp_path, optional=False)
    (out_dir / TASK / SCALE / "score_vs_seeds.csv").unlink()
    section = write_report(out_dir, TASK, SCALE)
    text = section.read_text(encoding="utf-8")
    assert "Paired differences" not in text and "Wall time" not in text
    assert "score_vs_seeds.csv` not found" in text
    _assert_images_ok(section)


def test_missing_ground_truth(tmp_path: Path) -> None:
    out_dir = _make_out_dir(tmp_path, optional=False)
    gt_path = out_dir / TASK / SCALE / "ground_truth.npz"
    gt_path.unlink()
    with pytest.raises(FileNotFoundError, match=re.escape(str(gt_path))):
        write_report(out_dir, TASK, SCALE)


def test_missing_section(tmp_path: Path) -> None:
    missing = tmp_path / "nope" / "report.md"
    with pytest.raises(FileNotFoundError, match=re.escape(str(missing))):
        write_index(tmp_path, [missing])
