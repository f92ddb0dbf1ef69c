"""Many-seed leave-one-out ground truth: S seeds × (full + K removals) → measurements [S, 1+K, Q, M].

Work is split into units of ``seeds_per_unit`` seeds; each unit is cached in the :class:`UnitStore`
under a content key of everything that determines it (task scale, data, coupling, its seeds, targets,
queries, dtype, device type, torch threads, model-batch size) and *not* the total seed count, so a
larger S reuses the smaller run's units. Units are :class:`~benchmark.executors.WorkUnit` s with a picklable
job (:class:`TrainRemovalsJob`), so any executor (local, process, SLURM, Ray) computes them into the same
store with the same bytes. A killed run keeps every finished unit and resumes. A seed with any diverged run is dropped
whole (a diverging removal run is an effect, not noise) and counted in ``n_failed``.
"""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from benchmark.config import CACHE_VERSION, Coupling, GroundTruthConfig, OptionError, TaskScale, derive_seed
from benchmark.engine import build_schedule, init_seed, initial_params, train_models
from benchmark.executors import (
    Executor,
    WorkUnit,
    compute_into_store,
    data_fingerprint,
    loaded_task,
    make_executor,
    register_loaded,
)
from benchmark.store import UnitStore, atomic_write_bytes, content_key
from tasks.base import Task, TaskData, cross_entropy

MAX_MODELS = 1024  # models trained at once along the model axis (part of a unit's key)


@dataclass(frozen=True)
class GroundTruth:
    """measurements [S, 1+K, Q, M] (float64; column 0 is the full run), targets [K], queries [Q],
    seeds [S] (or [S, 1+K] under independent coupling), theta_full [S, P], checkpoints [S, E+1, P],
    diagnostics {name: [S]}; seeds whose runs diverged are already dropped (``n_failed`` of them)."""

    measurements: np.ndarray
    measurement_names: tuple[str, ...]
    targets: np.ndarray
    queries: np.ndarray
    seeds: np.ndarray
    coupling: Coupling
    theta_full: Tensor
    checkpoints: Tensor
    diagnostics: dict[str, np.ndarray]
    n_failed: int
    key: str
    # per seed, the stored ground-truth unit (key) and row its theta_full and checkpoints come from: method
    # work units (benchmark.method_units) read their seeds' parameters from the store by these, never shipping
    # arrays; empty for a ground truth built by hand
    param_sources: tuple[tuple[str, int], ...] = ()

    @property
    def full(self) -> np.ndarray:  # [S, Q, M]
        return self.measurements[:, 0]

    @property
    def removed(self) -> np.ndarray:  # [S, K, Q, M]
        return self.measurements[:, 1:]

    @property
    def run_seeds(self) -> list[int]:
        return [int(s) for s in (self.seeds if self.seeds.ndim == 1 else self.seeds[:, 0])]

    def subset(self, n_seeds: int) -> GroundTruth:
        """The first ``n_seeds`` seeds only (for methods run on a subset); a distinct key."""
        return dataclasses.replace(
            self, measurements=self.measurements[:n_seeds], seeds=self.seeds[:n_seeds],
            theta_full=self.theta_full[:n_seeds], checkpoints=self.checkpoints[:n_seeds],
            diagnostics={k: v[:n_seeds] for k, v in self.diagnostics.items()},
            key=content_key(self.key, "first_seeds", n_seeds), param_sources=self.param_sources[:n_seeds])

    def export(self, path: Path) -> None:
        """Write the raw arrays as ``ground_truth.npz`` (documented in the README)."""
        import io

        buf = io.BytesIO()
        np.savez(buf, measurements=self.measurements, measurement_names=np.array(self.measurement_names),
                 targets=self.targets, queries=self.queries, seeds=self.seeds,
                 coupling=np.array(self.coupling.value), n_failed=np.array(self.n_failed),
                 **{f"diag_{k}": v for k, v in self.diagnostics.items()})
        atomic_write_bytes(path, buf.getvalue())


def select_targets_and_queries(data: TaskData, cfg: GroundTruthConfig, task_name: str) -> tuple[Tensor, Tensor]:
    """Targets [K] ⊂ training indices and queries [Q] ⊂ test indices, uniform without replacement,
    reproducible from ``selection_seed``."""
    if cfg.n_targets > data.n_train:
        raise OptionError(f"GroundTruthConfig.n_targets (K) = {cfg.n_targets} exceeds the training-set size "
                          f"N = {data.n_train}; allowed: 1 <= K <= N")
    n_test = int(data.y_test.shape[0])
    if cfg.n_queries > n_test:
        raise OptionError(f"GroundTruthConfig.n_queries (Q) = {cfg.n_queries} exceeds the query pool of {n_test} "
                          f"test examples; allowed: 1 <= Q <= {n_test}")
    gen = torch.Generator().manual_seed(derive_seed("targets_queries", task_name, cfg.selection_seed))
    targets = torch.randperm(data.n_train, generator=gen)[: cfg.n_targets].sort().values
    queries = torch.randperm(n_test, generator=gen)[: cfg.n_queries].sort().values
    return targets, queries


def unit_key(task: Task, scale: TaskScale, seeds: list[int], targets: Tensor, queries: Tensor,
             coupling: Coupling, dtype: torch.dtype, device: torch.device, threads: int,
             max_models: int = MAX_MODELS) -> tuple[str, dict]:
    """Content key of one LOO unit: everything that determines its bytes, including the torch thread count
    and the model-batch size it is trained with (bit-identity is promised at equal device, threads, shape)."""
    scale_dict = asdict(scale)
    scale_dict.pop("ground_truth")
    config = {"version": CACHE_VERSION, "kind": "loo_ground_truth", "task": task.name, "scale": scale_dict,
              "coupling": coupling.value, "seeds": seeds, "targets": targets.tolist(),
              "queries": queries.tolist(), "dtype": str(dtype), "device": device.type,
              "threads": threads, "max_models": max_models}
    return content_key(config), config


@dataclass(frozen=True)
class TrainRemovalsJob:
    """A picklable unit job: per seed, one run per removal (None = full data; an index; or a tuple of
    indices for a group), measured on the queries. A worker reloads the task's data itself
    (:func:`benchmark.executors.loaded_task`), so a unit ships names and indices, never arrays."""

    task: str
    scale: TaskScale
    seeds: tuple[int, ...]
    removals: tuple[int | tuple[int, ...] | None, ...]
    labels: tuple[object, ...]
    queries: tuple[int, ...]
    coupling: Coupling
    dtype: str
    device: str
    max_models: int = MAX_MODELS
    data_sha: str = ""

    def __call__(self) -> dict[str, Tensor]:
        task, data = loaded_task(self.task, self.scale, self.dtype, self.device, self.data_sha)
        removals = [torch.tensor(r, dtype=torch.long) if isinstance(r, tuple) else r for r in self.removals]
        return train_removal_runs(task, data, self.scale, list(self.seeds), removals, list(self.labels),
                                  torch.tensor(self.queries, dtype=torch.long), self.coupling, self.max_models)


def removal_units(task: Task, data: TaskData, scale: TaskScale, seed_units: list[list[int]],
                  removals: list[int | Tensor | None], labels: list[object], queries: Tensor, coupling: Coupling,
                  key_fn: Callable[[list[int]], tuple[str, dict]], kind: str, tags: dict, threads: int
                  ) -> list[WorkUnit]:
    """One :class:`WorkUnit` per list of seeds, each training ``len(removals)`` runs per seed."""
    frozen = tuple(tuple(int(i) for i in r.tolist()) if isinstance(r, Tensor) else r for r in removals)
    data_sha = data_fingerprint(data)
    units = []
    for seeds in seed_units:
        key, config = key_fn(seeds)
        job = TrainRemovalsJob(task.name, scale, tuple(seeds), frozen, tuple(labels), tuple(queries.tolist()),
                               coupling, str(data.x_train.dtype), data.x_train.device.type,
                               config.get("max_models", MAX_MODELS), data_sha)
        units.append(WorkUnit(key, config, job, kind, {**tags, "seeds": [seeds[0], seeds[-1]]}, threads,
                              runs=len(seeds) * len(removals)))
    return units


def train_removal_runs(task: Task, data: TaskData, scale: TaskScale, seeds: list[int],
                       removals: list[int | Tensor | None], labels: list[object], queries: Tensor,
                       coupling: Coupling, max_models: int = MAX_MODELS) -> dict[str, Tensor]:
    """Per seed, one run per entry of ``removals`` (None = full data, first; an index; or a 1-D tensor of
    indices for a group), ``labels`` naming each run for the independent coupling's fresh seeds; measured
    on the queries. Returns measurements [s, 1+K, Q, M], theta_full [s, P], checkpoints [s, E+1, P],
    failed [s, 1+K] and train_acc / test_acc / grad_norm [s] (diagnostics of the full runs)."""
    n_runs = len(removals)
    seeds_per_batch = max(1, max_models // n_runs)
    x_q, y_q = data.x_test[queries], data.y_test[queries]
    meas, thetas, ckpts, failed = [], [], [], []
    for start in range(0, len(seeds), seeds_per_batch):
        chunk = seeds[start:start + seeds_per_batch]
        run_seeds = [s for s in chunk for _ in removals]
        run_removed = removals * len(chunk)
        run_labels = labels * len(chunk)
        schedules = [build_schedule(task.name, data.n_train, scale.train, s, r, coupling, label=lab)
                     for s, r, lab in zip(run_seeds, run_removed, run_labels)]
        theta0 = initial_params(task, run_seeds, data.x_train.dtype, data.x_train.device, run_labels, coupling)
        full_runs = [i * n_runs for i in range(len(chunk))]  # checkpoints are kept for full runs only
        result = train_models(task, data, scale.train, schedules, theta0, checkpoint_models=full_runs)
        with torch.no_grad():
            m = task.measurements_batched(result.theta, x_q, y_q)  # [n, Q, M]
        meas.append(m.view(len(chunk), n_runs, *m.shape[1:]))
        thetas.append(result.theta.view(len(chunk), n_runs, -1)[:, 0])
        ckpts.append(result.checkpoints)
        failed.append(result.failed.view(len(chunk), n_runs) | ~torch.isfinite(m).view(len(chunk), n_runs, -1).all(-1))
    theta_full = torch.cat(thetas)
    out = {"measurements": torch.cat(meas), "theta_full": theta_full, "checkpoints": torch.cat(ckpts),
           "failed": torch.cat(failed)}
    out.update(full_run_diagnostics(task, data, scale, theta_full))
    return {k: v.detach().cpu() for k, v in out.items()}


def full_run_diagnostics(task: Task, data: TaskData, scale: TaskScale, theta: Tensor) -> dict[str, Tensor]:
    """Per seed: train accuracy, test accuracy (query pool), ‖∇[(1/N)Σℓ_n + (wd/2)‖θ‖²]‖ at θ_T."""
    n = theta.shape[0]
    theta = theta.detach().clone().requires_grad_(True)
    with torch.enable_grad():
        logits = task.logits_batched(theta, data.x_train.unsqueeze(0).expand(n, *data.x_train.shape))
        y = data.y_train.unsqueeze(0).expand(n, -1)
        objective = cross_entropy(logits, y).mean(1) + 0.5 * scale.train.weight_decay * theta.pow(2).sum(1)
        (grad,) = torch.autograd.grad(objective.sum(), theta)
    with torch.no_grad():
        test_logits = task.logits_batched(theta, data.x_test.unsqueeze(0).expand(n, *data.x_test.shape))
        test_acc = (test_logits.argmax(-1) == data.y_test).double().mean(1)
    return {"train_acc": (logits.argmax(-1) == y).double().mean(1).detach(), "test_acc": test_acc,
            "grad_norm": grad.norm(dim=1).double()}


def load_or_train_units(store: UnitStore, units: list[WorkUnit], executor: Executor | None, desc: str,
                        progress: bool) -> tuple[dict[str, Tensor], list[str], list[tuple[str, int]]]:
    """Every unit from the store, the missing ones first computed by ``executor`` (default: local, this
    process's threads); concatenated along seeds, in the order of ``units``. Also returns the unit keys and,
    per concatenated row, its (unit key, row within the unit)."""
    (executor or make_executor()).run(store, units, desc=desc, progress=progress)
    parts = []
    for unit in units:
        tensors = store.get(unit.key, unit.config)
        if tensors is None:  # e.g. removed as corrupt between the executor's write and this read: recompute here
            compute_into_store(str(store.root), unit)
            tensors = store.get(unit.key, unit.config)
        if tensors is None:
            raise RuntimeError(f"work unit {unit.key[:12]} ({unit.kind}) could not be computed into {store.root}")
        parts.append(tensors)
    first = next(iter(parts[0]))
    rows = [(unit.key, i) for unit, part in zip(units, parts) for i in range(part[first].shape[0])]
    return {k: torch.cat([p[k] for p in parts]) for k in parts[0]}, [u.key for u in units], rows


def assemble_ground_truth(cat: dict[str, Tensor], seeds: list[int], seed_arr: np.ndarray, task: Task,
                          coupling: Coupling, targets: np.ndarray, queries: np.ndarray, key: str,
                          rows: list[tuple[str, int]] | None = None) -> GroundTruth:
    """A :class:`GroundTruth` from concatenated unit arrays (``rows``: each row's unit key and row, from
    :func:`load_or_train_units`); a seed with any diverged run is dropped whole."""
    failed_seed = cat["failed"].any(1).numpy()
    if failed_seed.any():
        warnings.warn(f"{int(failed_seed.sum())} seed(s) diverged (NaN/inf) and are dropped: "
                      f"{np.asarray(seeds)[failed_seed].tolist()}", stacklevel=3)
    keep = ~failed_seed
    return GroundTruth(
        measurements=cat["measurements"].double().numpy()[keep],
        measurement_names=task.measurement_names,
        targets=targets, queries=queries, seeds=seed_arr[keep], coupling=coupling,
        theta_full=cat["theta_full"][torch.as_tensor(keep)],
        checkpoints=cat["checkpoints"][torch.as_tensor(keep)],
        diagnostics={k: cat[k].double().numpy()[keep] for k in ("train_acc", "test_acc", "grad_norm")},
        n_failed=int(failed_seed.sum()), key=key,
        param_sources=tuple(r for r, k in zip(rows or (), keep) if k),
    )


def build_ground_truth(task: Task, data: TaskData, scale: TaskScale, store: UnitStore,
                       device: torch.device, progress: bool = True, executor: Executor | None = None) -> GroundTruth:
    """Compute (or load from the store) every unit of the ground truth and assemble it."""
    targets, queries = select_targets_and_queries(data, scale.ground_truth, task.name)
    return build_loo_ground_truth(task, data, scale, store, device, targets, queries, scale.ground_truth.seeds,
                                  progress=progress, executor=executor)


def loo_units(task: Task, data: TaskData, scale: TaskScale, device: torch.device, targets: Tensor, queries: Tensor,
              seeds: list[int], threads: int, tags: dict | None = None) -> list[WorkUnit]:
    """The LOO ground truth's work units: ``seeds_per_unit`` seeds each, full run + K removals per seed."""
    cfg = scale.ground_truth
    if cfg.coupling is Coupling.MASKED and not task.supports_masked:
        raise OptionError(f"task {task.name!r} does not support coupling 'masked'; use deleted or independent")
    removals: list[int | Tensor | None] = [None, *targets.tolist()]
    seed_units = [seeds[i:i + cfg.seeds_per_unit] for i in range(0, len(seeds), cfg.seeds_per_unit)]
    return removal_units(
        task, data, scale, seed_units, removals, list(removals), queries, cfg.coupling,
        key_fn=lambda u: unit_key(task, scale, u, targets, queries, cfg.coupling, data.x_train.dtype, device, threads),
        kind="loo_ground_truth", tags={"task": task.name, "coupling": cfg.coupling.value, **(tags or {})},
        threads=threads)


def build_loo_ground_truth(task: Task, data: TaskData, scale: TaskScale, store: UnitStore, device: torch.device,
                           targets: Tensor, queries: Tensor, seeds: list[int], progress: bool = True,
                           tags: dict | None = None, key_parts: tuple = (), executor: Executor | None = None
                           ) -> GroundTruth:
    """The LOO ground truth for explicit targets, queries and seeds (the tuning split uses its own), in units
    of ``seeds_per_unit`` seeds computed by ``executor``; ``key_parts`` salt the assembled key (not the units')."""
    cfg = scale.ground_truth
    executor = executor or make_executor()
    register_loaded(task, data)
    units = loo_units(task, data, scale, device, targets, queries, seeds, executor.threads, tags)
    cat, keys, rows = load_or_train_units(store, units, executor, desc=f"ground truth {task.name}",
                                          progress=progress)
    seed_arr = np.asarray(seeds)
    if cfg.coupling is Coupling.INDEPENDENT:
        seed_arr = np.array([[s] + [init_seed(task.name, s, int(k), cfg.coupling) for k in targets] for s in seeds],
                            dtype=np.int64)  # [S, 1+K]: the full run's seed, then each removal run's init seed
    return assemble_ground_truth(cat, seeds, seed_arr, task, cfg.coupling, targets.numpy(), queries.numpy(),
                                 content_key(*key_parts, keys), rows)
