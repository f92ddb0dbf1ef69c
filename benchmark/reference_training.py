"""Straightforward reference trainers: what the engine must equal (tests) and beat (benchmark.speed).

- ``train_torch_loop``: one ``nn.Module`` and one ``torch.optim.SGD`` per model, trained one after another.
- ``train_vmap_ensemble``: ``stack_module_state`` + ``functional_call`` + ``vmap(grad)`` with a shared batch
  order, the usual torch.func ensembling recipe.
Both only support MLP tasks (``Task.layer_sizes``) and follow the engine's batch-loss definition.
"""

from __future__ import annotations

import copy

import torch
from torch import Tensor, nn
from torch.func import functional_call, grad, stack_module_state, vmap

from benchmark.config import TrainConfig
from benchmark.engine import Schedule, learning_rates
from tasks.base import Task, TaskData

_ACTS = {"relu": nn.ReLU, "tanh": nn.Tanh, "gelu": nn.GELU}


def build_mlp(task: Task, theta: Tensor) -> nn.Sequential:
    """An ``nn.Sequential`` MLP holding θ [P] (weights in ``nn.Linear``'s (out, in) layout)."""
    sizes = task.layer_sizes()  # type: ignore[attr-defined]
    layers: list[nn.Module] = []
    for i, (d_in, d_out) in enumerate(zip(sizes[:-1], sizes[1:])):
        layers.append(nn.Linear(d_in, d_out))
        if i < len(sizes) - 2:
            layers.append(_ACTS[task.scale.model.activation]())
    model = nn.Sequential(*layers).to(theta.device, theta.dtype)
    params = task.unflatten(theta)
    linears = [m for m in model if isinstance(m, nn.Linear)]
    with torch.no_grad():
        for i, lin in enumerate(linears):
            lin.weight.copy_(params[f"w{i}"])
            lin.bias.copy_(params[f"b{i}"])
    return model


def flat_params(model: nn.Module) -> Tensor:
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


def train_torch_loop(task: Task, data: TaskData, cfg: TrainConfig, schedule: Schedule, theta0: Tensor) -> Tensor:
    """Train one model with ``torch.optim.SGD``; returns θ_T [P]."""
    model = build_mlp(task, theta0)
    opt = torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    lrs = learning_rates(cfg, schedule.idx.shape[0])
    for t in range(schedule.idx.shape[0]):
        n_real = int(schedule.denom[t])
        if n_real == 0:
            continue
        idx, w = schedule.idx[t, :n_real], schedule.weight[t, :n_real].to(theta0)
        for group in opt.param_groups:
            group["lr"] = float(lrs[t])
        opt.zero_grad(set_to_none=True)
        loss = (nn.functional.cross_entropy(model(data.x_train[idx]), data.y_train[idx], reduction="none") * w)
        (loss.sum() / n_real).backward()
        opt.step()
    return flat_params(model)


def train_vmap_ensemble(task: Task, data: TaskData, cfg: TrainConfig, schedule: Schedule, theta0: Tensor) -> Tensor:
    """Train n models sharing one batch order with ``vmap(grad(functional_call))``; θ0 [n, P] → θ_T [n, P]."""
    models = [build_mlp(task, th) for th in theta0]
    params, buffers = stack_module_state(models)
    base = copy.deepcopy(models[0]).to("meta")

    def loss_fn(p: dict[str, Tensor], b: dict[str, Tensor], x: Tensor, y: Tensor, w: Tensor) -> Tensor:
        out = functional_call(base, (p, b), (x,))
        return (nn.functional.cross_entropy(out, y, reduction="none") * w).sum() / x.shape[0]

    grad_fn = vmap(grad(loss_fn), in_dims=(0, 0, None, None, None))
    names = list(params)
    leaves = [params[k].detach() for k in names]
    velocity = [torch.zeros_like(p) for p in leaves]
    lrs = learning_rates(cfg, schedule.idx.shape[0]).tolist()
    for t in range(schedule.idx.shape[0]):
        n_real = int(schedule.denom[t])
        idx, w = schedule.idx[t, :n_real], schedule.weight[t, :n_real].to(theta0)
        grads = grad_fn(dict(zip(names, leaves)), buffers, data.x_train[idx], data.y_train[idx], w)
        g = [grads[k] for k in names]
        torch._foreach_add_(g, leaves, alpha=cfg.weight_decay)
        torch._foreach_mul_(velocity, cfg.momentum)
        torch._foreach_add_(velocity, g)
        torch._foreach_add_(leaves, velocity, alpha=-lrs[t])
    n = theta0.shape[0]
    return torch.cat([p.reshape(n, -1) for p in leaves], dim=1)
