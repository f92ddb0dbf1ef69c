"""The final-model-only gold standard of Wei et al. 2024 (arXiv 2412.03906; PAPERS.md §3.3, §3.6) and its metric.

Gold standard. For each of the first ``max_seeds`` seeds s, further-train the final model θ_s on D and on
D \\ k (paired, ``deleted`` coupling) for E_gold epochs at lr/10, R_gold replicates with further-training
seeds of role ``gold`` (disjoint from the ``further_training`` method's by construction, see
``methods.further_training.replicate_seed``), and record after every epoch e

    diff[s, e, k, q] = mean_r [ m_q(FT_e(θ_s; D \\ k, ξ_r)) − m_q(FT_e(θ_s; D, ξ_r)) ]     (code's eq. 17)
    gold[s, e, k, q] = diff[s, e, k, q] − mean_k' diff[s, e, k', q]                     (centred, eq. 13)

Metric (Wei et al.'s Figs. 2 and 6, per test instance; here per (seed, query) because every method
predicts per seed): for a method's Δm[s, :, q] over the K targets,

    cos[s, e, q] = ⟨Δm[s, :, q], gold[s, e, :, q]⟩ / (‖Δm[s, :, q]‖ ‖gold[s, e, :, q]‖)
    spearman[s, e, q] = Pearson(rank Δm[s, :, q], rank gold[s, e, :, q])

reported as mean ± SEM over (seed, query) per epoch e, SEM = sd (ddof 1) / √n. The method's scores are
not centred (as in Wei et al.); cos(a, centred b) = ⟨a − ā, b − b̄⟩/(‖a‖‖b − b̄‖), so a constant offset in
a method's scores lowers its cosine but not its Spearman. Conventions for degenerate vectors: a cosine
with a zero vector is 0 (``torch.nn.functional.cosine_similarity``'s, whose eps makes 0/0 = 0: no
alignment); a Spearman with a constant vector is undefined (nan) and left out of the mean (``n`` counts
the finite values). A method with fewer seeds than the gold is scored on the first seeds both have.

The harness also scores ``oracle``, the retraining ground truth's own per-seed effect removed − full:
how far the two ground truths (retraining from scratch vs further training) agree. Also reported, as
method ``gold_split_half``: the cosine and Spearman between the centred gold diffs of
replicates r < R/2 and r ≥ R/2 (both centred), the gold's own reproducibility at R/2 replicates.

Every unit (``seeds_per_unit`` seeds × all replicates and epochs, per-replicate diffs) is cached in the
:class:`UnitStore` under a content key of the task scale, the seeds' final parameters (sha256 of θ), targets,
queries, the gold settings, dtype and device type.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd
import torch
from scipy.stats import rankdata

from benchmark.config import CACHE_VERSION, Coupling, OptionError, parse_enum
from benchmark.store import UnitStore, atomic_write_bytes, content_key
from methods.base import RemovalContext

if TYPE_CHECKING:
    from benchmark.executors import Executor
    from tasks.base import Task
from methods.further_training import (
    PAIRED_COUPLINGS,
    FurtherTrainingRuns,
    further_train_differences,
    further_training_config,
)

CURVE_COLUMNS = ("method", "measurement", "epoch", "metric", "mean", "sem", "n")
SPLIT_HALF = "gold_split_half"  # the gold's own split-half reproducibility, reported like a method


@dataclass(frozen=True)
class GoldConfig:
    """The further-training gold standard's settings (R_gold > the method's R, disjoint seeds)."""

    n_repeats: int = 20  # R_gold (the method uses 10); Wei et al. use 100, 10–20 capture most of it
    epochs: int = 3  # E_gold: the curve is recorded after every epoch 1…E_gold
    lr_factor: float = 0.1  # lr = lr_factor × peak training lr (Wei et al.: lr/10)
    max_seeds: int | None = 8  # the first seeds of the ground truth; None = all
    coupling: Coupling = Coupling.DELETED
    seeds_per_unit: int = 4  # seeds per cached unit

    def __post_init__(self) -> None:
        object.__setattr__(self, "coupling", parse_enum(Coupling, self.coupling, "coupling"))
        if self.coupling not in PAIRED_COUPLINGS:
            raise OptionError(f"GoldConfig.coupling must be one of: deleted, masked; got {self.coupling.value!r}")
        if self.n_repeats < 2 or self.epochs < 1 or self.seeds_per_unit < 1:
            raise OptionError("GoldConfig needs n_repeats >= 2 (split half), epochs >= 1 and seeds_per_unit >= 1")
        if not self.lr_factor > 0:
            raise OptionError(f"GoldConfig.lr_factor must be > 0, got {self.lr_factor}")
        if self.max_seeds is not None and self.max_seeds < 1:
            raise OptionError(f"GoldConfig.max_seeds must be None or >= 1, got {self.max_seeds}")


#: Per-scale defaults. smoke (a CI wiring check) is kept to seconds: 4 seeds × 12 replicates × 3 epochs;
#: small: 8 × 20 × 3 (≈ 0.75 of the ground truth's model-epochs); paper: 8 × 20 × 3 (≈ 0.24 of them).
GOLD_CONFIGS: Mapping[str, GoldConfig] = {"smoke": GoldConfig(n_repeats=12, epochs=3, max_seeds=4),
                                          "small": GoldConfig(), "paper": GoldConfig()}


def gold_config_for(scale_name: str, task: Task | None = None) -> GoldConfig:
    """The scale's defaults, with the task's ``gold_overrides[scale_name]`` (fields of GoldConfig) applied."""
    base = GOLD_CONFIGS.get(scale_name, GoldConfig())
    overrides = {} if task is None else dict(task.gold_overrides.get(scale_name, {}))
    return dataclasses.replace(base, **overrides) if overrides else base


@dataclass(frozen=True)
class GoldStandard:
    """diff [S, R, E, K, Q, M] per replicate (float64, removed − full after epoch e = 1…E), valid [S, R]."""

    diff: np.ndarray
    valid: np.ndarray
    seeds: list[int]
    measurement_names: tuple[str, ...]
    config: GoldConfig
    lr: float  # the further-training learning rate actually used
    key: str

    def centred(self, replicates: slice = slice(None)) -> np.ndarray:
        """gold [S, E, K, Q, M]: mean over the valid replicates in ``replicates``, centred across targets."""
        w = self.valid[:, replicates].astype(np.float64)[..., None, None, None, None]
        with np.errstate(invalid="ignore", divide="ignore"):
            mean = (self.diff[:, replicates] * w).sum(1) / w.sum(1)
        return mean - mean.mean(axis=2, keepdims=True)

    def settings(self) -> dict:
        """What run_info.json records about the gold standard."""
        return {"n_seeds": len(self.seeds), "n_repeats": self.config.n_repeats, "epochs": self.config.epochs,
                "lr_factor": self.config.lr_factor, "lr": self.lr, "coupling": self.config.coupling.value,
                "invalid_replicates": int((~self.valid).sum()), "role": "gold"}


def theta_digest(theta: torch.Tensor) -> str:
    """sha256 of θ's bytes (what the further training starts from)."""
    return hashlib.sha256(theta.detach().cpu().contiguous().numpy().tobytes()).hexdigest()


def gold_unit_key(ctx: RemovalContext, cfg: GoldConfig, seed_ids: list[int], threads: int,
                  max_models: int = 1024) -> tuple[str, dict]:
    scale = asdict(ctx.scale)
    scale.pop("ground_truth")
    settings = {k: v for k, v in asdict(cfg).items() if k not in ("max_seeds", "seeds_per_unit")}
    config = {"version": CACHE_VERSION, "kind": "further_training_gold", "task": ctx.task.name, "scale": scale,
              "gold": settings, "seeds": [ctx.seeds[i] for i in seed_ids],
              "theta_sha256": theta_digest(ctx.theta_full[seed_ids]), "targets": ctx.targets.tolist(),
              "queries": ctx.queries.tolist(), "dtype": str(ctx.theta_full.dtype),
              "device": ctx.theta_full.device.type, "threads": threads, "max_models": max_models}
    return content_key(config), config


@dataclass(frozen=True)
class GoldUnitJob:
    """A picklable gold-standard unit: further-train these seeds' final models (θ shipped, [s, P] on the CPU)
    on D and each D \\ k, R replicates each; the worker reloads the task's data itself."""

    task: str
    scale: object
    seeds: tuple[int, ...]
    theta: torch.Tensor
    targets: tuple[int, ...]
    queries: tuple[int, ...]
    runs: FurtherTrainingRuns
    dtype: str
    device: str
    max_models: int = 1024
    data_sha: str = ""

    def __call__(self) -> dict[str, torch.Tensor]:
        from benchmark.executors import loaded_task

        task, data = loaded_task(self.task, self.scale, self.dtype, self.device, self.data_sha)
        ctx = RemovalContext(task=task, data=data, scale=self.scale, seeds=list(self.seeds),
                             theta_full=self.theta.to(data.x_train.device, data.x_train.dtype),
                             targets=torch.tensor(self.targets, dtype=torch.long),
                             queries=torch.tensor(self.queries, dtype=torch.long))
        result = further_train_differences(ctx, self.runs, list(range(len(self.seeds))), max_models=self.max_models)
        return {"diff": result.diff, "valid": result.valid}


def build_gold_standard(ctx: RemovalContext, store: UnitStore, cfg: GoldConfig,
                        executor: Executor | None = None) -> GoldStandard:
    """Compute (or load from the store) the gold standard for the first ``cfg.max_seeds`` seeds of ``ctx``;
    its units (``seeds_per_unit`` seeds each) go to ``executor`` (default: local, this process's threads)."""
    from benchmark.executors import WorkUnit, data_fingerprint, make_executor, register_loaded
    from benchmark.ground_truth import load_or_train_units

    executor = executor or make_executor()
    register_loaded(ctx.task, ctx.data)
    n_gold = ctx.n_seeds if cfg.max_seeds is None else min(ctx.n_seeds, cfg.max_seeds)
    runs = FurtherTrainingRuns(epochs=cfg.epochs, n_repeats=cfg.n_repeats, lr_factor=cfg.lr_factor,
                               coupling=cfg.coupling, role="gold")
    seed_units = [list(range(i, min(i + cfg.seeds_per_unit, n_gold))) for i in range(0, n_gold, cfg.seeds_per_unit)]
    units = []
    for seed_ids in seed_units:
        key, config = gold_unit_key(ctx, cfg, seed_ids, executor.threads)
        job = GoldUnitJob(ctx.task.name, ctx.scale, tuple(ctx.seeds[i] for i in seed_ids),
                          ctx.theta_full[seed_ids].detach().cpu(), tuple(ctx.targets.tolist()),
                          tuple(ctx.queries.tolist()), runs, str(ctx.data.x_train.dtype),
                          ctx.data.x_train.device.type, data_sha=data_fingerprint(ctx.data))
        tags = {"task": ctx.task.name, "seeds": [ctx.seeds[seed_ids[0]], ctx.seeds[seed_ids[-1]]]}
        units.append(WorkUnit(key, config, job, "further_training_gold", tags, executor.threads,
                              runs=len(seed_ids) * runs.n_repeats * (1 + len(ctx.targets))))
    cat, keys, _ = load_or_train_units(store, units, executor, desc=f"further-training gold {ctx.task.name}",
                                    progress=ctx.progress)
    lr = further_training_config(ctx.scale.train, cfg.epochs, cfg.lr_factor).lr
    return GoldStandard(diff=cat["diff"].double().numpy(), valid=cat["valid"].bool().numpy(),
                        seeds=ctx.seeds[:n_gold], measurement_names=ctx.task.measurement_names, config=cfg,
                        lr=lr, key=content_key(keys))


def cosine_over_targets(pred: np.ndarray, gold: np.ndarray) -> np.ndarray:
    """Cosine over the target axis (-2) of pred [..., K, Q] and gold [..., K, Q] → [..., Q]; 0 for a zero
    vector, nan where either is not finite."""
    num = (pred * gold).sum(-2)
    den = np.sqrt((pred * pred).sum(-2) * (gold * gold).sum(-2))
    with np.errstate(invalid="ignore", divide="ignore"):
        cos = np.where(den > 0, num / np.where(den > 0, den, 1.0), 0.0)
    return np.where(np.isfinite(num) & np.isfinite(den), cos, np.nan)


def spearman_over_targets(pred: np.ndarray, gold: np.ndarray) -> np.ndarray:
    """Spearman over the target axis (-2) → [..., Q]; nan where either vector is constant (or not finite)."""
    pred, gold = np.broadcast_arrays(pred, gold)
    finite = np.isfinite(pred).all(-2) & np.isfinite(gold).all(-2)
    ra = rankdata(np.nan_to_num(pred), axis=-2)
    rb = rankdata(np.nan_to_num(gold), axis=-2)
    ra, rb = ra - ra.mean(-2, keepdims=True), rb - rb.mean(-2, keepdims=True)
    den = np.sqrt((ra * ra).sum(-2) * (rb * rb).sum(-2))
    with np.errstate(invalid="ignore", divide="ignore"):
        rho = (ra * rb).sum(-2) / den
    return np.where(finite & (den > 0), rho, np.nan)


def mean_sem(values: np.ndarray) -> tuple[float, float, int]:
    """Mean, SEM = sd(ddof=1)/√n and n over the finite entries (nan SEM for n < 2)."""
    v = np.asarray(values, dtype=np.float64).ravel()
    v = v[np.isfinite(v)]
    if v.size == 0:
        return math.nan, math.nan, 0
    sem = float(v.std(ddof=1) / math.sqrt(v.size)) if v.size > 1 else math.nan
    return float(v.mean()), sem, int(v.size)


def wei_scores(delta: np.ndarray, gold: np.ndarray) -> dict[str, np.ndarray]:
    """{metric: [S', E, Q, M]} for a method's delta [S, K, Q, M] against gold [S_g, E, K, Q, M] on the first
    S' = min(S, S_g) seeds."""
    n = min(delta.shape[0], gold.shape[0])
    pred = delta[:n, None]  # [S', 1, K, Q, M]
    pred_t, gold_t = np.moveaxis(pred, -1, 2), np.moveaxis(gold[:n], -1, 2)  # [S', E, M, K, Q]
    out = {"cosine": cosine_over_targets(pred_t, gold_t), "spearman": spearman_over_targets(pred_t, gold_t)}
    return {k: np.moveaxis(v, 2, -1) for k, v in out.items()}  # [S', E, Q, M]


def curve_rows(name: str, scores: dict[str, np.ndarray], measurement_names: tuple[str, ...]) -> list[dict]:
    rows = []
    for metric, values in scores.items():  # [S', E, Q, M]
        for e in range(values.shape[1]):
            for j, meas in enumerate(measurement_names):
                mean, sem, n = mean_sem(values[:, e, :, j])
                rows.append({"method": name, "measurement": meas, "epoch": e + 1, "metric": metric, "mean": mean,
                             "sem": sem, "n": n})
    return rows


def further_training_curves(gold: GoldStandard, predictions: Mapping[str, np.ndarray]) -> pd.DataFrame:
    """The tidy curves (columns ``CURVE_COLUMNS``): every method's Wei scores per epoch, then the gold's
    split-half reproducibility (``gold_split_half``). ``predictions``: {method: delta [S, K, Q, M]}."""
    centred = gold.centred()
    rows = []
    for name, delta in predictions.items():
        rows += curve_rows(name, wei_scores(np.asarray(delta, dtype=np.float64), centred), gold.measurement_names)
    half = gold.config.n_repeats // 2
    a, b = gold.centred(slice(0, half)), gold.centred(slice(half, None))  # [S, E, K, Q, M]
    a_t, b_t = np.moveaxis(a, -1, 2), np.moveaxis(b, -1, 2)
    split = {"cosine": cosine_over_targets(a_t, b_t), "spearman": spearman_over_targets(a_t, b_t)}
    rows += curve_rows(SPLIT_HALF, {k: np.moveaxis(v, 2, -1) for k, v in split.items()}, gold.measurement_names)
    return pd.DataFrame(rows, columns=list(CURVE_COLUMNS))


def replicate_curve(gold: GoldStandard) -> pd.DataFrame:
    """How many further-training replicates the gold standard needs (Wei et al.: 10–20 capture most of the
    benefit): the mean diff of the first r replicates of half A (uncentred, as a method's scores) against the
    centred mean of half B (the other R/2 replicates), Wei's metric per epoch, for r = 1, 2, 4, …, R/2.
    Columns ``n_replicates`` and ``CURVE_COLUMNS`` (``method`` = ``further_training_r<r>``)."""
    half = gold.config.n_repeats // 2
    target = gold.centred(slice(half, None))  # [S, E, K, Q, M]
    sizes = sorted({*(2 ** i for i in range(int(math.log2(max(half, 1))) + 1)), half})
    frames = []
    for r in sizes:
        w = gold.valid[:, :r].astype(np.float64)[..., None, None, None, None]
        with np.errstate(invalid="ignore", divide="ignore"):
            mean = (gold.diff[:, :r] * w).sum(1) / w.sum(1)  # [S, E, K, Q, M]
        pred_t, gold_t = np.moveaxis(mean, -1, 2), np.moveaxis(target, -1, 2)
        scores = {"cosine": np.moveaxis(cosine_over_targets(pred_t, gold_t), 2, -1),
                  "spearman": np.moveaxis(spearman_over_targets(pred_t, gold_t), 2, -1)}
        frame = pd.DataFrame(curve_rows(f"further_training_r{r}", scores, gold.measurement_names),
                             columns=list(CURVE_COLUMNS))
        frames.append(frame.assign(n_replicates=r))
    return pd.concat(frames, ignore_index=True)


def write_curves(path: Path, frame: pd.DataFrame) -> None:
    buf = io.StringIO()
    frame.to_csv(buf, index=False, float_format="%.6g")
    atomic_write_bytes(path, buf.getvalue().encode())
