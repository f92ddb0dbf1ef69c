"""Run one (task, scale): ground truth → methods → scores → leaderboard rows and raw arrays.

Outputs under ``out/<task>/<scale>/``: ``ground_truth.npz``, ``predictions/<method>.npz``
(``delta [S, K, Q, M]`` removed − full per seed), ``score_vs_seeds.csv``, ``paired_differences.csv``,
``run_info.json`` and ``further_training_curves.csv`` (every method against Wei et al.'s further-training
gold standard, ``benchmark.further_training_gold``). With the ``lds`` evaluation (``benchmark.lds``) also
``lds_ground_truth.npz``, ``predictions/lds_<method>.npz`` (``delta [R, M, Q, M_meas]``: each subset's
group prediction, the sum of the method's per-example effects over the removed examples),
``lds_score_vs_seeds.csv`` and ``lds_paired_differences.csv``; its leaderboard rows carry ``lds_*`` metrics.
Method predictions are work units (``benchmark.method_units``: one per chunk of the ground truth's seeds, run by
the same executor as the training), cached in the unit store, so a rerun only computes what changed.
"""

from __future__ import annotations

import dataclasses
import io
import json
import os
import platform
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from benchmark import __version__
from benchmark.config import Coupling, TaskScale
from benchmark.engine import build_schedule, configure_determinism, initial_params, train_models
from benchmark.executors import Executor, ExecutorSpec, make_executor
from benchmark.further_training_gold import (
    SPLIT_HALF,
    build_gold_standard,
    further_training_curves,
    gold_config_for,
    replicate_curve,
    write_curves,
)
from benchmark.ground_truth import GroundTruth, build_ground_truth
from benchmark.lds import build_lds_ground_truth, group_predictions, lds_config_for, lds_metric_name
from benchmark.leaderboard import seed_ranges
from benchmark.method_units import predict_in_units
from benchmark.registry import METHODS, TASKS
from benchmark.scores import paired_difference_ci, score_method, score_vs_seeds
from benchmark.store import UnitStore, atomic_write_bytes, atomic_write_text, content_key
from methods.base import Method, RemovalContext
from tasks.base import Task

REFERENCE_METHODS = ("zero", "random")
EVALUATIONS = ("loo", "lds", "mechanism")
PAIRED_METRICS = ("loo_mean_spearman", "distribution_skill", "loo_seed_spearman")


@dataclass(frozen=True)
class RunOptions:
    task: str
    scale: str
    methods: tuple[str, ...]
    coupling: Coupling | None = None  # None: the scale's default
    n_seeds: int | None = None
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    dtype: torch.dtype = torch.float32
    n_boot: int = 200
    n_splits: int = 20
    progress: bool = True
    further_training_gold: bool = True  # score every method against Wei et al.'s further-training gold standard
    evaluations: tuple[str, ...] = ("loo", "lds", "mechanism")  # subset of EVALUATIONS
    lds_seeds: int | None = None  # None: the task's LDS setting for the scale
    executor: ExecutorSpec = field(default_factory=ExecutorSpec)  # who computes the ground truth's work units


def git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=5,
                             cwd=Path(__file__).resolve().parent.parent)
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def resolve_scale(task_cls: type[Task], opts: RunOptions) -> TaskScale:
    scale = task_cls.scales[opts.scale]
    overrides: dict[str, Any] = {}
    if opts.coupling is not None:
        overrides["coupling"] = opts.coupling
    if opts.n_seeds is not None:
        overrides["n_seeds"] = opts.n_seeds
    return scale.with_overrides(**overrides) if overrides else scale


def time_one_training(task: Task, data: Any, scale: TaskScale) -> float:
    """Wall time of one plain training run (seed 0, full data), in this process."""
    sched = build_schedule(task.name, data.n_train, scale.train, 0, None, Coupling.MASKED)
    theta0 = initial_params(task, [0], data.x_train.dtype, data.x_train.device)
    start = time.perf_counter()
    train_models(task, data, scale.train, [sched], theta0)
    return time.perf_counter() - start


def reference_delta(name: str, gt: GroundTruth) -> np.ndarray:
    """Reference rows. ``zero``: Δ = 0. ``random``: N(0, σ²) with σ the spread of the true per-seed
    effects of each (query, measurement), so it has the truth's scale and no information."""
    true = gt.removed - gt.full[:, None]  # [S, K, Q, M]
    if name == "zero":
        return np.zeros_like(true)
    rng = np.random.default_rng(12345)
    sigma = true.std(axis=(0, 1), keepdims=True)
    return rng.standard_normal(true.shape) * sigma


def run_method(method: Method, ctx: RemovalContext, gt: GroundTruth, store: UnitStore,
               executor: Executor | None = None) -> tuple[np.ndarray, float, float, dict]:
    """Predictions [S, K, Q, M], runtime (s), peak RSS (MB) and info: the method's per-seed work units
    (``benchmark.method_units``) computed by ``executor`` (default local) into the store, or loaded from it."""
    return predict_in_units(method, ctx, gt, store, executor)


def save_npz(path: Path, **arrays: Any) -> None:
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    atomic_write_bytes(path, buf.getvalue())


@dataclass
class Evaluation:
    """One scored comparison: a ground truth whose columns are removals (LOO targets, or LDS subsets),
    the context methods predict from, and how a method's per-example Δm becomes a prediction of those
    columns (identity for LOO; the sum over each subset's removed examples for LDS)."""

    name: str  # "loo" or "lds"
    gt: GroundTruth
    ctx: RemovalContext
    to_columns: Callable[[np.ndarray], np.ndarray]
    metric_name: Callable[[str], str]
    file_prefix: str


def run(opts: RunOptions, out_dir: Path, store: UnitStore) -> list[dict]:
    """Everything for one (task, scale); returns leaderboard rows and writes the raw arrays."""
    configure_determinism(opts.device)
    task_cls = TASKS.get(opts.task)
    scale = resolve_scale(task_cls, opts)
    task = task_cls(scale)
    data = task.load_data().to(opts.device, opts.dtype)
    run_dir = out_dir / opts.task / opts.scale
    info: dict[str, Any] = {"task": opts.task, "scale": opts.scale, "evaluations": list(opts.evaluations),
                            "methods": {}}
    train_one = time_one_training(task, data, scale)
    info["train_one_s"] = train_one
    executor = make_executor(opts.executor)
    info["executor"] = executor.describe()
    common = {"task": opts.task, "scale": opts.scale, "version": __version__, "commit": git_commit(),
              "device": str(opts.device) if opts.device.type == "cpu" else torch.cuda.get_device_name(opts.device),
              "torch_version": torch.__version__}
    rows: list[dict] = []
    if task.experiment == "pruning":  # d-TDA Fig. 6: the task's own experiment, no LOO / LDS ground truth
        from benchmark.pruning import run_pruning

        start = time.perf_counter()
        cfg = task.pruning_config(opts.scale)  # type: ignore[attr-defined]
        rows, pruning_info = run_pruning(task, data, scale, cfg, store, out_dir, run_dir, common, executor,
                                         progress=opts.progress)
        info.update(pruning_info)
        info["pruning_s"] = time.perf_counter() - start
        atomic_write_text(run_dir / "run_info.json", json.dumps(info, indent=2, default=float))
        return rows
    if "loo" in opts.evaluations:
        start = time.perf_counter()
        gt = build_ground_truth(task, data, scale, store, opts.device, progress=opts.progress, executor=executor)
        info["ground_truth_s"] = time.perf_counter() - start
        gt.export(run_dir / "ground_truth.npz")
        ctx = make_context(task, data, scale, gt, torch.as_tensor(gt.targets), opts)
        loo = Evaluation("loo", gt, ctx, to_columns=lambda d: d, metric_name=lambda m: m, file_prefix="")
        predictions, loo_rows = evaluate_methods(loo, opts, store, common, train_one, info["methods"], run_dir,
                                                 executor)
        rows += loo_rows
        if opts.further_training_gold:
            start = time.perf_counter()
            gold = build_gold_standard(ctx, store, gold_config_for(opts.scale, task), executor)
            scored = {name: delta for name, (delta, _) in predictions.items()}
            scored["oracle"] = gt.removed - gt.full[:, None]  # how the retraining truth itself agrees with the gold
            curves = further_training_curves(gold, scored)
            write_curves(run_dir / "further_training_curves.csv", curves)
            rows += gold_rows(curves, loo_rows)
            write_curves(run_dir / "further_training_replicates.csv", replicate_curve(gold))
            info["further_training_gold"] = {**gold.settings(), "wall_s": time.perf_counter() - start}
    evaluations: list[Evaluation] = [loo] if "loo" in opts.evaluations else []
    if "lds" in opts.evaluations:
        start = time.perf_counter()
        lds_cfg = lds_config_for(task, opts.scale)
        if opts.lds_seeds is not None:
            lds_cfg = dataclasses.replace(lds_cfg, n_seeds=opts.lds_seeds)
        lds = build_lds_ground_truth(task, data, scale, lds_cfg, store, opts.device, progress=opts.progress,
                                     executor=executor)
        info["lds_ground_truth_s"] = time.perf_counter() - start
        lds.export(run_dir / "lds_ground_truth.npz")
        ctx = make_context(task, data, scale, lds.gt, torch.arange(data.n_train), opts)
        removed = lds.removed_matrix()
        evaluation = Evaluation("lds", lds.gt, ctx, to_columns=lambda d: group_predictions(d, lds.keep),
                                metric_name=lds_metric_name, file_prefix="lds_")
        info["lds"] = {"n_subsets": lds_cfg.n_subsets, "alpha": lds_cfg.alpha, "n_seeds": lds.gt.measurements.shape[0],
                       "coupling": lds_cfg.coupling.value, "removed_per_subset": float(removed.sum(1).mean()),
                       "methods": {}}
        _, lds_rows = evaluate_methods(evaluation, opts, store, common, train_one, info["lds"]["methods"], run_dir,
                                       executor)
        rows += lds_rows
        info["lds"]["wall_s"] = time.perf_counter() - start
        evaluations.append(evaluation)
    if "mechanism" in opts.evaluations:
        from benchmark.mechanism import run_mechanism  # the d-TDA mechanism study (Fig. 3, Remark 2)

        start = time.perf_counter()
        if task.mechanism_study:
            run_mechanism(opts.task, opts.scale, store, out_dir, opts.device, progress=opts.progress)
        else:
            info["mechanism"] = {"skipped": task.mechanism_skip_reason}
        info["mechanism_s"] = time.perf_counter() - start
        start = time.perf_counter()
        if (source_skip := skip_reason(opts.task, opts.scale, "source", opts.device)) is None:
            segment_study(evaluations, store, opts, run_dir, executor)
        else:  # the segment study is SOURCE run 4 times: skipped where SOURCE itself is
            info["source_segments"] = {"skipped": source_skip}
        info["source_segments_s"] = time.perf_counter() - start
    atomic_write_text(run_dir / "run_info.json", json.dumps(info, indent=2, default=float))
    return rows


def gold_rows(curves: pd.DataFrame, method_rows: list[dict]) -> list[dict]:
    """Leaderboard rows for Wei et al.'s metric: per method, measurement and metric (cosine, Spearman), the
    mean over (seed, query) at the first and the last further-training epoch as ``ft_gold_<metric>_e<E>``
    (regime ``further_training``), CI = mean ± 1.96 SEM, noise ceiling = the gold's own split-half value."""
    base = {r["method"]: r for r in method_rows if r["regime"] == "cost"}
    epochs = sorted({int(e) for e in curves["epoch"]})
    ceiling = {(r.measurement, r.metric, int(r.epoch)): float(r.mean)
               for r in curves[curves["method"] == SPLIT_HALF].itertuples()}
    rows = []
    for r in curves[curves["method"].isin(list(base)) & curves["epoch"].isin({epochs[0], epochs[-1]})].itertuples():
        half = 1.96 * float(r.sem)
        n_seeds = int(round(float(r.n) / base[r.method]["n_queries"]))  # scored on the gold's seeds
        rows.append({**base[r.method], "n_seeds": n_seeds, "measurement": r.measurement,
                     "metric": f"ft_gold_{r.metric}_e{int(r.epoch)}",
                     "regime": "further_training", "value": float(r.mean), "ci_low": float(r.mean) - half,
                     "ci_high": float(r.mean) + half,
                     "noise_ceiling": ceiling.get((r.measurement, r.metric, int(r.epoch)), np.nan)})
    return rows


SOURCE_SEGMENTS = (1, 2, 3, 5)


def segment_study(evaluations: list[Evaluation], store: UnitStore, opts: RunOptions, run_dir: Path,
                  executor: Executor | None = None) -> None:
    """SOURCE with L ∈ ``SOURCE_SEGMENTS`` segments (capped at the number of epochs, one checkpoint per epoch)
    on every evaluation: the primary score per L with CI and ceiling, and the paired bootstrap difference to
    the next smaller L (Bae et al.: more segments should never hurt). Writes ``source_segments.csv``."""
    from methods.source import Source, SourceConfig

    records = []
    for ev in evaluations:
        epochs = ev.ctx.scale.train.epochs
        previous: dict[str, np.ndarray] = {}
        for n_seg in [n for n in SOURCE_SEGMENTS if n <= epochs]:
            method = Source(SourceConfig(n_segments=n_seg))
            per_example, runtime, _, _ = run_method(method, ev.ctx, ev.gt, store, executor)
            delta = ev.to_columns(per_example)
            for j, meas in enumerate(ev.gt.measurement_names):
                res = {r.metric: r for r in score_method(ev.gt.full[..., j], ev.gt.removed[..., j], delta[..., j],
                                                         n_splits=opts.n_splits, n_boot=opts.n_boot, seed=0)}
                r = res["loo_mean_spearman"]
                diff = paired_difference_ci(r.replicates, previous[meas]) if meas in previous else (np.nan,) * 3
                previous[meas] = r.replicates
                records.append({"evaluation": ev.name, "n_segments": n_seg, "measurement": meas,
                                "metric": ev.metric_name(r.metric), "value": r.value, "ci_low": r.ci_low,
                                "ci_high": r.ci_high, "noise_ceiling": r.noise_ceiling, "diff_vs_previous": diff[0],
                                "diff_ci_low": diff[1], "diff_ci_high": diff[2], "runtime_s": runtime})
    buf = io.StringIO()
    pd.DataFrame(records).to_csv(buf, index=False, float_format="%.6g")
    atomic_write_bytes(run_dir / "source_segments.csv", buf.getvalue().encode())


def make_context(task: Task, data: Any, scale: TaskScale, gt: GroundTruth, targets: torch.Tensor,
                 opts: RunOptions) -> RemovalContext:
    """What methods see: the ground truth's seeds and full-run parameters and checkpoints."""
    return RemovalContext(task=task, data=data, scale=scale, theta_full=gt.theta_full.to(opts.device, opts.dtype),
                          seeds=gt.run_seeds, targets=targets, queries=torch.as_tensor(gt.queries),
                          coupling=gt.coupling, progress=opts.progress,
                          checkpoints=gt.checkpoints.to(opts.device, opts.dtype))


def evaluate_methods(ev: Evaluation, opts: RunOptions, store: UnitStore, common: dict, train_one: float,
                     method_info: dict, run_dir: Path, executor: Executor | None = None
                     ) -> tuple[dict[str, tuple[np.ndarray, bool]], list[dict]]:
    """Run every method (cached) and the reference rows on one evaluation; score, write the predictions
    (``predictions/<prefix><method>.npz``), curves and paired differences; return predictions and rows."""
    gt = ev.gt
    common = {**common, "coupling": gt.coupling.value, "n_seeds": gt.measurements.shape[0],
              "n_targets": len(gt.targets), "n_queries": len(gt.queries), "n_failed": gt.n_failed}
    rows: list[dict] = []
    predictions: dict[str, tuple[np.ndarray, bool]] = {}
    n_all = gt.measurements.shape[0]
    replicates: dict[tuple[str, str], dict[str, np.ndarray]] = {}
    for name in (*opts.methods, *REFERENCE_METHODS):
        method_gt = gt
        if name in REFERENCE_METHODS:
            delta, runtime, peak, minfo = reference_delta(name, gt), 0.0, float("nan"), {}
            variant, is_dist, config_hash = "reference", True, content_key(name)
        elif (skip := skip_reason(opts.task, opts.scale, name, opts.device)) is not None:
            method_info[name] = {"skipped": skip}
            rows.append({**common, "method": name, "variant": "skipped", "measurement": "all",
                         "metric": ev.metric_name("skipped"), "regime": "skipped", "value": float("nan")})
            continue
        else:
            method = METHODS.get(name)()
            if ev.name == "lds" and method.lds_skip_reason is not None:
                method_info[name] = {"skipped": method.lds_skip_reason}
                continue
            n_used = method.seeds_used(n_all)
            if opts.progress:
                print(f"[{opts.task}/{opts.scale}/{ev.name}] method {name} ({n_used} seeds) …", flush=True)
            method_gt = gt if n_used == n_all else gt.subset(n_used)
            method_ctx = ev.ctx if n_used == n_all else ev.ctx.subset(n_used)
            per_example, runtime, peak, minfo = run_method(method, method_ctx, method_gt, store, executor)
            delta = ev.to_columns(per_example)
            variant, is_dist = method.variant(), method.is_distributional
            config_hash = content_key(name, method.config_dict(), gt.key)
        save_npz(run_dir / "predictions" / f"{ev.file_prefix}{name}.npz", delta=delta.astype(np.float32),
                 measurement_names=np.array(gt.measurement_names))
        method_info[name] = {"runtime_s": runtime, "peak_rss_mb": peak, **minfo}
        predictions[name] = (delta, is_dist)
        base = {**common, "n_seeds": method_gt.measurements.shape[0], "seeds": seed_ranges(method_gt.run_seeds),
                "method": name, "variant": variant,
                "distributional": is_dist, "runtime_s": runtime, "peak_rss_mb": peak, "config_hash": config_hash}
        method_rows, method_reps = score_rows(method_gt, delta, is_dist, base, opts)
        rows += [{**r, "metric": ev.metric_name(r["metric"])} for r in method_rows]
        replicates.update({(name, meas): reps for meas, reps in method_reps.items()})
        rows.append({**base, "measurement": "all", "metric": ev.metric_name("runtime_rel_training"), "regime": "cost",
                     "value": runtime / train_one})
        if ev.name == "loo":  # logged quantities (e.g. λ, λ/mean eigenvalue), once per method
            rows += [{**base, "measurement": "all", "metric": key, "regime": "info", "value": float(value)}
                     for key, value in minfo.items() if isinstance(value, (int, float))]
    write_curves_and_differences(gt, predictions, replicates, run_dir, ev.file_prefix, ev.metric_name)
    return predictions, rows


def skip_reason(task_name: str, scale_name: str, method: str, device: torch.device) -> str | None:
    """Why ``method`` does not run on this task, scale and device (``Task.skip_reason``), or None. A skipped
    method gets a leaderboard row with regime ``skipped`` and its reason in ``run_info.json``: never silently
    absent."""
    return TASKS.get(task_name).skip_reason(scale_name, method, device.type)


def score_rows(gt: GroundTruth, delta: np.ndarray, is_dist: bool, base: dict, opts: RunOptions
               ) -> tuple[list[dict], dict[str, dict[str, np.ndarray]]]:
    """Leaderboard rows per measurement, and the bootstrap replicates {measurement: {metric: [n_boot]}}.
    Every method uses bootstrap seed 0, so replicates are paired across methods."""
    rows, reps = [], {}
    for j, meas in enumerate(gt.measurement_names):
        results = score_method(gt.full[..., j], gt.removed[..., j], delta[..., j], is_distributional=is_dist,
                               n_splits=opts.n_splits, n_boot=opts.n_boot, seed=0)
        reps[meas] = {r.metric: r.replicates for r in results}
        for r in results:
            rows.append({**base, "measurement": meas, "metric": r.metric, "regime": r.regime, "value": r.value,
                         "ci_low": r.ci_low, "ci_high": r.ci_high, "noise_ceiling": r.noise_ceiling})
    return rows, reps


def write_curves_and_differences(gt: GroundTruth, predictions: dict[str, tuple[np.ndarray, bool]],
                                 replicates: dict[tuple[str, str], dict[str, np.ndarray]], run_dir: Path,
                                 prefix: str = "", metric_name: Callable[[str], str] = lambda m: m) -> None:
    """Score-vs-seeds curves for every method, and paired bootstrap differences between methods
    (``<prefix>score_vs_seeds.csv``, ``<prefix>paired_differences.csv``)."""
    curves, diffs = [], []
    names = [n for n in predictions if n not in REFERENCE_METHODS]
    for j, meas in enumerate(gt.measurement_names):
        for name, (delta, is_dist) in predictions.items():
            n = delta.shape[0]  # a method may use only the first n seeds
            for row in score_vs_seeds(gt.full[:n, ..., j], gt.removed[:n, ..., j], delta[..., j],
                                      is_distributional=is_dist):
                curves.append({"method": name, "measurement": meas, **row, "metric": metric_name(row["metric"])})
        for i, a in enumerate(names):
            for b in [*names[i + 1:], "zero"]:
                if predictions[a][0].shape[0] != predictions[b][0].shape[0]:
                    continue  # bootstrap replicates pair only over the same seeds
                ra, rb = replicates[(a, meas)], replicates[(b, meas)]
                for metric in PAIRED_METRICS:
                    if metric in ra and metric in rb:
                        d, lo, hi = paired_difference_ci(ra[metric], rb[metric])
                        diffs.append({"measurement": meas, "metric": metric_name(metric), "method_a": a, "method_b": b,
                                      "diff": d, "ci_low": lo, "ci_high": hi})
    for name, frame in (("score_vs_seeds.csv", pd.DataFrame(curves)), ("paired_differences.csv", pd.DataFrame(diffs))):
        buf = io.StringIO()
        frame.to_csv(buf, index=False, float_format="%.6g")
        atomic_write_bytes(run_dir / f"{prefix}{name}", buf.getvalue().encode())


def environment() -> dict[str, str]:
    return {"python": platform.python_version(), "torch": torch.__version__, "threads": str(torch.get_num_threads()),
            "cpu_count": str(os.cpu_count())}
