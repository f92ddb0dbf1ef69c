"""TracIn over the recorded checkpoints (Pruthi et al. 2020, *Estimating Training Data Influence by Tracing
Gradient Descent*, eq. (3), TracInCP; PAPERS.md §4.3), as a per-seed removal effect.

    Δm[s, k, q] = Σ_{c=1}^{E} η_c · T_c / (N (1 − β)) · ∇m_q(θ_{s,c})ᵀ ∇ℓ_k(θ_{s,c})     (removed minus full)

θ_{s,c} = ``ctx.checkpoints[s, c]`` is seed s's model at the **end** of interval c (epoch c; c = 0, the
initialisation, is not used), T_c = steps in interval c (``ctx.checkpoint_steps[c] − [c − 1]``) and
η_c = the mean learning rate over those steps, so η_c·T_c = Σ_{t in interval c} η_t. This is the
Hessian-free unroll Σ_t (η_t/B)·𝟙[k∈B_t]·∇m(θ)ᵀ∇ℓ_k(θ)/(1 − β) (see ``grad_dot``) with the
indicator replaced by its expectation B/N and every gradient of interval c read at the interval's end,
θ_{s,c}, as TracInCP does. With one checkpoint after every full-batch GD step this is exactly
Σ_t (η_t/N)·∇m(θ_{t+1})ᵀ∇ℓ_k(θ_{t+1}). The sign is + (removing k undoes descent steps along ∇ℓ_k);
momentum β passes each step on with total gain 1/(1 − β).

Shapes: checkpoints [S, E+1, P]; per checkpoint g_k [K, P], g_m [Q, M, P]; output [S, K, Q, M].
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor
from torch.func import vmap
from tqdm.auto import tqdm

from benchmark.config import OptionError
from benchmark.registry import register_method
from methods.base import Method, RemovalContext
from methods.grad_dot import model_gradients


@dataclass(frozen=True)
class TracInConfig:
    checkpoints_per_chunk: int = 4  # checkpoints whose gradients are vmapped at once (memory ∝ chunk·(K+Q·M)·P)

    def __post_init__(self) -> None:
        if self.checkpoints_per_chunk < 1:
            raise OptionError(f"TracInConfig.checkpoints_per_chunk must be >= 1, got {self.checkpoints_per_chunk}")


def interval_step_weights(ctx: RemovalContext) -> list[float]:
    """η_c·T_c / (N (1 − β)) for the intervals c = 1..E between consecutive checkpoints."""
    lrs, steps = ctx.learning_rates(), ctx.checkpoint_steps
    denom = ctx.n_train * (1.0 - ctx.scale.train.momentum)
    return [float(lrs[steps[c - 1]:steps[c]].sum()) / denom for c in range(1, len(steps))]


@register_method("tracin")
class TracIn(Method):
    is_distributional = True
    config_cls = TracInConfig

    def predict(self, ctx: RemovalContext) -> Tensor:
        checkpoints = ctx.require_checkpoints("tracin")  # [S, E+1, P]
        weights = interval_step_weights(ctx)
        if checkpoints.shape[1] != len(weights) + 1:
            raise ValueError(f"tracin: {checkpoints.shape[1]} checkpoints per seed, expected E + 1 = "
                             f"{len(weights) + 1} (ctx.checkpoint_steps)")
        weights = torch.tensor(weights, dtype=checkpoints.dtype, device=checkpoints.device)  # [E]
        per_checkpoint = vmap(lambda th: model_gradients(ctx, th))  # [C, K, P], [C, Q, M, P]
        chunk = self.config.checkpoints_per_chunk
        out = []
        for s in tqdm(range(ctx.n_seeds), desc="tracin", unit="seed", disable=not ctx.progress):
            total = 0.0
            for c in range(1, checkpoints.shape[1], chunk):  # θ_{s,c} at the end of interval c
                g_k, g_m = per_checkpoint(checkpoints[s, c:c + chunk])
                total = total + torch.einsum("c,ckp,cqmp->kqm", weights[c - 1:c - 1 + chunk], g_k, g_m)
            out.append(total)
        self.info["n_checkpoints"] = float(len(weights))
        return torch.stack(out)  # [S, K, Q, M]
