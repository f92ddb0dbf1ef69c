"""The method interface: given the task, per-seed records, targets and queries, predict

    Δm[s, k, q, j] ≈ m_{q,j}(θ_s without k) − m_{q,j}(θ_s)      (removed minus full)

The predicted LOO law for (k, q) is {m_q(θ_s) + Δm[s, k, q]} over seeds (d-TDA Alg. 1).
"""

from __future__ import annotations

import dataclasses
from abc import ABC, abstractmethod
from dataclasses import asdict, dataclass, is_dataclass
from typing import Any, ClassVar

from torch import Tensor
from torch.func import grad, jacrev, vmap

from benchmark.config import Coupling, TaskScale
from benchmark.engine import Schedule, build_schedule, learning_rates, steps_per_epoch
from tasks.base import Task, TaskData


@dataclass(frozen=True)
class RemovalContext:
    """What a method sees. theta_full [S, P] are the seeds' final parameters (float, on ``device``);
    seeds [S] identify each seed's init and batch order (``benchmark.engine``); targets [K] are training
    indices, queries [Q] test indices; checkpoints [S, E+1, P] are each full run's parameters at the
    end of every epoch (index 0 = initialisation), taken at steps ``checkpoint_steps``."""

    task: Task
    data: TaskData
    scale: TaskScale
    theta_full: Tensor
    seeds: list[int]
    targets: Tensor
    queries: Tensor
    coupling: Coupling = Coupling.MASKED
    progress: bool = False  # show progress bars
    checkpoints: Tensor | None = None

    @property
    def n_seeds(self) -> int:  # S
        return int(self.theta_full.shape[0])

    @property
    def n_steps(self) -> int:  # T = epochs · ⌈N/B⌉
        return self.scale.train.epochs * steps_per_epoch(self.n_train, self.scale.train.batch_size)

    @property
    def checkpoint_steps(self) -> list[int]:
        """The training step at which each checkpoint was taken: [0, T/E, 2T/E, …, T]."""
        per_epoch = steps_per_epoch(self.n_train, self.scale.train.batch_size)
        return [e * per_epoch for e in range(self.scale.train.epochs + 1)]

    def learning_rates(self) -> Tensor:
        """η_t of the recorded runs, float64 [T]."""
        return learning_rates(self.scale.train, self.n_steps)

    def schedule(self, seed_index: int) -> Schedule:
        """Seed ``seed_index``'s full-run batch schedule (idx, weight, denom [T, B])."""
        return build_schedule(self.task.name, self.n_train, self.scale.train, self.seeds[seed_index], None,
                              Coupling.MASKED)

    def require_checkpoints(self, method: str) -> Tensor:
        if self.checkpoints is None:
            raise ValueError(f"method {method!r} needs the training checkpoints (RemovalContext.checkpoints)")
        return self.checkpoints

    def subset(self, n_seeds: int, start: int = 0) -> RemovalContext:
        """The same context restricted to the seeds ``start … start + n_seeds − 1`` (default: the first ones)."""
        stop = start + n_seeds
        ckpt = None if self.checkpoints is None else self.checkpoints[start:stop]
        return dataclasses.replace(self, theta_full=self.theta_full[start:stop], seeds=self.seeds[start:stop],
                                   checkpoints=ckpt)

    @property
    def n_train(self) -> int:  # N
        return self.data.n_train

    @property
    def x_query(self) -> Tensor:
        return self.data.x_test[self.queries]

    @property
    def y_query(self) -> Tensor:
        return self.data.y_test[self.queries]


class Method(ABC):
    """A registered attribution method with a frozen config (``config_cls``)."""

    name: ClassVar[str]
    is_distributional: ClassVar[bool] = True
    config_cls: ClassVar[type] = dict
    # LDS needs Δm for every training example (K = N); a method too costly for that says why here and the
    # harness lists it as not run in the report instead of scoring it
    lds_skip_reason: ClassVar[str | None] = None
    # True: seed s's prediction depends on seed s's run only, so the harness may predict for chunks of seeds
    # as separate work units (``benchmark.method_units``) and concatenate them; False for a method that pools
    # seeds (e.g. an ensemble), which then runs as one unit. tests/test_method_units.py checks every method.
    seed_separable: ClassVar[bool] = True

    def __init__(self, config: Any = None) -> None:
        self.config = config if config is not None else self.config_cls()
        self.info: dict[str, float] = {}  # logged quantities (e.g. damping), filled by predict

    def seeds_used(self, n_available: int) -> int:
        """How many of the ground truth's seeds this method predicts for (the first ones). Methods whose
        config has ``max_seeds`` (expensive ones, e.g. the peer libraries) use at most that many."""
        limit = getattr(self.config, "max_seeds", None)
        return n_available if limit is None else min(n_available, int(limit))

    @abstractmethod
    def predict(self, ctx: RemovalContext) -> Tensor:
        """Δm [S, K, Q, M], removed minus full, in the measurement's units."""

    def config_dict(self) -> dict[str, Any]:
        if is_dataclass(self.config):
            return {k: getattr(v, "value", v) for k, v in asdict(self.config).items()}
        return dict(self.config)

    def variant(self) -> str:
        """The config fields that differ from their defaults (``default`` if none); the leaderboard's
        ``config_hash`` identifies the full config."""
        defaults = Method.__new__(type(self))
        Method.__init__(defaults)
        base = defaults.config_dict()
        changed = {k: v for k, v in self.config_dict().items() if base.get(k) != v}
        return ",".join(f"{k}={v}" for k, v in changed.items()) or "default"


def measurement_grads(task: Task, theta: Tensor, x: Tensor, y: Tensor) -> Tensor:
    """∇_θ m_{q,j}(θ), [Q, M, P] for one model θ [P] (per query: vmap over queries of a one-query jacrev)."""
    def one(th: Tensor, xi: Tensor, yi: Tensor) -> Tensor:
        return task.measurements(th, xi.unsqueeze(0), yi.unsqueeze(0)).squeeze(0)  # [M]

    return vmap(jacrev(one), in_dims=(None, 0, 0))(theta, x, y)


def example_loss_grads(task: Task, theta: Tensor, x: Tensor, y: Tensor) -> Tensor:
    """∇_θ ℓ_k(θ) per example, [K, P] for x [K, ...], y [K]."""
    def loss_one(th: Tensor, xi: Tensor, yi: Tensor) -> Tensor:
        return task.per_example_loss(th, xi.unsqueeze(0), yi.unsqueeze(0)).squeeze(0)

    return vmap(grad(loss_one), in_dims=(None, 0, 0))(theta, x, y)
