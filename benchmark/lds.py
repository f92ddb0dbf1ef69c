"""Group removal: the linear datamodelling score (LDS) and distributional LDS (d-TDA eq. 11; PAPERS.md §1.6, §2.5).

Ground truth. M random subsets D′_j ⊂ D, each keeping ⌊αN⌉ examples (drawn without replacement,
reproducible from ``LdsConfig.subset_seed``; ``keep [M, N]`` bool), are trained with the same R seeds as R
full-data runs. Under the default ``masked`` coupling run (s, j) is seed s's own full-data batch schedule
with w_n = 0 for n ∉ D′_j and every batch denominator B unchanged, i.e. it minimises the weighted objective
(1/N)Σ_n w_n ℓ_n + (wd/2)‖θ‖² whose first-order response the per-example methods predict; ``deleted``
re-batches the seed's permutation without the removed examples (steps left empty are skipped: the
standard "retrain on the subset" LDS protocol, fewer steps per epoch); ``independent`` also draws a fresh
init and batch order per (seed, subset). Measurements ``[R, 1+M, Q, M_meas]`` (column 0 = full data).

Group prediction. A method predicts per-example removal effects Δm[s, n, q] for every training example
n (removed − full, per seed); its prediction for subset j is the sum over the removed examples,

    Δm_group[s, j, q] = Σ_{n ∉ D′_j} Δm[s, n, q]                                   (additivity)

— the method's linearity assumption, not the harness's. Shapes: delta [S, N, Q, M] → [S, M_sub, Q, M].

Scores. The subsets play the role of the LOO targets in :func:`benchmark.scores.score_method`, so every
LOO score has an LDS twin with the same cross-fitting, oracle noise ceiling, bootstrap CIs and
score-vs-seeds curves (``LDS_METRICS`` maps the names): ``lds_mean`` is per query the Spearman over
subsets of the predicted vs retrained mean effect (the standard LDS; SOURCE/TRAK average the
subsets' retrained measurement over seeds, which ranks subsets identically since the full-data mean
is common to all subsets), ``lds_var`` and ``lds_w2`` are the distributional LDS of d-TDA eq. 11 with
the variance change and the debiased W2² between the subset's law and the full-data law.
"""

from __future__ import annotations

import io
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from benchmark.config import CACHE_VERSION, Coupling, LdsConfig, TaskScale, derive_seed
from benchmark.engine import init_seed
from benchmark.executors import Executor, WorkUnit, make_executor, register_loaded
from benchmark.ground_truth import (
    MAX_MODELS,
    GroundTruth,
    assemble_ground_truth,
    load_or_train_units,
    removal_units,
    select_targets_and_queries,
)
from benchmark.scores.metrics import LDS_METRICS
from benchmark.store import UnitStore, atomic_write_bytes, content_key
from tasks.base import Task, TaskData


def lds_metric_name(metric: str) -> str:
    """The LDS name of a LOO score (``lds_`` + the name for any score not in :data:`LDS_METRICS`)."""
    return LDS_METRICS.get(metric, f"lds_{metric}")


def lds_config_for(task: Task | type[Task], scale_name: str) -> LdsConfig:
    """The task's LDS settings for a scale (the defaults of :class:`LdsConfig` when it sets none)."""
    return task.lds_scales.get(scale_name, LdsConfig())


def draw_subsets(n_train: int, cfg: LdsConfig, task_name: str) -> np.ndarray:
    """keep [M, N] bool: subset j keeps round(αN) examples drawn uniformly without replacement."""
    n_keep = int(round(cfg.alpha * n_train))
    if not 0 < n_keep < n_train:
        raise ValueError(f"LdsConfig.alpha={cfg.alpha} keeps {n_keep} of N={n_train} examples; need 0 < kept < N")
    gen = torch.Generator().manual_seed(derive_seed("lds_subsets", task_name, cfg.subset_seed))
    keep = np.zeros((cfg.n_subsets, n_train), dtype=bool)
    for j in range(cfg.n_subsets):
        keep[j, torch.randperm(n_train, generator=gen)[:n_keep].numpy()] = True
    return keep


def subset_label(cfg: LdsConfig, j: int) -> str:
    """Names run j for the independent coupling's fresh seeds (never collides with a LOO index)."""
    return f"lds:{cfg.subset_seed}:{j}"


@dataclass(frozen=True)
class LdsGroundTruth:
    """``gt`` holds the subsets in the place of LOO targets (``gt.targets`` = subset ids 0…M−1, measurements
    [R, 1+M, Q, M_meas]); ``keep [M, N]`` says which examples each subset keeps."""

    gt: GroundTruth
    keep: np.ndarray
    config: LdsConfig

    def removed_matrix(self) -> np.ndarray:
        """[M, N] float64, 1 where subset j removes example n."""
        return (~self.keep).astype(np.float64)

    def subset(self, n_seeds: int) -> LdsGroundTruth:
        return LdsGroundTruth(self.gt.subset(n_seeds), self.keep, self.config)

    def export(self, path: Path) -> None:
        """Write ``lds_ground_truth.npz``: the arrays of ``ground_truth.npz`` plus ``keep [M, N]`` and α."""
        gt = self.gt
        buf = io.BytesIO()
        np.savez(buf, measurements=gt.measurements, measurement_names=np.array(gt.measurement_names),
                 subsets=gt.targets, keep=self.keep, alpha=np.array(self.config.alpha), queries=gt.queries,
                 seeds=gt.seeds, coupling=np.array(gt.coupling.value), n_failed=np.array(gt.n_failed),
                 **{f"diag_{k}": v for k, v in gt.diagnostics.items()})
        atomic_write_bytes(path, buf.getvalue())


def lds_unit_key(task: Task, scale: TaskScale, cfg: LdsConfig, seeds: list[int], keep: np.ndarray,
                 queries: Tensor, dtype: torch.dtype, device: torch.device, threads: int,
                 max_models: int = MAX_MODELS) -> tuple[str, dict]:
    scale_dict = asdict(scale)
    scale_dict.pop("ground_truth")
    lds = {k: getattr(v, "value", v) for k, v in asdict(cfg).items() if k not in ("n_seeds", "first_seed",
                                                                               "seeds_per_unit")}
    config = {"version": CACHE_VERSION, "kind": "lds_ground_truth", "task": task.name, "scale": scale_dict,
              "lds": lds, "keep_sha": content_key(np.packbits(keep).tobytes().hex()), "seeds": seeds,
              "queries": queries.tolist(), "dtype": str(dtype), "device": device.type, "threads": threads,
              "max_models": max_models}
    return content_key(config), config


def lds_units(task: Task, data: TaskData, scale: TaskScale, cfg: LdsConfig, device: torch.device, threads: int
              ) -> tuple[list[WorkUnit], np.ndarray, Tensor, list[object]]:
    """The LDS ground truth's work units (R seeds in units of ``seeds_per_unit``; per seed the full run and
    M subset runs), the keep matrix [M, N], the queries and the run labels."""
    if cfg.coupling is Coupling.MASKED and not task.supports_masked:
        raise ValueError(f"task {task.name!r} does not support LDS coupling 'masked'; use deleted or independent")
    _, queries = select_targets_and_queries(data, scale.ground_truth, task.name)
    keep = draw_subsets(data.n_train, cfg, task.name)
    removals: list[int | Tensor | None] = [None, *(torch.from_numpy(np.flatnonzero(~k)) for k in keep)]
    labels: list[object] = [None, *(subset_label(cfg, j) for j in range(cfg.n_subsets))]
    seeds = cfg.seeds
    seed_units = [seeds[i:i + cfg.seeds_per_unit] for i in range(0, len(seeds), cfg.seeds_per_unit)]
    units = removal_units(
        task, data, scale, seed_units, removals, labels, queries, cfg.coupling,
        key_fn=lambda u: lds_unit_key(task, scale, cfg, u, keep, queries, data.x_train.dtype, device, threads),
        kind="lds_ground_truth", tags={"task": task.name, "coupling": cfg.coupling.value, "subsets": cfg.n_subsets},
        threads=threads)
    return units, keep, queries, labels


def build_lds_ground_truth(task: Task, data: TaskData, scale: TaskScale, cfg: LdsConfig, store: UnitStore,
                           device: torch.device, progress: bool = True, executor: Executor | None = None
                           ) -> LdsGroundTruth:
    """Train (or load) the R full runs and R × M subset runs; the queries are the LOO ground truth's."""
    executor = executor or make_executor()
    register_loaded(task, data)
    units, keep, queries, labels = lds_units(task, data, scale, cfg, device, executor.threads)
    cat, keys, rows = load_or_train_units(store, units, executor, desc=f"LDS ground truth {task.name}",
                                          progress=progress)
    seeds = cfg.seeds
    seed_arr = np.asarray(seeds)
    if cfg.coupling is Coupling.INDEPENDENT:
        seed_arr = np.array([[s] + [init_seed(task.name, s, lab, cfg.coupling) for lab in labels[1:]] for s in seeds],
                            dtype=np.int64)
    gt = assemble_ground_truth(cat, seeds, seed_arr, task, cfg.coupling, np.arange(cfg.n_subsets),
                               queries.numpy(), content_key("lds", keys), rows)
    return LdsGroundTruth(gt=gt, keep=keep, config=cfg)


def group_predictions(delta: np.ndarray, keep: np.ndarray) -> np.ndarray:
    """Σ over each subset's removed examples: delta [S, N, Q, M] (per-example, removed − full) and
    keep [M_sub, N] → [S, M_sub, Q, M]."""
    if delta.shape[1] != keep.shape[1]:
        raise ValueError(f"group_predictions: delta predicts {delta.shape[1]} examples but the subsets index "
                         f"N={keep.shape[1]}")
    return np.einsum("jn,snqm->sjqm", (~keep).astype(delta.dtype), delta, optimize=True)
