"""DataInf (Kwon, Wu, Wu & Zou 2023, *DataInf: Efficiently Estimating Data Influence in LoRA-tuned LLMs and
Diffusion Models*, arXiv 2310.00902, eqs. (5)–(6)) as a per-seed removal effect at each final model θ_s.

Per layer l (the parameters of one module: ``task.module(θ).named_parameters()`` grouped by prefix,
e.g. "0.weight" + "0.bias" → layer "0", mapped to θ's slices in packing order), the damped empirical
Fisher G_l + λ_l I, G_l = (1/N)Σ_i g_il g_ilᵀ over all N training examples' loss gradients g_il = ∇_l ℓ_i(θ_s),
is inverted by swapping the average and the inverse (eq. (5)) and applying Sherman–Morrison to each
rank-one term (eq. (6)):

    (G_l + λ_l I)⁻¹ ≈ (1/N) Σ_i (g_il g_ilᵀ + λ_l I)⁻¹ = (1/(N λ_l)) Σ_i (I − g_il g_ilᵀ / (λ_l + ‖g_il‖²))

    Δm[s, k, q] = (1/N) Σ_l ∇_l m_q(θ_s)ᵀ (G_l + λ_l I)⁻¹_approx ∇_l ℓ_k(θ_s)            (removed minus full)

    λ_l = damping_scale · (1/(N·P_l)) Σ_i ‖g_il‖²   (0.1 × the mean squared gradient entry of layer l)

λ_l is Kwon et al.'s choice as used in Wei et al.'s code (mean_i mean(g_il²)/10); the mean λ_l is logged.
The approximation is exact for N = 1 (a single rank-one term). G_l is the Fisher of the data term only
(no weight decay), as in DataInf. Sign: the removal effect of ε = 1/N, +(1/N)(G + λI)⁻¹∇ℓ_k as for influence
functions (Kwon et al.'s "influence" is −∇mᵀ(G + λI)⁻¹∇ℓ_k, the upweighting effect: converted here).

Computed without any P_l × P_l matrix or the [N, P] gradient matrix: with a = ∇_l m [Q·M, P_l], b = ∇_l ℓ_k
[K, P_l], aᵀ(·)b = (1/λ_l)·(a·b − (1/N)Σ_i (a·g_il)(g_il·b)/(λ_l + ‖g_il‖²)), from the projections a·g_il,
b·g_il and ‖g_il‖² accumulated over chunks of training examples (one pass per seed: λ_l needs only Σ‖g_il‖²).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor
from tqdm.auto import tqdm

from benchmark.config import OptionError
from benchmark.registry import register_method
from methods.base import Method, RemovalContext, example_loss_grads, measurement_grads
from tasks.base import Task


@dataclass(frozen=True)
class DataInfConfig:
    damping_scale: float = 0.1  # λ_l = damping_scale · mean squared gradient entry of layer l (Kwon et al.)
    chunk: int = 256  # training examples whose gradients are held at once (memory ∝ chunk·P)

    def __post_init__(self) -> None:
        if not self.damping_scale > 0:
            raise OptionError(f"DataInfConfig.damping_scale must be > 0, got {self.damping_scale}")
        if self.chunk < 1:
            raise OptionError(f"DataInfConfig.chunk must be >= 1, got {self.chunk}")


def layer_groups(task: Task, theta: Tensor) -> list[tuple[str, slice]]:
    """(layer name, slice of θ [P]) per module, from ``task.module(θ).named_parameters()`` in packing order:
    consecutive parameters whose names share a prefix (``"0.weight"``, ``"0.bias"``) form one layer."""
    groups: list[tuple[str, slice]] = []
    offset = 0
    for name, param in task.module(theta).named_parameters():
        prefix = name.rsplit(".", 1)[0] if "." in name else ""
        end = offset + param.numel()
        if groups and groups[-1][0] == prefix:
            groups[-1] = (prefix, slice(groups[-1][1].start, end))
        elif any(g == prefix for g, _ in groups):
            raise ValueError(f"datainf: the parameters of module {prefix!r} are not contiguous in θ")
        else:
            groups.append((prefix, slice(offset, end)))
        offset = end
    if offset != theta.numel():
        raise ValueError(f"datainf: the module has {offset} parameters, θ has {theta.numel()}")
    return groups


@dataclass
class LayerProjections:
    """One layer's per-example quantities, accumulated chunk by chunk over the N training examples:
    ‖g_il‖² [N], ∇_l ℓ_k·g_il [K, N] and ∇_l m·g_il [Q·M, N] (no [N, P] matrix is kept)."""

    sq_norm: list[Tensor] = field(default_factory=list)
    proj_k: list[Tensor] = field(default_factory=list)
    proj_m: list[Tensor] = field(default_factory=list)

    def add(self, g_l: Tensor, g_k: Tensor, g_m: Tensor) -> None:
        self.sq_norm.append(g_l.pow(2).sum(1))
        self.proj_k.append(g_k @ g_l.T)
        self.proj_m.append(g_m @ g_l.T)


def sherman_morrison_bilinear(g_k: Tensor, g_m: Tensor, proj: LayerProjections, damping: float) -> Tensor:
    """∇_l ℓ_kᵀ [(1/(Nλ))Σ_i (I − g_i g_iᵀ/(λ + ‖g_i‖²))] ∇_l m for all pairs (Kwon et al. 2023, eq. (6)):
    (1/λ)·(∇ℓ_k·∇m − (1/N)Σ_i (∇ℓ_k·g_i)(g_i·∇m)/(λ + ‖g_i‖²)), [K, R] from g_k [K, P_l], g_m [R, P_l]."""
    sq_norm, proj_k, proj_m = (torch.cat(x, dim=-1) for x in (proj.sq_norm, proj.proj_k, proj.proj_m))
    weight = 1.0 / (damping + sq_norm)  # [N]
    return (g_k @ g_m.T - (proj_k * weight) @ proj_m.T / sq_norm.numel()) / damping


@register_method("datainf")
class DataInf(Method):
    is_distributional = True
    config_cls = DataInfConfig

    def predict(self, ctx: RemovalContext) -> Tensor:
        layers = layer_groups(ctx.task, ctx.theta_full[0])
        out, lambdas = [], []
        for s in tqdm(range(ctx.n_seeds), desc="datainf", unit="seed", disable=not ctx.progress):
            theta = ctx.theta_full[s].clone()
            g_k = example_loss_grads(ctx.task, theta, ctx.data.x_train[ctx.targets], ctx.data.y_train[ctx.targets])
            g_m = measurement_grads(ctx.task, theta, ctx.x_query, ctx.y_query)  # [Q, M, P]
            flat_m = g_m.reshape(-1, g_m.shape[-1])  # [Q·M, P]
            projections = [LayerProjections() for _ in layers]
            for i in range(0, ctx.n_train, self.config.chunk):
                grads = example_loss_grads(ctx.task, theta, ctx.data.x_train[i:i + self.config.chunk],
                                           ctx.data.y_train[i:i + self.config.chunk])  # g_i [chunk, P]
                for (_, part), proj in zip(layers, projections):
                    proj.add(grads[:, part], g_k[:, part], flat_m[:, part])
            delta = g_k.new_zeros(g_k.shape[0], flat_m.shape[0])  # [K, Q·M]
            for (_, part), proj in zip(layers, projections):
                n_entries = ctx.n_train * (part.stop - part.start)
                lam = self.config.damping_scale * float(torch.cat(proj.sq_norm).sum()) / n_entries  # λ_l
                delta += sherman_morrison_bilinear(g_k[:, part], flat_m[:, part], proj, lam)
                lambdas.append(lam)
            out.append(delta.view(-1, *g_m.shape[:2]) / ctx.n_train)
        self.info.update(damping_mean=float(sum(lambdas) / len(lambdas)), n_layers=float(len(layers)))
        return torch.stack(out)  # [S, K, Q, M]
