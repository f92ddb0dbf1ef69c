"""Unrolled differentiation (Mlodozeniec et al. 2025, d-TDA, §3 Remark 1 eq. (6); Alg. 1).

Per seed s, the removal displacement is the tangent of the seed's own training trajectory with
respect to the removal weight: example k's weight is w_k = 1 − ε in every batch it appears in, and

    g_t   = (1/B)·Σ_i w_i ∇ℓ_i(θ_t) + wd·θ_t,   v_{t+1} = β v_t + g_t,   θ_{t+1} = θ_t − η_t v_{t+1}
    r^v_{t+1} = β r^v_t + (Ĥ_{B_t} + wd·I) r^θ_t − (1/B)·𝟙[k∈B_t]·∇ℓ_k(θ_t)
    r^θ_{t+1} = r^θ_t − η_t r^v_{t+1}

so r^θ_T = dθ_T/dε at ε = 0 is the first-order effect of removing k (ε = 1), with source term
(η_t/B)·𝟙[k∈B_t]·∇ℓ_k and **no further 1/N** (PAPERS.md §1.3: the paper's (1/N) r_UD with source
(Nη/B)… is the same quantity). Prediction: Δm[s, k, q] = ∇m_q(θ_{s,T})ᵀ r^θ_{s,k,T}.

Modes (``mode``; ``auto`` picks the one with fewer vectors):
- ``forward``: one tangent per target (K Hessian-vector products per step), each yielding every
  measurement of every query at the end; ``torch.func.jvp`` through the exact engine update
  (forward-over-reverse), vmapped over targets and a chunk of seeds.
- ``reverse``: one adjoint per (query, measurement) pair, λ_T = ∇m_{q,j}(θ_T), pulled back through the
  recorded trajectory (θ_t, v_t are stored) by ``torch.func.vjp`` of the same update with respect to
  (θ, v, w): (λ^θ_t, λ^v_t, λ^w_t) = vjp(update_t)(λ^θ_{t+1}, λ^v_{t+1}), and
  dm_{q,j}/dε_k = Σ_t Σ_{slots b of B_t holding k} λ^w_{t,b}·(−w_{t,b}). Q·M vectors instead of K: the
  mode for group removal (LDS needs all K = N training examples). Both give the same numbers (test).
Both replay the full run's recorded batch schedule.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor
from torch.func import grad, jvp, vjp, vmap
from tqdm.auto import tqdm

from benchmark.config import Coupling, OptionError
from benchmark.engine import build_schedule, initial_params, learning_rates, order_seed, steps_per_epoch
from benchmark.registry import register_method
from methods.base import Method, RemovalContext, measurement_grads
from tasks.base import Task

UNROLL_MODES = ("auto", "forward", "reverse")


@dataclass(frozen=True)
class UnrollConfig:
    seeds_per_chunk: int = 8  # seeds propagated together (memory ∝ chunk·(K or Q·M)·P)
    mode: str = "auto"  # forward (K tangents), reverse (Q·M adjoints) or auto (the smaller)

    def __post_init__(self) -> None:
        if self.seeds_per_chunk < 1:
            raise ValueError(f"UnrollConfig.seeds_per_chunk must be >= 1, got {self.seeds_per_chunk}")
        if self.mode not in UNROLL_MODES:
            raise OptionError(f"UnrollConfig.mode must be one of: {', '.join(UNROLL_MODES)}; got {self.mode!r}")


def replay_schedules(ctx: RemovalContext, seed_ids: list[int]
                     ) -> tuple[list[int], Tensor, Tensor, Tensor, list[float]]:
    """The seeds' full-run batch schedules stacked on ``ctx``'s device: seeds, idx [s, T, B], weight [s, T, B],
    denom [s, T] (float, like θ) and η_t [T]. The batch-order seeds (augmentation) come from
    :func:`replay_inputs`."""
    seeds = [ctx.seeds[i] for i in seed_ids]
    dtype, device = ctx.theta_full.dtype, ctx.theta_full.device
    schedules = [build_schedule(ctx.task.name, ctx.n_train, ctx.scale.train, s, None, Coupling.MASKED) for s in seeds]
    idx = torch.stack([s.idx for s in schedules]).to(device)
    weight = torch.stack([s.weight for s in schedules]).to(device, dtype)
    denom = torch.stack([s.denom for s in schedules]).to(device, dtype)
    return seeds, idx, weight, denom, learning_rates(ctx.scale.train, idx.shape[1]).tolist()


def replay_inputs(ctx: RemovalContext, seeds: list[int], idx: Tensor, t: int) -> tuple[Tensor, Tensor]:
    """Step t's training inputs and labels of the seeds' full runs, [s, B, ...] and [s, B], augmented
    exactly as the engine augments them (``Task.augment`` keyed by each run's batch-order seed)."""
    x, y = ctx.data.x_train[idx[:, t]], ctx.data.y_train[idx[:, t]]
    if ctx.task.augments:
        orders = torch.tensor([order_seed(ctx.task.name, s, None, Coupling.MASKED) for s in seeds],
                              dtype=torch.long, device=x.device)
        per_epoch = steps_per_epoch(ctx.n_train, ctx.scale.train.batch_size)
        x = ctx.task.augment(x, idx[:, t], orders, t // per_epoch)
    return x, y


def sgd_update(task: Task, wd: float, beta: float) -> Callable[..., tuple[Tensor, Tensor]]:
    """The engine's weighted SGD step as a pure function of (θ, v, w): g = (1/B)Σ w_i∇ℓ_i + wd·θ,
    v' = βv + g, θ' = θ − ηv' (for jvp / vjp through one step of one model)."""

    def update(th: Tensor, v: Tensor, w: Tensor, x: Tensor, y: Tensor, dn: Tensor, lr: float
               ) -> tuple[Tensor, Tensor]:
        g = grad(lambda p: task.batch_loss(p, x, y, w, dn))(th) + wd * th
        v_new = beta * v + g
        return th - lr * v_new, v_new

    return update


@register_method("unroll")
class Unroll(Method):
    is_distributional = True
    config_cls = UnrollConfig

    def predict(self, ctx: RemovalContext) -> Tensor:
        chunks = [list(range(i, min(i + self.config.seeds_per_chunk, len(ctx.seeds))))
                  for i in range(0, len(ctx.seeds), self.config.seeds_per_chunk)]
        bar = tqdm(chunks, desc="unroll", unit="chunk", disable=not ctx.progress)
        return torch.cat([self._predict_chunk(ctx, c) for c in bar])

    def tangents(self, ctx: RemovalContext, seed_ids: list[int]) -> tuple[Tensor, Tensor]:
        """Replays the seeds' training; returns θ_T [s, P] and r^θ_T [s, K, P]."""
        task, cfg = ctx.task, ctx.scale.train
        seeds, idx, weight, denom, lrs = replay_schedules(ctx, seed_ids)
        dtype, device = ctx.theta_full.dtype, ctx.theta_full.device
        theta = initial_params(task, seeds, dtype, device)  # [s, P]
        vel = torch.zeros_like(theta)
        n_targets = ctx.targets.numel()
        r_theta = theta.new_zeros(len(seeds), n_targets, theta.shape[1])  # [s, K, P]
        r_vel = torch.zeros_like(r_theta)
        targets = ctx.targets.to(device)
        wd, beta = cfg.weight_decay, cfg.momentum

        update = sgd_update(task, wd, beta)

        def tangent(th: Tensor, v: Tensor, w: Tensor, x: Tensor, y: Tensor, dn: Tensor, lr: float,
                    rt: Tensor, rv: Tensor, dw: Tensor) -> tuple[Tensor, Tensor]:
            return jvp(lambda a, b, c: update(a, b, c, x, y, dn, lr), (th, v, w), (rt, rv, dw))[1]

        per_target = vmap(tangent, in_dims=(None, None, None, None, None, None, None, 0, 0, 0))
        per_seed = vmap(per_target, in_dims=(0, 0, 0, 0, 0, 0, None, 0, 0, 0))
        step = vmap(update, in_dims=(0, 0, 0, 0, 0, 0, None))
        for t in range(idx.shape[1]):
            x, y = replay_inputs(ctx, seeds, idx, t)  # [s, B, ...], [s, B]
            dn = denom[:, t].clamp(min=1)
            # d w / d ε = −1 at the slots holding target k (w = 1 − ε there): [s, K, B]
            dw = -(idx[:, t].unsqueeze(1) == targets.view(1, -1, 1)).to(dtype) * weight[:, t].unsqueeze(1)
            r_theta, r_vel = per_seed(theta, vel, weight[:, t], x, y, dn, lrs[t], r_theta, r_vel, dw)
            theta, vel = step(theta, vel, weight[:, t], x, y, dn, lrs[t])
        return theta, r_theta

    def mode_for(self, ctx: RemovalContext) -> str:
        if self.config.mode != "auto":
            return self.config.mode
        n_adjoints = ctx.queries.numel() * len(ctx.task.measurement_names)
        return "reverse" if ctx.targets.numel() > n_adjoints else "forward"

    def adjoint_effects(self, ctx: RemovalContext, seed_ids: list[int]) -> tuple[Tensor, Tensor]:
        """Replays the seeds' training storing (θ_t, v_t), then pulls the Q·M measurement gradients back;
        returns θ_T [s, P] and dm/dε_k [s, K, Q, M] (ε = 1 is the removal of target k)."""
        task, cfg = ctx.task, ctx.scale.train
        seeds, idx, weight, denom, lrs = replay_schedules(ctx, seed_ids)
        dtype, device = ctx.theta_full.dtype, ctx.theta_full.device
        wd, beta = cfg.weight_decay, cfg.momentum

        update = sgd_update(task, wd, beta)

        def pull_back(th: Tensor, v: Tensor, w: Tensor, x: Tensor, y: Tensor, dn: Tensor, lr: float,
                      lt: Tensor, lv: Tensor) -> tuple[Tensor, Tensor, Tensor]:
            _, fn = vjp(lambda a, b, c: update(a, b, c, x, y, dn, lr), th, v, w)
            return fn((lt, lv))

        per_adjoint = vmap(pull_back, in_dims=(None, None, None, None, None, None, None, 0, 0))
        per_seed = vmap(per_adjoint, in_dims=(0, 0, 0, 0, 0, 0, None, 0, 0))
        step = vmap(update, in_dims=(0, 0, 0, 0, 0, 0, None))
        theta = initial_params(task, seeds, dtype, device)  # [s, P]
        vel = torch.zeros_like(theta)
        states = []
        for t in range(idx.shape[1]):
            states.append((theta, vel))
            x, y = replay_inputs(ctx, seeds, idx, t)
            theta, vel = step(theta, vel, weight[:, t], x, y, denom[:, t].clamp(min=1), lrs[t])
        g_m = torch.stack([measurement_grads(task, theta[i].clone(), ctx.x_query, ctx.y_query)
                           for i in range(len(seeds))])  # [s, Q, M, P]
        n_q, n_m = g_m.shape[1], g_m.shape[2]
        lam_t = g_m.reshape(len(seeds), n_q * n_m, -1)  # [s, R, P]
        lam_v = torch.zeros_like(lam_t)
        dm_dw = theta.new_zeros(len(seeds), n_q * n_m, ctx.n_train)  # dm/dw_n summed over steps
        for t in reversed(range(idx.shape[1])):
            th, v = states[t]
            x, y = replay_inputs(ctx, seeds, idx, t)
            lam_t, lam_v, lam_w = per_seed(th, v, weight[:, t], x, y, denom[:, t].clamp(min=1), lrs[t], lam_t, lam_v)
            slot = idx[:, t].unsqueeze(1).expand(-1, lam_w.shape[1], -1)  # [s, R, B]
            dm_dw.scatter_add_(2, slot, lam_w * weight[:, t].unsqueeze(1))  # a padded slot has w = 0
        # w_n = 1 − ε for the removed example: dm/dε = −dm/dw_n at the targets
        effects = -dm_dw[:, :, ctx.targets.to(device)]  # [s, R, K]
        return theta, effects.transpose(1, 2).reshape(len(seeds), -1, n_q, n_m)

    def _predict_chunk(self, ctx: RemovalContext, seed_ids: list[int]) -> Tensor:
        if self.mode_for(ctx) == "reverse":
            theta, effects = self.adjoint_effects(ctx, seed_ids)
            drift = (theta - ctx.theta_full[seed_ids]).abs().max().item()
            self.info["replay_max_abs_diff"] = max(self.info.get("replay_max_abs_diff", 0.0), drift)
            return effects
        theta, r_theta = self.tangents(ctx, seed_ids)
        drift = (theta - ctx.theta_full[seed_ids]).abs().max().item()
        self.info["replay_max_abs_diff"] = max(self.info.get("replay_max_abs_diff", 0.0), drift)
        out = []
        for i in range(len(seed_ids)):
            g_m = measurement_grads(ctx.task, theta[i].clone(), ctx.x_query, ctx.y_query)  # [Q, M, P]
            out.append(torch.einsum("kp,qmp->kqm", r_theta[i], g_m))
        return torch.stack(out)  # [s, K, Q, M]
