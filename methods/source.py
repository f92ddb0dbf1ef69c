"""SOURCE: segmented stationary unrolling (Bae et al. 2024, "Training Data Attribution via Approximate
Unrolling", §3, eqs. (16), (21), (24); PAPERS.md §2.3).

The T recorded steps are cut into L segments of T_ℓ steps (equal lengths; boundaries b_ℓ = round(ℓT/L)).
Within segment ℓ the curvature and example k's gradient are taken as stationary: H̄_ℓ is the curvature
of L(θ) = (1/N)Σℓ_n + (wd/2)‖θ‖² averaged over the segment's checkpoints (GGN, Hessian with eigenvalues
clamped ≥ 0, or EK-FAC fitted on the segment's checkpoints in a shared basis), ḡ_ℓ = ∇ℓ_k averaged over
the same checkpoints, η̄_ℓ the mean step. Then, per seed,

    S̄_ℓ = exp(−η̄_ℓ T_ℓ H̄_ℓ)                                  (segment Jacobian, eq. 16)
    r̄_ℓ = (1/N) (I − S̄_ℓ) H̄_ℓ⁻¹ ḡ_ℓ = (1/N) F_r(H̄_ℓ) ḡ_ℓ,   F_r(σ) = (1 − e^{−η̄Tσ})/σ → η̄T at σ = 0 (eq. 21)
    Δθ_k = Σ_ℓ (S̄_L ⋯ S̄_{ℓ+1}) r̄_ℓ                            (eq. 24, products in that order)
    Δm[s, k, q] = ∇m_q(θ_T)ᵀ Δθ_k                              (removed minus full: removal drops the
                                                                −(η/B)∇ℓ_k updates, so Δθ points along +∇ℓ_k)

computed as acc ← S̄_ℓ acc + r̄_ℓ for ℓ = 1..L (the segments' eigenbases do not commute). ``segment_map =
power`` uses the exact full-batch GD power (I − η̄H̄)^{T_ℓ} and F_r(σ) = (1 − (1 − η̄σ)^{T_ℓ})/σ instead
(with constant H, ḡ and full-batch GD this equals unrolled differentiation exactly).
Momentum β: the effective step η̄/(1 − β) (Bae et al. App. D, below eq. 54) — a steady-state rule for
slowly varying gradients, not exact for momentum transients. No damping is needed: F_r is finite on the
null space, and SOURCE's implied damping is 1/(η̄_ℓ T_ℓ) (logged as ``implied_damping_mean``).

Checkpoints (``RemovalContext.checkpoints``, epoch ends, 0 = init) belong to the segment whose steps
[b_{ℓ−1}, b_ℓ) contain theirs — step t's update uses θ_t, so the final θ_T, used by no update, is in no
segment; a segment without a checkpoint uses the one nearest its midpoint.
Cost: about (checkpoints used) × an influence computation per seed.
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor
from tqdm.auto import tqdm

from benchmark.config import OptionError, derive_seed, parse_enum
from benchmark.registry import register_method
from methods.base import Method, RemovalContext, example_loss_grads, measurement_grads
from methods.influence import Curvature, dense_curvature
from methods.kfac import FisherType, KroneckerCurvature, fit_kronecker


class SegmentMap(str, enum.Enum):
    EXP = "exp"  # S̄ = exp(−ηTH), Bae et al.'s stationary approximation
    POWER = "power"  # S̄ = (I − ηH)^T, exact for full-batch GD with constant H


class SourceCurvature(str, enum.Enum):
    AUTO = "auto"  # ggn when P ≤ auto_dense_params, else ekfac
    GGN = "ggn"
    HESSIAN = "hessian"
    EKFAC = "ekfac"


@dataclass(frozen=True)
class SourceConfig:
    n_segments: int = 3  # L (Bae et al. use 3 in every experiment)
    curvature: SourceCurvature = SourceCurvature.AUTO
    segment_map: SegmentMap = SegmentMap.EXP
    fisher: FisherType = FisherType.SAMPLED  # ekfac only
    fisher_seed: int = 0
    auto_dense_params: int = 2000
    max_dense_params: int = 5000

    def __post_init__(self) -> None:
        object.__setattr__(self, "curvature", parse_enum(SourceCurvature, self.curvature, "curvature"))
        object.__setattr__(self, "segment_map", parse_enum(SegmentMap, self.segment_map, "segment_map"))
        object.__setattr__(self, "fisher", parse_enum(FisherType, self.fisher, "fisher"))
        if self.n_segments < 1:
            raise OptionError(f"SourceConfig.n_segments must be >= 1, got {self.n_segments}")


def segment_functions(eigvals: Tensor, eta: float, steps: int, segment_map: SegmentMap) -> tuple[Tensor, Tensor]:
    """Elementwise S(σ) and F_r(σ) = (1 − S(σ))/σ (limit η·T at σ = 0) for eigenvalues σ ≥ 0."""
    x = eta * eigvals
    if segment_map is SegmentMap.EXP:
        s = torch.exp(-steps * x)
        one_minus_s = -torch.expm1(-steps * x)
    else:
        s = (1 - x) ** steps
        one_minus_s = 1 - s
    small = eigvals.abs() <= 1e-14 * max(float(eigvals.abs().max()), 1e-300)
    r = torch.where(small, torch.full_like(eigvals, eta * steps), one_minus_s / torch.where(small, 1.0, eigvals))
    return s, r


@dataclass(frozen=True)
class DenseEigen:
    """A symmetric matrix by its eigendecomposition (eigvals [P], eigvecs [P, P])."""

    eigvals: Tensor
    eigvecs: Tensor

    def apply(self, vecs: Tensor, fn: Callable[[Tensor], Tensor]) -> Tensor:
        """f(H) V for V [R, P]."""
        return ((vecs @ self.eigvecs) * fn(self.eigvals)) @ self.eigvecs.T


@dataclass(frozen=True)
class Segment:
    """One segment: its curvature operator, mean effective step η̄/(1−β), length T_ℓ and ḡ_ℓ [K, P]."""

    curvature: DenseEigen | KroneckerCurvature
    eta: float
    steps: int
    grad: Tensor


def source_displacement(segments: list[Segment], n_train: int, segment_map: SegmentMap) -> Tensor:
    """Δθ [K, P] = Σ_ℓ (S̄_L ⋯ S̄_{ℓ+1}) r̄_ℓ via acc ← S̄_ℓ acc + r̄_ℓ."""
    acc = torch.zeros_like(segments[0].grad)
    for seg in segments:
        def s_fn(ev: Tensor, seg: Segment = seg) -> Tensor:
            return segment_functions(ev, seg.eta, seg.steps, segment_map)[0]

        def r_fn(ev: Tensor, seg: Segment = seg) -> Tensor:
            return segment_functions(ev, seg.eta, seg.steps, segment_map)[1]

        acc = seg.curvature.apply(acc, s_fn) + seg.curvature.apply(seg.grad, r_fn) / n_train
    return acc


def segment_plan(n_steps: int, n_segments: int, checkpoint_steps: list[int]) -> list[tuple[int, int, list[int]]]:
    """(start, end, checkpoint indices) per segment; equal-length segments over [0, T)."""
    bounds = [round(i * n_steps / n_segments) for i in range(n_segments + 1)]
    plan = []
    for i in range(n_segments):
        start, end = bounds[i], bounds[i + 1]
        inside = [c for c, t in enumerate(checkpoint_steps) if start <= t < end]
        if not inside:
            mid = 0.5 * (start + end)
            inside = [min(range(len(checkpoint_steps)), key=lambda c: abs(checkpoint_steps[c] - mid))]
        plan.append((start, end, inside))
    return plan


@register_method("source")
class Source(Method):
    is_distributional = True
    config_cls = SourceConfig

    def predict(self, ctx: RemovalContext) -> Tensor:
        cfg = self.config
        ckpts = ctx.require_checkpoints("source")
        n_params = ctx.theta_full.shape[1]
        kind = cfg.curvature
        if kind is SourceCurvature.AUTO:
            kind = SourceCurvature.GGN if n_params <= cfg.auto_dense_params else SourceCurvature.EKFAC
        if kind is not SourceCurvature.EKFAC and n_params > cfg.max_dense_params:
            raise OptionError(f"source curvature {kind.value!r} is dense and needs P <= max_dense_params="
                              f"{cfg.max_dense_params}; this model has P={n_params}: use curvature 'ekfac'")
        n_steps = ctx.n_steps
        plan = segment_plan(n_steps, cfg.n_segments, ctx.checkpoint_steps)
        lrs = ctx.learning_rates()
        beta = ctx.scale.train.momentum
        etas = [float(lrs[a:b].mean()) / (1 - beta) for a, b, _ in plan]
        x_k, y_k = ctx.data.x_train[ctx.targets], ctx.data.y_train[ctx.targets]
        out = []
        for s in tqdm(range(ctx.n_seeds), desc="source", unit="seed", disable=not ctx.progress):
            segments = []
            for (start, end, members), eta in zip(plan, etas):
                thetas = [ckpts[s, c].clone() for c in members]
                grad = torch.stack([example_loss_grads(ctx.task, th, x_k, y_k) for th in thetas]).mean(0)
                curv = self._curvature(ctx, thetas, kind, ctx.seeds[s])
                segments.append(Segment(curv, eta, end - start, grad))
            delta_theta = source_displacement(segments, ctx.n_train, cfg.segment_map)  # [K, P]
            theta_t = ctx.theta_full[s].clone()
            g_m = measurement_grads(ctx.task, theta_t, ctx.x_query, ctx.y_query)  # [Q, M, P]
            out.append(torch.einsum("kp,qmp->kqm", delta_theta, g_m))
        self.info.update(curvature=kind.value, n_segments=float(cfg.n_segments),
                         implied_damping_mean=float(sum(1 / (e * (b - a)) for (a, b, _), e in zip(plan, etas))
                                                    / len(plan)),
                         checkpoints_used=float(sum(len(m) for _, _, m in plan)))
        return torch.stack(out)

    def _curvature(self, ctx: RemovalContext, thetas: list[Tensor], kind: SourceCurvature, seed: int
                   ) -> DenseEigen | KroneckerCurvature:
        if kind is SourceCurvature.EKFAC:
            return fit_kronecker(ctx.task, thetas, ctx.data.x_train, ctx.data.y_train, kind="ekfac",
                                 fisher=self.config.fisher, weight_decay=ctx.scale.train.weight_decay,
                                 seed=derive_seed("fisher", self.config.fisher_seed, seed))
        curvature = Curvature.GGN if kind is SourceCurvature.GGN else Curvature.HESSIAN
        h = torch.stack([dense_curvature(ctx, th, curvature) for th in thetas]).mean(0)
        evals, evecs = torch.linalg.eigh(0.5 * (h + h.T))
        return DenseEigen(evals.clamp(min=0.0), evecs)
