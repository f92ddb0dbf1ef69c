"""The task interface: a task says *what* (data, model, loss, measurements), the harness *how*.

A model is a flat parameter vector θ ∈ ℝ^P; ``logits_batched`` evaluates many models at once along a
leading model axis, which is what lets the engine train many seeds and removals together.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from benchmark.config import LdsConfig, TaskScale


@dataclass(frozen=True)
class TaskData:
    """Training pool and test set, already preprocessed to float tensors.

    x_train [N, ...], y_train [N] (int64), x_test [N_test, ...], y_test [N_test],
    train_index [N]: each training example's position in the official training set.
    """

    x_train: Tensor
    y_train: Tensor
    x_test: Tensor
    y_test: Tensor
    train_index: Tensor

    def to(self, device: torch.device | str, dtype: torch.dtype) -> TaskData:
        return TaskData(self.x_train.to(device, dtype), self.y_train.to(device), self.x_test.to(device, dtype),
                        self.y_test.to(device), self.train_index)

    @property
    def n_train(self) -> int:
        return int(self.y_train.shape[0])


def margin_from_logits(logits: Tensor, y: Tensor) -> Tensor:
    """TRAK's margin ``logit_y − logsumexp_{j≠y} logit_j``, [..., B] from logits [..., B, C]."""
    correct = logits.gather(-1, y.unsqueeze(-1)).squeeze(-1)
    others = logits.scatter(-1, y.unsqueeze(-1), float("-inf"))
    return correct - torch.logsumexp(others, dim=-1)


def cross_entropy(logits: Tensor, y: Tensor) -> Tensor:
    """Per-example cross-entropy, [..., B] from logits [..., B, C] and labels [..., B]."""
    shape = y.shape
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1), reduction="none").view(shape)


class Task(ABC):
    """A classification task trained by the harness.

    Subclasses set ``name`` (via registration), ``scales`` and implement the abstract methods.
    The training loss per example is cross-entropy; measurements are per-query test loss and margin.
    """

    name: ClassVar[str]
    scales: ClassVar[Mapping[str, TaskScale]]
    measurement_names: ClassVar[tuple[str, ...]] = ("loss", "margin")
    supports_masked: ClassVar[bool] = True  # False if the model uses unweighted batch statistics
    lds_scales: ClassVar[Mapping[str, LdsConfig]] = {}  # the LDS ground truth per scale name (group removal)
    experiment: ClassVar[str] = "attribution"  # "pruning": the task runs benchmark.pruning instead of LOO/LDS
    augments: ClassVar[bool] = False  # True: ``augment`` transforms the training inputs
    # scale → method → why it is not run there (cost or applicability); the leaderboard says so
    method_skips: ClassVar[Mapping[str, Mapping[str, str]]] = {}
    # the methods whose ``method_skips`` entries are about this CPU's cost: on another device (a GPU) they run
    cpu_cost_skips: ClassVar[frozenset[str]] = frozenset()
    # scale → GoldConfig fields overriding the further-training gold standard's per-scale defaults
    gold_overrides: ClassVar[Mapping[str, Mapping[str, object]]] = {}
    mechanism_study: ClassVar[bool] = True  # run_all's ``mechanism`` evaluation applies to this task
    mechanism_skip_reason: ClassVar[str] = ""

    def __init__(self, scale: TaskScale) -> None:
        self.scale = scale

    @classmethod
    def skip_reason(cls, scale_name: str, method: str, device_type: str = "cpu") -> str | None:
        """Why ``method`` does not run at ``scale_name`` on a ``device_type`` device (``method_skips``), or None;
        a skip listed in ``cpu_cost_skips`` applies on the CPU only."""
        reason = cls.method_skips.get(scale_name, {}).get(method)
        if reason is not None and device_type != "cpu" and method in cls.cpu_cost_skips:
            return None
        return reason

    @abstractmethod
    def load_data(self) -> TaskData:
        """Load and preprocess the training pool (N = scale.n_train) and the test set."""

    @abstractmethod
    def param_shapes(self) -> list[tuple[str, tuple[int, ...]]]:
        """Names and shapes of the parameters, in the order they are packed into θ."""

    @abstractmethod
    def init_params(self, gen: torch.Generator, dtype: torch.dtype) -> Tensor:
        """A fresh θ [P] drawn from ``gen`` (CPU generator, so seeds give the same init on any device)."""

    @abstractmethod
    def logits_batched(self, theta: Tensor, x: Tensor) -> Tensor:
        """Logits [n_models, B, C] for θ [n_models, P] and inputs x [n_models, B, ...]."""

    def logits_grouped(self, params: dict[str, Tensor], x: Tensor, weight: Tensor | None = None) -> Tensor:
        """Training-mode logits [n, B, C] where models g·m … g·m+m−1 share inputs x[g]; x [G, B, ...], n = G·m.

        ``params`` maps each name to a contiguous [n, *shape] tensor. ``weight [n, B]`` are the slots'
        example weights w (0 for a masked or padded slot): a model with batch statistics (BatchNorm) must
        weight them by w so that a masked example leaves them too; others ignore it. Default: repeat the
        inputs and call ``logits_batched``; tasks override it to share work across a group.
        """
        n = next(iter(params.values())).shape[0]
        theta = torch.cat([p.reshape(n, -1) for p in params.values()], dim=1)
        return self.logits_batched(theta, x.repeat_interleave(n // x.shape[0], dim=0))

    def augment(self, x: Tensor, idx: Tensor, order: Tensor, epoch: int) -> Tensor:
        """Training inputs after data augmentation: x [G, B, ...] holding examples idx [G, B] of runs whose
        batch-order seeds are order [G] (int64), at ``epoch``. Each example's augmentation must be a function
        of (order seed, example index, epoch) alone, so removing an example leaves every other example's
        augmentation unchanged. Default (``augments = False``): none."""
        return x

    def batch_loss(self, theta: Tensor, x: Tensor, y: Tensor, w: Tensor, denom: Tensor) -> Tensor:
        """One model's training-mode batch loss (1/B_t)·Σ_i w_i·ℓ_i(θ) for θ [P], x [B, ...], y [B], w [B]
        and B_t = ``denom`` (what the engine minimises; ``unroll`` differentiates it). Tasks with batch
        statistics override it to weight them by w, as ``logits_grouped`` does."""
        return (self.per_example_loss(theta, x, y) * w).sum() / denom

    @property
    def n_params(self) -> int:  # P
        total = 0
        for _, shape in self.param_shapes():
            n = 1
            for d in shape:
                n *= d
            total += n
        return total

    def unflatten(self, theta: Tensor) -> dict[str, Tensor]:
        """Views of θ [..., P] as named parameters [..., *shape]."""
        out, offset = {}, 0
        lead = theta.shape[:-1]
        for name, shape in self.param_shapes():
            n = 1
            for d in shape:
                n *= d
            out[name] = theta[..., offset:offset + n].reshape(*lead, *shape)
            offset += n
        return out

    def build_module(self) -> nn.Module:
        """An ``nn.Module`` (logits [B, C] from x [B, ...]) whose ``parameters()`` are, in order, the
        tensors of ``param_shapes``: the bridge to hook-based curvature (K-FAC) and the peer libraries."""
        raise NotImplementedError(f"task {self.name!r} has no nn.Module form")

    def module(self, theta: Tensor) -> nn.Module:
        """``build_module()`` with its parameters set to θ [P] (copied; same dtype and device as θ)."""
        mod = self.build_module().to(device=theta.device, dtype=theta.dtype)
        shapes = [tuple(p.shape) for p in mod.parameters()]
        if shapes != [s for _, s in self.param_shapes()]:
            raise ValueError(f"task {self.name!r}: module parameter shapes {shapes} differ from param_shapes")
        torch.nn.utils.vector_to_parameters(theta.detach().clone(), mod.parameters())
        return mod

    def logits(self, theta: Tensor, x: Tensor) -> Tensor:
        """Logits [B, C] of one model θ [P] on x [B, ...]."""
        return self.logits_batched(theta.unsqueeze(0), x.unsqueeze(0)).squeeze(0)

    def per_example_loss(self, theta: Tensor, x: Tensor, y: Tensor) -> Tensor:
        """ℓ_i(θ) per example, [B]. Not reduced: the engine forms (1/B)·Σ_i w_i·ℓ_i."""
        return cross_entropy(self.logits(theta, x), y)

    def measurements(self, theta: Tensor, x: Tensor, y: Tensor) -> Tensor:
        """m_q(θ) per query, [Q, M], columns in ``measurement_names`` order (loss, margin)."""
        logits = self.logits(theta, x)
        return torch.stack([cross_entropy(logits, y), margin_from_logits(logits, y)], dim=-1)

    def measurements_batched(self, theta: Tensor, x: Tensor, y: Tensor) -> Tensor:
        """m_q(θ_n) for many models, [n_models, Q, M] from θ [n_models, P], x [Q, ...], y [Q]."""
        xb = x.unsqueeze(0).expand(theta.shape[0], *x.shape)
        logits = self.logits_batched(theta, xb)
        yb = y.unsqueeze(0).expand(theta.shape[0], -1)
        return torch.stack([cross_entropy(logits, yb), margin_from_logits(logits, yb)], dim=-1)
