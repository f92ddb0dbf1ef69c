"""EK-FAC influence functions through the kronfluence library (Grosse et al. 2023, arXiv 2308.03296; George et al.
2018, arXiv 1806.03884, for the eigenvalue correction), run per seed on each seed's final model.

    Δm[s, k, q] = (1/N) · ∇m_q(θ_s)ᵀ (F̂_s + (wd + λ) I)⁻¹ ∇ℓ_k(θ_s)          (removed minus full)

F̂_s is kronfluence's EK-FAC approximation, per ``nn.Linear`` module, of the Fisher F = (1/N)Σ_n g_n g_nᵀ with
g_n = ∇ℓ_n(θ_s): ``fisher="true"`` uses the dataset labels (kronfluence's ``use_empirical_fisher=True``, the
*empirical* Fisher), ``"sampled"`` labels drawn from the model's softmax (kronfluence's default; its expectation
is the GGN that ``influence`` uses). wd·I is the weight-decay curvature of the trained objective
(1/N)Σℓ_n + (wd/2)‖θ‖², which kronfluence does not see.

Scale and sign, from kronfluence 1.0.1's source (site-packages/kronfluence/):
- ``compute_train_loss`` returns the *summed* loss, so each per-sample gradient is ∇ℓ_n; but the factors are
  divided by the number of examples: ``covariance_matrix.div_(covariance_factors[num_processed_name][module_name]
  ...)`` (factor/eigen.py) and ``lambda_matrix.div_(storage[NUM_LAMBDA_PROCESSED]...)`` (factor/config.py).
  F̂ is therefore the curvature of the *mean* loss, in the same units as ``influence``'s H, and the damping
  passed as ``damping_factor`` is absolute in those units: wd + λ, not N·(wd + λ). tests/test_peers.py checks
  it: the adapter equals EK-FAC computed by hand with damping wd + λ, divided by N (to 1e-8; the N·(wd + λ),
  no-1/N reading fails), and on the GLM |Δm| / |dense ``influence``| = 1.34 / 1.36 (loss / margin, sampled
  Fisher; 1.44 / 1.48 empirical), the EK-FAC approximation error of one 10-class layer; a 1/N slip is a factor 48.
- scores are ``(preconditioned ∇f_q) · ∇ℓ_k``: ``expr = "qio,b...i,b...o->qb"`` (module/linear.py,
  ``compute_pairwise_score``), with no minus sign and no 1/N. Removing k moves θ by +(1/N)H⁻¹∇ℓ_k, so
  Δm = +score / N for f = m (we hand kronfluence m itself, loss or margin, not its usual −margin).
Damping (``damping``): ``matched`` (default) λ = damping_scale × mean eigenvalue of F̂ + wd·I, i.e.
damping_scale·(tr F̂ / P + wd), the same rule as ``influence`` (tr F̂ = Σ of the corrected eigenvalues, exact for
EK-FAC); ``heuristic`` is kronfluence's own ``damping_factor=None``: 0.1 × the mean corrected eigenvalue of each
module separately, without wd. Precision: float64 for the model, factors, per-sample gradients, preconditioning and
scores (kronfluence supports it throughout). CPU only; factors go to a temporary directory per seed; sampled labels
come from a generator seeded by (task, seed), so every run is deterministic.
"""

from __future__ import annotations

import contextlib
import enum
import io
import logging
import tempfile
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import TensorDataset
from tqdm.auto import tqdm

from benchmark.config import OptionError, derive_seed, parse_enum
from benchmark.registry import register_method
from methods.base import Method, RemovalContext
from tasks.base import margin_from_logits


class Fisher(str, enum.Enum):
    TRUE = "true"  # dataset labels: the empirical Fisher (kronfluence use_empirical_fisher=True)
    SAMPLED = "sampled"  # labels sampled from the model: the "true" Fisher of the K-FAC literature, E = GGN


class Damping(str, enum.Enum):
    MATCHED = "matched"  # wd + damping_scale · (tr F̂ / P + wd), as ``influence``
    HEURISTIC = "heuristic"  # kronfluence damping_factor=None: 0.1 · mean corrected eigenvalue per module, no wd


@dataclass(frozen=True)
class KronfluenceConfig:
    fisher: Fisher = Fisher.TRUE
    damping: Damping = Damping.MATCHED
    damping_scale: float = 0.1  # λ = damping_scale · mean eigenvalue of F̂ + wd·I (``matched``)
    max_seeds: int | None = 8  # peers run on the first max_seeds seeds (≥ 4)
    train_batch_size: int = 256  # per-device batch for factors and training gradients (memory ∝ batch · layer size)
    query_batch_size: int = 50

    def __post_init__(self) -> None:
        object.__setattr__(self, "fisher", parse_enum(Fisher, self.fisher, "fisher"))
        object.__setattr__(self, "damping", parse_enum(Damping, self.damping, "damping"))
        if self.damping_scale < 0:
            raise OptionError(f"KronfluenceConfig.damping_scale must be >= 0, got {self.damping_scale}")
        if self.max_seeds is not None and self.max_seeds < 1:
            raise OptionError(f"KronfluenceConfig.max_seeds must be >= 1 or None, got {self.max_seeds}")
        if self.train_batch_size < 1 or self.query_batch_size < 1:
            raise OptionError("KronfluenceConfig needs train_batch_size >= 1 and query_batch_size >= 1")


@contextlib.contextmanager
def quiet_stderr(enabled: bool = True) -> Iterator[None]:
    """Send what a peer library prints to stderr meanwhile (tqdm bars that traker and dattri offer no switch for)
    to a discarded buffer; warnings raised meanwhile are re-issued afterwards. Does nothing if not ``enabled``."""
    if not enabled:
        yield
        return
    with warnings.catch_warnings(record=True) as caught, contextlib.redirect_stderr(io.StringIO()):
        yield
    for w in caught:
        warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)


@contextlib.contextmanager
def quiet_logger(name: str, level: int = logging.WARNING) -> Iterator[None]:
    """Raise one library logger's level for the duration (kronfluence logs every call at INFO)."""
    logger = logging.getLogger(name)
    old = logger.level
    logger.setLevel(level)
    try:
        yield
    finally:
        logger.setLevel(old)


def _kronfluence_task(measurement: list[int], generator: torch.Generator) -> object:
    """A kronfluence ``Task``: summed cross-entropy for training (labels sampled from the model when
    ``sample``), and the summed query measurement m_q (``measurement[0]``: 0 loss, 1 margin)."""
    from kronfluence.task import Task as KfTask

    class _Task(KfTask):
        def compute_train_loss(self, batch: tuple[Tensor, Tensor], model: nn.Module, sample: bool = False) -> Tensor:
            x, y = batch
            logits = model(x)
            if sample:
                with torch.no_grad():
                    probs = torch.softmax(logits.detach(), dim=-1)
                    y = torch.multinomial(probs, 1, generator=generator).squeeze(-1)
            return F.cross_entropy(logits, y, reduction="sum")

        def compute_measurement(self, batch: tuple[Tensor, Tensor], model: nn.Module) -> Tensor:
            x, y = batch
            logits = model(x)
            if measurement[0] == 0:
                return F.cross_entropy(logits, y, reduction="sum")
            return margin_from_logits(logits, y).sum()

    return _Task()


@register_method("kronfluence_ekfac")
class KronfluenceEkfac(Method):
    is_distributional = True
    config_cls = KronfluenceConfig

    def predict(self, ctx: RemovalContext) -> Tensor:
        cfg, f64 = self.config, torch.float64
        train_set = TensorDataset(ctx.data.x_train.detach().to("cpu", f64), ctx.data.y_train.cpu())
        query_set = TensorDataset(ctx.x_query.detach().to("cpu", f64), ctx.y_query.cpu())
        out, lambdas, seconds = [], [], []
        bar = tqdm(range(ctx.n_seeds), desc="kronfluence_ekfac", unit="seed", disable=not ctx.progress)
        for s in bar:
            start = time.perf_counter()
            with tempfile.TemporaryDirectory(prefix="kronfluence_") as tmp, quiet_logger("kronfluence"), \
                    warnings.catch_warnings():
                warnings.filterwarnings("ignore", message=".*torch.cuda.amp.GradScaler", category=FutureWarning)
                scores, lam = self._seed_scores(ctx, s, (train_set, query_set), tmp)  # [K, Q, M]
            out.append(scores / ctx.n_train)  # Δm = +score / N (module docstring)
            lambdas.append(lam)
            seconds.append(time.perf_counter() - start)
        self.info.update(fisher=cfg.fisher.value, damping=cfg.damping.value,
                         seconds_per_seed=float(sum(seconds) / len(seconds)))
        if cfg.damping is Damping.MATCHED:
            lam_mean = float(sum(lambdas) / len(lambdas))
            self.info.update(damping_mean=lam_mean, damping_over_mean_eig=cfg.damping_scale,
                             kronfluence_damping_factor=lam_mean + ctx.scale.train.weight_decay)
        return torch.stack(out).to(ctx.theta_full.device, ctx.theta_full.dtype)  # [S, K, Q, M]

    def _seed_scores(self, ctx: RemovalContext, s: int, sets: tuple[TensorDataset, TensorDataset], tmp: str
                     ) -> tuple[Tensor, float]:
        """kronfluence's pairwise scores ∇m_qᵀ(F̂ + λ_kf I)⁻¹∇ℓ_k as [K, Q, M] for seed s, and our λ."""
        from kronfluence.analyzer import Analyzer, prepare_model
        from kronfluence.arguments import FactorArguments, ScoreArguments

        cfg, f64 = self.config, torch.float64
        train_set, query_set = sets
        factor_args = FactorArguments(
            strategy="ekfac", use_empirical_fisher=cfg.fisher is Fisher.TRUE,
            activation_covariance_dtype=f64, gradient_covariance_dtype=f64, eigendecomposition_dtype=f64,
            per_sample_gradient_dtype=f64, lambda_dtype=f64)
        measurement = [0]  # which column compute_measurement returns; set before each score pass
        gen = torch.Generator().manual_seed(derive_seed("kronfluence_fisher", ctx.task.name, ctx.seeds[s]))
        kf_task = _kronfluence_task(measurement, gen)
        model = prepare_model(ctx.task.module(ctx.theta_full[s].detach().to("cpu", f64)), kf_task)
        analyzer = Analyzer(analysis_name="dtda", model=model, task=kf_task, cpu=True, disable_tqdm=True,
                            output_dir=tmp, disable_model_save=True)
        analyzer.fit_all_factors("ekfac", train_set, per_device_batch_size=cfg.train_batch_size,
                                 factor_args=factor_args)
        damping_factor, lam = self._damping(analyzer.load_lambda_matrices("ekfac"), ctx.scale.train.weight_decay)
        score_args = ScoreArguments(damping_factor=damping_factor, per_sample_gradient_dtype=f64,
                                    precondition_dtype=f64, score_dtype=f64, query_gradient_svd_dtype=f64)
        per_m = []
        for j, name in enumerate(ctx.task.measurement_names):
            measurement[0] = j
            analyzer.compute_pairwise_scores(
                scores_name=f"scores_{name}", factors_name="ekfac", query_dataset=query_set, train_dataset=train_set,
                per_device_query_batch_size=cfg.query_batch_size, per_device_train_batch_size=cfg.train_batch_size,
                train_indices=ctx.targets.cpu().tolist(), score_args=score_args)
            scores = analyzer.load_pairwise_scores(f"scores_{name}")  # compute_… returns None when it computed
            per_m.append(scores["all_modules"].T)  # [K, Q]
        return torch.stack(per_m, dim=-1), lam

    def _damping(self, lambda_factors: dict[str, dict[str, Tensor]], wd: float) -> tuple[float | None, float]:
        """kronfluence's ``damping_factor`` and our λ (NaN for ``heuristic``). tr F̂ = Σ_modules Σ Λ / n,
        the corrected eigenvalues summed (n = examples they were averaged over), P = their count."""
        if self.config.damping is Damping.HEURISTIC:
            return None, float("nan")
        sums = lambda_factors["lambda_matrix"]
        counts = lambda_factors["num_lambda_processed"]
        trace = sum(float(sums[m].double().sum() / counts[m].double().sum()) for m in sums)
        n_params = sum(sums[m].numel() for m in sums)
        lam = self.config.damping_scale * (trace / n_params + wd)
        return wd + lam, lam
