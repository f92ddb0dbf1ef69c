"""Influence functions as a per-seed d-TDA sampler (Mlodozeniec et al. 2025, eq. (3), Thm. 2; Koh & Liang 2017).

    Δm[s, k, q] = (1/N) · ∇m_q(θ_s)ᵀ (H_s + λI)⁻¹ ∇ℓ_k(θ_s)          (removed minus full)

H_s is the curvature of the objective actually trained, L(θ) = (1/N)Σ_n ℓ_n(θ) + (wd/2)‖θ‖²:
- ``ggn`` (default): (1/N)Σ_n J_nᵀ Λ_n J_n + wd·I, J_n = ∂logits_n/∂θ [C, P], Λ_n = diag(p_n) − p_n p_nᵀ;
- ``hessian``: ∇²L (dense solver only: CG needs a positive-definite system).
Damping λ = damping_scale × mean eigenvalue of H (= tr(H)/P; kronfluence's default 0.1, Grosse et al.
2023), logged. Removing k moves the minimiser of L − εℓ_k by +ε H⁻¹∇ℓ_k, ε = 1/N: hence the + sign.

Solvers: ``dense`` (eigendecomposition, P ≤ max_dense_params; ``pseudo_inverse`` drops eigenvalues
≤ pinv_rtol·λ_max and uses λ = 0, d-TDA Thm. 2's H⁺) and ``cg`` (conjugate gradients, batched over
the smaller of the K targets or the Q·M query gradients, GGN only).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

import torch
from torch import Tensor
from torch.func import grad, jacrev, jvp, vjp, vmap

from benchmark.config import OptionError, parse_enum
from benchmark.registry import register_method
from methods.base import Method, RemovalContext, example_loss_grads, measurement_grads
from tasks.base import cross_entropy


class Curvature(str, enum.Enum):
    GGN = "ggn"
    HESSIAN = "hessian"


class Solver(str, enum.Enum):
    DENSE = "dense"
    CG = "cg"
    AUTO = "auto"  # dense when P ≤ auto_dense_params, else cg


@dataclass(frozen=True)
class InfluenceConfig:
    curvature: Curvature = Curvature.GGN
    damping_scale: float = 0.1  # λ = damping_scale · mean eigenvalue of H
    solver: Solver = Solver.AUTO
    pseudo_inverse: bool = False
    pinv_rtol: float = 1e-8
    cg_rtol: float = 1e-6
    cg_max_iter: int = 300
    max_dense_params: int = 5000  # dense eigh refused above this
    auto_dense_params: int = 1000  # ``auto`` picks dense up to this size (eigh is O(P³) per seed)

    def __post_init__(self) -> None:
        object.__setattr__(self, "curvature", parse_enum(Curvature, self.curvature, "curvature"))
        object.__setattr__(self, "solver", parse_enum(Solver, self.solver, "solver"))
        if self.damping_scale < 0:
            raise OptionError(f"InfluenceConfig.damping_scale must be >= 0, got {self.damping_scale}")

    @classmethod
    def exact_for_tests(cls) -> InfluenceConfig:
        """Exact Hessian, dense solver, no damping."""
        return cls(curvature=Curvature.HESSIAN, damping_scale=0.0, solver=Solver.DENSE)


def objective(ctx: RemovalContext, theta: Tensor) -> Tensor:
    """L(θ) = (1/N)Σ_n ℓ_n(θ) + (wd/2)‖θ‖²."""
    loss = ctx.task.per_example_loss(theta, ctx.data.x_train, ctx.data.y_train).mean()
    return loss + 0.5 * ctx.scale.train.weight_decay * theta.pow(2).sum()


def dense_curvature(ctx: RemovalContext, theta: Tensor, curvature: Curvature, chunk: int = 256) -> Tensor:
    """H [P, P] explicitly (small models only)."""
    wd, n = ctx.scale.train.weight_decay, ctx.n_train
    if curvature is Curvature.HESSIAN:
        return torch.func.hessian(lambda th: objective(ctx, th))(theta)
    out = wd * torch.eye(theta.numel(), dtype=theta.dtype, device=theta.device)
    for i in range(0, n, chunk):
        x, y = ctx.data.x_train[i:i + chunk], ctx.data.y_train[i:i + chunk]
        jac = jacrev(lambda th: ctx.task.logits(th, x))(theta)  # [b, C, P]
        p = torch.softmax(ctx.task.logits(theta, x), -1)  # [b, C]
        lam = torch.diag_embed(p) - p.unsqueeze(-1) * p.unsqueeze(-2)  # [b, C, C]
        out += torch.einsum("bcp,bcd,bdr->pr", jac, lam, jac) / n
    return out


def ggn_trace(ctx: RemovalContext, theta: Tensor, chunk: int = 128) -> float:
    """tr(G) = (1/N)Σ_n tr(Λ_n J_n J_nᵀ) + wd·P, exact, chunked over examples."""
    total = 0.0
    for i in range(0, ctx.n_train, chunk):
        x, y = ctx.data.x_train[i:i + chunk], ctx.data.y_train[i:i + chunk]
        jac = jacrev(lambda th: ctx.task.logits(th, x))(theta)  # [b, C, P]
        p = torch.softmax(ctx.task.logits(theta, x), -1)
        gram = torch.einsum("bcp,bdp->bcd", jac, jac)  # J Jᵀ [b, C, C]
        total += float((p * gram.diagonal(dim1=1, dim2=2)).sum() - torch.einsum("bc,bcd,bd->", p, gram, p))
    return total / ctx.n_train + ctx.scale.train.weight_decay * theta.numel()


def ggn_mvp(ctx: RemovalContext, theta: Tensor, vecs: Tensor) -> Tensor:
    """G V for V [R, P]: (1/N) Jᵀ Λ J V + wd V (forward-over-reverse, batched over R)."""
    x = ctx.data.x_train

    def logits_fn(th: Tensor) -> Tensor:
        return ctx.task.logits(th, x)

    logits, vjp_fn = vjp(logits_fn, theta)
    p = torch.softmax(logits, -1).detach()  # [N, C]

    def one(v: Tensor) -> Tensor:
        jv = jvp(logits_fn, (theta,), (v,))[1]  # [N, C]
        lam_jv = p * jv - p * (p * jv).sum(-1, keepdim=True)
        return vjp_fn(lam_jv / ctx.n_train)[0]

    return vmap(one)(vecs) + ctx.scale.train.weight_decay * vecs


def batched_cg(mvp: object, rhs: Tensor, damping: float, rtol: float, max_iter: int) -> tuple[Tensor, int]:
    """Solve (A + λI) X = B for each row of B [R, P] by conjugate gradients; returns X and iterations."""
    x = torch.zeros_like(rhs)
    r = rhs.clone()
    d = r.clone()
    rs = (r * r).sum(1)
    target = (rtol ** 2) * rs.clamp(min=1e-300)
    for it in range(1, max_iter + 1):
        ad = mvp(d) + damping * d  # type: ignore[operator]
        alpha = rs / (d * ad).sum(1).clamp(min=1e-300)
        x += alpha.unsqueeze(1) * d
        r -= alpha.unsqueeze(1) * ad
        rs_new = (r * r).sum(1)
        if bool((rs_new <= target).all()):
            return x, it
        d = r + (rs_new / rs.clamp(min=1e-300)).unsqueeze(1) * d
        rs = rs_new
    return x, max_iter


@register_method("influence")
class Influence(Method):
    is_distributional = True
    config_cls = InfluenceConfig

    def predict(self, ctx: RemovalContext) -> Tensor:
        cfg = self.config
        n_params = ctx.theta_full.shape[1]
        solver = cfg.solver
        if solver is Solver.AUTO:
            solver = Solver.DENSE if n_params <= cfg.auto_dense_params else Solver.CG
        if solver is Solver.DENSE and n_params > cfg.max_dense_params:
            raise OptionError(f"solver 'dense' needs P <= max_dense_params={cfg.max_dense_params}; "
                              f"this model has P={n_params}: use solver 'cg'")
        if solver is Solver.CG and cfg.curvature is Curvature.HESSIAN:
            raise OptionError("solver 'cg' needs a positive-definite system: use curvature 'ggn' "
                              "or solver 'dense' with curvature 'hessian'")
        out, lambdas, ratios, iters = [], [], [], []
        for s in range(ctx.theta_full.shape[0]):
            theta = ctx.theta_full[s]
            g_k = example_loss_grads(ctx.task, theta, ctx.data.x_train[ctx.targets], ctx.data.y_train[ctx.targets])
            g_m = measurement_grads(ctx.task, theta, ctx.x_query, ctx.y_query)  # [Q, M, P]
            if solver is Solver.DENSE:
                delta, lam, mean_eig = self._dense(ctx, theta, g_k, g_m)
            else:
                delta, lam, mean_eig, it = self._cg(ctx, theta, g_k, g_m)
                iters.append(it)
            out.append(delta / ctx.n_train)
            lambdas.append(lam)
            ratios.append(lam / mean_eig if mean_eig else 0.0)
        self.info.update(damping_mean=float(sum(lambdas) / len(lambdas)),
                         damping_over_mean_eig=float(sum(ratios) / len(ratios)), solver=solver.value)
        if iters:
            self.info["cg_iterations_max"] = float(max(iters))
        return torch.stack(out)  # [S, K, Q, M]

    def _dense(self, ctx: RemovalContext, theta: Tensor, g_k: Tensor, g_m: Tensor) -> tuple[Tensor, float, float]:
        cfg = self.config
        h = dense_curvature(ctx, theta, cfg.curvature)
        evals, evecs = torch.linalg.eigh(0.5 * (h + h.T))
        mean_eig = float(evals.mean())
        if cfg.pseudo_inverse:
            lam = 0.0
            keep = evals.abs() > cfg.pinv_rtol * evals.abs().max()
            inv = torch.where(keep, 1.0 / torch.where(keep, evals, torch.ones_like(evals)), torch.zeros_like(evals))
        else:
            lam = cfg.damping_scale * mean_eig
            inv = 1.0 / (evals + lam)
        proj_k = g_k @ evecs  # [K, P]
        proj_m = torch.einsum("qmp,pr->qmr", g_m, evecs)
        return torch.einsum("kr,r,qmr->kqm", proj_k, inv, proj_m), lam, mean_eig

    def _cg(self, ctx: RemovalContext, theta: Tensor, g_k: Tensor, g_m: Tensor) -> tuple[Tensor, float, float, int]:
        cfg = self.config
        mean_eig = ggn_trace(ctx, theta) / theta.numel()
        lam = cfg.damping_scale * mean_eig
        n_q, n_m = g_m.shape[0], g_m.shape[1]
        flat_m = g_m.reshape(n_q * n_m, -1)
        mvp = lambda v: ggn_mvp(ctx, theta, v)  # noqa: E731
        if g_k.shape[0] <= flat_m.shape[0]:
            sol, it = batched_cg(mvp, g_k, lam, cfg.cg_rtol, cfg.cg_max_iter)  # (H+λI)⁻¹∇ℓ_k [K, P]
            delta = torch.einsum("kp,qmp->kqm", sol, g_m)
        else:
            sol, it = batched_cg(mvp, flat_m, lam, cfg.cg_rtol, cfg.cg_max_iter)  # [Q·M, P]
            delta = torch.einsum("kp,rp->kr", g_k, sol).view(-1, n_q, n_m)
        return delta, lam, mean_eig, it


_ = (grad, cross_entropy)  # re-exported helpers used by tests
