"""EK-FAC influence, ours against kronfluence, on the same model in one process.

    python -m benchmark.speed ekfac [--queries 100] [--repeats 1] [--scale paper]

Workload (both sides): fit EK-FAC (true-label Fisher) on all N training examples of the ``mnist_mlp``
model, then score ``--queries`` test queries (margin) against every training example with damping
λ = 0.1 × mean eigenvalue (the same absolute λ handed to kronfluence as ``damping_factor``). The model is
the scale's initialisation (timing does not depend on training). Prints the wall times (medians over
repeats), ``spearman_ours_vs_kronfluence`` over all (query, train) scores, and last
``ekfac_time_ratio_vs_kronfluence=<ours/theirs>``.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import torch
import torch.nn.functional as F
from scipy.stats import spearmanr
from torch import Tensor, nn
from torch.utils.data import TensorDataset

from benchmark.engine import initial_params
from methods.base import measurement_grads
from methods.kfac import fit_kronecker, train_gradient_scores
from tasks.base import margin_from_logits
from tasks.mnist_mlp import MnistMlp


def ours(task: MnistMlp, theta: Tensor, data, x_q: Tensor, y_q: Tensor) -> tuple[Tensor, float]:  # noqa: ANN001
    """Scores [Q, N] = ∇m_qᵀ (F̂ + λI)⁻¹ ∇ℓ_n and λ."""
    curv = fit_kronecker(task, [theta], data.x_train, data.y_train, kind="ekfac", fisher="true", weight_decay=0.0)
    lam = 0.1 * curv.mean_eigenvalue()
    g_q = measurement_grads(task, theta, x_q, y_q)[:, 1]  # margin, [Q, P]
    pre = curv.inverse_hvp(g_q, lam)
    return train_gradient_scores(curv, task, theta, data.x_train, data.y_train, pre), lam


def kronfluence_scores(task: MnistMlp, theta: Tensor, data, x_q: Tensor, y_q: Tensor, lam: float  # noqa: ANN001
                       ) -> Tensor:
    """The same scores from kronfluence 1.0.1 (its factors are in mean-loss units: λ is absolute)."""
    import logging

    from kronfluence.analyzer import Analyzer, prepare_model
    from kronfluence.arguments import FactorArguments, ScoreArguments
    from kronfluence.task import Task as KfTask

    class MarginTask(KfTask):
        def compute_train_loss(self, batch, model: nn.Module, sample: bool = False) -> Tensor:  # noqa: ANN001
            x, y = batch
            return F.cross_entropy(model(x), y, reduction="sum")

        def compute_measurement(self, batch, model: nn.Module) -> Tensor:  # noqa: ANN001
            x, y = batch
            return margin_from_logits(model(x), y).sum()

    logging.getLogger("kronfluence").setLevel(logging.WARNING)
    kf_task = MarginTask()
    model = prepare_model(task.module(theta), kf_task)
    train = TensorDataset(data.x_train, data.y_train)
    query = TensorDataset(x_q, y_q)
    with tempfile.TemporaryDirectory(prefix="kronfluence_speed_") as tmp:
        analyzer = Analyzer(analysis_name="speed", model=model, task=kf_task, cpu=True, disable_tqdm=True,
                            output_dir=tmp, disable_model_save=True)
        analyzer.fit_all_factors("ekfac", train, per_device_batch_size=512,
                                 factor_args=FactorArguments(strategy="ekfac", use_empirical_fisher=True))
        analyzer.compute_pairwise_scores(scores_name="s", factors_name="ekfac", query_dataset=query,
                                         train_dataset=train, per_device_query_batch_size=x_q.shape[0],
                                         per_device_train_batch_size=512,
                                         score_args=ScoreArguments(damping_factor=lam))
        return analyzer.load_pairwise_scores("s")["all_modules"]  # [Q, N]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--queries", type=int, default=100)
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--scale", default="paper", choices=sorted(MnistMlp.scales))
    args = p.parse_args(argv)
    task = MnistMlp(MnistMlp.scales[args.scale])
    data = task.load_data().to("cpu", torch.float32)
    theta = initial_params(task, [0], torch.float32, "cpu")[0]
    x_q, y_q = data.x_test[:args.queries], data.y_test[:args.queries]
    times: dict[str, list[float]] = {"ours": [], "kronfluence": []}
    for _ in range(args.repeats):
        start = time.perf_counter()
        mine, lam = ours(task, theta, data, x_q, y_q)
        times["ours"].append(time.perf_counter() - start)
        start = time.perf_counter()
        theirs = kronfluence_scores(task, theta, data, x_q, y_q, lam)
        times["kronfluence"].append(time.perf_counter() - start)
    med = {k: statistics.median(v) for k, v in times.items()}
    rho = spearmanr(mine.flatten().double().numpy(), theirs.flatten().double().numpy())[0]
    print(f"scale={args.scale} N={data.n_train} P={task.n_params} queries={args.queries} "
          f"threads={torch.get_num_threads()} damping={lam:.3g}")
    for k, v in med.items():
        print(f"{k}: {v:.2f} s (median of {args.repeats}; runs {', '.join(f'{x:.2f}' for x in times[k])})")
    print(f"spearman_ours_vs_kronfluence={rho:.4f}")
    print(f"ekfac_time_ratio_vs_kronfluence={med['ours'] / med['kronfluence']:.3f}")
    return 0
