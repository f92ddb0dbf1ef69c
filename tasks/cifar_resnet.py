"""ResNet-9 on CIFAR-10 (the TRAK / kronfluence / SOURCE model), with BatchNorm and data augmentation.

Model (``ResNetConfig``; channels c = width, 2c, 4c with width 64 the original):
conv-BN-ReLU(3→c, k3) → conv-BN-ReLU(c→2c, k5, s2) → residual[conv-BN-ReLU(2c→2c) ×2] →
conv-BN-ReLU(2c→4c) → max-pool 2 → residual[conv-BN-ReLU(4c→4c) ×2] → conv-BN-ReLU(4c→2c, k3, no padding) →
adaptive max-pool → linear(2c→10, no bias) → × 0.2. Convolutions have no bias; BatchNorm has γ, β (in θ).

BatchNorm, the one place where examples of a batch interact:
- **training mode** (``logits_grouped``, ``batch_loss``: the engine and ``unroll``): per channel,
  μ = Σ_i w_i Σ_{h,w} a_i / (HW·Σ_i w_i) and σ² = Σ_i w_i Σ_{h,w} (a_i − μ)² / (HW·Σ_i w_i) (biased, as
  ``nn.BatchNorm2d``), â = γ(a − μ)/√(σ² + ε) + β. Weighting by the slot weights w makes a *masked* example
  (w = 0) leave the batch statistics as well as the loss, so masked coupling removes it exactly (test:
  equal to the batch without it).
- **evaluation mode** (``logits``, ``logits_batched``: measurements and every method's gradients): μ, σ² are
  the statistics, at θ, of ``bn_calibration`` fixed unaugmented training images disjoint from the pool
  (``tasks.cifar.held_out``), held fixed (``detach``) when differentiating, as running statistics are in
  ``eval()`` mode. So a measurement is a function of θ alone (no running buffers outside θ), and every run,
  full or removed, is evaluated the same way. Per-example gradients ∇ℓ_k are taken in this mode, as TRAK
  and kronfluence take them.

Augmentation (``augment``): random crop of the 32×32 image after ``crop_pad`` pixels of black padding
(offsets dx, dy ∈ {0…2·pad}) and a horizontal flip, drawn by a counter-based hash of (the run's batch-order
seed, the example's pool index, epoch): removing an example changes no other example's augmentation.

Scales (``small`` sized for a 2-core CPU; see README "cifar_resnet"):
- ``smoke``: N = 128, width 4, 2 epochs — CI seconds;
- ``small`` (default): N = 500, width 8, batch 50, 8 epochs, lr 0.4 triangular (peak at 1/5) — ≈ 2.4 s per
  training here; its main ground truth is group removal (LDS: 20 random 50 % subsets × 4 seeds), with the
  single-example LOO rows (4 seeds × 8 targets) and their ceilings beside it;
- ``paper``: SOURCE's setting — the 3,072-example subset, width 64, batch 512, 25 epochs, 50 seeds.
"""

from __future__ import annotations

from functools import cached_property

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import vmap

from benchmark.config import GroundTruthConfig, LdsConfig, LRSchedule, ResNetConfig, TaskScale, TrainConfig
from benchmark.data import load_cifar10
from benchmark.registry import register_task
from tasks import cifar
from tasks.base import Task, TaskData, cross_entropy

BN_EPS = 1e-5
HASH_MODULUS = 2147483647  # 2³¹ − 1 (MINSTD)

SCALES = {
    "smoke": TaskScale(
        n_train=128, model=ResNetConfig(width=4, bn_calibration=64),
        train=TrainConfig(lr=0.2, momentum=0.9, weight_decay=1e-3, batch_size=32, epochs=2,
                          lr_schedule=LRSchedule.TRIANGULAR, peak_fraction=0.2),
        ground_truth=GroundTruthConfig(n_seeds=4, n_targets=4, n_queries=8, seeds_per_unit=4), query_pool=200),
    "small": TaskScale(
        n_train=500, model=ResNetConfig(width=8, bn_calibration=256),
        train=TrainConfig(lr=0.4, momentum=0.9, weight_decay=1e-3, batch_size=50, epochs=8,
                          lr_schedule=LRSchedule.TRIANGULAR, peak_fraction=0.2),
        ground_truth=GroundTruthConfig(n_seeds=4, n_targets=8, n_queries=50, seeds_per_unit=1), query_pool=2000),
    "paper": TaskScale(
        n_train=3072, model=ResNetConfig(width=64, bn_calibration=512),
        train=TrainConfig(lr=0.4, momentum=0.9, weight_decay=1e-3, batch_size=512, epochs=25,
                          lr_schedule=LRSchedule.TRIANGULAR, peak_fraction=0.2),
        ground_truth=GroundTruthConfig(n_seeds=50, n_targets=100, n_queries=100, seeds_per_unit=5), query_pool=10000),
}

LDS_SCALES = {
    "smoke": LdsConfig(n_subsets=8, alpha=0.5, n_seeds=4, seeds_per_unit=4),
    "small": LdsConfig(n_subsets=20, alpha=0.5, n_seeds=4, seeds_per_unit=1),
    "paper": LdsConfig(n_subsets=100, alpha=0.5, n_seeds=10, seeds_per_unit=2),
}


_SLOW = "{method} at {where} took {cost} on the 2-core CPU (measured); it is tested on mnist_mlp, and " \
        "influence_ekfac, kronfluence_ekfac and unroll cover this task"
_DATTRI_CG = ("dattri's IFAttributorCG on this ResNet-9 exceeded 24 GB of memory at smoke (killed); dattri_if_datainf, "
              "dattri_tracin and dattri_trak run here")
METHOD_SKIPS = {
    "smoke": {"influence": _SLOW.format(method="exact-GGN CG influence", where="smoke", cost="35-45 s per seed"),
              "lissa": _SLOW.format(method="LiSSA", where="smoke", cost="60 s per seed"),
              "dattri_if_cg": _DATTRI_CG},
    "small": {"influence": _SLOW.format(method="exact-GGN CG influence", where="smoke", cost="35-45 s per seed"),
              "lissa": _SLOW.format(method="LiSSA", where="smoke", cost="60 s per seed"),
              "dattri_if_cg": _DATTRI_CG,
              "further_training": "the further-training method (10 replicates × 9 runs × 4 seeds of one epoch, "
                                  "≈ 3 min here at N = 500; 5.6 min measured at N = 1,000) "
                                  "would take a quarter of small's 25-minute budget; the further-training gold "
                                  "standard still runs (4 replicates, 1 epoch)",
              "unroll": "forward-mode unroll (one tangent per target × 4 seeds × 80 steps through double backward "
                        "of conv and BatchNorm; 6 targets at N = 1,000 had not finished after 7 minutes here, and "
                        "LDS needs all N) is over small's budget; it runs at smoke and on a GPU",
              "source": "SOURCE with per-segment EK-FAC took 80 s per seed here at N = 1,000 (5.3 min for 4 seeds; "
                        "twice that with LDS, and the segment study runs it 4 times more), over small's budget; "
                        "it runs at smoke and on a GPU"},
    "paper": {"dattri_if_cg": _DATTRI_CG},
}


def conv_bn_layers(width: int) -> list[tuple[str, int, int, int, int, int]]:
    """(name, c_in, c_out, kernel, stride, padding) of the eight conv-BN-ReLU blocks, in forward order."""
    c1, c2, c3 = width, 2 * width, 4 * width
    return [("prep", 3, c1, 3, 1, 1), ("down", c1, c2, 5, 2, 2), ("res1a", c2, c2, 3, 1, 1),
            ("res1b", c2, c2, 3, 1, 1), ("mid", c2, c3, 3, 1, 1), ("res2a", c3, c3, 3, 1, 1),
            ("res2b", c3, c3, 3, 1, 1), ("out", c3, c2, 3, 1, 0)]


def batch_stats(a: Tensor, w: Tensor | None) -> tuple[Tensor, Tensor]:
    """Per-channel mean and biased variance of activations a [B, C, H, W], examples weighted by w [B]."""
    if w is None:
        return a.mean((0, 2, 3)), a.var((0, 2, 3), unbiased=False)
    wn = (w / w.sum().clamp(min=1e-12)).view(-1, 1, 1, 1)  # a batch of weight 0 trains nothing (loss weight 0)
    mean = (wn * a.mean((2, 3), keepdim=True)).sum(0).flatten()
    var = (wn * (a - mean.view(1, -1, 1, 1)).pow(2).mean((2, 3), keepdim=True)).sum(0).flatten()
    return mean, var


def resnet9_forward(p: dict[str, Tensor], x: Tensor, width: int, w: Tensor | None = None,
                    stats: list[tuple[Tensor, Tensor]] | None = None,
                    collect: list[tuple[Tensor, Tensor]] | None = None) -> Tensor:
    """Logits [B, 10] of one model for x [B, 3, H, W]. BatchNorm uses ``stats`` (one (μ, σ²) per block) when
    given, else the batch's statistics weighted by w [B] (None: unweighted), appended to ``collect``."""
    layers = {name: (stride, pad) for name, _, _, _, stride, pad in conv_bn_layers(width)}
    block = iter(range(len(layers)))

    def conv_bn(name: str, h: Tensor) -> Tensor:
        stride, pad = layers[name]
        a = F.conv2d(h, p[f"{name}.conv"], stride=stride, padding=pad)
        i = next(block)
        mean, var = stats[i] if stats is not None else batch_stats(a, w)
        if collect is not None:
            collect.append((mean, var))
        a = (a - mean.view(1, -1, 1, 1)) * torch.rsqrt(var.view(1, -1, 1, 1) + BN_EPS)
        return torch.relu(a * p[f"{name}.bn_weight"].view(1, -1, 1, 1) + p[f"{name}.bn_bias"].view(1, -1, 1, 1))

    h = conv_bn("down", conv_bn("prep", x))
    h = h + conv_bn("res1b", conv_bn("res1a", h))
    h = F.max_pool2d(conv_bn("mid", h), 2)
    h = h + conv_bn("res2b", conv_bn("res2a", h))
    h = F.adaptive_max_pool2d(conv_bn("out", h), 1).flatten(1)
    return 0.2 * (h @ p["fc.weight"].t())


class CalibratedBatchNorm2d(nn.Module):
    """Evaluation-mode BatchNorm with the statistics in buffers ``mean``, ``var`` (set by ``CifarResnet.module``)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))
        self.register_buffer("mean", torch.zeros(channels))
        self.register_buffer("var", torch.ones(channels))

    def forward(self, a: Tensor) -> Tensor:
        a = (a - self.mean.view(1, -1, 1, 1)) * torch.rsqrt(self.var.view(1, -1, 1, 1) + BN_EPS)
        return a * self.weight.view(1, -1, 1, 1) + self.bias.view(1, -1, 1, 1)


class ResNet9(nn.Module):
    """``resnet9_forward`` in evaluation mode as an ``nn.Module`` (Conv2d / Linear for hook-based curvature);
    parameters in ``CifarResnet.param_shapes`` order."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.blocks = nn.ModuleDict()
        for name, c_in, c_out, k, stride, pad in conv_bn_layers(width):
            self.blocks[name] = nn.Sequential(nn.Conv2d(c_in, c_out, k, stride, pad, bias=False),
                                              CalibratedBatchNorm2d(c_out), nn.ReLU())
        self.fc = nn.Linear(2 * width, 10, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        b = self.blocks
        h = b["down"](b["prep"](x))
        h = h + b["res1b"](b["res1a"](h))
        h = F.max_pool2d(b["mid"](h), 2)
        h = h + b["res2b"](b["res2a"](h))
        return 0.2 * self.fc(F.adaptive_max_pool2d(b["out"](h), 1).flatten(1))


def mix(a: Tensor, b: Tensor | int) -> Tensor:
    """A counter-based hash step on int64 values in [0, 2³¹−1): MINSTD after an xor (no overflow)."""
    for _ in range(2):
        a = ((a ^ b) * 48271 + 11) % HASH_MODULUS
    return a


@register_task("cifar_resnet")
class CifarResnet(Task):
    """ResNet-9 on a CIFAR-10 pool, trained with augmentation and (w-weighted) BatchNorm."""

    scales = SCALES
    lds_scales = LDS_SCALES
    augments = True
    method_skips = METHOD_SKIPS
    # every skip but dattri_if_cg's (memory) is this CPU's cost: on a GPU they run (the H100 smoke run ran them)
    cpu_cost_skips = frozenset({"influence", "lissa", "further_training", "unroll", "source"})
    # small: 4 seeds × 4 replicates × 1 epoch × 9 runs ≈ 1 min here (the defaults, 8 × 20 × 3, ≈ 20 min)
    gold_overrides = {"small": {"n_repeats": 4, "epochs": 1, "max_seeds": 4}}
    mechanism_study = False
    mechanism_skip_reason = ("the mechanism study's exact data GGN (benchmark.mechanism.DataGgn) is built for "
                             "all-Linear models; ResNet-9's convolutions and BatchNorm are not covered")

    @property
    def resnet(self) -> ResNetConfig:
        if not isinstance(self.scale.model, ResNetConfig):
            raise TypeError(f"cifar_resnet needs a ResNetConfig model, got {type(self.scale.model).__name__}")
        return self.scale.model

    # ---------------------------------------------------------------- data
    @cached_property
    def _arrays(self) -> dict[str, np.ndarray]:
        return load_cifar10()

    def load_data(self) -> TaskData:
        return cifar.task_data(self._arrays, self.scale.n_train, self.scale.query_pool, self.scale.data_seed)

    @cached_property
    def _calibration_cpu(self) -> Tensor:
        x, _, _ = cifar.held_out(self._arrays, self.resnet.bn_calibration, "cifar_bn_calibration",
                                 self.scale.n_train, self.scale.data_seed)
        return x

    def calibration_images(self, like: Tensor) -> Tensor:
        """The BatchNorm calibration images [C, 3, H, W] on ``like``'s device and dtype (cached)."""
        cache = self.__dict__.setdefault("_calibration_cache", {})
        key = (like.device, like.dtype)
        if key not in cache:
            cache[key] = self._calibration_cpu.to(like.device, like.dtype)
        return cache[key]

    # ---------------------------------------------------------------- parameters
    def param_shapes(self) -> list[tuple[str, tuple[int, ...]]]:
        shapes: list[tuple[str, tuple[int, ...]]] = []
        for name, c_in, c_out, k, _, _ in conv_bn_layers(self.resnet.width):
            shapes += [(f"{name}.conv", (c_out, c_in, k, k)), (f"{name}.bn_weight", (c_out,)),
                       (f"{name}.bn_bias", (c_out,))]
        return [*shapes, ("fc.weight", (10, 2 * self.resnet.width))]

    def init_params(self, gen: torch.Generator, dtype: torch.dtype) -> Tensor:
        """PyTorch's defaults: Kaiming-uniform convolutions and linear (bound 1/√fan_in), γ = 1, β = 0."""
        parts = []
        for name, shape in self.param_shapes():
            if name.endswith("bn_weight"):
                parts.append(torch.ones(shape, dtype=torch.float64))
            elif name.endswith("bn_bias"):
                parts.append(torch.zeros(shape, dtype=torch.float64))
            else:
                fan_in = int(np.prod(shape[1:]))
                bound = 1.0 / fan_in**0.5
                parts.append((torch.rand(shape, generator=gen, dtype=torch.float64) * 2 - 1) * bound)
        return torch.cat([t.flatten() for t in parts]).to(dtype)

    def build_module(self) -> nn.Module:
        return ResNet9(self.resnet.width)

    def module(self, theta: Tensor) -> nn.Module:
        """``ResNet9`` at θ [P] with its BatchNorm buffers set to the calibration statistics at θ."""
        mod = super().module(theta)
        stats: list[tuple[Tensor, Tensor]] = []
        with torch.no_grad():
            resnet9_forward(self.unflatten(theta.detach()), self.calibration_images(theta), self.resnet.width,
                            collect=stats)
        for block, (mean, var) in zip(mod.blocks.values(), stats):
            block[1].mean.copy_(mean)
            block[1].var.copy_(var)
        return mod.eval()

    # ---------------------------------------------------------------- forward
    def _eval_logits(self, p: dict[str, Tensor], x: Tensor) -> Tensor:
        stats: list[tuple[Tensor, Tensor]] = []
        detached = {k: v.detach() for k, v in p.items()}
        resnet9_forward(detached, self.calibration_images(x), self.resnet.width, collect=stats)
        return resnet9_forward(p, x, self.resnet.width, stats=[(m.detach(), v.detach()) for m, v in stats])

    def logits_batched(self, theta: Tensor, x: Tensor) -> Tensor:
        """Evaluation-mode logits [n, B, 10] for θ [n, P] and images x [n, B, 3, H, W] (calibration statistics)."""
        return vmap(self._eval_logits)(self.unflatten(theta), x)

    def logits_grouped(self, params: dict[str, Tensor], x: Tensor, weight: Tensor | None = None) -> Tensor:
        """Training-mode logits [n, B, 10]: models g·m … g·m+m−1 share x[g] [G, B, 3, H, W]; BatchNorm statistics
        weighted by each model's slot weights ``weight`` [n, B]."""
        n = next(iter(params.values())).shape[0]
        xs = x.repeat_interleave(n // x.shape[0], dim=0)
        w = torch.ones(xs.shape[:2], dtype=xs.dtype, device=xs.device) if weight is None else weight.to(xs.dtype)
        return vmap(lambda p, xi, wi: resnet9_forward(p, xi, self.resnet.width, w=wi))(params, xs, w)

    def batch_loss(self, theta: Tensor, x: Tensor, y: Tensor, w: Tensor, denom: Tensor) -> Tensor:
        """(1/B_t)·Σ_i w_i·ℓ_i with training-mode BatchNorm weighted by w (what the engine minimises)."""
        logits = resnet9_forward(self.unflatten(theta), x, self.resnet.width, w=w)
        return (cross_entropy(logits, y) * w).sum() / denom

    # ---------------------------------------------------------------- augmentation
    def augment(self, x: Tensor, idx: Tensor, order: Tensor, epoch: int) -> Tensor:
        """Random crop (offsets in {0…2·pad} after black padding) and horizontal flip of x [G, B, 3, H, W], each
        drawn from hash(order seed [G], pool index idx [G, B], epoch)."""
        cfg = self.resnet
        if not cfg.augment:
            return x
        g, b, c, h, wd = x.shape
        pad = cfg.crop_pad
        key = mix(mix((order % HASH_MODULUS).view(-1, 1).expand(g, b), idx), epoch)  # [G, B]
        dx, dy, flip = (mix(key, 1) % (2 * pad + 1)), (mix(key, 2) % (2 * pad + 1)), (mix(key, 3) % 2).bool()
        fill = cifar.black().to(x.device, x.dtype)
        xp = F.pad(x.reshape(g * b, c, h, wd) - fill, (pad, pad, pad, pad)) + fill  # [GB, C, H+2p, W+2p]
        ar_h = torch.arange(h, device=x.device)
        ar_w = torch.arange(wd, device=x.device)
        rows = (dy.reshape(-1, 1) + ar_h).view(g * b, 1, h, 1).expand(-1, c, -1, wd + 2 * pad)
        cols = torch.where(flip.reshape(-1, 1), dx.reshape(-1, 1) + wd - 1 - ar_w, dx.reshape(-1, 1) + ar_w)
        out = xp.gather(2, rows).gather(3, cols.view(g * b, 1, 1, wd).expand(-1, c, h, -1))
        return out.view(g, b, c, h, wd)
