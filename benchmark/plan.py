"""``run_all.py --dry-run``: the plan of ground-truth work units, what is cached, and an estimated cost.

Per (task, evaluation) it lists the work units the executor would receive (LOO and LDS ground truth),
how many are already in the store, the training runs still to do, and minutes estimated from a short
calibration on this device: one batch of ``CALIBRATION_MODELS`` models trained along the model axis for
``CALIBRATION_STEPS`` steps (at most an epoch) with the units' thread count, scaled to an epoch (units batch
up to 1,024 models, so this errs on the slow side):

    est_minutes = runs_to_train × epochs × (seconds per model-epoch) / parallel / 60,

with ``parallel`` the executor's concurrency (process workers; SLURM array parallelism or Ray workers, each
capped by the number of units). It is an estimate at this device's speed, not a promise. Work that runs
(methods, the further-training gold standard, the mechanism study) is not estimated; the methods' own work
units (``benchmark.method_units``: one per method and chunk of the ground truth's seeds) are counted, with
how many are cached, on a ``<eval>:methods`` row. A pruning task plans its full runs and arms (``eval`` ``prune``);
before its scores are cached, the arms are placeholders counted as uncached.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass

import torch

from benchmark.config import Coupling, TaskScale
from benchmark.engine import Schedule, build_schedule, initial_params, steps_per_epoch, train_models
from benchmark.executors import Executor, ProcessExecutor, RayExecutor, SlurmExecutor, WorkUnit, register_loaded
from benchmark.ground_truth import loo_units, select_targets_and_queries
from benchmark.store import UnitStore, content_key
from tasks.base import Task, TaskData

CALIBRATION_MODELS = 8
CALIBRATION_MAX_MODELS = 512
CALIBRATION_QUICK_S = 1.0
CALIBRATION_SLOW_STEP_S = 5.0  # a warm-up step this slow is the estimate itself
CALIBRATION_STEPS = 5  # timed steps (at most one epoch, after one untimed warm-up step), scaled to an epoch


@dataclass(frozen=True)
class PlanRow:
    task: str
    scale: str
    evaluation: str
    units: int
    cached: int
    runs_total: int
    runs_to_train: int
    epochs: int
    est_minutes: float


def seconds_per_model_epoch(task: Task, data: TaskData, scale: TaskScale, threads: int,
                            n_models: int = CALIBRATION_MODELS) -> float:
    """Wall seconds per model per epoch, from the first ``CALIBRATION_STEPS`` steps (at most one epoch) of
    ``n_models`` models trained together with the units' thread count, scaled to a full epoch. While that
    takes under ``CALIBRATION_QUICK_S`` the batch of models grows ×4 (up to ``CALIBRATION_MAX_MODELS``), so
    cheap models are timed at a batching closer to the units' own (up to 1,024 models)."""
    one_epoch = dataclasses.replace(scale.train, epochs=1)
    per_epoch = steps_per_epoch(data.n_train, one_epoch.batch_size)
    steps = min(CALIBRATION_STEPS, per_epoch)
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        while True:
            seeds = list(range(n_models))
            full = [build_schedule(task.name, data.n_train, one_epoch, s, None, Coupling.MASKED) for s in seeds]
            theta0 = initial_params(task, seeds, data.x_train.dtype, data.x_train.device)
            warm = [Schedule(s.idx[:1], s.weight[:1], s.denom[:1], s.order) for s in full]
            start = time.perf_counter()
            train_models(task, data, one_epoch, warm, theta0)  # first-call overheads are not a model-epoch's cost
            warm_wall = time.perf_counter() - start
            if warm_wall >= CALIBRATION_SLOW_STEP_S:  # a big model: its one step already says enough
                return warm_wall / n_models * per_epoch
            start = time.perf_counter()
            train_models(task, data, one_epoch, [Schedule(s.idx[:steps], s.weight[:steps], s.denom[:steps], s.order)
                                                 for s in full], theta0)
            wall = time.perf_counter() - start
            if wall >= CALIBRATION_QUICK_S or n_models >= CALIBRATION_MAX_MODELS:
                return wall / n_models * per_epoch / steps
            n_models *= 4
    finally:
        torch.set_num_threads(previous)


def parallelism(executor: Executor, n_units: int) -> int:
    """How many units run at once under ``executor`` (at most the number of units)."""
    if isinstance(executor, ProcessExecutor):
        width = executor.workers
    elif isinstance(executor, SlurmExecutor):
        width = executor.settings.array_parallelism
    elif isinstance(executor, RayExecutor):
        width = max(1, (executor.num_cpus or executor.threads) // executor.threads)
    else:
        width = 1
    return max(1, min(width, n_units))


def plan_rows(task: Task, data: TaskData, scale: TaskScale, scale_name: str, evaluations: tuple[str, ...],
              lds_cfg: object, store: UnitStore, executor: Executor, device: torch.device,
              methods: tuple[str, ...] = ()) -> list[PlanRow]:
    """One :class:`PlanRow` per ground-truth evaluation (``loo``, ``lds``) of one task at one scale, and one
    ``<eval>:methods`` row counting the method work units of ``methods`` on it."""
    from benchmark.lds import lds_units  # lds imports ground_truth; keep the import graph one-way

    register_loaded(task, data)
    groups: list[tuple[str, list[WorkUnit]]] = []
    if task.experiment == "pruning":
        groups.append(("prune", pruning_units(task, data, scale, scale_name, store, executor)))
        evaluations = ()
    method_groups: list[tuple[str, list[WorkUnit]]] = []
    if "loo" in evaluations:
        targets, queries = select_targets_and_queries(data, scale.ground_truth, task.name)
        units = loo_units(task, data, scale, device, targets, queries, scale.ground_truth.seeds, executor.threads)
        groups.append(("loo", units))
        method_groups.append(("loo:methods", planned_method_units(
            task, data, scale, scale_name, units, targets, queries, scale.ground_truth.coupling, methods, "loo",
            store, executor)))
    if "lds" in evaluations:
        units, _, queries, _ = lds_units(task, data, scale, lds_cfg, device, executor.threads)
        groups.append(("lds", units))
        method_groups.append(("lds:methods", planned_method_units(
            task, data, scale, scale_name, units, torch.arange(data.n_train), queries, lds_cfg.coupling,  # type: ignore[attr-defined]
            methods, "lds", store, executor)))
    if not groups:
        return []
    per_epoch = seconds_per_model_epoch(task, data, scale, executor.threads)
    rows = []
    for name, units in groups:
        missing = [u for u in units if not store.has(u.key)]
        runs = sum(u.runs for u in missing)
        minutes = runs * scale.train.epochs * per_epoch / parallelism(executor, len(missing) or 1) / 60
        rows.append(PlanRow(task.name, scale_name, name, len(units), len(units) - len(missing),
                            sum(u.runs for u in units), runs, scale.train.epochs, minutes))
    for name, units in method_groups:
        if units:
            cached = sum(store.has(u.key) for u in units)
            rows.append(PlanRow(task.name, scale_name, name, len(units), cached, 0, 0, scale.train.epochs,
                                float("nan")))
    return rows


def planned_method_units(task: Task, data: TaskData, scale: TaskScale, scale_name: str, gt_units: list[WorkUnit],
                         targets: torch.Tensor, queries: torch.Tensor, coupling: Coupling, methods: tuple[str, ...],
                         evaluation: str, store: UnitStore, executor: Executor) -> list[WorkUnit]:
    """The method work units the harness will hand the executor after this ground truth (assuming no seed
    diverges): their keys name the ground-truth units' rows, so they are known before any training."""
    from types import SimpleNamespace

    from benchmark.method_units import method_units
    from benchmark.registry import METHODS
    from methods.base import RemovalContext

    seeds = [s for u in gt_units for s in u.job.seeds]  # type: ignore[attr-defined]
    sources = tuple((u.key, i) for u in gt_units for i in range(len(u.job.seeds)))  # type: ignore[attr-defined]
    out: list[WorkUnit] = []
    device_type = data.x_train.device.type
    for name in methods:
        method = METHODS.get(name)()
        if task.skip_reason(scale_name, name, device_type) or (evaluation == "lds" and method.lds_skip_reason):
            continue
        n = method.seeds_used(len(seeds))
        ctx = RemovalContext(task=task, data=data, scale=scale, theta_full=torch.empty(n, 0), seeds=seeds[:n],
                             targets=targets, queries=queries, coupling=coupling)
        gt = SimpleNamespace(param_sources=sources[:n], key="")
        out += method_units(method, ctx, gt, store, executor.threads)
    return out


def pruning_units(task: Task, data: TaskData, scale: TaskScale, scale_name: str, store: UnitStore,
                  executor: Executor) -> list[WorkUnit]:
    """The pruning experiment's trainings: the full runs, then every arm. The arms' removals depend on the
    scores, so before the scores are cached they are planned as placeholders (uncached, S runs each)."""
    from benchmark.pruning import arm_removals, arm_unit, cached_scores

    cfg = task.pruning_config(scale_name)  # type: ignore[attr-defined]
    full = arm_unit(task, data, scale, cfg, "full", [[]] * cfg.n_seeds, executor.threads, keep_checkpoints=True)
    scores = cached_scores(task, cfg, full, store)
    units = [full]
    for fraction in cfg.fractions:
        arms = [(a, None) for a in ("random", "fixed_seed", "distributional")]
        arms += [("distributional_var", c) for c in cfg.c_grid]
        for arm, c in arms:
            if scores is None:
                placeholder = content_key("planned pruning arm", task.name, arm, fraction, c)  # never stored
                units.append(WorkUnit(placeholder, {}, full.job, "pruning_arm", {}, executor.threads,
                                      runs=cfg.n_seeds))
            else:
                removals = arm_removals(arm, scores, fraction, cfg.seeds, task.name, c)
                units.append(arm_unit(task, data, scale, cfg, arm, removals, executor.threads, fraction=fraction,
                                      c=c))
    return units


def format_plan(rows: list[PlanRow], executor: Executor, device: torch.device) -> str:
    """The plan as a fixed-width table with a total line."""
    head = f"{'task':<14}{'scale':<7}{'eval':<12}{'units':>7}{'cached':>8}{'runs':>10}{'to train':>10}" \
           f"{'epochs':>8}{'est. min':>10}"
    lines = [f"plan on {device} with executor {executor.describe()}", head]
    for r in rows:
        minutes = "n/a" if r.est_minutes != r.est_minutes else f"{r.est_minutes:.1f}"
        lines.append(f"{r.task:<14}{r.scale:<7}{r.evaluation:<12}{r.units:>7}{r.cached:>8}{r.runs_total:>10}"
                     f"{r.runs_to_train:>10}{r.epochs:>8}{minutes:>10}")
    lines.append(f"total: {sum(r.units for r in rows)} unit(s), {sum(r.cached for r in rows)} cached, "
                 f"{sum(r.runs_to_train for r in rows)} training run(s) to do, ≈ "
                 f"{sum(r.est_minutes for r in rows if r.est_minutes == r.est_minutes):.1f} min of training "
                 "(estimated from a short calibration on this device); the methods' units (counted on the "
                 "':methods' rows), the gold standard and the mechanism study run afterwards and are not "
                 "estimated")
    return "\n".join(lines)
