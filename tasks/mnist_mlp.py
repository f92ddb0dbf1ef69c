"""MNIST multilayer perceptron (SOURCE's MNIST setting at ``paper`` scale, Bae et al. 2024 / ASTRA Table 2).

Scales:
- ``smoke``: seconds, for CI (N = 256, 14×14 pooled input, MLP 196-16-10, 16 seeds).
- ``small`` (default): an informative ground truth on a 2-core CPU (see README "Choosing `small`").
- ``paper``: 6,144 examples, MLP 784-512-256-128-10, SGD momentum 0.9, lr 0.03, wd 1e-3, batch 64,
  20 epochs; 100 seeds, 100 targets, 100 queries (for a GPU or a cluster).
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from benchmark.config import GroundTruthConfig, LdsConfig, ModelConfig, TaskScale, TrainConfig, derive_seed
from benchmark.data import load_mnist
from benchmark.registry import register_task
from tasks.base import Task, TaskData

MNIST_MEAN, MNIST_STD = 0.1307, 0.3081

SCALES = {
    "smoke": TaskScale(
        n_train=256,
        model=ModelConfig(hidden=(16,), activation="relu", input_pool=2),
        train=TrainConfig(lr=0.1, momentum=0.0, weight_decay=1e-4, batch_size=32, epochs=3),
        ground_truth=GroundTruthConfig(n_seeds=16, n_targets=8, n_queries=8, seeds_per_unit=8),
        query_pool=500,
    ),
    "small": TaskScale(
        n_train=1000,
        model=ModelConfig(hidden=(64,), activation="relu", input_pool=2),
        train=TrainConfig(lr=0.1, momentum=0.0, weight_decay=1e-4, batch_size=50, epochs=5),
        ground_truth=GroundTruthConfig(n_seeds=128, n_targets=50, n_queries=50, seeds_per_unit=16),
        query_pool=1000,
    ),
    "paper": TaskScale(
        n_train=6144,
        model=ModelConfig(hidden=(512, 256, 128), activation="relu", input_pool=1),
        train=TrainConfig(lr=0.03, momentum=0.9, weight_decay=1e-3, batch_size=64, epochs=20),
        ground_truth=GroundTruthConfig(n_seeds=100, n_targets=100, n_queries=100, seeds_per_unit=10),
        query_pool=10000,
    ),
}

LDS_SCALES = {
    "smoke": LdsConfig(n_subsets=16, alpha=0.5, n_seeds=4, seeds_per_unit=4),
    "small": LdsConfig(n_subsets=100, alpha=0.5, n_seeds=8, seeds_per_unit=4),
    "paper": LdsConfig(n_subsets=100, alpha=0.5, n_seeds=20, seeds_per_unit=4),
}

_ACTIVATIONS = {"relu": torch.relu, "tanh": torch.tanh, "gelu": F.gelu}
_ACTIVATION_MODULES: dict[str, type[nn.Module]] = {"relu": nn.ReLU, "tanh": nn.Tanh, "gelu": nn.GELU}


@register_task("mnist_mlp")
class MnistMlp(Task):
    """MLP on (optionally average-pooled) MNIST digits; inputs standardised with MNIST's mean and std."""

    scales = SCALES
    lds_scales = LDS_SCALES

    @property
    def input_dim(self) -> int:
        side = 28 // self.scale.model.input_pool
        return side * side

    def layer_sizes(self) -> list[int]:
        return [self.input_dim, *self.scale.model.hidden, 10]

    def param_shapes(self) -> list[tuple[str, tuple[int, ...]]]:
        sizes = self.layer_sizes()
        shapes: list[tuple[str, tuple[int, ...]]] = []
        for i, (d_in, d_out) in enumerate(zip(sizes[:-1], sizes[1:])):
            shapes += [(f"w{i}", (d_out, d_in)), (f"b{i}", (d_out,))]  # nn.Linear layout
        return shapes

    def load_data(self) -> TaskData:
        arrays = load_mnist()
        n_official = arrays["x_train"].shape[0]
        if self.scale.n_train > n_official:
            raise ValueError(f"n_train={self.scale.n_train} exceeds the {n_official} MNIST training images")
        rng = np.random.default_rng(derive_seed("mnist_subset", self.scale.data_seed) % (2**32))
        index = np.sort(rng.choice(n_official, size=self.scale.n_train, replace=False))
        n_test = min(self.scale.query_pool, arrays["x_test"].shape[0])
        return TaskData(
            x_train=self._preprocess(arrays["x_train"][index]),
            y_train=torch.as_tensor(arrays["y_train"][index].astype(np.int64)),
            x_test=self._preprocess(arrays["x_test"][:n_test]),
            y_test=torch.as_tensor(arrays["y_test"][:n_test].astype(np.int64)),
            train_index=torch.as_tensor(index),
        )

    def _preprocess(self, images: np.ndarray) -> Tensor:
        x = torch.as_tensor(images, dtype=torch.float32).div_(255.0).sub_(MNIST_MEAN).div_(MNIST_STD)
        pool = self.scale.model.input_pool
        if pool > 1:
            x = F.avg_pool2d(x.unsqueeze(1), pool).squeeze(1)
        return x.reshape(x.shape[0], -1)

    def init_params(self, gen: torch.Generator, dtype: torch.dtype) -> Tensor:
        """PyTorch's ``nn.Linear`` default: U(−1/√fan_in, 1/√fan_in) for weights and biases."""
        parts = []
        fan_in = 1
        for name, shape in self.param_shapes():
            if name.startswith("w"):
                fan_in = shape[1]  # a bias uses the fan-in of the weight before it
            bound = 1.0 / math.sqrt(fan_in)
            parts.append((torch.rand(shape, generator=gen, dtype=torch.float64) * 2 - 1).mul_(bound).reshape(-1))
        return torch.cat(parts).to(dtype)

    def build_module(self) -> nn.Module:
        """The same MLP as ``nn.Sequential(Linear, act, …, Linear)`` on flattened (pooled) inputs."""
        sizes = self.layer_sizes()
        layers: list[nn.Module] = []
        for i, (d_in, d_out) in enumerate(zip(sizes[:-1], sizes[1:])):
            layers.append(nn.Linear(d_in, d_out))
            if i < len(sizes) - 2:
                layers.append(_ACTIVATION_MODULES[self.scale.model.activation]())
        return nn.Sequential(*layers)

    def logits_batched(self, theta: Tensor, x: Tensor) -> Tensor:
        """h_{l+1} = act(W_l h_l + b_l), last layer linear; logits [n, B, C] from θ [n, P], x [n, B, D].

        Computed feature-major (hᵀ [n, H, B]) so every bmm takes W in its natural [out, in] layout.
        """
        return self._forward_t(self.unflatten(theta), x.transpose(1, 2), first=0)

    def logits_grouped(self, params: dict[str, Tensor], x: Tensor, weight: Tensor | None = None) -> Tensor:
        """Logits [n, B, C] where models g·m … g·m+m−1 share inputs x[g], x [G, B, D], n = G·m (no batch
        statistics, so ``weight`` is unused).

        The first layer is one GEMM per group, [W_{g·m}; …; W_{g·m+m−1}] [m·H, D] @ x[g]ᵀ [D, B], whose
        output [G, m·H, B] is already the per-model hᵀ [n, H, B] (a view, no copy). Requires each weight
        as a contiguous [n, out, in] tensor (the engine's layout).
        """
        n_groups = x.shape[0]
        w0, b0 = params["w0"], params["b0"]
        n, hid = w0.shape[0], w0.shape[1]
        h_t = torch.bmm(w0.view(n_groups, (n // n_groups) * hid, -1), x.transpose(1, 2))  # [G, m·H, B]
        h_t = h_t.view(n, hid, -1) + b0.unsqueeze(-1)
        return self._forward_t(params, h_t, first=1)

    def _forward_t(self, p: dict[str, Tensor], h_t: Tensor, first: int) -> Tensor:
        """Layers ``first``… on feature-major activations hᵀ [n, H, B]; returns logits [n, B, C]."""
        act = _ACTIVATIONS[self.scale.model.activation]
        n_layers = len(self.layer_sizes()) - 1
        if first == 1 and n_layers > 1:
            h_t = act(h_t)
        for i in range(first, n_layers):
            h_t = torch.baddbmm(p[f"b{i}"].unsqueeze(-1), p[f"w{i}"], h_t)
            if i < n_layers - 1:
                h_t = act(h_t)
        return h_t.transpose(1, 2)
