"""Tiny seeded problems and named tolerances. Tests run on the CPU, in float64 for exactness checks."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch

import methods  # noqa: F401  (registers the methods)
import tasks  # noqa: F401  (registers the tasks)
from benchmark.config import Coupling, GroundTruthConfig, ModelConfig, TaskScale, TrainConfig
from benchmark.engine import build_schedule, initial_params, train_models
from methods.base import RemovalContext
from methods.influence import Curvature, InfluenceConfig, Solver, objective
from tasks.base import TaskData
from tasks.mnist_mlp import MnistMlp

ENGINE_ATOL = 1e-12  # engine vs torch.optim loop, float64
UNROLL_FD_RTOL = 2e-3  # unroll vs central finite differences (δ = 1e-4), relative to max |effect|
UD_IF_RTOL = 1e-3  # unroll → influence under converged full-batch GD on a GLM
DENSE_CG_RTOL = 1e-5
GLM_PEARSON_MIN = 0.99
SIGN_PEARSON_MIN = 0.5

torch.set_num_threads(2)


def tiny_scale(n_train: int = 64, hidden: tuple[int, ...] = (8,), activation: str = "tanh", pool: int = 7,
               lr: float = 0.1, momentum: float = 0.9, wd: float = 1e-3, batch: int = 16, epochs: int = 2,
               ) -> TaskScale:
    return TaskScale(n_train=n_train, model=ModelConfig(hidden=hidden, activation=activation, input_pool=pool),
                     train=TrainConfig(lr=lr, momentum=momentum, weight_decay=wd, batch_size=batch, epochs=epochs),
                     ground_truth=GroundTruthConfig(n_seeds=4, n_targets=6, n_queries=5), query_pool=200)


def make_task(scale: TaskScale) -> tuple[MnistMlp, TaskData]:
    task = MnistMlp(scale)
    return task, task.load_data().to("cpu", torch.float64)


def pearson(a: torch.Tensor, b: torch.Tensor) -> float:
    """Pearson correlation of two tensors, flattened."""
    a, b = a.flatten() - a.mean(), b.flatten() - b.mean()
    return float((a @ b) / (a.norm() * b.norm()))


@dataclass
class GlmProblem:
    """L2-regularised multinomial logistic regression on 4×4-pooled MNIST, solved by Newton's method."""

    task: MnistMlp
    data: TaskData
    theta: torch.Tensor  # [P] the exact minimiser
    ctx: RemovalContext

    def solve(self, weights: torch.Tensor, theta0: torch.Tensor) -> torch.Tensor:
        """argmin (1/N)Σ w_n ℓ_n + (wd/2)‖θ‖² by Newton iterations (exact to ~1e-13)."""
        wd, n = self.task.scale.train.weight_decay, self.data.n_train
        x, y = self.data.x_train, self.data.y_train

        def obj(th: torch.Tensor) -> torch.Tensor:
            return (self.task.per_example_loss(th, x, y) * weights).sum() / n + 0.5 * wd * th.pow(2).sum()

        theta = theta0.clone()
        for _ in range(50):
            g = torch.func.grad(obj)(theta)
            if g.norm() < 1e-13:
                break
            h = torch.func.hessian(obj)(theta)
            theta = theta - torch.linalg.solve(h, g)
        return theta

    def exact_loo(self) -> torch.Tensor:
        """Δm [K, Q, M] by exact retraining without each target (removed minus full); computed once."""
        if getattr(self, "_exact_loo", None) is None:
            self._exact_loo = self._compute_exact_loo()
        return self._exact_loo.clone()

    def _compute_exact_loo(self) -> torch.Tensor:
        full = self.task.measurements(self.theta, self.ctx.x_query, self.ctx.y_query)
        out = []
        for k in self.ctx.targets.tolist():
            w = torch.ones(self.data.n_train, dtype=torch.float64)
            w[k] = 0.0
            th = self.solve(w, self.theta)
            out.append(self.task.measurements(th, self.ctx.x_query, self.ctx.y_query) - full)
        return torch.stack(out)


@pytest.fixture(scope="session")
def glm() -> GlmProblem:
    scale = tiny_scale(n_train=48, hidden=(), pool=7, wd=0.05)
    task, data = make_task(scale)
    prob = GlmProblem(task, data, torch.zeros(task.n_params, dtype=torch.float64), None)  # type: ignore[arg-type]
    theta = prob.solve(torch.ones(data.n_train, dtype=torch.float64), prob.theta)
    ctx = RemovalContext(task=task, data=data, scale=scale, theta_full=theta.unsqueeze(0), seeds=[0],
                         targets=torch.arange(0, 48, 3), queries=torch.arange(10))
    prob.theta, prob.ctx = theta, ctx
    return prob


_GLM_CONTEXTS: dict[tuple[int, int], tuple[RemovalContext, float]] = {}


def full_batch_glm_context(glm: GlmProblem, steps: int) -> tuple[RemovalContext, float]:
    """Cached per (problem, steps): the sign-contract tests of every method share one training."""
    key = (id(glm), steps)
    if key not in _GLM_CONTEXTS:
        _GLM_CONTEXTS[key] = _train_full_batch_glm(glm, steps)
    return _GLM_CONTEXTS[key]


def _train_full_batch_glm(glm: GlmProblem, steps: int) -> tuple[RemovalContext, float]:
    """The GLM trained by full-batch GD (β = 0, η = 1/λ_max) for ``steps`` steps from seed 0, with a
    checkpoint after every step."""
    h = torch.func.hessian(lambda th: glm.task.per_example_loss(th, glm.data.x_train, glm.data.y_train).mean()
                           + 0.5 * glm.task.scale.train.weight_decay * th.pow(2).sum())(glm.theta)
    lr = 1.0 / float(torch.linalg.eigvalsh(h).max())
    n = glm.data.n_train
    scale = glm.task.scale.__class__(**{**glm.task.scale.__dict__, "train": TrainConfig(
        lr=lr, momentum=0.0, weight_decay=glm.task.scale.train.weight_decay, batch_size=n, epochs=steps)})
    task = glm.task.__class__(scale)
    sched = build_schedule(task.name, n, scale.train, 0, None, Coupling.MASKED)
    result = train_models(task, glm.data, scale.train, [sched], initial_params(task, [0], torch.float64, "cpu"),
                          checkpoint_models=[0])
    return RemovalContext(task=task, data=glm.data, scale=scale, theta_full=result.theta, seeds=[0],
                          targets=glm.ctx.targets, queries=glm.ctx.queries, checkpoints=result.checkpoints), lr


EXACT_INFLUENCE = InfluenceConfig(curvature=Curvature.HESSIAN, damping_scale=0.0, solver=Solver.DENSE)
_ = objective
