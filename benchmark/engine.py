"""Training many models at once along a model axis.

Each model is a seed (init + batch order) and a per-slot example-weight schedule. All models in a
call share the step count T; the batch loss of model n at step t is

    L_{n,t}(θ) = (1/B_{n,t}) · Σ_{i∈slots} w_{n,t,i} · ℓ(θ; x_{idx[n,t,i]})

with B_{n,t} the number of real slots (a masked example keeps its slot with w = 0, so B is unchanged;
a padded slot of a shorter batch is not counted). The update is torch.optim.SGD's (see TrainConfig).
A step with B_{n,t} = 0 (a deleted example emptied the last batch of an epoch) leaves θ and v unchanged.
The learning rate is indexed by the full-data run's step grid, so all couplings share η_t.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch
from torch import Tensor

from benchmark.config import Coupling, LRSchedule, TrainConfig, derive_seed
from tasks.base import Task, TaskData, cross_entropy


@dataclass(frozen=True)
class Schedule:
    """The batches of one run: idx [T, B] (training indices), weight [T, B], denom [T] (real slots);
    ``order`` is the run's batch-order seed, which also seeds its data augmentation (``Task.augment``)."""

    idx: Tensor
    weight: Tensor
    denom: Tensor
    order: int = 0


def steps_per_epoch(n_train: int, batch_size: int) -> int:
    return math.ceil(n_train / batch_size)


def learning_rates(cfg: TrainConfig, n_steps: int) -> Tensor:
    """η_t for t ∈ [0, T), float64 [T]."""
    t = torch.arange(n_steps, dtype=torch.float64)
    if cfg.lr_schedule is LRSchedule.CONSTANT:
        return torch.full((n_steps,), cfg.lr, dtype=torch.float64)
    if cfg.lr_schedule is LRSchedule.LINEAR:
        return cfg.lr * (1 - t / n_steps)
    peak = cfg.peak_fraction * n_steps
    up, down = t / peak, (n_steps - t) / (n_steps - peak)
    return cfg.lr * torch.minimum(up, down).clamp(min=0.0)


def init_seed(task_name: str, seed: int, removed: object, coupling: Coupling) -> int:
    """The seed that draws a run's initial parameters (fresh per removal only when independent);
    ``removed`` is the removed index or a run label (group removal), None for the full run."""
    if coupling is Coupling.INDEPENDENT and removed is not None:
        return derive_seed("independent", task_name, seed, removed)
    return derive_seed("init", task_name, seed)


def order_seed(task_name: str, seed: int, removed: object, coupling: Coupling) -> int:
    if coupling is Coupling.INDEPENDENT and removed is not None:
        return derive_seed("independent_order", task_name, seed, removed)
    return derive_seed("batch_order", task_name, seed)


@functools.lru_cache(maxsize=16)
def permutations(n_train: int, epochs: int, order: int) -> tuple[Tensor, ...]:
    """Each epoch's permutation of 0..N−1 drawn from ``order``; memoised (the 1+K runs of one seed share
    them under masked and deleted coupling), so callers must not modify the tensors in place."""
    gen = torch.Generator().manual_seed(order)
    return tuple(torch.randperm(n_train, generator=gen) for _ in range(epochs))


def build_schedule(
    task_name: str, n_train: int, cfg: TrainConfig, seed: int, removed: int | Tensor | None, coupling: Coupling,
    label: object = None,
) -> Schedule:
    """The batch schedule of one run on the full-data step grid (T = epochs · ⌈N/B⌉ steps).

    ``removed`` is one training index, a 1-D tensor of indices (group removal), or None (full data).
    masked: the full run's batches with w = 0 at every slot holding a removed example.
    deleted / independent: each epoch's permutation with the removed examples deleted, chunked into B;
    a shorter last batch is padded with zero-weight slots that are not counted in B_{t}, and steps left
    without examples (group removal) have B_t = 0, so they leave θ unchanged.
    ``label`` names the run for the independent coupling's fresh batch order (required for a group).
    """
    if isinstance(removed, Tensor) and coupling is Coupling.INDEPENDENT and label is None:
        raise ValueError("build_schedule: a group removal under independent coupling needs a run label")
    bsz, per_epoch = cfg.batch_size, steps_per_epoch(n_train, cfg.batch_size)
    idx = torch.zeros(cfg.epochs * per_epoch, bsz, dtype=torch.long)
    weight = torch.zeros(cfg.epochs * per_epoch, bsz, dtype=torch.float64)
    denom = torch.zeros(cfg.epochs * per_epoch, dtype=torch.float64)
    run_id = label if label is not None else removed
    order = order_seed(task_name, seed, run_id, coupling)
    perms = permutations(n_train, cfg.epochs, order)
    for e, perm in enumerate(perms):
        w_perm = torch.ones(n_train, dtype=torch.float64)
        if removed is not None:
            gone = torch.isin(perm, torch.as_tensor(removed).reshape(-1))
            if coupling is Coupling.MASKED:
                w_perm[gone] = 0.0
            else:
                perm = perm[~gone]
                w_perm = w_perm[: perm.numel()]
        # Step j of the epoch holds perm[j·B : (j+1)·B]; the tail of the last real batch and any step past
        # the data (a deleted group) stay zero with weight 0, and B_t counts the real slots.
        n_e = perm.numel()
        steps = slice(e * per_epoch, (e + 1) * per_epoch)
        idx[steps].view(-1)[:n_e] = perm
        weight[steps].view(-1)[:n_e] = w_perm
        denom[steps] = (n_e - bsz * torch.arange(per_epoch, dtype=torch.float64)).clamp(0, bsz)
    return Schedule(idx=idx, weight=weight, denom=denom, order=order)


@dataclass(frozen=True)
class TrainResult:
    """theta [n, P] final parameters; checkpoints [c, E+1, P] of the c requested models at epoch ends
    (epoch 0 = init) or None;
    failed [n] bool, True where the loss or parameters became non-finite."""

    theta: Tensor
    checkpoints: Tensor | None
    failed: Tensor


def shared_batch_groups(schedules: list[Schedule]) -> int:
    """The largest m such that consecutive groups of m schedules share their batch indices."""
    n = len(schedules)
    for m in sorted({d for d in range(1, n + 1) if n % d == 0}, reverse=True):
        if all(torch.equal(schedules[g * m].idx, schedules[g * m + j].idx)
               for g in range(n // m) for j in range(1, m)):
            return m
    return 1


def split_params(task: Task, theta: Tensor) -> dict[str, Tensor]:
    """θ [n, P] → contiguous leaf tensors {name: [n, *shape]} (the engine's layout)."""
    return {k: v.clone(memory_format=torch.contiguous_format) for k, v in task.unflatten(theta).items()}


def join_params(params: dict[str, Tensor]) -> Tensor:
    n = next(iter(params.values())).shape[0]
    return torch.cat([p.reshape(n, -1) for p in params.values()], dim=1)


def train_models(
    task: Task, data: TaskData, cfg: TrainConfig, schedules: list[Schedule], theta0: Tensor,
    checkpoint_models: list[int] | None = None,
) -> TrainResult:
    """Train n models at once: θ0 [n, P] on their own schedules; returns final θ and checkpoints.

    One autograd graph over the model axis; its gradient splits per model because model n's loss
    depends only on θ_n. Models whose schedules share batch indices (masked coupling: the 1+K runs of
    one seed) are grouped so the first layer is one GEMM per group (``Task.logits_grouped``).
    Updates are fused ``_foreach`` ops on per-parameter [n, ...] buffers. Epoch-end checkpoints are
    kept only for the models listed in ``checkpoint_models`` (none if None).
    """
    n_models = theta0.shape[0]
    group = shared_batch_groups(schedules)
    device = data.x_train.device
    idx = torch.stack([s.idx for s in schedules[::group]]).to(device)  # [G, T, B]
    orders = torch.tensor([s.order for s in schedules[::group]], dtype=torch.long, device=device)  # [G]
    weight = torch.stack([s.weight for s in schedules]).to(theta0)  # [n, T, B]
    denom = torch.stack([s.denom for s in schedules]).to(theta0)  # [n, T]
    n_steps = idx.shape[1]
    per_epoch = n_steps // cfg.epochs
    lrs = learning_rates(cfg, n_steps).tolist()
    all_active = bool((denom > 0).all())
    wd, beta = cfg.weight_decay, cfg.momentum
    params = split_params(task, theta0.detach())
    names = list(params)
    leaves = [params[k].requires_grad_(True) for k in names]
    velocity = [torch.zeros_like(p) for p in leaves] if beta else []  # plain SGD needs no buffer
    failed = torch.zeros(n_models, dtype=torch.bool, device=theta0.device)

    def snapshot(rows: list[int] | slice) -> Tensor:
        return join_params({k: p.detach()[rows] for k, p in zip(names, leaves)})

    ckpts = [snapshot(checkpoint_models)] if checkpoint_models is not None else None
    for t in range(n_steps):
        xb = data.x_train[idx[:, t]]  # [G, B, ...]
        if task.augments:
            xb = task.augment(xb, idx[:, t], orders, t // per_epoch)
        yb = data.y_train[idx[:, t]].repeat_interleave(group, dim=0)  # [n, B]
        logits = task.logits_grouped(dict(zip(names, leaves)), xb, weight[:, t])
        losses = (cross_entropy(logits, yb) * weight[:, t]).sum(1) / denom[:, t].clamp(min=1)  # [n]
        grads = torch.autograd.grad(losses.sum(), leaves)
        with torch.no_grad():
            if wd:
                torch._foreach_add_(grads, leaves, alpha=wd)
            active = None if all_active else denom[:, t] > 0
            if active is None or bool(active.all()):
                if beta:
                    torch._foreach_mul_(velocity, beta)
                    torch._foreach_add_(velocity, grads)
                    torch._foreach_add_(leaves, velocity, alpha=-lrs[t])
                else:  # plain SGD: v_{t+1} = g_t
                    torch._foreach_add_(leaves, grads, alpha=-lrs[t])
            else:
                mask = active.to(theta0.dtype)
                for i, (p, g) in enumerate(zip(leaves, grads)):
                    m = mask.view(-1, *([1] * (p.dim() - 1)))
                    if beta:  # inactive models keep v; active ones take v ← βv + g
                        velocity[i].copy_(m * (beta * velocity[i] + g) + (1 - m) * velocity[i])
                        g = velocity[i]
                    p.sub_(m * g, alpha=lrs[t])
            failed |= ~torch.isfinite(losses)
        if ckpts is not None and (t + 1) % per_epoch == 0:
            ckpts.append(snapshot(checkpoint_models))
    theta = snapshot(slice(None))
    failed |= ~torch.isfinite(theta).all(1)
    checkpoints = torch.stack(ckpts, dim=1) if ckpts is not None else None
    return TrainResult(theta=theta, checkpoints=checkpoints, failed=failed)


def initial_params(task: Task, seeds: list[int], dtype: torch.dtype, device: torch.device | str,
                   removed: list[object] | None = None, coupling: Coupling = Coupling.MASKED) -> Tensor:
    """θ0 [n, P] for runs (seed, removed) under a coupling; drawn on the CPU for device independence."""
    removed = removed or [None] * len(seeds)
    init = [init_seed(task.name, s, r, coupling) for s, r in zip(seeds, removed)]
    position = {i: j for j, i in enumerate(dict.fromkeys(init))}  # one draw per distinct init seed
    drawn = torch.stack([task.init_params(torch.Generator().manual_seed(i), dtype) for i in position])
    return drawn[torch.tensor([position[i] for i in init])].to(device)


def configure_determinism(device: torch.device) -> None:
    """float32 means float32: TF32 off for matmul and cuDNN on CUDA."""
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False


def resolve_device(name: str | None) -> torch.device:
    """``auto`` → cuda when present, else cpu."""
    if name in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name not in ("cpu", "cuda") and not name.startswith("cuda:"):
        raise ValueError(f"--device must be one of: auto, cpu, cuda; got {name!r}")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"--device {name} requested but CUDA is not available; use --device cpu")
    return torch.device(name)
