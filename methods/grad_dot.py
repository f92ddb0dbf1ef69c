"""Grad-Dot: the first-order (Hessian-free) removal effect at each seed's final model
(Wei et al. 2024, *Final-Model-Only Data Attribution*, arXiv 2412.03906, §3: the first-order
approximation of further training; Pruthi et al. 2020's TracIn restricted to the final checkpoint).

Removing k deletes the update −(η_t/B)·∇ℓ_k from every step whose batch holds k; with every gradient
frozen at the final model θ_s (no Hessian terms) the parameters move by +Σ_t (η_t/B_t)·𝟙[k∈B_t]·∇ℓ_k(θ_s),
and heavy-ball momentum β passes each such impulse on with total gain 1/(1 − β) (Σ_j β^j). Hence

    Δm[s, k, q] = c_{s,k} · ∇m_q(θ_s)ᵀ ∇ℓ_k(θ_s)                                   (removed minus full)

    c_{s,k} = Σ_t (η_t / B_t) · Σ_{b} w_{t,b}·𝟙[idx_{t,b} = k] / (1 − β)       ``scale='schedule'`` (default)
    c_{s,k} = Σ_t η_t / (N (1 − β))                                           ``scale='expected'``

with seed s's own batch schedule (idx, weight w, denom B_t = ``ctx.schedule(s)``) and learning rates
η_t (``ctx.learning_rates()``). ``schedule`` counts the steps in which k actually appeared in seed s's
run, each weighted by its η_t / B_t; ``expected`` is its expectation over batch orders (k is in a batch
with probability B/N, each time weighted η_t/B). The two agree for a constant learning rate when B
divides N (each example appears once per epoch); with a decaying schedule, ``schedule`` knows *when*
k was seen. The sign is + (removing k undoes a descent step along ∇ℓ_k). 1/(1 − β) is the
infinite-horizon momentum gain: an impulse in the last ~1/(1 − β) steps has delivered only
Σ_{j<T−t} β^j of it by the end (β = 0 at ``small``, where this is exact). With one full-batch step
(T = 1, B = N) the prediction is exactly the linearised effect of one further SGD step from θ_s on
removing k, Wei et al.'s further-training reading of Grad-Dot. Wei et al.'s Grad-Dot is the bare dot
product; c_{s,k} puts it in the units of a removal effect (with ``expected`` it is one constant, so
rankings are the same).

Shapes: g_k = ∇ℓ_k(θ_s) [K, P], g_m = ∇m_q(θ_s) [Q, M, P]; output [S, K, Q, M]. A per-seed sampler.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

import torch
from torch import Tensor
from tqdm.auto import tqdm

from benchmark.config import parse_enum
from benchmark.registry import register_method
from methods.base import Method, RemovalContext, example_loss_grads, measurement_grads


class StepScale(str, enum.Enum):
    SCHEDULE = "schedule"  # the seed's own batch schedule: Σ_t η_t/B_t over the steps holding k
    EXPECTED = "expected"  # its expectation over batch orders: Σ_t η_t/N


@dataclass(frozen=True)
class GradDotConfig:
    scale: StepScale = StepScale.SCHEDULE

    def __post_init__(self) -> None:
        object.__setattr__(self, "scale", parse_enum(StepScale, self.scale, "scale"))


def model_gradients(ctx: RemovalContext, theta: Tensor) -> tuple[Tensor, Tensor]:
    """g_k = ∇ℓ_k(θ) [K, P] for the targets and g_m = ∇m_q(θ) [Q, M, P] for the queries, at θ [P].

    θ is cloned first: forward-mode AD on a view of a [S, P] stack pays for the whole base."""
    theta = theta.clone()
    x_k, y_k = ctx.data.x_train[ctx.targets], ctx.data.y_train[ctx.targets]
    return example_loss_grads(ctx.task, theta, x_k, y_k), measurement_grads(ctx.task, theta, ctx.x_query, ctx.y_query)


def schedule_step_weights(ctx: RemovalContext, seed_index: int) -> Tensor:
    """c_k = Σ_t (η_t/B_t)·Σ_b w_{t,b}·𝟙[idx_{t,b} = k] / (1 − β) for each target, [K] float64."""
    sched = ctx.schedule(seed_index)
    per_slot = ctx.learning_rates().unsqueeze(1) * sched.weight / sched.denom.clamp(min=1).unsqueeze(1)  # [T, B]
    per_example = torch.zeros(ctx.n_train, dtype=torch.float64).index_add_(0, sched.idx.flatten(), per_slot.flatten())
    return per_example[ctx.targets.cpu()] / (1.0 - ctx.scale.train.momentum)


def expected_step_weight(ctx: RemovalContext) -> float:
    """c = Σ_t η_t / (N (1 − β)): ``schedule_step_weights`` averaged over batch orders."""
    return float(ctx.learning_rates().sum()) / (ctx.n_train * (1.0 - ctx.scale.train.momentum))


def gradient_dots(g_k: Tensor, g_m: Tensor) -> Tensor:
    """∇m_qᵀ∇ℓ_k, [K, Q, M] from g_k [K, P] and g_m [Q, M, P]."""
    return torch.einsum("kp,qmp->kqm", g_k, g_m)


@register_method("grad_dot")
class GradDot(Method):
    is_distributional = True
    config_cls = GradDotConfig

    def predict(self, ctx: RemovalContext) -> Tensor:
        out, coefs = [], []
        for s in tqdm(range(ctx.n_seeds), desc="grad_dot", unit="seed", disable=not ctx.progress):
            g_k, g_m = model_gradients(ctx, ctx.theta_full[s])
            if self.config.scale is StepScale.SCHEDULE:
                coef = schedule_step_weights(ctx, s).to(g_k)  # [K]
            else:
                coef = g_k.new_full((g_k.shape[0],), expected_step_weight(ctx))
            coefs.append(coef)
            out.append(coef.view(-1, 1, 1) * gradient_dots(g_k, g_m))
        self.info["step_weight_mean"] = float(torch.stack(coefs).mean())  # mean c_{s,k}
        return torch.stack(out)  # [S, K, Q, M]
