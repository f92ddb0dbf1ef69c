"""Influence functions as a per-seed d-TDA sampler (Mlodozeniec et al. 2025, eq. (3), Thm. 2; Koh & Liang 2017).

    Δm[s, k, q] = (1/N) · ∇m_q(θ_s)ᵀ (H_s + λI)⁻¹ ∇ℓ_k(θ_s)          (removed minus full)

H_s is the curvature of the objective actually trained, L(θ) = (1/N)Σ_n ℓ_n(θ) + (wd/2)‖θ‖²:
- ``ggn`` (default): (1/N)Σ_n J_nᵀ Λ_n J_n + wd·I, J_n = ∂logits_n/∂θ [C, P], Λ_n = diag(p_n) − p_n p_nᵀ;
- ``hessian``: ∇²L (dense solver only: CG needs a positive-definite system);
- ``ekfac`` / ``kfac``: the block-diagonal (eigenvalue-corrected) Kronecker-factored GGN of the
  ``nn.Linear``/``nn.Conv2d`` layers plus wd·I (``methods.kfac``; George et al. 2018), inverted exactly in
  its eigenbasis; ``fisher`` picks the pseudo-labels (``sampled`` default as kronfluence, ``true`` = the
  empirical Fisher, ``exact`` = all labels weighted by p); the choice is logged.
Damping λ = damping_scale × mean eigenvalue of H (= tr(H)/P; kronfluence's default 0.1, Grosse et al.
2023), logged. Removing k moves the minimiser of L − εℓ_k by +ε H⁻¹∇ℓ_k, ε = 1/N: hence the + sign.

Solvers: ``dense`` (eigendecomposition, P ≤ max_dense_params; ``pseudo_inverse`` drops eigenvalues
≤ pinv_rtol·λ_max and uses λ = 0, d-TDA Thm. 2's H⁺) and ``cg`` (conjugate gradients, batched over
the smaller of the K targets or the Q·M query gradients, GGN only, preconditioned by a rank-r randomized
Nyström approximation of the GGN: plain CG needed ≈ 250–300 iterations per seed at ``small``).
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from torch import Tensor
from torch.func import jacrev, jvp, vjp, vmap
from tqdm.auto import tqdm

from benchmark.config import OptionError, derive_seed, parse_enum
from benchmark.registry import register_method
from methods.base import Method, RemovalContext, example_loss_grads, measurement_grads
from methods.kfac import FisherType, fit_kronecker


class Curvature(str, enum.Enum):
    GGN = "ggn"
    HESSIAN = "hessian"
    EKFAC = "ekfac"
    KFAC = "kfac"


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
    cg_rtol: float = 1e-3  # relative residual; vs 1e-5 the predictions moved by 4e-4 (relative) at `small`
    cg_max_iter: int = 500
    nystrom_rank: int = 256  # rank of the randomized Nyström preconditioner for CG; 0 = plain CG
    exact_trace: bool = False  # CG: tr(H) exactly (per-example Jacobians) instead of Hutchinson on the sketch
    max_dense_params: int = 5000  # dense eigh refused above this
    auto_dense_params: int = 1000  # ``auto`` picks dense up to this size (eigh is O(P³) per seed)
    fisher: FisherType = FisherType.SAMPLED  # ekfac / kfac only: pseudo-labels of the Gauss–Newton factors
    fisher_seed: int = 0  # sampled labels are drawn from derive_seed(fisher_seed, seed)

    def __post_init__(self) -> None:
        object.__setattr__(self, "curvature", parse_enum(Curvature, self.curvature, "curvature"))
        object.__setattr__(self, "solver", parse_enum(Solver, self.solver, "solver"))
        object.__setattr__(self, "fisher", parse_enum(FisherType, self.fisher, "fisher"))
        if self.kronecker and self.solver is not Solver.AUTO:
            raise OptionError(f"curvature {self.curvature.value!r} is inverted in its own eigenbasis: "
                              "leave solver at 'auto'")
        if self.damping_scale < 0:
            raise OptionError(f"InfluenceConfig.damping_scale must be >= 0, got {self.damping_scale}")
        if self.nystrom_rank < 0 or self.cg_max_iter < 1 or not 0 < self.cg_rtol < 1:
            raise OptionError("InfluenceConfig needs nystrom_rank >= 0, cg_max_iter >= 1 and 0 < cg_rtol < 1")

    @property
    def kronecker(self) -> bool:
        return self.curvature in (Curvature.EKFAC, Curvature.KFAC)

    @classmethod
    def exact_for_tests(cls) -> InfluenceConfig:
        """Exact Hessian, dense solver, no damping."""
        return cls(curvature=Curvature.HESSIAN, damping_scale=0.0, solver=Solver.DENSE)


def objective(ctx: RemovalContext, theta: Tensor) -> Tensor:
    """L(θ) = (1/N)Σ_n ℓ_n(θ) + (wd/2)‖θ‖²."""
    loss = ctx.task.per_example_loss(theta, ctx.data.x_train, ctx.data.y_train).mean()
    return loss + 0.5 * ctx.scale.train.weight_decay * theta.pow(2).sum()


def logit_jacobians(ctx: RemovalContext, theta: Tensor, chunk: int) -> Iterator[tuple[Tensor, Tensor]]:
    """Per-example logit Jacobians J [b, C, P] and softmax probabilities p [b, C], chunk by chunk."""
    def one(th: Tensor, xi: Tensor) -> Tensor:  # logits of one example, [C]
        return ctx.task.logits(th, xi.unsqueeze(0)).squeeze(0)

    per_example = vmap(jacrev(one), in_dims=(None, 0))  # b Jacobians of one example each, not one of b
    for i in range(0, ctx.n_train, chunk):
        x = ctx.data.x_train[i:i + chunk]
        yield per_example(theta, x), torch.softmax(ctx.task.logits(theta, x), -1)


def dense_curvature(ctx: RemovalContext, theta: Tensor, curvature: Curvature, chunk: int = 256) -> Tensor:
    """H [P, P] explicitly (small models only)."""
    if curvature is Curvature.HESSIAN:
        return torch.func.hessian(lambda th: objective(ctx, th))(theta)
    out = ctx.scale.train.weight_decay * torch.eye(theta.numel(), dtype=theta.dtype, device=theta.device)
    for jac, p in logit_jacobians(ctx, theta, chunk):
        lam = torch.diag_embed(p) - p.unsqueeze(-1) * p.unsqueeze(-2)  # Λ_n [b, C, C]
        out += torch.einsum("bcp,bcd,bdr->pr", jac, lam, jac) / ctx.n_train
    return out


def ggn_trace(ctx: RemovalContext, theta: Tensor, chunk: int = 128) -> float:
    """tr(G) = (1/N)Σ_n tr(Λ_n J_n J_nᵀ) + wd·P, exact, chunked over examples."""
    total = 0.0
    for jac, p in logit_jacobians(ctx, theta, chunk):
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


@dataclass(frozen=True)
class NystromPreconditioner:
    """Randomized Nyström preconditioner for (A + λI) (Frangella, Tropp & Udell 2023, Alg. 2.1 and eq. (5.3)).

    Â = U diag(σ̂) Uᵀ ≈ A from a rank-r sketch Y = AΩ; then
        P⁻¹ v = (σ̂_r + λ)·U (diag(σ̂) + λI)⁻¹ Uᵀ v + (v − U Uᵀ v),
    which makes (A + λI) well conditioned when r exceeds its effective dimension. U [P, r], sigma [r].
    """

    basis: Tensor
    sigma: Tensor
    damping: float

    @classmethod
    def fit(cls, mvp: Callable[[Tensor], Tensor], n_params: int, rank: int, like: Tensor, seed: int = 0
            ) -> tuple[NystromPreconditioner, float]:
        """Sketch A with ``rank`` Gaussian probes Ω_g; returns the preconditioner (damping 0 until
        ``with_damping``) and Hutchinson's tr(A) ≈ (1/r)Σ_i ω_iᵀAω_i from the same products."""
        gen = torch.Generator().manual_seed(seed)
        probes = torch.randn(n_params, rank, generator=gen, dtype=torch.float64).to(like)
        y_probes = mvp(probes.T).T  # A Ω_g, [P, r]
        trace = float((probes * y_probes).sum() / rank)
        omega, r_factor = torch.linalg.qr(probes)
        y = torch.linalg.solve_triangular(r_factor, y_probes, upper=True, left=False)  # A Ω = A Ω_g R⁻¹
        shift = torch.finfo(like.dtype).eps * float(torch.linalg.matrix_norm(y))
        y = y + shift * omega
        chol = torch.linalg.cholesky(0.5 * (omega.T @ y + y.T @ omega))  # lower L, LLᵀ = Ωᵀ Y_ν
        b = torch.linalg.solve_triangular(chol, y.T, upper=False).T  # Y_ν L⁻ᵀ, [P, r]
        u, svals, _ = torch.linalg.svd(b, full_matrices=False)
        return cls(basis=u, sigma=(svals.pow(2) - shift).clamp(min=0.0), damping=0.0), trace

    def with_damping(self, damping: float) -> NystromPreconditioner:
        return NystromPreconditioner(self.basis, self.sigma, damping)

    def apply(self, v: Tensor) -> Tensor:
        """P⁻¹ V for V [R, P]."""
        coef = v @ self.basis  # [R, r]
        scaled = coef * ((self.sigma[-1] + self.damping) / (self.sigma + self.damping))
        return (scaled - coef) @ self.basis.T + v


def batched_cg(mvp: Callable[[Tensor], Tensor], rhs: Tensor, damping: float, rtol: float, max_iter: int,
               precondition: Callable[[Tensor], Tensor] | None = None) -> tuple[Tensor, int]:
    """Solve (A + λI) X = B for each row of B [R, P] by (preconditioned) conjugate gradients.

    Stops when every row's residual is below rtol·‖b‖; returns X [R, P] and the iterations used.
    """
    identity = (lambda v: v)  # noqa: E731
    prec = precondition or identity
    x = torch.zeros_like(rhs)
    r = rhs.clone()
    z = prec(r)
    d = z.clone()
    rz = (r * z).sum(1)
    target = (rtol ** 2) * (rhs * rhs).sum(1).clamp(min=1e-300)
    for it in range(1, max_iter + 1):
        ad = mvp(d) + damping * d
        alpha = rz / (d * ad).sum(1).clamp(min=1e-300)
        x += alpha.unsqueeze(1) * d
        r -= alpha.unsqueeze(1) * ad
        if bool(((r * r).sum(1) <= target).all()):
            return x, it
        z = prec(r)
        rz_new = (r * z).sum(1)
        d = z + (rz_new / rz.clamp(min=1e-300)).unsqueeze(1) * d
        rz = rz_new
    return x, max_iter


@register_method("influence")
class Influence(Method):
    is_distributional = True
    config_cls = InfluenceConfig

    def predict(self, ctx: RemovalContext) -> Tensor:
        cfg = self.config
        n_params = ctx.theta_full.shape[1]
        if cfg.kronecker:
            return self._predict_kronecker(ctx)
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
        for s in tqdm(range(ctx.theta_full.shape[0]), desc="influence", unit="seed", disable=not ctx.progress):
            # own storage: forward-mode AD on a view of the [S, P] stack pays for the whole base (2.3× slower)
            theta = ctx.theta_full[s].clone()
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

    def _predict_kronecker(self, ctx: RemovalContext) -> Tensor:
        """Per seed: fit K-FAC/EK-FAC at θ_s on the training set, then (1/N)∇mᵀ(H + λI)⁻¹∇ℓ_k."""
        cfg = self.config
        out, lambdas, ratios = [], [], []
        uncovered = 0.0
        for s in tqdm(range(ctx.n_seeds), desc=f"influence[{cfg.curvature.value}]", unit="seed",
                      disable=not ctx.progress):
            theta = ctx.theta_full[s].clone()
            curv = fit_kronecker(ctx.task, [theta], ctx.data.x_train, ctx.data.y_train, kind=cfg.curvature.value,
                                 fisher=cfg.fisher, weight_decay=ctx.scale.train.weight_decay,
                                 seed=derive_seed("fisher", cfg.fisher_seed, ctx.seeds[s]))
            mean_eig = curv.mean_eigenvalue()
            lam = cfg.damping_scale * mean_eig
            g_k = example_loss_grads(ctx.task, theta, ctx.data.x_train[ctx.targets], ctx.data.y_train[ctx.targets])
            g_m = measurement_grads(ctx.task, theta, ctx.x_query, ctx.y_query)  # [Q, M, P]
            sol = curv.inverse_hvp(g_k, lam)  # [K, P]
            out.append(torch.einsum("kp,qmp->kqm", sol, g_m) / ctx.n_train)
            lambdas.append(lam)
            ratios.append(lam / mean_eig if mean_eig else 0.0)
            uncovered = curv.uncovered_fraction
        self.info.update(damping_mean=float(sum(lambdas) / len(lambdas)),
                         damping_over_mean_eig=float(sum(ratios) / len(ratios)),
                         fisher=cfg.fisher.value, uncovered_fraction=uncovered)
        return torch.stack(out)

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
        """Preconditioned CG. The mean eigenvalue tr(H)/P is exact with ``exact_trace``, else Hutchinson's
        estimate from the Nyström sketch's 256 Gaussian probes (relative SE ≈ √(2/r)·‖H‖_F/tr H, a few %)."""
        cfg = self.config
        n_params = theta.numel()
        mvp = lambda v: ggn_mvp(ctx, theta, v)  # noqa: E731
        rank = min(cfg.nystrom_rank, n_params)
        sketch, trace = NystromPreconditioner.fit(mvp, n_params, rank, theta) if rank > 0 else (None, float("nan"))
        if cfg.exact_trace or sketch is None:
            trace = ggn_trace(ctx, theta)
        mean_eig = trace / n_params
        lam = cfg.damping_scale * mean_eig
        prec = sketch.with_damping(lam).apply if sketch is not None else None
        n_q, n_m = g_m.shape[0], g_m.shape[1]
        flat_m = g_m.reshape(n_q * n_m, -1)
        if g_k.shape[0] <= flat_m.shape[0]:
            sol, it = batched_cg(mvp, g_k, lam, cfg.cg_rtol, cfg.cg_max_iter, prec)  # (H+λI)⁻¹∇ℓ_k [K, P]
            delta = torch.einsum("kp,qmp->kqm", sol, g_m)
        else:
            sol, it = batched_cg(mvp, flat_m, lam, cfg.cg_rtol, cfg.cg_max_iter, prec)  # [Q·M, P]
            delta = torch.einsum("kp,rp->kr", g_k, sol).view(-1, n_q, n_m)
        return delta, lam, mean_eig, it


@dataclass(frozen=True)
class EkfacInfluenceConfig(InfluenceConfig):
    curvature: Curvature = Curvature.EKFAC


@register_method("influence_ekfac")
class InfluenceEkfac(Influence):
    """``influence`` with the EK-FAC curvature (kronfluence's and SOURCE's approximation) as its default."""

    config_cls = EkfacInfluenceConfig
