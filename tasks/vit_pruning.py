"""Vision-transformer data pruning on CIFAR-10 (Mlodozeniec et al. 2025, d-TDA Fig. 6).

The paper trained a Swin transformer on the full CIFAR-10 with 10 seeds and removed 5,000 (10 %) examples
predicted by influence functions to lower the validation loss most, per seed ("fixed-seed") or on average
over the seeds ("distributional"), then retrained with the same seeds. Its sizes and hyperparameters are
not retrievable (PAPERS.md §1), so this task chooses and documents them: a timm ``VisionTransformer``
(no pretrained weights), trained by SGD with momentum 0.9 and a triangular learning rate, no augmentation.
The experiment itself lives in :mod:`benchmark.pruning`; this module is the data and the model.

Data (``benchmark.data.load_cifar10``; drawn by *official index*, so a full copy selects the same images):
the training pool (N = ``n_train``), a disjoint validation set (``PruningConfig.n_val``) from the official
training set, and the test set the results are reported on (``query_pool`` images of the official test set).

Scales:
- ``smoke``: CI seconds (N = 128, ViT depth 1, width 32, patch 8, 2 epochs, S = 4);
- ``small`` (default): N = 1,000, ViT depth 4, width 96, 3 heads, patch 8 (16 tokens), 12 epochs, S = 8,
  10 % pruned. Measured here: patch 4 (64 tokens) cost 41.5 s per training against ≈ 16 s budgeted, and
  reached no better test accuracy than patch 8 (≈ 27–30 % after 10–20 epochs: a CPU-sized ViT without
  augmentation on 1,000 images), so ``small`` uses patch 8;
- ``paper``: the full pool (49,000 with 1,000 held out for validation), ViT depth 6, width 192, 25 epochs,
  S = 10, 5/10/20 % pruned — for a GPU.

Second derivatives through timm's fused attention are unsupported on the CPU, so the module is built with
``TIMM_FUSED_ATTN=0`` (plain softmax attention: identical maths).
"""

from __future__ import annotations

import os
from functools import cached_property
from typing import ClassVar

import numpy as np
import torch
from torch import Tensor, nn
from torch.func import functional_call, vmap

from benchmark.config import (
    GroundTruthConfig,
    LRSchedule,
    PruningConfig,
    TaskScale,
    TrainConfig,
    VitConfig,
)
from benchmark.data import (
    load_cifar10,
)
from benchmark.registry import register_task
from tasks import cifar
from tasks.base import Task, TaskData

_UNUSED_GT = GroundTruthConfig(n_seeds=4, n_targets=1, n_queries=1)  # the pruning experiment has no LOO truth

SCALES = {
    "smoke": TaskScale(
        n_train=128, model=VitConfig(patch=8, embed_dim=32, depth=1, heads=2, mlp_ratio=2.0),
        train=TrainConfig(lr=0.05, momentum=0.9, weight_decay=5e-4, batch_size=32, epochs=2,
                          lr_schedule=LRSchedule.TRIANGULAR, peak_fraction=0.2),
        ground_truth=_UNUSED_GT, query_pool=200),
    "small": TaskScale(
        n_train=1000, model=VitConfig(patch=8, embed_dim=96, depth=4, heads=3, mlp_ratio=2.0),
        train=TrainConfig(lr=0.1, momentum=0.9, weight_decay=5e-4, batch_size=50, epochs=12,
                          lr_schedule=LRSchedule.TRIANGULAR, peak_fraction=0.2),
        ground_truth=_UNUSED_GT, query_pool=2000),
    "paper": TaskScale(
        n_train=49000, model=VitConfig(patch=4, embed_dim=192, depth=6, heads=3, mlp_ratio=2.0),
        train=TrainConfig(lr=0.05, momentum=0.9, weight_decay=5e-4, batch_size=256, epochs=25,
                          lr_schedule=LRSchedule.TRIANGULAR, peak_fraction=0.2),
        ground_truth=_UNUSED_GT, query_pool=10000),
}

PRUNING_SCALES = {
    "smoke": PruningConfig(n_seeds=4, fractions=(0.1,), n_val=100, c_grid=(1.0,)),
    "small": PruningConfig(n_seeds=8, fractions=(0.1,), n_val=500, c_grid=(0.5, 1.0)),
    "paper": PruningConfig(n_seeds=10, fractions=(0.05, 0.1, 0.2), n_val=1000, c_grid=(0.25, 0.5, 1.0, 2.0)),
}


def build_vit(cfg: VitConfig, num_classes: int = 10) -> nn.Module:
    """timm's ``VisionTransformer`` with plain (non-fused) attention, so double backward works on the CPU."""
    os.environ["TIMM_FUSED_ATTN"] = "0"
    from timm.models.vision_transformer import VisionTransformer

    model = VisionTransformer(img_size=cfg.image_size, patch_size=cfg.patch, embed_dim=cfg.embed_dim, depth=cfg.depth,
                              num_heads=cfg.heads, mlp_ratio=cfg.mlp_ratio, num_classes=num_classes)
    for block in model.blocks:
        block.attn.fused_attn = False
    return model


@register_task("vit_pruning")
class VitPruning(Task):
    """A small ViT on CIFAR-10 for the data-pruning experiment (``benchmark.pruning``)."""

    scales = SCALES
    pruning_scales: ClassVar[dict[str, PruningConfig]] = PRUNING_SCALES
    experiment: ClassVar[str] = "pruning"

    def __init__(self, scale: TaskScale) -> None:
        super().__init__(scale)
        with torch.random.fork_rng(devices=[]):  # built eagerly (never inside vmap), without touching the RNG
            self._template = build_vit(self.vit)  # functional_call's module; its own values are never used

    @property
    def vit(self) -> VitConfig:
        if not isinstance(self.scale.model, VitConfig):
            raise TypeError(f"vit_pruning needs a VitConfig model, got {type(self.scale.model).__name__}")
        return self.scale.model

    def param_shapes(self) -> list[tuple[str, tuple[int, ...]]]:
        return [(name, tuple(p.shape)) for name, p in self._template.named_parameters()]

    def build_module(self) -> nn.Module:
        return build_vit(self.vit)

    def init_params(self, gen: torch.Generator, dtype: torch.dtype) -> Tensor:
        """timm's own initialisation (truncated normal, zero biases), drawn under a seed taken from ``gen``."""
        seed = int(torch.randint(0, 2**62, (1,), generator=gen))
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = build_vit(self.vit)
        return torch.nn.utils.parameters_to_vector(model.parameters()).detach().to(dtype)

    def logits_batched(self, theta: Tensor, x: Tensor) -> Tensor:
        """Logits [n, B, 10] for θ [n, P] and images x [n, B, 3, H, W] (``torch.func.functional_call`` per model,
        vectorised over the model axis with ``vmap``)."""
        module = self._template

        def one(params: dict[str, Tensor], xi: Tensor) -> Tensor:
            return functional_call(module, params, (xi,))

        return vmap(one)(self.unflatten(theta), x)

    # ---------------------------------------------------------------- data
    def pruning_config(self, scale_name: str) -> PruningConfig:
        return self.pruning_scales[scale_name]

    @cached_property
    def _arrays(self) -> dict[str, np.ndarray]:
        return load_cifar10()

    def load_data(self) -> TaskData:
        """Training pool (by official index) and the first ``query_pool`` selectable official test images."""
        return cifar.task_data(self._arrays, self.scale.n_train, self.scale.query_pool, self.scale.data_seed)

    def load_validation(self, n_val: int) -> tuple[Tensor, Tensor, Tensor]:
        """x_val [n_val, 3, H, W], y_val, official indices: a fixed part of the official training set, disjoint
        from the pool (drawn after it, excluding it) and from the test set."""
        return cifar.held_out(self._arrays, n_val, "cifar_val", self.scale.n_train, self.scale.data_seed)
