"""Expected-loss downweighting ground truth (Wei et al. 2024, fimoda ``leave_out_every_batch``; PAPERS.md §6.1).

Instead of dropping target k from the one batch per epoch that holds it (masked LOO), every step's loss
is lowered by k's *expected* share,

    L_t(θ) = (1/B_t)·Σ_{i∈B_t} w_i·ℓ_i(θ) − ε·ℓ_k(θ)/N,      ε = 1 for the ground truth,

so the expected update of every step carries exactly the LOO perturbation −ℓ_k/N (E[𝟙[k∈B_t]]/B = 1/N)
without the noise of *which* steps hold k. Effect = downweighted − full, per seed, paired (same init,
same batches): ``Δm[s, k, q] = m_q(θ_s, downweighted k) − m_q(θ_s)`` (removed − full, the suite's sign).

No engine change: a :class:`benchmark.engine.Schedule` has idx [T, B], weight [T, B], denom [T] and the
engine's batch loss is Σ_i w_i·ℓ_i / denom_t, so appending a column with idx = k and weight
−ε·denom_t/N (denom unchanged) adds −ε·ℓ_k/N. Two layouts (:class:`Layout`):

- ``own``: one extra column, [T, B+1]; the full run gets the same column with weight 0. The 1+K runs
  of a seed then no longer share idx, so ``train_models`` cannot group them (one first-layer GEMM per
  model instead of per seed).
- ``shared``: all K targets appended to every run, [T, B+K], weight −ε·denom/N only at the run's own
  target (all 0 for the full run). idx is identical across the seed's runs, so they are grouped again,
  at the price of K extra forward rows per model. Both give the same parameters (tested).
"""

from __future__ import annotations

import enum
import time
from dataclasses import asdict, dataclass, replace

import numpy as np
import torch
from torch import Tensor
from tqdm.auto import tqdm

from benchmark.config import CACHE_VERSION, Coupling, TaskScale, parse_enum
from benchmark.engine import Schedule, build_schedule, initial_params, train_models
from benchmark.ground_truth import build_ground_truth
from benchmark.scores import score_method
from benchmark.store import UnitStore, content_key
from tasks.base import Task, TaskData


class Layout(str, enum.Enum):
    OWN = "own"  # one extra column per run: [T, B+1]
    SHARED = "shared"  # every target's column in every run: [T, B+K], runs of a seed grouped


def downweighted_schedule(
    base: Schedule, columns: Tensor, active: int | None, n_train: int, epsilon: float = 1.0
) -> Schedule:
    """``base`` (idx, weight [T, B], denom [T]) with the columns ``columns`` [c] appended to every step.

    Column j holds training index ``columns[j]`` with weight −ε·denom_t/N if j == ``active``, else 0
    (``active=None``: the full run). The engine's batch loss becomes
    (1/denom_t)·Σ_{i∈B_t} w_i ℓ_i − ε·ℓ_{columns[active]}/N; denom is unchanged.
    """
    n_steps, n_cols = base.idx.shape[0], columns.numel()
    extra_w = torch.zeros(n_steps, n_cols, dtype=base.weight.dtype)
    if active is not None:
        extra_w[:, active] = -epsilon * base.denom / n_train
    extra_idx = columns.view(1, -1).expand(n_steps, n_cols)
    return Schedule(
        idx=torch.cat([base.idx, extra_idx], dim=1),
        weight=torch.cat([base.weight, extra_w], dim=1),
        denom=base.denom.clone(),
        order=base.order,
    )


def seed_schedules(
    task: Task, n_train: int, scale: TaskScale, seed: int, targets: Tensor, layout: Layout, epsilon: float = 1.0
) -> list[Schedule]:
    """The 1+K schedules of one seed (full run first, then target k = targets[k−1]), sharing init and batches."""
    base = build_schedule(task.name, n_train, scale.train, seed, None, Coupling.MASKED)
    if layout is Layout.SHARED:
        return [downweighted_schedule(base, targets, a, n_train, epsilon) for a in [None, *range(targets.numel())]]
    first = targets[:1]  # the full run's placeholder column (weight 0)
    return [downweighted_schedule(base, first, None, n_train, epsilon)] + [
        downweighted_schedule(base, targets[i : i + 1], 0, n_train, epsilon) for i in range(targets.numel())
    ]


@dataclass(frozen=True)
class DownweightingConfig:
    """Which runs the downweighted ground truth trains: S seeds × (full + K downweighted) on Q queries."""

    seeds: tuple[int, ...]
    targets: tuple[int, ...]
    queries: tuple[int, ...]
    layout: Layout = Layout.OWN
    epsilon: float = 1.0  # 1: remove k's expected share; the tests use ±small ε for finite differences
    seeds_per_unit: int = 8  # seeds per cached unit

    def __post_init__(self) -> None:
        object.__setattr__(self, "layout", parse_enum(Layout, self.layout, "DownweightingConfig.layout"))
        if len(self.seeds) < 1 or len(self.targets) < 1 or len(self.queries) < 1 or self.seeds_per_unit < 1:
            raise ValueError("DownweightingConfig needs >= 1 seed, target, query and seeds_per_unit")


@dataclass(frozen=True)
class DownweightedGroundTruth:
    """measurements [S, 1+K, Q, M] (float64; column 0 the full run, k the run downweighting targets[k−1]),
    failed [S] (seeds with a non-finite run, kept here: the caller decides), train_s (wall of computed units)."""

    measurements: np.ndarray
    measurement_names: tuple[str, ...]
    config: DownweightingConfig
    failed: np.ndarray
    train_s: float
    key: str

    @property
    def full(self) -> np.ndarray:  # [S, Q, M]
        return self.measurements[:, 0]

    @property
    def removed(self) -> np.ndarray:  # [S, K, Q, M]
        return self.measurements[:, 1:]


def train_downweighted_unit(
    task: Task, data: TaskData, scale: TaskScale, cfg: DownweightingConfig, seeds: list[int]
) -> dict[str, Tensor]:
    """Train full + K downweighted runs for ``seeds``; measurements [s, 1+K, Q, M], failed [s]."""
    targets, queries = torch.tensor(cfg.targets), torch.tensor(cfg.queries)
    schedules = [
        sch for s in seeds for sch in seed_schedules(task, data.n_train, scale, s, targets, cfg.layout, cfg.epsilon)
    ]
    n_runs = 1 + targets.numel()
    run_seeds = [s for s in seeds for _ in range(n_runs)]
    theta0 = initial_params(task, run_seeds, data.x_train.dtype, data.x_train.device)
    start = time.perf_counter()
    result = train_models(task, data, scale.train, schedules, theta0)
    wall = time.perf_counter() - start
    with torch.no_grad():
        m = task.measurements_batched(result.theta, data.x_test[queries], data.y_test[queries])  # [n, Q, M]
    failed = result.failed | ~torch.isfinite(m).flatten(1).all(1)
    return {
        "measurements": m.view(len(seeds), n_runs, *m.shape[1:]).double().cpu(),
        "failed": failed.view(len(seeds), n_runs).any(1).cpu(),
        "train_s": torch.tensor(wall),
    }


def build_downweighted_ground_truth(
    task: Task, data: TaskData, scale: TaskScale, cfg: DownweightingConfig, store: UnitStore, progress: bool = True
) -> DownweightedGroundTruth:
    """Every unit of ``seeds_per_unit`` seeds from the store, or trained and stored (ground_truth.py's pattern)."""
    scale_dict = asdict(scale)
    scale_dict.pop("ground_truth")
    seeds = list(cfg.seeds)
    units = [seeds[i : i + cfg.seeds_per_unit] for i in range(0, len(seeds), cfg.seeds_per_unit)]
    parts, keys, train_s = [], [], 0.0
    for unit in tqdm(units, desc=f"downweighted ground truth {task.name}", unit="unit", disable=not progress):
        config = {
            "version": CACHE_VERSION,
            "kind": "downweighted_ground_truth",
            "task": task.name,
            "scale": scale_dict,
            "config": asdict(replace(cfg, seeds=tuple(unit), seeds_per_unit=1)),
            "dtype": str(data.x_train.dtype),
            "device": data.x_train.device.type,
        }
        key = content_key(config)
        tensors = store.get(key, config)
        if tensors is None:
            tensors = train_downweighted_unit(task, data, scale, cfg, unit)
            store.put(
                key,
                config,
                tensors,
                kind="downweighted_ground_truth",
                tags={"task": task.name, "seeds": [unit[0], unit[-1]]},
            )
            train_s += float(tensors["train_s"])
        parts.append(tensors)
        keys.append(key)
    return DownweightedGroundTruth(
        measurements=torch.cat([p["measurements"] for p in parts]).numpy(),
        measurement_names=task.measurement_names,
        config=cfg,
        failed=torch.cat([p["failed"] for p in parts]).numpy(),
        train_s=train_s,
        key=content_key(keys),
    )


SCORED_METRICS = ("loo_mean_spearman", "loo_mean_pearson", "loo_seed_pearson")


def score_against(
    full: np.ndarray,
    removed: np.ndarray,
    predictions: dict[str, np.ndarray],
    measurement_names: tuple[str, ...],
    truth_name: str,
    n_boot: int,
) -> list[dict]:
    """Score per-seed predictions {method: Δ [S, K, Q, M]} against one ground truth (full [S, Q, M],
    removed [S, K, Q, M]) with the harness's :func:`benchmark.scores.score_method` (cross-fitted mean-effect
    Spearman/Pearson over targets per query, averaged over queries; bootstrap CI over seeds, targets and
    queries; noise ceiling = the same score of the truth's own per-seed effect, i.e. its split-half
    reliability). Rows: section ``downweighting``, variant = ``truth_name``, one ``noise_ceiling`` row per
    (measurement, metric)."""
    rows = []
    n_seeds = full.shape[0]
    for j, meas in enumerate(measurement_names):
        ceilings: dict[str, tuple[float, float, float]] = {}
        for method, delta in predictions.items():
            results = score_method(full[..., j], removed[..., j], delta[..., j], n_boot=n_boot, seed=0)
            for r in results:
                if r.metric not in SCORED_METRICS:
                    continue
                rows.append(
                    {
                        "section": "downweighting",
                        "method": method,
                        "variant": truth_name,
                        "measurement": meas,
                        "metric": r.metric,
                        "value": r.value,
                        "ci_low": r.ci_low,
                        "ci_high": r.ci_high,
                        "n": n_seeds,
                    }
                )
                ceilings[r.metric] = (r.noise_ceiling, r.ceiling_ci_low, r.ceiling_ci_high)
        rows += [
            {
                "section": "downweighting",
                "method": "noise_ceiling",
                "variant": truth_name,
                "measurement": meas,
                "metric": metric,
                "value": v,
                "ci_low": lo,
                "ci_high": hi,
                "n": n_seeds,
            }
            for metric, (v, lo, hi) in ceilings.items()
        ]
    return rows


@dataclass(frozen=True)
class PairedTruths:
    """Both truths on the same seeds (those finite in both): downweighted and masked retraining LOO, each
    [S, 1+K, Q, M] with column 0 the (shared) full run."""

    seeds: tuple[int, ...]
    downweighted: np.ndarray
    retraining: np.ndarray


def paired_truths(
    task: Task,
    data: TaskData,
    scale: TaskScale,
    cfg: DownweightingConfig,
    store: UnitStore,
    device: torch.device,
    progress: bool = True,
) -> PairedTruths:
    """The downweighted truth of ``cfg`` and the retraining LOO truth (``benchmark.ground_truth``, the
    scale's coupling and targets/queries, first ``len(cfg.seeds)`` seeds) restricted to cfg's targets and
    queries, which must be among the scale's selection; seeds dropped by either are dropped from both."""
    down = build_downweighted_ground_truth(task, data, scale, cfg, store, progress)
    gt = build_ground_truth(task, data, scale.with_overrides(n_seeds=len(cfg.seeds)), store, device, progress)
    k_pos = np.searchsorted(gt.targets, np.asarray(cfg.targets))
    q_pos = np.searchsorted(gt.queries, np.asarray(cfg.queries))
    if not (np.array_equal(gt.targets[k_pos], cfg.targets) and np.array_equal(gt.queries[q_pos], cfg.queries)):
        raise ValueError("DownweightingConfig targets/queries must be among the ground truth's selection")
    retrain = gt.measurements[:, np.r_[0, 1 + k_pos]][:, :, q_pos]  # [S', 1+K, Q, M]
    kept = [i for i, s in enumerate(cfg.seeds) if s in gt.run_seeds and not down.failed[i]]
    return PairedTruths(
        seeds=tuple(cfg.seeds[i] for i in kept),
        downweighted=down.measurements[kept],
        retraining=retrain[[gt.run_seeds.index(cfg.seeds[i]) for i in kept]],
    )


def training_cost(
    task: Task, data: TaskData, scale: TaskScale, cfg: DownweightingConfig, layouts: tuple[Layout, ...] = (Layout.OWN,)
) -> dict[str, float]:
    """Wall seconds to train one seed's 1+K runs (not cached): masked LOO (grouped by the engine) vs the
    downweighted runs in ``layouts``."""
    seed, targets = cfg.seeds[0], torch.tensor(cfg.targets)
    masked = [
        build_schedule(task.name, data.n_train, scale.train, seed, r, Coupling.MASKED) for r in [None, *cfg.targets]
    ]
    runs = {"masked_loo": masked}
    runs.update(
        {f"downweighted_{lay.value}": seed_schedules(task, data.n_train, scale, seed, targets, lay) for lay in layouts}
    )
    theta0 = initial_params(task, [seed] * len(masked), data.x_train.dtype, data.x_train.device)
    out = {}
    for name, scheds in runs.items():
        start = time.perf_counter()
        train_models(task, data, scale.train, scheds, theta0)
        out[name] = time.perf_counter() - start
    return out
