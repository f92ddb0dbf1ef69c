"""Honest tuning: choose a method's hyperparameter on a tuning split disjoint from the reported one.

A setting (damping, projection dimension, epochs, LiSSA scale, …) is chosen on a **tuning split**:
targets [K_t] ⊂ training indices and queries [Q_t] ⊂ test indices drawn, seeded, from the complement of the
reported targets and queries (:func:`benchmark.ground_truth.select_targets_and_queries`), with seeds
``first_seed, first_seed + 1, …`` (default 1,000,000) disjoint from the reported seeds. A modest many-seed LOO
ground truth on that split (default S_t = 32) is trained with the ground truth's own units and cached in the
unit store, so a rerun is free. Each value is scored by :func:`benchmark.scores.score_method` (default
``loo_mean_spearman`` on ``loss``); the best wins, ties go to the first value listed (list the default
first: a default that needs no tuning is preferred). Never pick a setting by maximising a reported score.

Provenance (atomic JSON): ``<out>/<task>/<scale>/tuning/<method>__<param>.json``.

    python -m benchmark.tuning --task mnist_mlp --scale small --method influence --param damping_scale \\
        --values 0.1,0.01,1 [--seeds 32] [--targets 30] [--queries 30] [--metric loo_mean_spearman] \\
        [--measurement loss] [--split-seed 0] [--n-boot 200] [--out results] [--cache .cache/dtda] [--device auto]
"""

from __future__ import annotations

import argparse
import dataclasses
import enum
import json
import math
import sys
import types
import typing
import warnings
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from benchmark import __version__
from benchmark.config import GroundTruthConfig, OptionError, Scale, TaskScale, derive_seed, parse_enum
from benchmark.engine import configure_determinism, resolve_device
from benchmark.ground_truth import GroundTruth, build_loo_ground_truth, select_targets_and_queries
from benchmark.harness import git_commit, run_method
from benchmark.registry import METHODS, TASKS, UnknownNameError
from benchmark.scores import SCORE_NAMES_DISTRIBUTIONAL, SCORE_NAMES_FIXED_SEED, metric_names, score_method
from benchmark.store import UnitStore, atomic_write_text, content_key
from methods.base import Method, RemovalContext
from tasks.base import Task, TaskData

TUNING_FIRST_SEED = 1_000_000  # tuning seeds start here: disjoint from the reported seeds 0…S−1
ALL_METRICS = SCORE_NAMES_DISTRIBUTIONAL + SCORE_NAMES_FIXED_SEED


@dataclass(frozen=True)
class TuningOptions:
    """Size of the tuning split and ground truth, the score that picks, and where things go."""

    n_seeds: int = 32  # S_t
    n_targets: int = 30  # K_t
    n_queries: int = 30  # Q_t
    metric: str = "loo_mean_spearman"
    measurement: str = "loss"
    split_seed: int = 0  # draws the tuning targets and queries
    first_seed: int = TUNING_FIRST_SEED
    n_boot: int = 200
    n_splits: int = 20
    out: Path = Path("results")
    cache: Path = Path(".cache/dtda")
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    dtype: torch.dtype = torch.float32
    progress: bool = False
    scale_label: str | None = None  # folder name under <out>/<task>/; default: the scale's name ("custom")

    def __post_init__(self) -> None:
        if self.metric not in ALL_METRICS:
            raise OptionError(f"--metric must be one of: {', '.join(ALL_METRICS)}; got {self.metric!r}")
        if self.n_seeds < 4:
            raise OptionError(f"--seeds must be >= 4 (cross-fitting needs two halves of >= 2), got {self.n_seeds}")
        if self.n_targets < 2 or self.n_queries < 1:
            raise OptionError(f"--targets must be >= 2 and --queries >= 1, got {self.n_targets}, {self.n_queries}")
        if self.n_boot < 0 or self.n_splits < 1 or self.first_seed < 0:
            raise OptionError("TuningOptions needs n_boot >= 0, n_splits >= 1 and first_seed >= 0")


@dataclass(frozen=True)
class TuningSplit:
    """Tuning targets [K_t], queries [Q_t] and seeds [S_t], with the reported targets [K] / queries [Q]
    they exclude (kept to prove it)."""

    targets: Tensor
    queries: Tensor
    seeds: list[int]
    reported_targets: Tensor
    reported_queries: Tensor


@dataclass(frozen=True)
class TuningResult:
    """One record per value (in the order listed), the chosen value and the provenance file."""

    records: list[dict[str, Any]]
    chosen: Any
    path: Path
    provenance: dict[str, Any]


def _complement(n: int, taken: Tensor) -> Tensor:
    keep = torch.ones(n, dtype=torch.bool)
    keep[taken] = False
    return torch.nonzero(keep).squeeze(1)


def tuning_split(data: TaskData, gt_cfg: GroundTruthConfig, task_name: str, n_targets: int, n_queries: int,
                 seed: int) -> tuple[Tensor, Tensor]:
    """Tuning targets [K_t] and queries [Q_t], uniform without replacement from the training / test indices
    that are *not* reported (``select_targets_and_queries(data, gt_cfg, task_name)``): disjoint by construction,
    reproducible from (task, ``gt_cfg.selection_seed``, ``seed``). Sorted, like the reported ones."""
    reported_t, reported_q = select_targets_and_queries(data, gt_cfg, task_name)
    pool_t = _complement(data.n_train, reported_t)
    pool_q = _complement(int(data.y_test.shape[0]), reported_q)
    if n_targets > len(pool_t):
        raise OptionError(f"--targets {n_targets} exceeds the {len(pool_t)} training examples left after the "
                          f"{len(reported_t)} reported targets")
    if n_queries > len(pool_q):
        raise OptionError(f"--queries {n_queries} exceeds the {len(pool_q)} test examples left after the "
                          f"{len(reported_q)} reported queries")
    gen = torch.Generator().manual_seed(derive_seed("tuning_targets_queries", task_name, gt_cfg.selection_seed, seed))
    targets = pool_t[torch.randperm(len(pool_t), generator=gen)[:n_targets]].sort().values
    queries = pool_q[torch.randperm(len(pool_q), generator=gen)[:n_queries]].sort().values
    return targets, queries


def make_split(task: Task, data: TaskData, scale: TaskScale, opts: TuningOptions) -> TuningSplit:
    targets, queries = tuning_split(data, scale.ground_truth, task.name, opts.n_targets, opts.n_queries,
                                    opts.split_seed)
    reported_t, reported_q = select_targets_and_queries(data, scale.ground_truth, task.name)
    seeds = list(range(opts.first_seed, opts.first_seed + opts.n_seeds))
    if set(seeds) & set(scale.ground_truth.seeds):
        raise OptionError(f"tuning seeds {seeds[0]}…{seeds[-1]} overlap the reported seeds; raise first_seed")
    if np.intersect1d(targets, reported_t).size or np.intersect1d(queries, reported_q).size:
        raise AssertionError("tuning split intersects the reported split")  # impossible by construction
    return TuningSplit(targets, queries, seeds, reported_t, reported_q)


def build_tuning_ground_truth(task: Task, data: TaskData, scale: TaskScale, split: TuningSplit, store: UnitStore,
                              progress: bool = False) -> GroundTruth:
    """S_t × (full + K_t removals) on the tuning split, in units of ``seeds_per_unit`` seeds cached in the
    store (``benchmark.ground_truth.build_loo_ground_truth``); diverged seeds are dropped whole."""
    return build_loo_ground_truth(task, data, scale, store, data.x_train.device, split.targets, split.queries,
                                  split.seeds, progress=progress, tags={"split": "tuning"},
                                  key_parts=("tuning_ground_truth",))


def config_with(method_cls: type[Method], param: str, value: Any) -> Any:
    """``dataclasses.replace(default config, param=value)``, validated by the config's ``__post_init__``."""
    default = method_cls().config
    allowed = [f.name for f in dataclasses.fields(default)] if dataclasses.is_dataclass(default) else []
    if param not in allowed:
        raise OptionError(f"unknown parameter {param!r} for method {method_cls.name!r}; allowed: "
                          f"{', '.join(allowed) or '(none: the method has no config fields)'}")
    try:
        return dataclasses.replace(default, **{param: value})
    except (ValueError, TypeError) as exc:
        raise OptionError(f"{param}={value!r} is not a valid setting for {method_cls.name!r}: {exc}") from None


def plain(value: Any) -> Any:
    """A JSON-able form of a config value (enums by their value)."""
    return value.value if isinstance(value, enum.Enum) else value


def choose(scores: Sequence[float]) -> int:
    """Index of the best score; ties go to the first listed; nan never wins (all nan is an error)."""
    best = None
    for i, s in enumerate(scores):
        if not math.isnan(s) and (best is None or s > scores[best]):
            best = i
    if best is None:
        raise ValueError("every value scored nan on the tuning split: nothing to choose")
    return best


def score_value(method: Method, ctx: RemovalContext, gt: GroundTruth, store: UnitStore, opts: TuningOptions
                ) -> dict[str, Any]:
    """Predict on the tuning split (cached in the store) and score the chosen measurement and metric."""
    n_used = method.seeds_used(gt.measurements.shape[0])
    if n_used < gt.measurements.shape[0]:
        gt, ctx = gt.subset(n_used), ctx.subset(n_used)
    delta, runtime, _, info = run_method(method, ctx, gt, store)  # [S, K, Q, M]
    j = gt.measurement_names.index(opts.measurement)
    results = score_method(gt.full[..., j], gt.removed[..., j], delta[..., j],
                           is_distributional=method.is_distributional, n_splits=opts.n_splits, n_boot=opts.n_boot,
                           seed=0)
    (res,) = [r for r in results if r.metric == opts.metric]
    return {"score": res.value, "ci_low": res.ci_low, "ci_high": res.ci_high, "noise_ceiling": res.noise_ceiling,
            "n_seeds": n_used, "runtime_s": runtime,
            "info": {k: v for k, v in info.items() if isinstance(v, (int, float, str))}}


def resolve(task: str, scale: str | TaskScale, method: str | type[Method], opts: TuningOptions
            ) -> tuple[type[Task], TaskScale, str, type[Method]]:
    """Task class, its scale, the scale's folder label and the method class; errors name the choices."""
    task_cls = TASKS.get(task)
    if isinstance(scale, TaskScale):
        task_scale, label = scale, opts.scale_label or "custom"
    else:
        name = parse_enum(Scale, scale, "--scale").value
        if name not in task_cls.scales:
            raise OptionError(f"--scale must be one of: {', '.join(task_cls.scales)} for {task}; got {scale!r}")
        task_scale, label = task_cls.scales[name], opts.scale_label or name
    method_cls = METHODS.get(method) if isinstance(method, str) else method
    if opts.metric not in metric_names(method_cls.is_distributional):
        raise OptionError(f"--metric for the ranking-only method {method_cls.name!r} must be one of: "
                          f"{', '.join(metric_names(False))}; got {opts.metric!r}")
    if opts.measurement not in task_cls.measurement_names:
        raise OptionError(f"--measurement must be one of: {', '.join(task_cls.measurement_names)}; "
                          f"got {opts.measurement!r}")
    return task_cls, task_scale, label, method_cls


def tune(task: str, scale: str | TaskScale, method: str | type[Method], param: str, values: Sequence[Any],
         opts: TuningOptions | None = None) -> TuningResult:
    """Score ``method`` with ``param`` set to each of ``values`` on the tuning split; pick the best.

    Args:
        task: registered task name.
        scale: scale name, or a :class:`TaskScale` (its folder is ``opts.scale_label`` or ``custom``).
        method: registered method name, or a :class:`Method` subclass with a ``name``.
        param: a field of the method's config.
        values: the settings to try, default first (ties go to the first listed).
        opts: split sizes, metric, measurement, output and cache folders, device.
    Returns:
        Per-value records (score with CI ends and noise ceiling), the chosen value and the provenance path.
    """
    opts = opts or TuningOptions()
    task_cls, task_scale, label, method_cls = resolve(task, scale, method, opts)
    configs = [config_with(method_cls, param, v) for v in values]  # every value is validated before any training
    listed = [plain(getattr(c, param)) for c in configs]
    if not listed or len({json.dumps(v) for v in listed}) != len(listed):
        raise OptionError(f"--values must list distinct settings of {param}; got {listed}")
    problem = prepare(task_cls(task_scale), label, opts)
    records = []
    for value, config in zip(listed, configs):
        if opts.progress:
            print(f"[tuning] {method_cls.name} {param}={value} …", file=sys.stderr, flush=True)
        records.append({"value": value, **score_value(method_cls(config), problem.ctx, problem.gt, problem.store,
                                                      opts)})
    best = choose([r["score"] for r in records])
    provenance = build_provenance(problem, method_cls, param, records, best, opts)
    path = opts.out / problem.task.name / label / "tuning" / f"{method_cls.name}__{param}.json"
    atomic_write_text(path, json.dumps(_finite(provenance), indent=2) + "\n")
    return TuningResult(records=records, chosen=getattr(configs[best], param), path=path, provenance=provenance)


@dataclass(frozen=True)
class TuningProblem:
    """The task, its scale's folder label, the tuning split, its ground truth, the method context, the store."""

    task: Task
    label: str
    split: TuningSplit
    gt: GroundTruth
    ctx: RemovalContext
    store: UnitStore


def prepare(task: Task, label: str, opts: TuningOptions) -> TuningProblem:
    """Load the data, draw the tuning split, build (or load) its ground truth and the RemovalContext
    (as ``benchmark.harness.run`` builds it, checkpoints included)."""
    configure_determinism(opts.device)
    data = task.load_data().to(opts.device, opts.dtype)
    store = UnitStore(opts.cache)
    split = make_split(task, data, task.scale, opts)
    gt = build_tuning_ground_truth(task, data, task.scale, split, store, opts.progress)
    ctx = RemovalContext(task=task, data=data, scale=task.scale, theta_full=gt.theta_full.to(opts.device, opts.dtype),
                         seeds=gt.run_seeds, targets=split.targets, queries=split.queries, coupling=gt.coupling,
                         progress=opts.progress, checkpoints=gt.checkpoints.to(opts.device, opts.dtype))
    return TuningProblem(task=task, label=label, split=split, gt=gt, ctx=ctx, store=store)


def build_provenance(problem: TuningProblem, method_cls: type[Method], param: str, records: list[dict[str, Any]],
                     best: int, opts: TuningOptions) -> dict[str, Any]:
    """Everything needed to audit the choice, including the reported split it excluded."""
    task, split, gt = problem.task, problem.split, problem.gt
    default = plain(getattr(method_cls().config, param))
    reported_seeds = task.scale.ground_truth.seeds
    excluded = (f"The reported targets ({len(split.reported_targets)} training indices) and queries "
                f"({len(split.reported_queries)} test indices) of benchmark.ground_truth.select_targets_and_queries "
                f"(selection_seed={task.scale.ground_truth.selection_seed}) were excluded: the tuning targets and "
                f"queries were drawn from their complement, and the tuning seeds {split.seeds[0]}..{split.seeds[-1]} "
                f"are disjoint from the reported seeds {reported_seeds[0]}..{reported_seeds[-1]}. "
                "No reported score was used to choose.")
    return {
        "task": task.name, "scale": problem.label, "method": method_cls.name, "param": param, "default": default,
        "values": [r["value"] for r in records], "results": records,
        "chosen": records[best]["value"], "chosen_index": best, "chosen_is_default": records[best]["value"] == default,
        "rule": f"highest {opts.metric} on {opts.measurement} over the tuning split; ties go to the first value listed",
        "metric": opts.metric, "measurement": opts.measurement, "n_boot": opts.n_boot, "n_splits": opts.n_splits,
        "n_seeds": int(gt.measurements.shape[0]), "n_seeds_requested": opts.n_seeds, "n_failed": gt.n_failed,
        "tuning_targets": split.targets.tolist(), "tuning_queries": split.queries.tolist(),
        "tuning_seeds": [int(s) for s in gt.run_seeds], "split_seed": opts.split_seed,
        "reported_excluded": True, "reported_targets": split.reported_targets.tolist(),
        "reported_queries": split.reported_queries.tolist(), "excluded_statement": excluded,
        "coupling": gt.coupling.value, "ground_truth_key": gt.key,
        "scale_config_hash": content_key(asdict(task.scale)), "default_config": method_cls().config_dict(),
        "device": str(opts.device), "dtype": str(opts.dtype), "version": __version__, "commit": git_commit(),
    }


def _finite(obj: Any) -> Any:
    """nan/inf → None, so the file is strict JSON."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_finite(v) for v in obj]
    return obj


def parse_value(kind: Any, text: str, param: str) -> Any:
    """``text`` as a value of the config field's type (bool, int, float, str, an enum, or X | None)."""
    if typing.get_origin(kind) in (typing.Union, types.UnionType):
        inner = [a for a in typing.get_args(kind) if a is not type(None)]
        if text.lower() == "none" and len(inner) < len(typing.get_args(kind)):
            return None
        if len(inner) == 1:
            return parse_value(inner[0], text, param)
    elif kind is bool and text.lower() in ("true", "false", "1", "0"):
        return text.lower() in ("true", "1")
    elif kind in (int, float):
        try:
            value = kind(text)
        except ValueError:
            raise OptionError(f"--values: {param} takes {kind.__name__} values; got {text!r}") from None
        if not math.isfinite(value):
            raise OptionError(f"--values: {param} must be finite; got {text!r}")
        return value
    elif kind is str:
        return text
    elif isinstance(kind, type) and issubclass(kind, enum.Enum):
        return parse_enum(kind, text, f"--values ({param})")
    raise OptionError(f"--values: cannot parse {text!r} as {param} (type {getattr(kind, '__name__', kind)})")


def parse_values(method_cls: type[Method], param: str, text: str) -> list[Any]:
    """Comma-separated ``text`` → typed values of ``param`` (unknown param: error naming the fields)."""
    config_with(method_cls, param, getattr(method_cls().config, param, None))  # raises on an unknown param
    kind = typing.get_type_hints(type(method_cls().config))[param]
    items = [v.strip() for v in text.split(",") if v.strip()]
    if not items:
        raise OptionError(f"--values is empty; give comma-separated settings of {param}, default first")
    return [parse_value(kind, v, param) for v in items]


def summary(result: TuningResult) -> str:
    p = result.provenance
    lines = [f"tuning {p['method']}.{p['param']} on {p['task']}/{p['scale']}: K_t={len(p['tuning_targets'])} targets, "
             f"Q_t={len(p['tuning_queries'])} queries, S_t={p['n_seeds']} seeds (reported targets/queries excluded)",
             f"  {p['metric']} on {p['measurement']} ({p['n_splits']} cross-fit splits, {p['n_boot']} bootstrap "
             "replicates; ties → first listed)"]
    width = max(len(f"{p['param']}={r['value']}") for r in result.records)
    for i, r in enumerate(result.records):
        tags = [t for t, on in (("default", r["value"] == p["default"]), ("<- chosen", i == p["chosen_index"])) if on]
        lines.append(f"  {p['param'] + '=' + str(r['value']):<{width}}  {r['score']:+.4f} "
                     f"[{r['ci_low']:+.4f}, {r['ci_high']:+.4f}]  ceiling {r['noise_ceiling']:.4f}  "
                     f"n_seeds {r['n_seeds']}  {r['runtime_s']:.1f}s  {' '.join(tags)}".rstrip())
    lines += [f"provenance: {result.path}", f"chosen {p['param']}={p['chosen']}"]
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m benchmark.tuning", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--task", required=True, help="registered task, e.g. mnist_mlp")
    p.add_argument("--scale", default="small", help="smoke, small (default) or paper")
    p.add_argument("--method", required=True, help="registered method, e.g. influence")
    p.add_argument("--param", required=True, help="a field of the method's config, e.g. damping_scale")
    p.add_argument("--values", required=True, help="comma-separated settings, default first (ties → first)")
    p.add_argument("--seeds", type=int, default=32, help="tuning seeds S_t (default 32)")
    p.add_argument("--targets", type=int, default=30, help="tuning targets K_t (default 30)")
    p.add_argument("--queries", type=int, default=30, help="tuning queries Q_t (default 30)")
    p.add_argument("--metric", default="loo_mean_spearman", help=f"one of {', '.join(ALL_METRICS)}")
    p.add_argument("--measurement", default="loss", help="loss (default) or margin")
    p.add_argument("--split-seed", type=int, default=0, help="draws the tuning targets and queries")
    p.add_argument("--n-boot", type=int, default=200, help="bootstrap replicates for the CIs")
    p.add_argument("--out", default="results", help="output folder (default results/)")
    p.add_argument("--cache", default=".cache/dtda", help="unit store folder (default .cache/dtda)")
    p.add_argument("--device", default="auto", help="auto (cuda when present), cpu or cuda")
    p.add_argument("--quiet", action="store_true", help="no progress output")
    return p


def main(argv: list[str] | None = None) -> int:
    import methods  # noqa: F401  (registers the methods)
    import tasks  # noqa: F401  (registers the tasks)

    warnings.filterwarnings("ignore", message="`torch.jit.script` is deprecated", category=FutureWarning)
    args = build_parser().parse_args(argv)
    try:
        try:
            device = resolve_device(args.device)
        except ValueError as exc:
            raise OptionError(str(exc)) from None
        opts = TuningOptions(n_seeds=args.seeds, n_targets=args.targets, n_queries=args.queries, metric=args.metric,
                             measurement=args.measurement, split_seed=args.split_seed, n_boot=args.n_boot,
                             out=Path(args.out), cache=Path(args.cache), device=device,
                             progress=not args.quiet)
        values = parse_values(METHODS.get(args.method), args.param, args.values)
        result = tune(args.task, args.scale, args.method, args.param, values, opts)
    except (OptionError, UnknownNameError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(summary(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
