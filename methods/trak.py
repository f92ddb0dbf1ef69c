"""TRAK (Park et al. 2023, "TRAK: Attributing Model Behavior at Scale", §3, eqs. (13)–(15); PAPERS.md §4.1).

Per model (seed) s, with f_i = margin_i(θ) = logit_y − logsumexp_{j≠y} logit_j and p_i the softmax
probability of example i's label:

    Φ = [φ_1; …; φ_N] [N, d],   φ_i = Pᵀ ∇_θ f_i(θ_s)          (random projection P [P, d], seeded)
    R = diag(p_i (1 − p_i))                                    (the logistic Hessian weights)
    Δmargin[s, k, q] = −φ_qᵀ (ΦᵀRΦ + λI)⁻¹ φ_k · (1 − p_k)     (removed minus full)
    Δloss[s, k, q]   = −(1 − p_q) · Δmargin[s, k, q]           (d loss / d margin = −(1 − p))

This is the one-step Newton (influence) estimate of removing k from the *summed* loss of the linearised
margin model (a logistic regression on φ): no 1/N. TRAK's "score" counts helpful examples as positive,
i.e. score = −Δmargin. λ = damping_scale × mean eigenvalue of ΦᵀRΦ (logged; TRAK's library uses λ = 0
and no R). P is Gaussian N(0, 1/d) or Rademacher ±1/√d, drawn block by block from ``proj_seed`` (so it is
never materialised whole), or ``none`` (d = P, exact features). d = min(proj_dim, P, N).

``trak`` is the M = 1 per-seed estimator (a d-TDA sampler, one sample per seed). ``trak_ensemble`` is
TRAK's ensemble over the S seeds, ``[mean_s scores_s] ⊙ [mean_s (1 − p_k)_s]`` (``finalize_scores``),
a mean-only predictor: ``distributional = False``; its loss column uses mean_s (1 − p_q)_s.
"""

from __future__ import annotations

import enum
import hashlib
import math
from collections import OrderedDict
from dataclasses import asdict, dataclass

import torch
from torch import Tensor
from torch.func import grad, vmap
from tqdm.auto import tqdm

from benchmark.config import OptionError, derive_seed, parse_enum
from benchmark.registry import register_method
from benchmark.store import content_key
from methods.base import Method, RemovalContext
from tasks.base import margin_from_logits


class Projection(str, enum.Enum):
    GAUSSIAN = "gaussian"
    RADEMACHER = "rademacher"
    NONE = "none"


@dataclass(frozen=True)
class TrakConfig:
    proj_dim: int = 2048  # TRAK's default; capped at min(P, N)
    projection: Projection = Projection.GAUSSIAN
    proj_seed: int = 0
    damping_scale: float = 0.1  # λ = damping_scale · mean eigenvalue of ΦᵀRΦ
    example_chunk: int = 256
    param_block: int = 8192  # rows of P generated at a time

    def __post_init__(self) -> None:
        object.__setattr__(self, "projection", parse_enum(Projection, self.projection, "projection"))
        if self.proj_dim < 1:
            raise OptionError(f"TrakConfig.proj_dim must be >= 1, got {self.proj_dim}")
        if self.damping_scale < 0:
            raise OptionError(f"TrakConfig.damping_scale must be >= 0, got {self.damping_scale}")


def projection_block(cfg: TrakConfig, start: int, stop: int, dim: int, like: Tensor) -> Tensor:
    """Rows start:stop of P [P, d], reproducible from (proj_seed, block start)."""
    gen = torch.Generator().manual_seed(derive_seed("trak_projection", cfg.proj_seed, start, dim))
    if cfg.projection is Projection.GAUSSIAN:
        block = torch.randn(stop - start, dim, generator=gen, dtype=torch.float64)
    else:
        block = torch.randint(0, 2, (stop - start, dim), generator=gen).double().mul_(2).sub_(1)
    return (block / math.sqrt(dim)).to(like)


def margin_grads(ctx: RemovalContext, theta: Tensor, x: Tensor, y: Tensor) -> Tensor:
    """∇_θ margin_i(θ) per example, [B, P]."""
    def one(th: Tensor, xi: Tensor, yi: Tensor) -> Tensor:
        return margin_from_logits(ctx.task.logits(th, xi.unsqueeze(0)), yi.unsqueeze(0)).squeeze(0)

    return vmap(grad(one), in_dims=(None, 0, 0))(theta, x, y)


def features(ctx: RemovalContext, cfg: TrakConfig, theta: Tensor, x: Tensor, y: Tensor, dim: int) -> Tensor:
    """φ_i = Pᵀ∇f_i, [B, d], chunked over examples and over P's rows."""
    out = []
    for i in range(0, x.shape[0], cfg.example_chunk):
        g = margin_grads(ctx, theta, x[i:i + cfg.example_chunk], y[i:i + cfg.example_chunk])
        if cfg.projection is Projection.NONE:
            out.append(g)
            continue
        phi = g.new_zeros(g.shape[0], dim)
        for start in range(0, g.shape[1], cfg.param_block):
            stop = min(start + cfg.param_block, g.shape[1])
            phi += g[:, start:stop] @ projection_block(cfg, start, stop, dim, g)
        out.append(phi)
    return torch.cat(out)


def correct_prob(ctx: RemovalContext, theta: Tensor, x: Tensor, y: Tensor) -> Tensor:
    with torch.no_grad():
        return torch.softmax(ctx.task.logits(theta, x), -1).gather(1, y.unsqueeze(1)).squeeze(1)


_MEMO_SIZE = 4096  # per-seed score sets kept in memory ([K, Q] each)
_SEED_SCORES: OrderedDict[str, tuple[Tensor, Tensor, Tensor, float]] = OrderedDict()


@register_method("trak")
class Trak(Method):
    is_distributional = True
    config_cls = TrakConfig

    def projected_dim(self, ctx: RemovalContext) -> int:
        n_params = ctx.theta_full.shape[1]
        if self.config.projection is Projection.NONE:
            return n_params
        return min(self.config.proj_dim, n_params, ctx.n_train)

    def seed_scores(self, ctx: RemovalContext, s: int) -> tuple[Tensor, Tensor, Tensor, float]:
        """TRAK's scores φ_qᵀ(ΦᵀRΦ + λI)⁻¹φ_k [K, Q] (no (1 − p_k) yet), 1 − p_k [K], 1 − p_q [Q], λ.
        Memoised in-process by content (config, θ_s, data, targets, queries), so ``trak_ensemble`` reuses the
        per-seed work of ``trak`` in the same run."""
        theta = ctx.theta_full[s].clone()
        key = content_key(self.config_dict(), asdict(ctx.scale), ctx.task.name, str(theta.dtype),
                          hashlib.sha256(theta.detach().cpu().numpy().tobytes()).hexdigest(),
                          ctx.targets.tolist(), ctx.queries.tolist())
        if key not in _SEED_SCORES:
            _SEED_SCORES[key] = self._seed_scores(ctx, theta)
            while len(_SEED_SCORES) > _MEMO_SIZE:
                _SEED_SCORES.popitem(last=False)
        return _SEED_SCORES[key]

    def _seed_scores(self, ctx: RemovalContext, theta: Tensor) -> tuple[Tensor, Tensor, Tensor, float]:
        cfg = self.config
        dim = self.projected_dim(ctx)
        x, y = ctx.data.x_train, ctx.data.y_train
        phi = features(ctx, cfg, theta, x, y, dim)  # [N, d]
        p = correct_prob(ctx, theta, x, y)
        kernel = phi.T @ (phi * (p * (1 - p)).unsqueeze(1))  # ΦᵀRΦ [d, d]
        lam = cfg.damping_scale * float(kernel.diagonal().mean())
        kernel.diagonal().add_(lam)
        phi_q = features(ctx, cfg, theta, ctx.x_query, ctx.y_query, dim)  # [Q, d]
        solved = torch.linalg.solve(kernel, phi[ctx.targets].T)  # [d, K]
        scores = (phi_q @ solved).T  # [K, Q]
        q_query = 1 - correct_prob(ctx, theta, ctx.x_query, ctx.y_query)
        return scores, 1 - p[ctx.targets], q_query, lam

    @staticmethod
    def to_effects(scores: Tensor, one_minus_p_k: Tensor, one_minus_p_q: Tensor) -> Tensor:
        """[K, Q, M=(loss, margin)] removal effects from TRAK scores (helpful = positive)."""
        d_margin = -scores * one_minus_p_k.unsqueeze(1)
        return torch.stack([-one_minus_p_q.unsqueeze(0) * d_margin, d_margin], dim=-1)

    def predict(self, ctx: RemovalContext) -> Tensor:
        out, lambdas = [], []
        for s in tqdm(range(ctx.n_seeds), desc=self.name, unit="seed", disable=not ctx.progress):
            scores, qk, qq, lam = self.seed_scores(ctx, s)
            out.append(self.to_effects(scores, qk, qq))
            lambdas.append(lam)
        self.info.update(damping_mean=float(sum(lambdas) / len(lambdas)), proj_dim=float(self.projected_dim(ctx)))
        return torch.stack(out)


@register_method("trak_ensemble")
class TrakEnsemble(Trak):
    """TRAK's ensemble over the seeds' models: one mean prediction, repeated for every seed."""

    is_distributional = False
    seed_separable = False  # one score pooled over all seeds: a single work unit

    def predict(self, ctx: RemovalContext) -> Tensor:
        scores, qk, qq, lambdas = [], [], [], []
        for s in tqdm(range(ctx.n_seeds), desc=self.name, unit="seed", disable=not ctx.progress):
            sc, k, q, lam = self.seed_scores(ctx, s)
            scores.append(sc)
            qk.append(k)
            qq.append(q)
            lambdas.append(lam)
        mean = self.to_effects(torch.stack(scores).mean(0), torch.stack(qk).mean(0), torch.stack(qq).mean(0))
        self.info.update(damping_mean=float(sum(lambdas) / len(lambdas)), proj_dim=float(self.projected_dim(ctx)))
        return mean.unsqueeze(0).expand(ctx.n_seeds, *mean.shape).clone()
