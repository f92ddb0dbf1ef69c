"""The method interface: given the task, per-seed records, targets and queries, predict

    Δm[s, k, q, j] ≈ m_{q,j}(θ_s without k) − m_{q,j}(θ_s)      (removed minus full)

The predicted LOO law for (k, q) is {m_q(θ_s) + Δm[s, k, q]} over seeds (d-TDA Alg. 1).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import asdict, dataclass, is_dataclass
from typing import Any, ClassVar

from torch import Tensor
from torch.func import grad, jacrev, vmap

from benchmark.config import Coupling, TaskScale
from tasks.base import Task, TaskData


@dataclass(frozen=True)
class RemovalContext:
    """What a method sees. theta_full [S, P] are the seeds' final parameters (float, on ``device``);
    seeds [S] identify each seed's init and batch order (``benchmark.engine``); targets [K] are training
    indices, queries [Q] test indices."""

    task: Task
    data: TaskData
    scale: TaskScale
    theta_full: Tensor
    seeds: list[int]
    targets: Tensor
    queries: Tensor
    coupling: Coupling = Coupling.MASKED
    progress: bool = False  # show progress bars

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

    def __init__(self, config: Any = None) -> None:
        self.config = config if config is not None else self.config_cls()
        self.info: dict[str, float] = {}  # logged quantities (e.g. damping), filled by predict

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
