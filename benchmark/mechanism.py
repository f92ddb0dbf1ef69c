"""The d-TDA mechanism: unrolled differentiation → influence functions, the null space, a low-noise truth.

Mlodozeniec et al. 2025 (d-TDA, arXiv 2506.12965) Theorem 2: along an SGD trajectory the unrolled
response r_UD converges to r_IF = ∇²L⁺∇ℓ_k plus a component in Null(∇²L); Fig. 3 shows the UD–IF
correlation of predicted measurement changes rising to ≈ 0.9 late in training (higher for smaller η) and
‖P_col ∇m‖/‖∇m‖ ≈ 1 (the null-space part is invisible to m); Remark 2: for GLMs UD → IF exactly.
Wei et al. 2024 (arXiv 2412.03906), fimoda ``leave_out_every_batch``: see :mod:`benchmark.downweighting`.
Every effect is **removed − full**, Δm[s,k,q] = m_q(θ_s without k) − m_q(θ_s) (d-TDA eq. (1) is full − removed).

``mechanism.csv`` (long format): section, lr, epoch, time, method, variant, measurement, metric, value, ci_low,
ci_high, se, n. Targets [K] and queries [Q] are the first K / Q of the scale's ground-truth selection
(``select_targets_and_queries``); seeds are 0…S−1 as in the ground truth.

1. ``ud_vs_if``. Seeds trained with the task's TrainConfig but lr η ∈ ``lrs``, for E ∈ ``epochs`` epochs.
   With a constant lr the E-epoch run is a prefix of the longest (``engine.permutations`` draws the epochs'
   permutations in order from one generator), so one engine training (epoch checkpoints) and ONE UD replay
   per (η, seed) serve every E (:func:`unroll_predictions`, tested equal to ``Unroll`` on each prefix run).
       Δ_UD[s,k,q,j] = ∇m_{q,j}(θ_E)ᵀ r_E                      r_E: methods/unroll.py's tangent at epoch E
       Δ_IF[s,k,q,j] = (1/N)·∇m_{q,j}(θ_E)ᵀ (G(θ_E) + wd·I + λI)⁻¹ ∇ℓ_k(θ_E)     (methods/influence.py)
   G = GGN of (1/N)Σℓ_n: with wd·I the curvature of the objective actually trained. θ_E for the IF is the
   engine's checkpoint; ∇m for UD is at the replay's θ_E (as ``Unroll``; |difference| logged,
   ``replay_max_abs_diff``). Variants: ``damped``, λ = damping_scale × mean eigenvalue (the suite's default
   0.1): ``Influence(InfluenceConfig(damping_scale))`` itself (CG + Nyström at small); ``undamped``, λ = 0
   (Theorem 2's limit; wd·I keeps it invertible): the same formula solved EXACTLY by Woodbury,
       (G_data + wd·I)⁻¹ = (I − Aᵀ(AAᵀ + wd·I)⁻¹A)/wd,
   with the Cholesky factor of section 2 (CG needs κ ≈ λ_max/wd ≈ 1e5 there: 80–150+ iterations, slower than
   the factor; tests check it equals ``Influence`` dense with damping 0). Metrics per seed over the K·Q pairs
   (k, q): ``pearson``, ``spearman``, ``norm_ratio`` = ‖Δ_IF‖/‖Δ_UD‖; value = mean over seeds, se = sd/√S,
   ci = mean ± t_{.975,S−1}·se (clipped to [−1, 1]), n = S. Column ``time`` = η·t (t = E·⌈N/B⌉ steps), the
   gradient-flow time at which learning rates are comparable. Diagnostic variant ``time_damped`` (column-space
   checkpoints only): λ = 1/(η·t). Reason: for a quadratic, UD after t steps is r_t = (I − (I − ηH)^t)H⁻¹g,
   i.e. H⁻¹g in directions with curvature s ≫ 1/(ηt) and ≈ ηt·g below, the same cutoff as a damping
   λ ≈ 1/(ηt); with wd = 1e-4 the undamped limit needs η·wd·t ≳ 1 (≈ 1e5 steps at η = 0.1). Info rows:
   ``replay_max_abs_diff``, damped ``damping`` λ, ``cg_iterations``.
2. ``colspace``. G_data = (1/N)Σ_n J_nᵀΛ_nJ_n WITHOUT wd·I (which would make it full rank); J_n =
   ∂logits_n/∂θ [C, P], Λ_n = diag(p_n) − p_n p_nᵀ. G_data = AᵀA, A [N(C−1), P] with rows
   A_n = Λ_n^{1/2}J_n/√N (Λ_n's null vector 𝟙 dropped), so rank ≤ N(C−1) (9000 < P = 13258 at small).
       f_μ(g)² = gᵀ G(G + μI)⁻¹ g / ‖g‖² = (Ag)ᵀ(AAᵀ + μI)⁻¹(Ag) / ‖g‖² = Σ_i s_i/(s_i + μ)·c_i² / ‖g‖²
   (s_i, c_i: G's eigenvalues and g's coordinates in its eigenbasis): the norm of a soft projection onto the
   eigendirections with s_i ≫ μ, evaluated exactly by a float64 Cholesky of the [N(C−1)]² Gram AAᵀ, which
   is built from per-layer Kronecker factors (δ ⊗ a for nn.Linear) in ~2 s at small; an eigendecomposition
   (all thresholds at once) costs ≈ 15× a Cholesky (measured: 148 s vs ≈ 10 s for 9000², 2 threads).
   Variants ``rtol=r``: μ = r·λ_max(G) (the numerical column space; λ_max by 100 power iterations) at the
   column-space checkpoints (first ``colspace_seeds`` seeds × ``colspace_epochs``); ``mu=wd``: μ = wd, the
   directions where data curvature exceeds weight decay (what the undamped IF inverts), at every section-1
   checkpoint (free: the Woodbury factor). Measured at small: G_data's spectrum is wide (λ_max ≈ 9; 455 /
   2410 / 5299 / 7261 of 9000 eigenvalues above 1e-3 / 1e-5 / 1e-7 / 1e-9 × λ_max at epoch 5), so the
   threshold matters and both are reported. g = ∇m_q; value = mean over (seed, query), se over them,
   n = S·Q. For cross-entropy ∇margin = −∇loss/(1 − p_y), so the two measurements' rows coincide.
3. ``downweighting``. :mod:`benchmark.downweighting`'s truth (every batch's loss − ℓ_k/N) and the masked
   retraining LOO truth (benchmark.ground_truth) on the same ``downweight_seeds`` seeds at the task's own
   TrainConfig; ``unroll``, ``influence_damped``, ``influence_undamped`` scored against each with
   benchmark.scores.score_method (as the harness: cross-fitted halves, centred bootstrap CI over seeds,
   targets and queries, noise_ceiling = the truth's own split-half score); ``mean_abs_mean_effect`` of
   each truth; ``train_s_per_seed`` times one seed's 1+K runs: masked LOO (grouped by the engine) vs the
   downweighted ``own`` layout (not grouped). Measured at small (2 idle cores, K = 50): masked 0.52 s,
   ``own`` 0.62 s (+19 %), ``shared`` 0.80 s (grouped again, but K extra rows per model), so ``own`` is
   the default.

Costs per (seed, E) at small (2 idle cores): Gram 1.2 s, float64 Cholesky of 9000² 8.7 s (μ = wd: the
undamped IF and f_wd), solves 1.5 s, damped CG 3.8 s, UD replay 0.7 s per seed-epoch; at column-space
checkpoints + ≈ 10 s per rtol and ≈ 5 s for the float32 time-damped factor. ``small`` (2 seeds × 2 lrs ×
3 E, 6 seeds in section 3) took 450 s on idle cores before two savings (float32 power iteration, a shared
solve; ≈ 390 s expected) and 1824 s while another job held a core. ``paper`` (N = 6144: a 55296² Gram,
24 GB float64 plus its factor) needs a GPU and is untested. Units are cached per (η, seed, E) in the
UnitStore (kind ``mechanism_ud_if``; section 3's truths as ``downweighted_ground_truth`` /
``loo_ground_truth``, its bootstrap scores as ``mechanism_scores``), so a rerun only re-times training
and a larger S is incremental.
"""

from __future__ import annotations

import argparse
import io
import json
import math
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from scipy import stats
from torch import Tensor, nn
from torch.func import jvp, vmap
from tqdm.auto import tqdm

from benchmark.config import CACHE_VERSION, Coupling, OptionError, TaskScale
from benchmark.downweighting import DownweightingConfig, paired_truths, score_against, training_cost
from benchmark.engine import (
    build_schedule,
    configure_determinism,
    initial_params,
    steps_per_epoch,
    train_models,
)
from benchmark.ground_truth import select_targets_and_queries
from benchmark.registry import TASKS
from benchmark.scores import rowwise_pearson, rowwise_spearman
from benchmark.store import UnitStore, atomic_write_bytes, content_key
from methods.base import RemovalContext, example_loss_grads, measurement_grads
from methods.influence import Influence, InfluenceConfig
from methods.kfac import LayerBlock, layer_blocks
from methods.unroll import replay_schedules, sgd_update
from tasks.base import Task, TaskData

COLUMNS = (
    "section",
    "lr",
    "epoch",
    "time",
    "method",
    "variant",
    "measurement",
    "metric",
    "value",
    "ci_low",
    "ci_high",
    "se",
    "n",
)


@dataclass(frozen=True)
class MechanismConfig:
    lrs: tuple[float, ...] = (0.1, 0.03)  # η values compared in section 1
    epochs: tuple[int, ...] = (1, 5, 20)  # training lengths E, increasing
    n_seeds: int = 2  # S of sections 1–2 (seeds 0…S−1); each (η, seed, E) costs a Gram + a Cholesky
    n_targets: int = 50  # K: the first K of the scale's targets
    n_queries: int = 50  # Q: the first Q of the scale's queries
    colspace_epochs: tuple[int, ...] = (1, 20)  # ⊂ epochs: where the rtol variants are computed
    colspace_seeds: int = 1  # the first seeds get the rtol variants (one more Cholesky per rtol)
    colspace_rtols: tuple[float, ...] = (1e-9,)  # μ = rtol·λ_max(G_data); μ = wd is always computed
    downweight_seeds: int = 6  # S of section 3 (even, >= 4: split halves)
    damping_scale: float = 0.1  # the suite's default λ / mean eigenvalue
    n_boot: int = 200  # bootstrap replicates of section 3's scores
    max_gram_rows: int = 60_000  # N(C−1) above this is refused (memory: 16·rows² bytes)

    def __post_init__(self) -> None:
        def need(ok: bool, name: str, allowed: str) -> None:
            if not ok:
                raise OptionError(f"MechanismConfig.{name} must be {allowed}; got {getattr(self, name)!r}")

        need(len(self.lrs) >= 1 and all(lr > 0 for lr in self.lrs), "lrs", "a non-empty tuple of floats > 0")
        need(
            len(self.epochs) >= 1 and list(self.epochs) == sorted(set(self.epochs)) and self.epochs[0] >= 1,
            "epochs",
            "a non-empty strictly increasing tuple of ints >= 1",
        )
        need(self.n_seeds >= 2, "n_seeds", ">= 2 (a standard error over seeds)")
        need(self.n_targets >= 2 and self.n_queries >= 2, "n_targets", "and n_queries >= 2")
        need(set(self.colspace_epochs) <= set(self.epochs), "colspace_epochs", f"a subset of epochs {self.epochs}")
        need(0 <= self.colspace_seeds <= self.n_seeds, "colspace_seeds", f"in [0, n_seeds={self.n_seeds}]")
        need(all(0 < r < 1 for r in self.colspace_rtols), "colspace_rtols", "a tuple of floats in (0, 1)")
        need(self.downweight_seeds >= 4 and self.downweight_seeds % 2 == 0, "downweight_seeds", "even and >= 4")
        need(self.damping_scale > 0, "damping_scale", "> 0 (the undamped variant is always added)")
        need(self.n_boot >= 10, "n_boot", ">= 10")
        need(self.max_gram_rows >= 1, "max_gram_rows", ">= 1")


MECHANISM_CONFIGS: dict[str, MechanismConfig] = {
    "smoke": MechanismConfig(
        lrs=(0.1, 0.03),
        epochs=(1, 3, 9),
        n_seeds=2,
        n_targets=8,
        n_queries=8,
        colspace_epochs=(1, 9),
        colspace_seeds=1,
        downweight_seeds=4,
        n_boot=50,
    ),
    "small": MechanismConfig(),
    "paper": MechanismConfig(  # the paper task (N = 6144, momentum 0.9, lr 0.03): GPU only
        lrs=(0.03, 0.01),
        epochs=(1, 2, 5, 10, 20),
        n_seeds=4,
        n_targets=100,
        n_queries=100,
        colspace_epochs=(1, 5, 20),
        colspace_seeds=2,
        colspace_rtols=(1e-6, 1e-9),
        downweight_seeds=16,
    ),
}


# ---------------------------------------------------------------------------------------------- UD
def unroll_predictions(
    ctx: RemovalContext, record_epochs: tuple[int, ...], seeds_per_chunk: int = 8
) -> tuple[Tensor, Tensor]:
    """methods/unroll.py's tangent, recorded at the end of each epoch in ``record_epochs`` of ONE replay of
    ``ctx.scale.train`` (plain or momentum SGD, d-TDA eq. (6)); returns Δ_UD [S, E, K, Q, M] =
    ∇m(θ_e)ᵀ r_e and the replayed θ_e [S, E, P]. Equals ``Unroll().tangents`` on the e-epoch run (tested)."""
    if not record_epochs or max(record_epochs) > ctx.scale.train.epochs or min(record_epochs) < 1:
        raise ValueError(f"record_epochs {record_epochs} must lie in [1, {ctx.scale.train.epochs}] (the replayed run)")
    deltas, thetas = [], []
    for start in range(0, ctx.n_seeds, seeds_per_chunk):
        d, th = _replay_chunk(ctx, list(range(start, min(start + seeds_per_chunk, ctx.n_seeds))), record_epochs)
        deltas.append(d)
        thetas.append(th)
    return torch.cat(deltas), torch.cat(thetas)


def _replay_chunk(ctx: RemovalContext, seed_ids: list[int], record_epochs: tuple[int, ...]) -> tuple[Tensor, Tensor]:
    task, data, cfg = ctx.task, ctx.data, ctx.scale.train
    dtype, device = ctx.theta_full.dtype, ctx.theta_full.device
    seeds, idx, weight, denom, lrs = replay_schedules(ctx, seed_ids)  # idx [s, T, B]
    theta = initial_params(task, seeds, dtype, device)  # [s, P]
    vel = torch.zeros_like(theta)
    r_theta = theta.new_zeros(len(seed_ids), ctx.targets.numel(), theta.shape[1])  # [s, K, P]
    r_vel = torch.zeros_like(r_theta)
    targets = ctx.targets.to(device)
    update = sgd_update(task, cfg.weight_decay, cfg.momentum)

    def tangent(
        th: Tensor,
        v: Tensor,
        w: Tensor,
        x: Tensor,
        y: Tensor,
        dn: Tensor,
        lr: float,
        rt: Tensor,
        rv: Tensor,
        dw: Tensor,
    ) -> tuple[Tensor, Tensor]:
        return jvp(lambda a, b, c: update(a, b, c, x, y, dn, lr), (th, v, w), (rt, rv, dw))[1]

    per_seed = vmap(vmap(tangent, in_dims=(None,) * 7 + (0, 0, 0)), in_dims=(0,) * 6 + (None, 0, 0, 0))
    step = vmap(update, in_dims=(0, 0, 0, 0, 0, 0, None))
    per_epoch = idx.shape[1] // cfg.epochs
    record = {e * per_epoch for e in record_epochs}
    deltas, thetas = [], []
    for t in range(max(record)):
        x, y = data.x_train[idx[:, t]], data.y_train[idx[:, t]]
        dn = denom[:, t].clamp(min=1)
        dw = -(idx[:, t].unsqueeze(1) == targets.view(1, -1, 1)).to(dtype) * weight[:, t].unsqueeze(1)  # [s, K, B]
        r_theta, r_vel = per_seed(theta, vel, weight[:, t], x, y, dn, lrs[t], r_theta, r_vel, dw)
        theta, vel = step(theta, vel, weight[:, t], x, y, dn, lrs[t])
        if t + 1 in record:
            g_m = [measurement_grads(task, theta[i].clone(), ctx.x_query, ctx.y_query) for i in range(len(seed_ids))]
            deltas.append(torch.einsum("skp,sqmp->skqm", r_theta, torch.stack(g_m)))
            thetas.append(theta.clone())
    return torch.stack(deltas, 1), torch.stack(thetas, 1)


# ---------------------------------------------------------------------------------------------- GGN
@dataclass(frozen=True)
class DataGgn:
    """G_data = (1/N)Σ_n J_nᵀΛ_nJ_n = AᵀA held as per-layer Kronecker factors of the logit Jacobian.

    For nn.Linear layer l with inputs a_n^l [I_l] (a trailing 1 for the bias) and output gradients
    δ^l_{n,c} = ∂logit_c(x_n)/∂z^l_n [O_l], row c of J_n restricted to the layer is δ^l_{n,c} ⊗ a^l_n.
    ``rows`` [N, C−1, C] are R_n = diag(√ev)Vᵀ/√N from Λ_n = V diag(ev) Vᵀ without its zero eigenvalue,
    so A_n = R_n J_n and AᵀA = G_data."""

    blocks: list[LayerBlock]
    inputs: list[Tensor]  # a^l [N, I_l]
    out_grads: list[Tensor]  # δ^l [N, C, O_l]
    rows: Tensor  # R [N, C−1, C]

    @classmethod
    def at(cls, task: Task, theta: Tensor, x: Tensor) -> DataGgn:
        """Factors at θ [P] on training inputs x [N, ...] (float64 advised); MLPs of nn.Linear layers only."""
        module = task.module(theta)
        blocks = layer_blocks(module)
        layers = [m for m in module.modules() if isinstance(m, nn.Linear)]
        if len(layers) != len(blocks) or sum(b.out_dim * b.in_dim for b in blocks) != theta.numel():
            raise ValueError(f"task {task.name!r}: DataGgn needs a module whose parameters all sit in nn.Linear")
        inputs: list[Tensor] = []
        outputs: list[Tensor] = []

        def record(mod: nn.Module, args: tuple[Tensor, ...], out: Tensor) -> None:
            a = args[0].detach()
            inputs.append(torch.cat([a, a.new_ones(a.shape[0], 1)], 1) if mod.bias is not None else a)
            outputs.append(out)

        hooks = [layer.register_forward_hook(record) for layer in layers]
        try:
            logits = module(x)
        finally:
            for h in hooks:
                h.remove()
        grads = [torch.autograd.grad(logits[:, c].sum(), outputs, retain_graph=True) for c in range(logits.shape[1])]
        out_grads = [torch.stack([g[layer] for g in grads], 1) for layer in range(len(layers))]  # [N, C, O]
        p = torch.softmax(logits.detach(), -1)
        ev, vec = torch.linalg.eigh(torch.diag_embed(p) - p.unsqueeze(-1) * p.unsqueeze(-2))  # ascending
        rows = (vec[..., 1:] * ev[:, 1:].clamp(min=0).sqrt().unsqueeze(1)).transpose(1, 2) / math.sqrt(x.shape[0])
        return cls(blocks, inputs, out_grads, rows)

    def jvp(self, v: Tensor) -> Tensor:
        """J v: [R, N, C] for v [R, P]."""
        out = 0
        for blk, a, d in zip(self.blocks, self.inputs, self.out_grads):
            z = torch.einsum("roi,ni->rno", blk.gather(v), a)  # the layer's output tangent [R, N, O]
            out = out + torch.einsum("nco,rno->rnc", d, z)
        return out

    def apply_a(self, v: Tensor) -> Tensor:
        """A v: [R, N(C−1)] for v [R, P]."""
        return torch.einsum("njc,rnc->rnj", self.rows, self.jvp(v)).flatten(1)

    def gram(self) -> Tensor:
        """AAᵀ [N(C−1), N(C−1)] = Σ_l (D_l D_lᵀ) ⊙ (a^l a^lᵀ ⊗ 𝟙𝟙ᵀ), D_l = R δ^l."""
        n, c1 = self.rows.shape[:2]
        out = torch.zeros(n * c1, n * c1, dtype=self.rows.dtype, device=self.rows.device)
        for a, d in zip(self.inputs, self.out_grads):
            dl = torch.einsum("njc,nco->njo", self.rows, d).reshape(n * c1, -1)
            block = dl @ dl.T
            block.view(n, c1, n, c1).mul_((a @ a.T)[:, None, :, None])
            out += block
        return out


def top_eigenvalue(mat: Tensor, iters: int = 30) -> float:
    """λ_max of a PSD matrix by power iteration on a float32 copy (the float64 Gram's 100 matrix-vector
    products cost 3.6 s at small, these 0.7 s; they agreed to 5e-5 relative; λ_max only sets a threshold)."""
    m32 = mat.float()
    v = torch.ones(mat.shape[0], dtype=m32.dtype, device=mat.device)
    for _ in range(iters):
        v = m32 @ v
        v = v / v.norm()
    return float(v @ (m32 @ v))


def soft_fraction(factor: Tensor, a_g: Tensor, g_sq: Tensor, sol: Tensor | None = None) -> Tensor:
    """f_μ(g) = √((Ag)ᵀ(AAᵀ + μI)⁻¹(Ag)/‖g‖²) for rows of a_g [R, r] and g_sq [R], factor = chol(AAᵀ + μI);
    ``sol`` = (AAᵀ + μI)⁻¹ a_gᵀ [r, R] if already solved."""
    sol = torch.cholesky_solve(a_g.T, factor) if sol is None else sol
    return ((a_g.T * sol).sum(0) / g_sq).clamp(0.0, 1.0).sqrt()


@dataclass(frozen=True)
class ColspaceResult:
    fractions: Tensor  # [V, Q, M]: V = (μ = wd, μ = rtol·λ_max for each rtol)
    if_undamped: Tensor  # [K, Q, M] exact (1/N)∇mᵀ(G_data + wd·I)⁻¹∇ℓ_k by Woodbury
    if_extra: Tensor  # [D, K, Q, M] the same with wd + λ_d for each extra damping λ_d (float32 factor)
    lam_max: float


def colspace_analysis(
    ctx: RemovalContext, seed_index: int, rtols: tuple[float, ...], dampings: tuple[float, ...] = ()
) -> ColspaceResult:
    """Sections 1–2 at θ = ctx.theta_full[seed_index] (float64): f_μ(∇m_q) for μ = wd and μ = rtol·λ_max, and
    the Woodbury IF (1/N)∇mᵀ(G_data + μI)⁻¹∇ℓ_k for μ = wd (exact) and μ = wd + λ_d (float32 Cholesky:
    κ = λ_max/μ ≲ 1e3 there, so ≲ 1e-4 relative error)."""
    x_train = ctx.data.x_train.double()
    theta = ctx.theta_full[seed_index].double().clone()
    task, wd, n = ctx.task, ctx.scale.train.weight_decay, ctx.n_train
    ggn = DataGgn.at(task, theta, x_train)
    gram = ggn.gram()
    lam_max = top_eigenvalue(gram)
    g_m = measurement_grads(task, theta, ctx.x_query.double(), ctx.y_query).flatten(0, 1)  # [Q·M, P]
    g_k = example_loss_grads(task, theta, x_train[ctx.targets], ctx.data.y_train[ctx.targets])  # [K, P]
    a_m, a_k = ggn.apply_a(g_m), ggn.apply_a(g_k)
    shape = (-1, ctx.queries.numel(), len(task.measurement_names))

    def factor(mu: float, dtype: torch.dtype = torch.float64) -> Tensor:
        gram.diagonal().add_(mu)  # in place: the Gram is 0.65 GB at small
        out = torch.linalg.cholesky(gram.to(dtype))
        gram.diagonal().sub_(mu)
        return out

    def woodbury(sol: Tensor, mu: float) -> Tensor:  # (1/N)∇mᵀ(AᵀA + μI)⁻¹∇ℓ_k from sol = (AAᵀ + μI)⁻¹A∇m
        return ((g_k @ g_m.T - a_k @ sol) / (mu * n)).view(shape)

    def solve(chol: Tensor) -> Tensor:  # (AAᵀ + μI)⁻¹ A∇m, [r, Q·M]
        return torch.cholesky_solve(a_m.T.to(chol.dtype), chol).double()

    chol = factor(wd)
    sol = solve(chol)
    fractions = [soft_fraction(chol, a_m, g_m.pow(2).sum(1), sol).view(shape[1:])]
    exact = woodbury(sol, wd)
    for r in rtols:
        fractions.append(soft_fraction(factor(r * lam_max), a_m, g_m.pow(2).sum(1)).view(shape[1:]))
    extra = [woodbury(solve(factor(wd + lam, torch.float32)), wd + lam) for lam in dampings]
    return ColspaceResult(
        torch.stack(fractions), exact, torch.stack(extra) if extra else exact.new_zeros(0, *exact.shape), lam_max
    )


# ---------------------------------------------------------------------------------------------- runs
MECHANISM_VERSION = 2  # bump when a unit's maths or format changes


@dataclass(frozen=True)
class MechanismRun:
    """What every unit of one (task, scale) shares."""

    task: Task
    data: TaskData
    scale: TaskScale
    targets: Tensor  # [K]
    queries: Tensor  # [Q]
    cfg: MechanismConfig
    store: UnitStore
    progress: bool = True


def scale_with(scale: TaskScale, lr: float, epochs: int) -> TaskScale:
    return replace(scale, train=replace(scale.train, lr=lr, epochs=epochs))


def _unit(run: MechanismRun, kind: str, lr: float, epoch: int, seed: int, **extra: object) -> tuple[str, dict]:
    scale_dict = asdict(scale_with(run.scale, lr, epoch))
    scale_dict.pop("ground_truth")
    config = {
        "version": CACHE_VERSION,
        "mechanism_version": MECHANISM_VERSION,
        "kind": kind,
        "task": run.task.name,
        "scale": scale_dict,
        "seed": seed,
        "targets": run.targets.tolist(),
        "queries": run.queries.tolist(),
        "dtype": str(run.data.x_train.dtype),
        "device": run.data.x_train.device.type,
        **extra,
    }
    return content_key(config), config


def _cached(
    run: MechanismRun,
    keys: dict[tuple[int, int], tuple[str, dict]],
    kind: str,
    compute: Callable[[list[int]], dict[tuple[int, int], dict[str, Tensor]]],
) -> dict[tuple[int, int], dict]:
    """Units {(seed, epoch): tensors}: from the store, else ``compute(missing seeds)`` and stored."""
    out = {se: run.store.get(*keys[se]) for se in keys}
    missing = sorted({s for (s, _), v in out.items() if v is None})
    if missing:
        for se, tensors in compute(missing).items():
            if se in keys:
                run.store.put(*keys[se], tensors, kind=kind, tags={"task": run.task.name, "seed": se[0]})
                out[se] = tensors
    return out


def _trained_context(run: MechanismRun, lr: float, seeds: list[int], epochs: int) -> tuple[RemovalContext, Tensor]:
    """The seeds trained for ``epochs`` at lr (engine, masked full runs); checkpoints [S, E+1, P]."""
    scale = scale_with(run.scale, lr, epochs)
    scheds = [build_schedule(run.task.name, run.data.n_train, scale.train, s, None, Coupling.MASKED) for s in seeds]
    theta0 = initial_params(run.task, seeds, run.data.x_train.dtype, run.data.x_train.device)
    res = train_models(run.task, run.data, scale.train, scheds, theta0, checkpoint_models=list(range(len(seeds))))
    ctx = RemovalContext(
        task=run.task,
        data=run.data,
        scale=scale,
        theta_full=res.theta,
        seeds=seeds,
        targets=run.targets,
        queries=run.queries,
    )
    return ctx, res.checkpoints


def colspace_checkpoint(run: MechanismRun, seed: int, epoch: int) -> bool:
    return seed < run.cfg.colspace_seeds and epoch in run.cfg.colspace_epochs


def ud_if_units(run: MechanismRun, lr: float, seeds: list[int], epochs: tuple[int, ...]) -> dict[tuple[int, int], dict]:
    """Per (seed, epoch), cached: ud, if_damped, if_undamped [K, Q, M]; fractions [1+R, Q, M] (μ = wd, then
    each rtol: NaN unless a column-space checkpoint); lam_max, drift, damping λ, cg_iters of the damped IF."""
    damped = asdict(InfluenceConfig(damping_scale=run.cfg.damping_scale))

    def rtols(s: int, e: int) -> tuple[float, ...]:
        return run.cfg.colspace_rtols if colspace_checkpoint(run, s, e) else ()

    def time_damping(s: int, e: int) -> tuple[float, ...]:  # λ = 1/(η·t): UD's effective damping after t steps
        return (1.0 / (lr * e * steps_per_epoch(run.data.n_train, run.scale.train.batch_size)),) if rtols(s, e) else ()

    keys = {
        (s, e): _unit(
            run,
            "mechanism_ud_if",
            lr,
            e,
            s,
            influence_damped=damped,
            rtols=list(rtols(s, e)),
            time_damping=bool(rtols(s, e)),
        )
        for s in seeds
        for e in epochs
    }

    def compute(todo: list[int]) -> dict[tuple[int, int], dict[str, Tensor]]:
        ctx, ckpts = _trained_context(run, lr, todo, max(epochs))
        ud, theta_replay = unroll_predictions(ctx, epochs)  # [S, E, K, Q, M], [S, E, P]
        out = {}
        for i, e in enumerate(tqdm(epochs, desc=f"UD vs IF lr={lr}", unit="epoch", disable=not run.progress)):
            ctx_e = replace(ctx, scale=scale_with(run.scale, lr, e), theta_full=ckpts[:, e].contiguous())
            method = Influence(InfluenceConfig(damping_scale=run.cfg.damping_scale))
            if_damped = method.predict(ctx_e).detach().cpu()
            drift = (theta_replay[:, i] - ctx_e.theta_full).abs().amax(1).cpu()
            for j, s in enumerate(todo):
                res = colspace_analysis(ctx_e, j, rtols(s, e), time_damping(s, e))
                fractions = torch.full((1 + len(run.cfg.colspace_rtols), *res.fractions.shape[1:]), math.nan)
                fractions[: res.fractions.shape[0]] = res.fractions.cpu()
                out[(s, e)] = {
                    "ud": ud[j, i].cpu(),
                    "if_damped": if_damped[j],
                    "if_undamped": res.if_undamped.cpu(),
                    "if_time_damped": res.if_extra[0].cpu()
                    if len(res.if_extra)
                    else torch.full_like(if_damped[j], math.nan),
                    "fractions": fractions,
                    "lam_max": torch.tensor(res.lam_max),
                    "drift": drift[j],
                    "damping": torch.tensor(method.info.get("damping_mean", math.nan)),
                    "cg_iters": torch.tensor(method.info.get("cg_iterations_max", 0.0)),
                }
        return out

    return _cached(run, keys, "mechanism_ud_if", compute)


# ---------------------------------------------------------------------------------------------- rows
def summary(values: np.ndarray) -> tuple[float, float, float, float, int]:
    """mean, mean ∓ t_{.975,n−1}·se, se = sd/√n over the finite values; n."""
    v = np.asarray(values, dtype=np.float64).ravel()
    v = v[np.isfinite(v)]
    if v.size == 0:
        return math.nan, math.nan, math.nan, math.nan, 0
    mean = float(v.mean())
    if v.size < 2:
        return mean, math.nan, math.nan, math.nan, 1
    se = float(v.std(ddof=1) / math.sqrt(v.size))
    half = float(stats.t.ppf(0.975, v.size - 1)) * se
    return mean, mean - half, mean + half, se, int(v.size)


def _row(section: str, values: np.ndarray, bounds: tuple[float, float] | None = None, **fields: object) -> dict:
    """One CSV row of ``summary(values)``; the CI is clipped to ``bounds`` (a correlation's [−1, 1])."""
    mean, lo, hi, se, n = summary(values)
    if bounds is not None:
        lo, hi = max(lo, bounds[0]), min(hi, bounds[1])
    return {"section": section, **fields, "value": mean, "ci_low": lo, "ci_high": hi, "se": se, "n": n}


def _info_row(section: str, values: list[float], **fields: object) -> dict:
    return _row(section, np.array(values, dtype=np.float64), measurement="all", **fields)


def ud_if_rows(units: dict, lr: float, seeds: list[int], epochs: tuple[int, ...], names: tuple[str, ...]) -> list[dict]:
    """Section 1 rows: per seed Pearson / Spearman over (k, q) of Δ_UD vs Δ_IF, and ‖Δ_IF‖/‖Δ_UD‖."""
    rows = []
    for e in epochs:
        unit = [units[(s, e)] for s in seeds]
        ud = torch.stack([u["ud"] for u in unit]).double().numpy()  # [S, K, Q, M]
        base = {"lr": lr, "epoch": e}
        for variant in ("damped", "undamped", "time_damped"):
            pred = torch.stack([u[f"if_{variant}"] for u in unit]).double().numpy()
            have = np.isfinite(pred).all(axis=(1, 2, 3))  # time_damped: column-space checkpoints only
            if not have.any():
                continue
            for j, meas in enumerate(names):
                x, y = ud[have, ..., j].reshape(int(have.sum()), -1), pred[have, ..., j].reshape(int(have.sum()), -1)
                per_seed = {
                    "pearson": rowwise_pearson(x, y),
                    "spearman": rowwise_spearman(x, y),
                    "norm_ratio": np.linalg.norm(y, axis=1) / np.linalg.norm(x, axis=1),
                }
                rows += [
                    _row(
                        "ud_vs_if",
                        v,
                        None if metric == "norm_ratio" else (-1.0, 1.0),
                        **base,
                        method="influence",
                        variant=variant,
                        measurement=meas,
                        metric=metric,
                    )
                    for metric, v in per_seed.items()
                ]
        drift, cg, lam = ([float(u[k]) for u in unit] for k in ("drift", "cg_iters", "damping"))
        rows.append(
            _info_row("ud_vs_if", drift, **base, method="unroll", variant="replay", metric="replay_max_abs_diff")
        )
        rows.append(_info_row("ud_vs_if", cg, **base, method="influence", variant="damped", metric="cg_iterations"))
        rows.append(_info_row("ud_vs_if", lam, **base, method="influence", variant="damped", metric="damping"))
    return rows


def colspace_rows(units: dict, lr: float, seeds: list[int], epochs: tuple[int, ...], run: MechanismRun) -> list[dict]:
    """Section 2 rows: mean ± SE over (seed, query) of f_μ(∇m_q) for every μ variant with values."""
    variants = ["mu=wd", *(f"rtol={r:g}" for r in run.cfg.colspace_rtols)]
    rows = []
    for e in epochs:
        frac = torch.stack([units[(s, e)]["fractions"] for s in seeds]).double().numpy()  # [S, V, Q, M]
        base = {"lr": lr, "epoch": e, "method": "ggn_data"}
        for v, variant in enumerate(variants):
            rows += [
                _row(
                    "colspace",
                    frac[:, v, :, j],
                    (0.0, 1.0),
                    **base,
                    variant=variant,
                    measurement=m,
                    metric="colspace_fraction",
                )
                for j, m in enumerate(run.task.measurement_names)
                if np.isfinite(frac[:, v, :, j]).any()
            ]
        lam_max = [float(units[(s, e)]["lam_max"]) for s in seeds]
        rows.append(_info_row("colspace", lam_max, **base, variant="", metric="lambda_max"))
    return rows


def downweighting_rows(run: MechanismRun, device: torch.device) -> list[dict]:
    """Section 3 at the task's own TrainConfig: both ground truths on seeds 0…S−1, three methods scored."""
    lr, n_epochs, names = run.scale.train.lr, run.scale.train.epochs, run.task.measurement_names
    seeds = tuple(range(run.cfg.downweight_seeds))
    dw_cfg = DownweightingConfig(seeds, tuple(run.targets.tolist()), tuple(run.queries.tolist()))
    truths = paired_truths(run.task, run.data, run.scale, dw_cfg, run.store, device, run.progress)
    units = ud_if_units(run, lr, list(truths.seeds), (n_epochs,))
    preds = {
        name: torch.stack([units[(s, n_epochs)][key] for s in truths.seeds]).double().numpy()
        for name, key in (("unroll", "ud"), ("influence_damped", "if_damped"), ("influence_undamped", "if_undamped"))
    }
    rows = _cached_scores(
        run,
        truths.seeds,
        lambda: [
            row
            for truth, arr in (("downweighted", truths.downweighted), ("retraining_loo", truths.retraining))
            for row in score_against(arr[:, 0], arr[:, 1:], preds, names, truth, run.cfg.n_boot)
        ],
    )
    for truth, arr in (("downweighted", truths.downweighted), ("retraining_loo", truths.retraining)):
        mean_effect = np.abs((arr[:, 1:] - arr[:, :1]).mean(0))  # [K, Q, M]
        rows += [
            _row(
                "downweighting",
                mean_effect[..., j],
                method="truth",
                variant=truth,
                measurement=m,
                metric="mean_abs_mean_effect",
            )
            for j, m in enumerate(names)
        ]
    for name, wall in training_cost(run.task, run.data, run.scale, dw_cfg).items():
        rows.append(
            _row(
                "downweighting",
                np.array([wall]),
                method="training",
                variant=name,
                measurement="all",
                metric="train_s_per_seed",
            )
        )
    for row in rows:
        row.update(lr=lr, epoch=n_epochs)
    return rows


def _cached_scores(run: MechanismRun, seeds: tuple[int, ...], score: Callable[[], list[dict]]) -> list[dict]:
    """Section 3's bootstrap scores (the slow part of a rerun) from the store, else ``score()`` stored as JSON."""
    _, config = _unit(run, "mechanism_scores", run.scale.train.lr, run.scale.train.epochs, -1)
    config.update(
        seeds=list(seeds),
        n_boot=run.cfg.n_boot,
        damping_scale=run.cfg.damping_scale,
        coupling=run.scale.ground_truth.coupling.value,
    )
    key = content_key(config)
    cached = run.store.get(key, config)
    if cached is not None:
        return json.loads(bytes(cached["rows_json"].tolist()).decode())
    rows = score()
    blob = torch.tensor(list(json.dumps(rows).encode()), dtype=torch.uint8)
    run.store.put(key, config, {"rows_json": blob}, kind="mechanism_scores", tags={"task": run.task.name})
    return rows


def run_mechanism(
    task_name: str,
    scale_name: str,
    store: UnitStore,
    out_dir: Path,
    device: torch.device,
    progress: bool = True,
    config: MechanismConfig | None = None,
) -> pd.DataFrame:
    """All three sections for one (task, scale); writes ``out_dir/<task>/<scale>/mechanism.csv`` atomically.

    ``config`` overrides ``MECHANISM_CONFIGS[scale_name]`` (tests)."""
    if config is None and scale_name not in MECHANISM_CONFIGS:
        raise OptionError(f"scale must be one of: {', '.join(MECHANISM_CONFIGS)}; got {scale_name!r}")
    cfg = config or MECHANISM_CONFIGS[scale_name]
    task_cls = TASKS.get(task_name)
    if scale_name not in task_cls.scales:
        raise OptionError(f"scale must be one of: {', '.join(task_cls.scales)}; got {scale_name!r}")
    scale = task_cls.scales[scale_name]
    if scale.train.lr_schedule.value != "constant" or scale.train.weight_decay <= 0:
        raise OptionError("the mechanism study needs lr_schedule 'constant' (prefix runs) and weight_decay > 0")
    configure_determinism(device)
    task = task_cls(scale)
    data = task.load_data().to(device, torch.float32)
    targets, queries = select_targets_and_queries(data, scale.ground_truth, task.name)
    if cfg.n_targets > targets.numel() or cfg.n_queries > queries.numel():
        raise OptionError(
            f"MechanismConfig.n_targets/n_queries must be <= the scale's K={targets.numel()}, Q={queries.numel()}"
        )
    gram_rows = data.n_train * (int(data.y_train.max()) + 1 - 1)
    if gram_rows > cfg.max_gram_rows:
        raise OptionError(f"MechanismConfig.max_gram_rows={cfg.max_gram_rows} is below N(C−1)={gram_rows}")
    run = MechanismRun(task, data, scale, targets[: cfg.n_targets], queries[: cfg.n_queries], cfg, store, progress)
    seeds = list(range(cfg.n_seeds))
    rows: list[dict] = []
    timing: dict[str, float] = {}
    for lr in cfg.lrs:
        start = time.perf_counter()
        units = ud_if_units(run, lr, seeds, cfg.epochs)
        rows += ud_if_rows(units, lr, seeds, cfg.epochs, task.measurement_names)
        rows += colspace_rows(units, lr, seeds, cfg.epochs, run)
        timing[f"ud_vs_if_and_colspace_lr={lr:g}"] = time.perf_counter() - start
    start = time.perf_counter()
    rows += downweighting_rows(run, device)
    timing["downweighting"] = time.perf_counter() - start
    rows += [
        _row("timing", np.array([t]), method=name, variant="", measurement="all", metric="wall_s")
        for name, t in timing.items()
    ]
    frame = pd.DataFrame(rows)
    frame["time"] = frame["lr"] * frame["epoch"] * steps_per_epoch(data.n_train, scale.train.batch_size)  # η·t
    frame = frame.reindex(columns=list(COLUMNS))
    buf = io.StringIO()
    frame.to_csv(buf, index=False, float_format="%.6g")
    atomic_write_bytes(out_dir / task_name / scale_name / "mechanism.csv", buf.getvalue().encode())
    return frame


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="d-TDA mechanism study: UD vs IF, column space, downweighted truth")
    parser.add_argument("--task", default="mnist_mlp")
    parser.add_argument("--scale", default="small")
    parser.add_argument("--out", type=Path, default=Path("results"))
    parser.add_argument("--cache", type=Path, default=Path(".cache/dtda"))
    parser.add_argument("--device", default="auto")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--quiet", action="store_true")
    args = parser.parse_args(argv)
    import methods  # noqa: F401  (registers the methods)
    import tasks  # noqa: F401  (registers the tasks)
    from benchmark.engine import resolve_device
    from benchmark.registry import UnknownNameError

    if args.threads:
        torch.set_num_threads(args.threads)
    start = time.perf_counter()
    try:
        device = resolve_device(args.device)
        TASKS.get(args.task)
        if args.scale not in MECHANISM_CONFIGS:
            raise OptionError(f"--scale must be one of: {', '.join(MECHANISM_CONFIGS)}; got {args.scale!r}")
    except (OptionError, UnknownNameError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    frame = run_mechanism(args.task, args.scale, UnitStore(args.cache), args.out, device, progress=not args.quiet)
    with pd.option_context("display.max_rows", None, "display.width", 200):
        print(frame.drop(columns=["ci_low", "ci_high"]).to_string(index=False, float_format="%.4g"))
    print(f"wall time: {time.perf_counter() - start:.1f} s → {args.out / args.task / args.scale / 'mechanism.csv'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
