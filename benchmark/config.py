"""Frozen configuration dataclasses, option enums and derived seeds.

Every option that a user can set is an enum converted once in ``__post_init__`` so a bad value
fails at construction with the allowed values named (STYLE.md §5).
"""

from __future__ import annotations

import enum
import hashlib
import math
from dataclasses import dataclass, field, fields, replace
from typing import Any

CACHE_VERSION = 3  # bump when the stored format, the key layout or the maths of a cached unit changes
# 3: ground-truth and gold unit keys carry the torch thread count and model-batch size (bit-identity promise)


class OptionError(ValueError):
    """A configuration value outside its allowed set; the message names option and choices."""


def parse_enum(enum_cls: type[enum.Enum], value: Any, option: str) -> Any:
    """Convert ``value`` to ``enum_cls`` or raise an :class:`OptionError` naming the choices."""
    if isinstance(value, enum_cls):
        return value
    try:
        return enum_cls(value)
    except ValueError:
        allowed = ", ".join(str(m.value) for m in enum_cls)
        raise OptionError(f"{option} must be one of: {allowed}; got {value!r}") from None


class Coupling(str, enum.Enum):
    """How a removal run is coupled to the full-data run of the same seed.

    MASKED: same seed, same batches, w_k = 0 (the perturbation unrolled differentiation differentiates).
    DELETED: same seed, same permutation with k deleted, so later batch boundaries shift
        (Wei et al. 2024's ``RandomSamplerLOO``).
    INDEPENDENT: fresh init and batch order for every removal run (k deleted from its own permutation).
    """

    MASKED = "masked"
    DELETED = "deleted"
    INDEPENDENT = "independent"


class Scale(str, enum.Enum):
    SMOKE = "smoke"
    SMALL = "small"
    PAPER = "paper"


class LRSchedule(str, enum.Enum):
    """Learning-rate schedules, indexed by the full-data run's global step t ∈ [0, T)."""

    CONSTANT = "constant"
    LINEAR = "linear"  # η_t = η·(1 − t/T)
    TRIANGULAR = "triangular"  # 0 → η at peak_fraction·T → 0


@dataclass(frozen=True)
class TrainConfig:
    """SGD with heavy-ball momentum and coupled weight decay (torch.optim.SGD semantics):

        g_t = (1/B)·Σ_{i∈B_t} w_i·∇ℓ_i(θ_t) + wd·θ_t;  v_{t+1} = β·v_t + g_t;  θ_{t+1} = θ_t − η_t·v_{t+1}

    B is the number of slots of the batch (a masked example keeps its slot with w = 0).
    """

    lr: float = 0.1
    momentum: float = 0.0  # β
    weight_decay: float = 1e-4  # wd; the trained objective is (1/N)Σℓ_n + (wd/2)‖θ‖²
    batch_size: int = 50  # B
    epochs: int = 5
    lr_schedule: LRSchedule = LRSchedule.CONSTANT
    peak_fraction: float = 0.2  # triangular only

    def __post_init__(self) -> None:
        object.__setattr__(self, "lr_schedule", parse_enum(LRSchedule, self.lr_schedule, "lr_schedule"))
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise OptionError(f"TrainConfig.lr must be finite and > 0, got {self.lr}")
        if not 0 <= self.momentum < 1:
            raise OptionError(f"TrainConfig.momentum must be in [0, 1), got {self.momentum}")
        if not (math.isfinite(self.weight_decay) and self.weight_decay >= 0):
            raise OptionError(f"TrainConfig.weight_decay must be finite and >= 0, got {self.weight_decay}")
        if self.batch_size < 1 or self.epochs < 1:
            raise OptionError("TrainConfig.batch_size and epochs must be >= 1")
        if not 0 < self.peak_fraction < 1:
            raise OptionError(f"TrainConfig.peak_fraction must be in (0, 1), got {self.peak_fraction}")


@dataclass(frozen=True)
class GroundTruthConfig:
    """What the ground truth samples: S seeds × (full + K removals), measured on Q queries."""

    n_seeds: int = 16  # S
    n_targets: int = 16  # K
    n_queries: int = 16  # Q
    coupling: Coupling = Coupling.MASKED
    first_seed: int = 0
    selection_seed: int = 0  # draws targets and queries
    seeds_per_unit: int = 8  # seeds per cached work unit

    def __post_init__(self) -> None:
        object.__setattr__(self, "coupling", parse_enum(Coupling, self.coupling, "coupling"))
        for name in ("n_seeds", "n_targets", "n_queries", "seeds_per_unit"):
            if getattr(self, name) < 1:
                raise OptionError(f"GroundTruthConfig.{name} must be >= 1, got {getattr(self, name)}")
        if self.n_seeds < 4:
            raise OptionError(f"GroundTruthConfig.n_seeds must be >= 4 (cross-fitting), got {self.n_seeds}")
        if self.first_seed < 0:
            raise OptionError(f"GroundTruthConfig.first_seed must be >= 0, got {self.first_seed}")

    @property
    def seeds(self) -> list[int]:
        return list(range(self.first_seed, self.first_seed + self.n_seeds))


@dataclass(frozen=True)
class LdsConfig:
    """Group-removal ground truth for the linear datamodelling score (LDS; Park et al. 2023, SOURCE §5,
    d-TDA eq. 11): M random subsets D′_j keeping a fraction α of the training set, each trained with the
    same R seeds as R full-data runs (coupling as in :class:`Coupling`; masked: the subset is a 0/1 weight
    vector on the seed's own batches)."""

    n_subsets: int = 100  # M
    alpha: float = 0.5  # fraction of the training set each subset keeps
    n_seeds: int = 8  # R
    coupling: Coupling = Coupling.MASKED
    first_seed: int = 0
    subset_seed: int = 0  # draws the subsets
    seeds_per_unit: int = 4  # seeds per cached work unit

    def __post_init__(self) -> None:
        object.__setattr__(self, "coupling", parse_enum(Coupling, self.coupling, "LdsConfig.coupling"))
        if self.n_subsets < 3:
            raise OptionError(f"LdsConfig.n_subsets must be >= 3 (a Spearman over subsets), got {self.n_subsets}")
        if not 0 < self.alpha < 1:
            raise OptionError(f"LdsConfig.alpha must lie in (0, 1), got {self.alpha}")
        if self.n_seeds < 4:
            raise OptionError(f"LdsConfig.n_seeds must be >= 4 (cross-fitting needs two halves of >= 2), "
                              f"got {self.n_seeds}")
        if self.first_seed < 0 or self.subset_seed < 0:
            raise OptionError("LdsConfig.first_seed and subset_seed must be >= 0")
        if self.seeds_per_unit < 1:
            raise OptionError(f"LdsConfig.seeds_per_unit must be >= 1, got {self.seeds_per_unit}")

    @property
    def seeds(self) -> list[int]:
        return list(range(self.first_seed, self.first_seed + self.n_seeds))


@dataclass(frozen=True)
class ModelConfig:
    """An MLP: input → hidden… → classes, with an activation and optional input pooling."""

    hidden: tuple[int, ...] = (64,)
    activation: str = "relu"
    input_pool: int = 1  # average-pool the 28×28 image by this factor before flattening

    def __post_init__(self) -> None:
        if self.activation not in ("relu", "tanh", "gelu"):
            raise OptionError(f"ModelConfig.activation must be one of: relu, tanh, gelu; got {self.activation!r}")


@dataclass(frozen=True)
class VitConfig:
    """A timm ``VisionTransformer`` (class token, learned position embedding, pre-norm blocks), no pretrained
    weights: ``image_size`` / ``patch`` tokens of width ``embed_dim``, ``depth`` blocks of ``heads`` heads."""

    image_size: int = 32
    patch: int = 4
    embed_dim: int = 96
    depth: int = 4
    heads: int = 3
    mlp_ratio: float = 2.0

    def __post_init__(self) -> None:
        if self.image_size % self.patch:
            raise OptionError(f"VitConfig.patch={self.patch} must divide image_size={self.image_size}")
        if self.embed_dim % self.heads:
            raise OptionError(f"VitConfig.heads={self.heads} must divide embed_dim={self.embed_dim}")
        if min(self.depth, self.heads, self.patch, self.embed_dim) < 1 or not self.mlp_ratio > 0:
            raise OptionError("VitConfig: depth, heads, patch and embed_dim must be >= 1 and mlp_ratio > 0")


@dataclass(frozen=True)
class ResNetConfig:
    """ResNet-9 as in TRAK and kronfluence (conv-BN-ReLU blocks 64 → 128 (k5, s2) → residual(128) → 256 →
    max-pool → residual(256) → 128 → adaptive max-pool → linear, logits × 0.2) with channels scaled by
    ``width / 64``. Training-mode BatchNorm uses the batch's w-weighted statistics; evaluation-mode
    BatchNorm uses the statistics, at θ, of ``bn_calibration`` fixed training images disjoint from the pool.
    Augmentation: random crop after ``crop_pad`` pixels of black padding, and a horizontal flip."""

    width: int = 64
    bn_calibration: int = 256
    crop_pad: int = 4
    augment: bool = True

    def __post_init__(self) -> None:
        if self.width < 1 or self.bn_calibration < 2 or self.crop_pad < 0:
            raise OptionError(f"ResNetConfig: width >= 1, bn_calibration >= 2 and crop_pad >= 0 required; got "
                              f"{self.width}, {self.bn_calibration}, {self.crop_pad}")


@dataclass(frozen=True)
class PruningConfig:
    """The data-pruning experiment (d-TDA Fig. 6): S seeds trained on the pool, each example scored by the
    predicted change of the validation loss on its removal (``scorer``, a registered method), the arms
    retrained on the pruned set with the same S seeds. ``c_grid``: the risk-averse arm's candidates for c in
    ``mean + c·std`` (chosen on the validation loss)."""

    n_seeds: int = 8  # S
    fractions: tuple[float, ...] = (0.1,)
    n_val: int = 500
    c_grid: tuple[float, ...] = (0.5, 1.0)
    scorer: str = "influence_ekfac"
    first_seed: int = 0

    def __post_init__(self) -> None:
        object.__setattr__(self, "fractions", tuple(float(f) for f in self.fractions))
        object.__setattr__(self, "c_grid", tuple(float(c) for c in self.c_grid))
        if self.n_seeds < 2:
            raise OptionError(f"PruningConfig.n_seeds must be >= 2 (paired differences), got {self.n_seeds}")
        if not self.fractions or any(not 0 < f < 1 for f in self.fractions):
            raise OptionError(f"PruningConfig.fractions must lie in (0, 1), got {self.fractions}")
        if len(set(self.fractions)) != len(self.fractions):
            raise OptionError(f"PruningConfig.fractions lists a fraction twice: {self.fractions}")
        if self.n_val < 1 or self.first_seed < 0:
            raise OptionError("PruningConfig.n_val must be >= 1 and first_seed >= 0")
        if not self.c_grid or any(not (math.isfinite(c) and c > 0) for c in self.c_grid):
            raise OptionError(f"PruningConfig.c_grid must be finite values > 0, got {self.c_grid}")

    @property
    def seeds(self) -> list[int]:
        return list(range(self.first_seed, self.first_seed + self.n_seeds))


@dataclass(frozen=True)
class TaskScale:
    """Everything a scale of a task fixes: data sizes, model, training and ground truth."""

    n_train: int  # N
    model: ModelConfig | VitConfig | ResNetConfig
    train: TrainConfig
    ground_truth: GroundTruthConfig
    query_pool: int = 1000  # queries are drawn from the first `query_pool` test examples
    data_seed: int = 0  # draws the training subset

    def with_overrides(self, **kw: Any) -> TaskScale:
        gt_names = {f.name for f in fields(GroundTruthConfig)}
        gt_kw = {k: v for k, v in kw.items() if k in gt_names}
        rest = {k: v for k, v in kw.items() if k not in gt_names}
        return replace(self, ground_truth=replace(self.ground_truth, **gt_kw), **rest)


def derive_seed(*parts: object) -> int:
    """A 63-bit seed derived from a tuple of names and numbers (DomainBed's ``seed_hash``)."""
    digest = hashlib.sha256(repr(parts).encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def generator(*parts: object, device: str = "cpu") -> Any:
    import torch

    return torch.Generator(device=device).manual_seed(derive_seed(*parts))


__all__ = [
    "CACHE_VERSION",
    "Coupling",
    "GroundTruthConfig",
    "LRSchedule",
    "LdsConfig",
    "ModelConfig",
    "OptionError",
    "PruningConfig",
    "Scale",
    "TaskScale",
    "TrainConfig",
    "VitConfig",
    "derive_seed",
    "field",
    "generator",
    "parse_enum",
]
