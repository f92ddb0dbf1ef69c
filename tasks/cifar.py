"""CIFAR-10 task data shared by the CIFAR tasks: the training pool, the test queries and held-out parts of the
official training set, each drawn by *official index* (``benchmark.data.select_official``), so any copy of the
data set that holds the images selects the same ones.

- pool: N images, seeded by ``("cifar_pool", data_seed)``;
- test: the first ``query_pool`` selectable images of a fixed permutation of the official test set;
- held-out: n images of the official training set outside the pool, seeded by ``(name, data_seed)``
  (``cifar_val``: the pruning experiment's validation set; ``cifar_bn_calibration``: ResNet-9's
  evaluation-mode BatchNorm statistics).
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from benchmark.config import derive_seed
from benchmark.data import (
    CIFAR10_MEAN,
    CIFAR10_OFFICIAL_SIZES,
    CIFAR10_STD,
    CIFAR10_UNAVAILABLE_TEST,
    CIFAR10_UNAVAILABLE_TRAIN,
    select_official,
)
from tasks.base import TaskData


def pool_positions(arrays: dict[str, np.ndarray], n_train: int, data_seed: int) -> np.ndarray:
    """Positions (into ``arrays``) of the N pool images."""
    return select_official(arrays["idx_train"], n_train, derive_seed("cifar_pool", data_seed) % 2**32,
                           CIFAR10_OFFICIAL_SIZES[0], CIFAR10_UNAVAILABLE_TRAIN)


def task_data(arrays: dict[str, np.ndarray], n_train: int, query_pool: int, data_seed: int) -> TaskData:
    """Training pool (by official index) and the first ``query_pool`` selectable official test images."""
    pool = pool_positions(arrays, n_train, data_seed)
    n_test = min(query_pool, CIFAR10_OFFICIAL_SIZES[1] - len(CIFAR10_UNAVAILABLE_TEST))
    test = select_official(arrays["idx_test"], n_test, derive_seed("cifar_test", 0) % 2**32,
                           CIFAR10_OFFICIAL_SIZES[1], CIFAR10_UNAVAILABLE_TEST)
    return TaskData(x_train=preprocess(arrays["x_train"][pool]), y_train=labels(arrays["y_train"][pool]),
                    x_test=preprocess(arrays["x_test"][test]), y_test=labels(arrays["y_test"][test]),
                    train_index=torch.as_tensor(arrays["idx_train"][pool].astype(np.int64)))


def held_out(arrays: dict[str, np.ndarray], n: int, name: str, n_train: int, data_seed: int
             ) -> tuple[Tensor, Tensor, Tensor]:
    """x [n, 3, H, W], y [n], official indices [n]: n official training images disjoint from the pool (drawn
    after it, excluding it) and hence from the test set."""
    pool_official = arrays["idx_train"][pool_positions(arrays, n_train, data_seed)]
    pos = select_official(arrays["idx_train"], n, derive_seed(name, data_seed) % 2**32, CIFAR10_OFFICIAL_SIZES[0],
                          CIFAR10_UNAVAILABLE_TRAIN, exclude=pool_official)
    return (preprocess(arrays["x_train"][pos]), labels(arrays["y_train"][pos]),
            torch.as_tensor(arrays["idx_train"][pos].astype(np.int64)))


def preprocess(images: np.ndarray) -> Tensor:
    """uint8 [n, H, W, 3] → float32 [n, 3, H, W], standardised per channel (CIFAR-10 mean and std)."""
    x = torch.as_tensor(images, dtype=torch.float32).div_(255.0).permute(0, 3, 1, 2)
    mean = torch.tensor(CIFAR10_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(CIFAR10_STD).view(1, 3, 1, 1)
    return ((x - mean) / std).contiguous()


def labels(y: np.ndarray) -> Tensor:
    return torch.as_tensor(y.astype(np.int64))


def black() -> Tensor:
    """A black pixel after standardisation, [3, 1, 1] (the fill of a padded crop)."""
    return (-torch.tensor(CIFAR10_MEAN) / torch.tensor(CIFAR10_STD)).view(3, 1, 1)
