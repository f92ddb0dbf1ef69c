"""dattri attributors (Deng et al. 2024, "dattri: A Library for Efficient Data Attribution", arXiv 2410.04555) run per
seed on each seed's model, converted to Δm[s, k, q, j] = m_{q,j}(θ_s without k) − m_{q,j}(θ_s).

Registered (all CPU; float64 models and data except DataInf, float32; dattri accumulates scores in float32):

- ``dattri_if_cg``: ``IFAttributorCG``, the Hessian of the mean training loss (one full batch), conjugate gradients
  with ``regularization`` = wd + λ, λ = damping_scale · mean eigenvalue of the GGN of the trained objective (exact
  trace, as ``influence``). Δm = +score / N (Koh & Liang 2017, §2.1, upweighting by ε = −1/N).
- ``dattri_if_datainf``: ``IFAttributorDataInf`` (Kwon et al. 2024, arXiv 2310.00902): per layer,
  (F_l + rI)⁻¹ ≈ (1/N)Σ_n (rI + g_n g_nᵀ)⁻¹ with g_n = ∇ℓ_n and r = wd + λ, λ = damping_scale ·
  (tr F / P + wd) for the empirical Fisher F = (1/N)Σ g gᵀ. Δm = +score / N.
- ``dattri_tracin``: ``TracInAttributor`` (Pruthi et al. 2020, TracInCP) on the epoch-end checkpoints,
  weight per checkpoint = η̄_e / (B(1 − β)), the total displacement of one visit of k in epoch e (learning rate
  averaged over the epoch, batch B, momentum β). Δm = +score: removing k undoes the steps −(η/B)∇ℓ_k.
- ``dattri_trak``: ``TRAKAttributor`` (Park et al. 2023), training features from the margin f, M = 1 per
  seed. Δm = −score (TRAK counts "helpful" as positive, as ``trak_lib``); the query feature is ∇m_q, and for the
  loss ∇ℓ_q = −(1 − p_q)∇f_q, so Δloss = −(1 − p_q)·Δmargin, TRAK's convention, comes out by itself.

Sign, from dattri 0.3.0's source (site-packages/dattri/algorithm/): the inner-product attributors return
``train_batch_rep @ test_batch_rep.T`` (base.py, ``BaseInnerProductAttributor.attribute``), i.e.
∇ℓ_kᵀ (H + rI)⁻¹ ∇m_q with no minus sign; ``ihvp_at_x_cg`` returns ``vjp_fn(v)[argnums] + regularization * v``
products of the Hessian of the loss function it is given, here the *mean* loss, hence the 1/N. TracIn
accumulates ``train_batch_grad @ test_batch_grad.T * ckpt_weight`` (tracin.py). TRAK returns
``(running_xinv_XTX_XT * running_Q...).T`` = φ_qᵀ(ΦᵀΦ + rI)⁻¹φ_k·(1 − p_k), Φ built from the gradient of the
loss function it is given, here the margin f (so ∇ℓ_k = −(1 − p_k)∇f_k and the score is −Δf, in summed units).

Not registered: ``IFAttributorEKFAC``: its ``transform_test_rep`` concatenates the flattened weight and bias
gradients and reshapes them to [out, in + 1], which misplaces the bias of every layer that has one (on the GLM it
disagreed with EK-FAC computed by hand: Pearson 0.91, magnitude × 3.9), and it fits the Fisher on the *target*
function, so the margin cannot be the query; kronfluence_ekfac covers EK-FAC. ``IFAttributorExplicit``: a P × P
Hessian, 1.4 GB at ``small``. ``IFAttributorLiSSA``: stochastic, thousands of Hessian-vector products per query
vector, and its collate casts labels to float. ``IFAttributorArnoldi`` (H⁻¹ on the top Krylov eigenspace only):
not adapted yet. ``LoGra``, ``FactGraSS``, ``BlockProjectedIF``, ``RPS``, ``DVEmb``, ``KNN-Shapley``: GPU-oriented
projections of the same estimators, or not removal estimates.
"""

from __future__ import annotations

import time
from abc import abstractmethod
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset
from tqdm.auto import tqdm

from benchmark.config import OptionError
from benchmark.registry import register_method
from methods.base import Method, RemovalContext, example_loss_grads
from methods.kronfluence_ekfac import quiet_stderr
from tasks.base import margin_from_logits


def _check_common(name: str, max_seeds: int | None, damping_scale: float = 0.0) -> None:
    if max_seeds is not None and max_seeds < 1:
        raise OptionError(f"{name}.max_seeds must be >= 1 or None, got {max_seeds}")
    if damping_scale < 0:
        raise OptionError(f"{name}.damping_scale must be >= 0, got {damping_scale}")


@dataclass(frozen=True)
class DattriCgConfig:
    damping_scale: float = 0.1  # λ = damping_scale · mean eigenvalue of the GGN (+ wd), as ``influence``
    max_iter: int = 10  # dattri's default; its CG runs exactly max_iter iterations (``tol`` is unused)
    mode: str = "rev-fwd"  # Hessian-vector products: forward-over-reverse
    max_seeds: int | None = 8

    def __post_init__(self) -> None:
        _check_common("DattriCgConfig", self.max_seeds, self.damping_scale)
        if self.max_iter < 1:
            raise OptionError(f"DattriCgConfig.max_iter must be >= 1, got {self.max_iter}")
        if self.mode not in ("rev-rev", "rev-fwd"):
            raise OptionError(f"DattriCgConfig.mode must be one of: rev-rev, rev-fwd; got {self.mode!r}")


@dataclass(frozen=True)
class DattriDataInfConfig:
    damping_scale: float = 0.1  # λ = damping_scale · (tr F / P + wd), F the empirical Fisher
    max_seeds: int | None = 8

    def __post_init__(self) -> None:
        _check_common("DattriDataInfConfig", self.max_seeds, self.damping_scale)


@dataclass(frozen=True)
class DattriTracInConfig:
    final_only: bool = False  # True: the final model only (Grad-Dot with weight η̄_E / (B(1 − β)))
    max_seeds: int | None = 8

    def __post_init__(self) -> None:
        _check_common("DattriTracInConfig", self.max_seeds)


@dataclass(frozen=True)
class DattriTrakConfig:
    proj_dim: int = 2048  # capped at min(P, ⌊max_proj_fraction · N⌋), as ``trak_lib``
    max_proj_fraction: float = 0.25
    regularization: float | None = None  # None: N·wd in TRAK's normalised coordinates (see trak_lib)
    max_seeds: int | None = 8

    def __post_init__(self) -> None:
        _check_common("DattriTrakConfig", self.max_seeds)
        if self.proj_dim < 1 or not 0 < self.max_proj_fraction <= 1:
            raise OptionError("DattriTrakConfig needs proj_dim >= 1 and 0 < max_proj_fraction <= 1")
        if self.regularization is not None and self.regularization < 0:
            raise OptionError(f"DattriTrakConfig.regularization must be >= 0 or None, got {self.regularization}")


def _batched(x: Tensor, example_ndim: int) -> Tensor:
    """dattri hands loss functions one example unbatched (vmap in_dims 0) or as a batch of one (in_dims 1);
    ``example_ndim`` is an example's own number of dimensions (1 for a vector, 3 for an image)."""
    return x.unsqueeze(0) if x.ndim == example_ndim else x


class _DattriMethod(Method):
    """Per seed: build the seed's model and dattri task, run the attributor, convert the scores."""

    is_distributional = True

    def predict(self, ctx: RemovalContext) -> Tensor:
        if tuple(ctx.task.measurement_names) != ("loss", "margin"):
            raise ValueError(f"{self.name} expects measurements (loss, margin), got {ctx.task.measurement_names}")
        f64 = torch.float64
        self._x_train = ctx.data.x_train.detach().to("cpu", f64)
        self._y_train = ctx.data.y_train.cpu()
        self._targets = ctx.targets.cpu()
        self._example_ndim = ctx.data.x_train.dim() - 1
        out, seconds = [], []
        bar = tqdm(range(ctx.n_seeds), desc=self.name, unit="seed", disable=not ctx.progress)
        for s in bar:
            start = time.perf_counter()
            with quiet_stderr(not ctx.progress):  # dattri's own tqdm bars have no switch
                out.append(self.predict_seed(ctx, s))  # [K, Q, M]
            seconds.append(time.perf_counter() - start)
        self.info["seconds_per_seed"] = float(sum(seconds) / len(seconds))
        return torch.stack(out).to(ctx.theta_full.device, ctx.theta_full.dtype)  # [S, K, Q, M]

    @abstractmethod
    def predict_seed(self, ctx: RemovalContext, s: int) -> Tensor:
        """Δm [K, Q, M] for seed s."""

    # data --------------------------------------------------------------------------------------------------
    def full_train_loader(self, dtype: torch.dtype = torch.float64) -> DataLoader:
        ds = TensorDataset(self._x_train.to(dtype), self._y_train)
        return DataLoader(ds, batch_size=len(self._y_train), shuffle=False)

    def target_loader(self, dtype: torch.dtype = torch.float64) -> DataLoader:
        ds = TensorDataset(self._x_train[self._targets].to(dtype), self._y_train[self._targets])
        return DataLoader(ds, batch_size=len(self._targets), shuffle=False)

    @staticmethod
    def query_loader(ctx: RemovalContext, dtype: torch.dtype = torch.float64) -> DataLoader:
        """Each query twice, tagged j = 0 (loss) and j = 1 (margin): one attribute call gives both columns."""
        x = ctx.x_query.detach().to("cpu", dtype)
        y = ctx.y_query.cpu()
        j = torch.arange(2).repeat_interleave(len(y))
        ds = TensorDataset(x.repeat(2, *([1] * (x.dim() - 1))), y.repeat(2), j)
        return DataLoader(ds, batch_size=2 * len(y), shuffle=False)

    @staticmethod
    def to_delta(scores: Tensor, sign: float, scale: float) -> Tensor:
        """[K, 2Q] (loss queries, then margin queries) → Δm [K, Q, M] = sign · scale · score."""
        n_k = scores.shape[0]
        return (sign * scale) * scores.detach().double().view(n_k, 2, -1).permute(0, 2, 1)

    # dattri task -------------------------------------------------------------------------------------------
    @staticmethod
    def attribution_task(model: nn.Module, checkpoints: list[dict[str, Tensor]], train_output: str = "loss",
                         example_ndim: int = 1) -> Any:
        """An ``AttributionTask``: loss_func = mean cross-entropy (``train_output="loss"``) or the margin f
        (``"margin"``, TRAK's model output); target_func = m_{q,j} with j carried by the query batch."""
        from dattri.task import AttributionTask

        def loss_func(params: dict[str, Tensor], data: tuple[Tensor, ...]) -> Tensor:
            x, y = _batched(data[0], example_ndim), data[1].reshape(-1).long()
            logits = torch.func.functional_call(model, params, x.to(next(iter(params.values())).dtype))
            if train_output == "margin":
                return margin_from_logits(logits, y).mean()
            return F.cross_entropy(logits, y)

        def target_func(params: dict[str, Tensor], data: tuple[Tensor, Tensor, Tensor]) -> Tensor:
            x, y, j = _batched(data[0], example_ndim), data[1].reshape(-1), data[2].reshape(-1)
            logits = torch.func.functional_call(model, params, x)
            value = torch.where(j == 0, F.cross_entropy(logits, y, reduction="none"), margin_from_logits(logits, y))
            return value.mean()

        return AttributionTask(loss_func=loss_func, model=model, checkpoints=checkpoints, target_func=target_func)

    @staticmethod
    def seed_model(ctx: RemovalContext, theta: Tensor) -> nn.Module:
        return ctx.task.module(theta.detach().to("cpu", torch.float64))


def mean_ggn_eig(ctx: RemovalContext, theta: Tensor, chunk: int = 250) -> float:
    """tr(G)/P + wd, the mean eigenvalue of the trained objective's GGN (``influence``'s damping rule), exactly:
    tr(J_nᵀ(diag p − ppᵀ)J_n) = Σ_c p_c ‖∇ℓ(x_n, c)‖², since ∇ℓ(x_n, c) = J_nᵀ(p − e_c). θ [P], float64 CPU."""
    x, n_classes, total = ctx.data.x_train.detach().to("cpu", theta.dtype), 0, 0.0
    for i in range(0, x.shape[0], chunk):
        xb = x[i:i + chunk]
        with torch.no_grad():
            p = torch.softmax(ctx.task.logits(theta, xb), -1)  # [b, C]
        n_classes = p.shape[1]
        for c in range(n_classes):
            g = example_loss_grads(ctx.task, theta, xb, torch.full((xb.shape[0],), c, dtype=torch.long))  # [b, P]
            total += float((p[:, c] * g.pow(2).sum(1)).sum())
    return total / x.shape[0] / theta.numel() + ctx.scale.train.weight_decay


@register_method("dattri_if_cg")
class DattriIfCg(_DattriMethod):
    config_cls = DattriCgConfig

    def predict_seed(self, ctx: RemovalContext, s: int) -> Tensor:
        from dattri.algorithm import IFAttributorCG

        cfg, wd = self.config, ctx.scale.train.weight_decay
        theta = ctx.theta_full[s].detach().to("cpu", torch.float64)
        lam = cfg.damping_scale * mean_ggn_eig(ctx, theta)
        model = self.seed_model(ctx, theta)
        task = self.attribution_task(model, [model.state_dict()], example_ndim=self._example_ndim)
        attributor = IFAttributorCG(task=task, device="cpu", max_iter=cfg.max_iter, mode=cfg.mode,
                                    regularization=wd + lam)
        attributor.cache(self.full_train_loader())
        scores = attributor.attribute(self.target_loader(), self.query_loader(ctx))  # [K, 2Q]
        self.info.update(damping_mean=lam, damping_over_mean_eig=cfg.damping_scale, cg_iterations=cfg.max_iter)
        return self.to_delta(scores, +1.0, 1.0 / ctx.n_train)


@register_method("dattri_if_datainf")
class DattriIfDataInf(_DattriMethod):
    config_cls = DattriDataInfConfig

    def predict_seed(self, ctx: RemovalContext, s: int) -> Tensor:
        from dattri.algorithm import IFAttributorDataInf

        cfg, wd = self.config, ctx.scale.train.weight_decay
        # float32: DataInf accumulates its transformed queries in a float32 buffer and then multiplies them with
        # the training gradients, which fails for float64 ones
        theta = ctx.theta_full[s].detach().to("cpu", torch.float32)
        x64, th64 = self._x_train, theta.double()
        sq_norm = sum(float(example_loss_grads(ctx.task, th64, x64[i:i + 256], self._y_train[i:i + 256]).pow(2).sum())
                      for i in range(0, len(self._y_train), 256))
        lam = cfg.damping_scale * (sq_norm / len(self._y_train) / theta.numel() + wd)  # tr F / P = mean ‖g‖² / P
        model = ctx.task.module(theta)
        task = self.attribution_task(model, [model.state_dict()], example_ndim=self._example_ndim)
        attributor = IFAttributorDataInf(task=task, device="cpu", regularization=wd + lam)
        attributor.cache(self.full_train_loader(torch.float32))
        scores = attributor.attribute(self.target_loader(torch.float32), self.query_loader(ctx, torch.float32))
        self.info.update(damping_mean=lam, damping_over_mean_eig=cfg.damping_scale)
        return self.to_delta(scores, +1.0, 1.0 / ctx.n_train)


@register_method("dattri_tracin")
class DattriTracIn(_DattriMethod):
    config_cls = DattriTracInConfig

    def predict_seed(self, ctx: RemovalContext, s: int) -> Tensor:
        from dattri.algorithm import TracInAttributor

        ckpts = ctx.require_checkpoints(self.name)[s]  # [E+1, P], index 0 = initialisation
        train = ctx.scale.train
        n_epochs = ckpts.shape[0] - 1
        lr_epoch = ctx.learning_rates().view(n_epochs, -1).mean(1)  # η̄_e [E]
        weights = lr_epoch / (train.batch_size * (1.0 - train.momentum))  # one visit of k per epoch
        epochs = [n_epochs] if self.config.final_only else list(range(1, n_epochs + 1))
        model = self.seed_model(ctx, ckpts[-1])
        states = [self.seed_model(ctx, ckpts[e]).state_dict() for e in epochs]
        task = self.attribution_task(model, states, example_ndim=self._example_ndim)
        n_params = ckpts.shape[1]
        projector = {"proj_type": "identity", "proj_dim": n_params, "proj_max_batch_size": 32, "proj_seed": 0,
                     "device": "cpu"}  # exact gradients (dattri mutates its module-level defaults with these)
        attributor = TracInAttributor(task=task, weight_list=weights[torch.tensor(epochs) - 1].tolist(),
                                      normalized_grad=False, projector_kwargs=projector, device="cpu")
        scores = attributor.attribute(self.target_loader(), self.query_loader(ctx))  # [K, 2Q]
        self.info.update(n_checkpoints=float(len(epochs)))
        return self.to_delta(scores, +1.0, 1.0)


@register_method("dattri_trak")
class DattriTrak(_DattriMethod):
    config_cls = DattriTrakConfig

    def predict_seed(self, ctx: RemovalContext, s: int) -> Tensor:
        from dattri.algorithm import TRAKAttributor

        cfg = self.config
        theta = ctx.theta_full[s].detach().to("cpu", torch.float64)
        n_train, n_params = ctx.n_train, theta.numel()
        proj_dim = max(1, min(cfg.proj_dim, n_params, int(cfg.max_proj_fraction * n_train)))
        # dattri scales features by 1/√(P·d) (traker: 1/√P), so a parameter-space ridge N·wd is N·wd/d here
        reg = cfg.regularization
        if reg is None:
            reg = n_train * ctx.scale.train.weight_decay / proj_dim
        model = self.seed_model(ctx, theta)
        task = self.attribution_task(model, [model.state_dict()], train_output="margin",
                                     example_ndim=self._example_ndim)

        def correct_probability(params: dict[str, Tensor], data: tuple[Tensor, Tensor]) -> Tensor:
            x, y = _batched(data[0], self._example_ndim), data[1].reshape(-1)
            logits = torch.func.functional_call(model, params, x)
            return torch.softmax(logits, -1).gather(-1, y[:, None]).squeeze()

        projector = {"proj_type": "normal", "proj_dim": proj_dim, "proj_max_batch_size": 32, "proj_seed": 0,
                     "device": "cpu"}
        attributor = TRAKAttributor(task=task, correct_probability_func=correct_probability,
                                    projector_kwargs=projector, device="cpu", regularization=reg)
        attributor.cache(self.full_train_loader())
        scores = attributor.attribute(self.query_loader(ctx))[self._targets]  # [K, 2Q]: φ_qᵀ(ΦᵀΦ+r)⁻¹φ_k(1−p_k)
        self.info.update(proj_dim_used=float(proj_dim), regularization=float(reg))
        # φ_q of the loss-tagged queries is ∇ℓ_q = −(1 − p_q)∇f_q: TRAK's loss convention comes out by itself
        return self.to_delta(scores, -1.0, 1.0)
