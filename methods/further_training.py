"""Further training from the final model (Wei et al. 2024, arXiv 2412.03906, §3 "further training" gold
standard: the expectation the reviewers call eq. (3), with the full-run subtraction of the code's eq. (17)).

Per seed s, start from the seed's final parameters θ_s with a fresh optimiser (plain SGD, no momentum,
same weight decay and batch size, constant lr = lr_factor × the training run's peak lr; Wei et al. use
lr/10 in every released config, PAPERS.md §6.3) and further-train for E epochs on D and on D \\ k,
paired: replicate r draws one batch order per epoch and the LOO run of k uses the same permutation with
k deleted (``deleted`` coupling, fimoda's ``RandomSamplerLOO``; ``masked`` keeps k's slot at weight 0).
The prediction is the replicate average

    Δm[s, k, q] = (1/R) Σ_r [ m_q(FT_E(θ_s; D \\ k, ξ_{s,r})) − m_q(FT_E(θ_s; D, ξ_{s,r})) ]      (removed − full)

optionally centred across targets (the code's eq. (13): Δm[s, k, q] − mean_k' Δm[s, k', q]; off for the
method, which predicts removal effects). Shapes: θ_s [S, P] → Δm [S, K, Q, M].

The replicate's batch-order seed ξ_{s,r} is ``derive_seed("further_training", role, task, seed, r)``:
the method (role ``method``) and the gold standard of ``benchmark.further_training_gold`` (role ``gold``)
therefore never share a further-training seed. All 1+K runs of a seed (times R replicates) are trained
at once by ``benchmark.engine.train_models``; epoch-end checkpoints give the measurement after every
further-training epoch (the gold standard's curve over epochs).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor
from tqdm.auto import tqdm

from benchmark.config import Coupling, LRSchedule, OptionError, TrainConfig, derive_seed, parse_enum
from benchmark.engine import build_schedule, train_models
from benchmark.registry import register_method
from methods.base import Method, RemovalContext

ROLES = ("method", "gold")  # disjoint further-training seed streams
PAIRED_COUPLINGS = (Coupling.DELETED, Coupling.MASKED)


def replicate_seed(task_name: str, seed: int, replicate: int, role: str) -> int:
    """ξ_{s,r}: the seed of replicate r's batch order when further-training seed s's final model."""
    if role not in ROLES:
        raise OptionError(f"further-training role must be one of: {', '.join(ROLES)}; got {role!r}")
    return derive_seed("further_training", role, task_name, seed, replicate)


def further_training_config(train: TrainConfig, epochs: int, lr_factor: float) -> TrainConfig:
    """Plain SGD (β = 0), constant lr = lr_factor · peak lr, same weight decay and batch size, E epochs."""
    return TrainConfig(lr=lr_factor * train.lr, momentum=0.0, weight_decay=train.weight_decay,
                       batch_size=train.batch_size, epochs=epochs, lr_schedule=LRSchedule.CONSTANT)


@dataclass(frozen=True)
class FurtherTrainingRuns:
    """Everything that determines a set of further-training runs besides the context."""

    epochs: int  # E
    n_repeats: int  # R
    lr_factor: float
    coupling: Coupling
    role: str


@dataclass(frozen=True)
class FurtherTrainingDiffs:
    """diff [s, R, E, K, Q, M] float64: m(LOO) − m(full) after each epoch e = 1…E (or after epoch E only,
    E axis of length 1), per seed and replicate; valid [s, R] bool: False where any of the replicate's 1+K
    runs diverged (its diff is then 0)."""

    diff: Tensor
    valid: Tensor

    def mean(self) -> Tensor:
        """Mean over the valid replicates, [s, E, K, Q, M] (nan for a seed with none)."""
        w = self.valid.to(self.diff.dtype).view(*self.valid.shape, 1, 1, 1, 1)
        return (self.diff * w).sum(1) / w.sum(1)


def further_train_differences(ctx: RemovalContext, runs: FurtherTrainingRuns, seed_ids: list[int],
                              every_epoch: bool = True, max_models: int = 1024,
                              max_checkpoint_elems: int = 2**28) -> FurtherTrainingDiffs:
    """Further-train seeds ``seed_ids`` of ``ctx`` (full + K LOO runs, R replicates each) and measure after
    every epoch (``every_epoch``; else after the last only, so the E axis has length 1).

    Chunks the (seed, replicate) pairs so that one call trains at most ``max_models`` models and keeps at
    most ``max_checkpoint_elems`` checkpoint entries (models × (E+1) × P); chunking does not change results.
    """
    if runs.coupling not in PAIRED_COUPLINGS:
        raise OptionError(f"further-training coupling must be one of: deleted, masked; got {runs.coupling.value!r}")
    task, data = ctx.task, ctx.data
    cfg = further_training_config(ctx.scale.train, runs.epochs, runs.lr_factor)
    removals: list[int | None] = [None, *ctx.targets.tolist()]
    n_runs = len(removals)
    pairs = [(i, r) for i in seed_ids for r in range(runs.n_repeats)]
    per_model = (runs.epochs + 1 if every_epoch else 1) * ctx.theta_full.shape[1]
    per_chunk = max(1, min(max_models, max_checkpoint_elems // per_model) // n_runs)
    chunks = [pairs[i:i + per_chunk] for i in range(0, len(pairs), per_chunk)]
    diffs, valid = [], []
    for chunk in tqdm(chunks, desc=f"further training ({runs.role})", unit="chunk", disable=not ctx.progress):
        schedules = [build_schedule(task.name, ctx.n_train, cfg, replicate_seed(task.name, ctx.seeds[i], r, runs.role),
                                    k, runs.coupling) for i, r in chunk for k in removals]
        theta0 = ctx.theta_full[[i for i, _ in chunk]].repeat_interleave(n_runs, dim=0)  # [c·(1+K), P]
        result = train_models(task, data, cfg, schedules, theta0,
                              checkpoint_models=list(range(len(schedules))) if every_epoch else None)
        thetas = result.checkpoints[:, 1:].unbind(1) if every_epoch else [result.theta]
        with torch.no_grad():
            m = torch.stack([task.measurements_batched(th, ctx.x_query, ctx.y_query) for th in thetas],
                            dim=1)  # [c·(1+K), E, Q, M] (E = 1 unless every_epoch)
        m = m.double().view(len(chunk), n_runs, *m.shape[1:])
        ok = ~result.failed.view(len(chunk), n_runs).any(1) & torch.isfinite(m).flatten(1).all(1)  # [c]
        d = (m[:, 1:] - m[:, :1]).transpose(1, 2)  # [c, E, K, Q, M]
        diffs.append(torch.where(ok.view(-1, 1, 1, 1, 1), d, torch.zeros_like(d)))
        valid.append(ok)
    diff = torch.cat(diffs).view(len(seed_ids), runs.n_repeats, *diffs[0].shape[1:]).cpu()
    return FurtherTrainingDiffs(diff=diff, valid=torch.cat(valid).view(len(seed_ids), runs.n_repeats).cpu())


@dataclass(frozen=True)
class FurtherTrainingConfig:
    epochs: int = 1  # E; no principled choice exists (Wei et al. report curves); 1 is their shortest
    n_repeats: int = 10  # R further-training seeds; 10–20 capture most of the benefit of 100 (PAPERS.md §3.3)
    lr_factor: float = 0.1  # lr = lr_factor × peak training lr (lr/10 in every fimoda config)
    max_seeds: int | None = 8  # the first 8 seeds (≥ 4 for cross-fitting); None = all
    centre: bool = False  # subtract the mean over targets (eq. 13); the method predicts removal effects
    coupling: Coupling = Coupling.DELETED  # deleted: fimoda's RandomSamplerLOO; masked: k's slot at w = 0

    def __post_init__(self) -> None:
        object.__setattr__(self, "coupling", parse_enum(Coupling, self.coupling, "coupling"))
        if self.coupling not in PAIRED_COUPLINGS:
            raise OptionError(f"FurtherTrainingConfig.coupling must be one of: deleted, masked; got "
                              f"{self.coupling.value!r}")
        if self.epochs < 1 or self.n_repeats < 1:
            raise OptionError(f"FurtherTrainingConfig.epochs and n_repeats must be >= 1, got {self.epochs}, "
                              f"{self.n_repeats}")
        if not self.lr_factor > 0:
            raise OptionError(f"FurtherTrainingConfig.lr_factor must be > 0, got {self.lr_factor}")
        if self.max_seeds is not None and self.max_seeds < 4:
            raise OptionError(f"FurtherTrainingConfig.max_seeds must be None or >= 4, got {self.max_seeds}")


@register_method("further_training")
class FurtherTraining(Method):
    """Δm[s, k, q] = mean_r [m_q(FT(θ_s; D \\ k, ξ_r)) − m_q(FT(θ_s; D, ξ_r))] after E epochs (module doc)."""

    is_distributional = True
    lds_skip_reason = ("one further-training run per training example × R replicates × seeds "
                       "(N·R·S runs; 80,000 at small): not run for LDS")
    config_cls = FurtherTrainingConfig

    def predict(self, ctx: RemovalContext) -> Tensor:
        c = self.config
        runs = FurtherTrainingRuns(epochs=c.epochs, n_repeats=c.n_repeats, lr_factor=c.lr_factor,
                                   coupling=c.coupling, role="method")
        result = further_train_differences(ctx, runs, list(range(ctx.n_seeds)), every_epoch=False)
        delta = result.mean()[:, -1]  # after E epochs, [S, K, Q, M]
        if c.centre:
            delta = delta - delta.mean(1, keepdim=True)
        self.info["further_lr"] = c.lr_factor * ctx.scale.train.lr
        self.info["invalid_replicates"] = int((~result.valid).sum())
        return delta.to(ctx.theta_full.device)
