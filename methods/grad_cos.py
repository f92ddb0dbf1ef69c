"""Grad-Cos: Grad-Dot normalised by both gradient norms (Wei et al. 2024, arXiv 2412.03906, §3; the
authors call it "theoretically unjustified" but evaluate it; Wei et al.'s code: grad_dot / ‖g_train‖ / ‖g_test‖).

    score[s, k, q, j] = ∇m_{q,j}(θ_s)ᵀ ∇ℓ_k(θ_s) / (‖∇m_{q,j}(θ_s)‖ · ‖∇ℓ_k(θ_s)‖)   ∈ [−1, 1]

per seed s, one cosine per measurement j (loss, margin), each in that measurement's slot of [S, K, Q, M].
The sign is Grad-Dot's: a positive cosine means removing k moves m_q up (removed minus full, to first
order). A cosine has no units, so it is a *ranking* score only (``is_distributional = False``): the harness
reports ranking scores for it and never reads it as a predicted distribution.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor
from tqdm.auto import tqdm

from benchmark.config import OptionError
from benchmark.registry import register_method
from methods.base import Method, RemovalContext
from methods.grad_dot import gradient_dots, model_gradients


@dataclass(frozen=True)
class GradCosConfig:
    eps: float = 1e-12  # added to each norm (a zero gradient gives a zero cosine, not NaN)

    def __post_init__(self) -> None:
        if not self.eps >= 0:
            raise OptionError(f"GradCosConfig.eps must be >= 0, got {self.eps}")


@register_method("grad_cos")
class GradCos(Method):
    is_distributional = False
    config_cls = GradCosConfig

    def predict(self, ctx: RemovalContext) -> Tensor:
        out = []
        for s in tqdm(range(ctx.n_seeds), desc="grad_cos", unit="seed", disable=not ctx.progress):
            g_k, g_m = model_gradients(ctx, ctx.theta_full[s])  # [K, P], [Q, M, P]
            norm_k = g_k.norm(dim=-1) + self.config.eps  # [K]
            norm_m = g_m.norm(dim=-1) + self.config.eps  # [Q, M]
            out.append(gradient_dots(g_k, g_m) / (norm_k.view(-1, 1, 1) * norm_m.unsqueeze(0)))
        return torch.stack(out)  # [S, K, Q, M]
