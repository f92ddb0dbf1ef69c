"""TRAK through the MadryLab ``traker`` library (Park et al. 2023, arXiv 2303.14186; PAPERS.md §4.1), one model
per seed.

Per seed s (M = 1: each seed's scores are that seed's sample of the d-TDA law), with f the margin
logit_y − logsumexp_{j≠y} logit_j, φ_n = Pᵀ∇f_n(θ_s)/√P (P a seeded Gaussian [P, d] projection, TRAK's CPU
``BasicProjector``), Φ [N, d] the training features and Q_k = 1 − p_k (softmax probability of k's label):

    τ[k, q] = φ_kᵀ (ΦᵀΦ + λ_reg I)⁻¹ φ_q · Q_k
    Δmargin[s, k, q] = −τ[k, q]                                   (removed minus full)
    Δloss[s, k, q]   = −(1 − p_q) · Δmargin[s, k, q]

Sign, from traker 0.3.2's source (site-packages/trak/): the score is
``_scores_mmap[:] = (_scores_on_cpu.numpy() / _num_models_used) * (_avg_out_to_losses / _num_models_used)``
(traker.py, ``finalize_scores``), with ``_avg_out_to_losses`` the training examples' ``(1 - ps)``
(modelout_functions.py, ``get_out_to_loss_grad``): finalize_scores already applies Q_k, so no further 1 − p on
the training side. Since ℓ = −log p = log(1 + e^{−f}) exactly, ∇ℓ_k = −Q_k∇f_k, and the one-Newton-step removal
effect under the curvature ΦᵀΦ (summed over examples, so no 1/N) is Δf_q = φ_qᵀ(ΦᵀΦ)⁻¹(−Q_kφ_k) = −τ: TRAK
counts "helpful" (removal lowers the margin) as positive. The loss column is TRAK's own first-order convention,
the chain rule dℓ_q/df_q = −(1 − p_q) at θ_s (PAPERS.md §4.1).

Scale: traker's default ``BasicScoreComputer`` divides (ΦᵀΦ)⁻¹ by its mean |entry| (``xtx_inv /=
xtx_inv.abs().mean()``, score_computers.py), which leaves scores in arbitrary units; a distributional benchmark
needs units, so this adapter passes the same computer without that line (the inverse in float64). Features are
float32 (``use_half_precision=False``; traker has no float64 path).

Choices (logged): d = min(proj_dim, P, ⌊N/4⌋). ΦᵀΦ has rank ≤ N, so traker's d = 2048 at N = 1,000 is singular, and
near d = N the scores interpolate: at ``small`` (4 seeds, λ_reg = 0.1) the mean-effect Spearman was 0.28 for
d = 100–250, 0.23 at 500 and 0.19 at 999 (0.00 at 999 with λ_reg = 0). λ_reg = N·wd: ΦᵀΦ is the summed-loss
Gauss–Newton matrix (without TRAK's dropped p(1 − p) weights) and N·wd·I the weight decay of the summed
objective; PᵀP/P ≈ I_d carries it into TRAK's projected, 1/√P-normalised coordinates unchanged.
"""

from __future__ import annotations

import contextlib
import logging
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import Tensor
from tqdm.auto import tqdm

from benchmark.config import OptionError
from benchmark.registry import register_method
from methods.base import Method, RemovalContext
from methods.kronfluence_ekfac import quiet_stderr


@dataclass(frozen=True)
class TrakConfig:
    proj_dim: int = 2048  # traker's default d; capped at min(P, ⌊max_proj_fraction · N⌋) (logged: proj_dim_used)
    max_proj_fraction: float = 0.25
    lambda_reg: float | None = None  # ridge on ΦᵀΦ; None: N·wd (the trained objective's); traker's default is 0
    projector_seed: int = 0  # traker's default
    max_seeds: int | None = 8  # peers run on the first max_seeds seeds (≥ 4)
    batch_size: int = 250  # examples per featurize / score call (memory ∝ batch · P)

    def __post_init__(self) -> None:
        if self.proj_dim < 1 or self.batch_size < 1:
            raise OptionError("TrakConfig needs proj_dim >= 1 and batch_size >= 1")
        if not 0 < self.max_proj_fraction <= 1:
            raise OptionError(f"TrakConfig.max_proj_fraction must be in (0, 1], got {self.max_proj_fraction}")
        if self.lambda_reg is not None and self.lambda_reg < 0:
            raise OptionError(f"TrakConfig.lambda_reg must be >= 0 or None, got {self.lambda_reg}")
        if self.max_seeds is not None and self.max_seeds < 1:
            raise OptionError(f"TrakConfig.max_seeds must be >= 1 or None, got {self.max_seeds}")


def unscaled_score_computer() -> type:
    """traker's ``BasicScoreComputer`` with X(XᵀX + λ_reg I)⁻¹ in float64 and without its normalisation."""
    from trak.score_computers import BasicScoreComputer

    class UnscaledScoreComputer(BasicScoreComputer):
        def get_x_xtx_inv(self, grads: Tensor, xtx: Tensor) -> Tensor:
            eye = torch.eye(xtx.shape[0], dtype=torch.float64, device=xtx.device)
            xtx_inv = torch.linalg.inv(xtx.double() + self.lambda_reg * eye)
            return (grads.double() @ xtx_inv).to(self.dtype)

    return UnscaledScoreComputer


@contextlib.contextmanager
def keep_root_logging() -> Iterator[None]:
    """``TRAKer`` calls ``logging.basicConfig()``, which adds a handler to the root logger: undo it."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    try:
        yield
    finally:
        root.handlers[:] = handlers
        root.setLevel(level)


@register_method("trak_lib")
class TrakLib(Method):
    is_distributional = True
    config_cls = TrakConfig

    def predict(self, ctx: RemovalContext) -> Tensor:
        cfg = self.config
        if tuple(ctx.task.measurement_names) != ("loss", "margin"):
            raise ValueError(f"trak_lib expects measurements (loss, margin), got {ctx.task.measurement_names}")
        n_params = ctx.theta_full.shape[1]
        proj_dim = max(1, min(cfg.proj_dim, n_params, int(cfg.max_proj_fraction * ctx.n_train)))
        lambda_reg = cfg.lambda_reg if cfg.lambda_reg is not None else ctx.n_train * ctx.scale.train.weight_decay
        x_train = ctx.data.x_train.detach().to("cpu", torch.float32)
        y_train = ctx.data.y_train.cpu()
        x_query, y_query = ctx.x_query.detach().to("cpu", torch.float32), ctx.y_query.cpu()
        out, seconds = [], []
        bar = tqdm(range(ctx.n_seeds), desc="trak_lib", unit="seed", disable=not ctx.progress)
        for s in bar:
            start = time.perf_counter()
            theta = ctx.theta_full[s].detach().to("cpu", torch.float32)
            with quiet_stderr(not ctx.progress):
                tau = self._scores(ctx, theta, (x_train, y_train), (x_query, y_query), (proj_dim, lambda_reg))
            d_margin = -tau[ctx.targets.cpu()].double()  # [K, Q]
            with torch.no_grad():
                p_q = torch.softmax(ctx.task.logits(theta, x_query).double(), -1).gather(1, y_query[:, None])[:, 0]
            d_loss = -(1.0 - p_q) * d_margin  # dℓ/df = −(1 − p) at θ_s
            out.append(torch.stack([d_loss, d_margin], dim=-1))  # [K, Q, M]
            seconds.append(time.perf_counter() - start)
        self.info.update(proj_dim_used=float(proj_dim), lambda_reg=float(lambda_reg),
                         seconds_per_seed=float(sum(seconds) / len(seconds)))
        return torch.stack(out).to(ctx.theta_full.device, ctx.theta_full.dtype)  # [S, K, Q, M]

    def _scores(self, ctx: RemovalContext, theta: Tensor, train: tuple[Tensor, Tensor],
                query: tuple[Tensor, Tensor], proj: tuple[int, float]) -> Tensor:
        """τ [N, Q] for one seed's model, by traker's featurize / finalize / score / finalize_scores;
        ``proj`` = (d, λ_reg)."""
        from trak import TRAKer
        from trak.modelout_functions import ImageClassificationModelOutput
        from trak.projectors import BasicProjector, ProjectionType

        cfg = self.config
        proj_dim, lambda_reg = proj
        model = ctx.task.module(theta)
        # What TRAKer builds on the CPU (normal projection, float32), except that d ≤ 100 is split into two blocks:
        # with one block, finalize_features frees the matrix and BasicProjector.project never regenerates it.
        block = 100 if proj_dim > 100 else max(1, (proj_dim + 1) // 2)
        projector = BasicProjector(grad_dim=theta.numel(), proj_dim=proj_dim, seed=cfg.projector_seed,
                                   proj_type=ProjectionType.normal, device="cpu", block_size=block,
                                   dtype=torch.float32)
        with tempfile.TemporaryDirectory(prefix="trak_") as tmp, keep_root_logging():
            # load_from_save_dir=True only makes the saver create experiments.json (the directory is fresh)
            traker = TRAKer(model=model, task=ImageClassificationModelOutput(), train_set_size=ctx.n_train,
                            save_dir=tmp, load_from_save_dir=True, device="cpu", projector=projector,
                            logging_level=logging.WARNING, use_half_precision=False, lambda_reg=lambda_reg,
                            score_computer=unscaled_score_computer())
            traker.load_checkpoint(model.state_dict(), model_id=0)
            for i in range(0, ctx.n_train, cfg.batch_size):
                batch = (train[0][i:i + cfg.batch_size], train[1][i:i + cfg.batch_size])
                traker.featurize(batch=batch, num_samples=batch[1].shape[0])
            traker.finalize_features()
            n_query = query[1].shape[0]
            traker.start_scoring_checkpoint(exp_name="queries", checkpoint=model.state_dict(), model_id=0,
                                            num_targets=n_query)
            for i in range(0, n_query, cfg.batch_size):
                batch = (query[0][i:i + cfg.batch_size], query[1][i:i + cfg.batch_size])
                traker.score(batch=batch, num_samples=batch[1].shape[0])
            scores = torch.as_tensor(traker.finalize_scores(exp_name="queries")).clone()  # [N, Q], copied off mmap
        return scores
