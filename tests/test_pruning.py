"""CIFAR-10 loading by official index, the ViT task's model, and the pruning experiment's arms and statistics."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
from scipy import stats

from benchmark.config import Coupling, OptionError, PruningConfig, VitConfig
from benchmark.data import (
    CIFAR10_OFFICIAL_SIZES,
    CIFAR10_UNAVAILABLE_TEST,
    CIFAR10_UNAVAILABLE_TRAIN,
    load_cifar10,
    select_official,
)
from benchmark.engine import build_schedule
from benchmark.pruning import _expand_full_and_choose_c, arm_removals, n_removed, paired, summarise
from tasks.vit_pruning import VitPruning


@pytest.fixture(scope="module")
def cifar() -> dict[str, np.ndarray]:
    return load_cifar10()


def test_cifar_arrays(cifar: dict[str, np.ndarray]) -> None:
    assert cifar["x_train"].shape[1:] == (32, 32, 3) and cifar["x_train"].dtype == np.uint8
    assert cifar["x_test"].shape[1:] == (32, 32, 3)
    assert len(cifar["y_train"]) == len(cifar["x_train"]) == len(cifar["idx_train"])
    for split in ("train", "test"):
        y = cifar[f"y_{split}"]
        assert y.min() == 0 and y.max() == 9
        assert (np.diff(cifar[f"idx_{split}"]) > 0).all()  # stored in the official order
    missing_train = set(range(CIFAR10_OFFICIAL_SIZES[0])) - set(cifar["idx_train"].tolist())
    assert missing_train <= set(CIFAR10_UNAVAILABLE_TRAIN)  # a full copy misses none
    assert set(range(CIFAR10_OFFICIAL_SIZES[1])) - set(cifar["idx_test"].tolist()) <= set(CIFAR10_UNAVAILABLE_TEST)


def test_selection_by_official_index_matches_a_full_copy(cifar: dict[str, np.ndarray]) -> None:
    shared = select_official(cifar["idx_train"], 2000, 7, 50000, CIFAR10_UNAVAILABLE_TRAIN)
    full_copy = select_official(np.arange(50000), 2000, 7, 50000, CIFAR10_UNAVAILABLE_TRAIN)
    assert np.array_equal(cifar["idx_train"][shared], full_copy)  # the same official images from either copy
    assert not set(full_copy.tolist()) & set(CIFAR10_UNAVAILABLE_TRAIN)
    assert np.array_equal(shared, select_official(cifar["idx_train"], 2000, 7, 50000, CIFAR10_UNAVAILABLE_TRAIN))
    assert not np.array_equal(shared, select_official(cifar["idx_train"], 2000, 8, 50000, CIFAR10_UNAVAILABLE_TRAIN))
    excluded = select_official(np.arange(50000), 500, 9, 50000, CIFAR10_UNAVAILABLE_TRAIN, exclude=full_copy)
    assert not set(excluded.tolist()) & set(full_copy.tolist())
    with pytest.raises(ValueError, match="not in this copy"):  # negative control: skipping nothing hits a gap
        select_official(cifar["idx_train"], 49000, 7, 50000, ())


def test_vit_task_data_and_model() -> None:
    task = VitPruning(VitPruning.scales["smoke"])
    data = task.load_data()
    assert data.x_train.shape == (128, 3, 32, 32) and data.y_train.max() <= 9
    x_val, y_val, val_index = task.load_validation(50)
    assert x_val.shape == (50, 3, 32, 32)
    assert not set(val_index.tolist()) & set(data.train_index.tolist())  # validation ∩ pool = ∅
    theta = task.init_params(torch.Generator().manual_seed(0), torch.float32)
    assert theta.shape == (task.n_params,)
    assert torch.equal(theta, task.init_params(torch.Generator().manual_seed(0), torch.float32))
    thetas = torch.stack([theta, task.init_params(torch.Generator().manual_seed(1), torch.float32)])
    thetas.requires_grad_(True)
    logits = task.logits_batched(thetas, data.x_train[:6].expand(2, 6, 3, 32, 32))
    assert logits.shape == (2, 6, 10)
    (grad,) = torch.autograd.grad(logits.square().sum(), thetas)
    assert torch.isfinite(grad).all() and grad[0].abs().sum() > 0
    # the nn.Module form (K-FAC, peers) computes the same function of the same θ layout
    with torch.no_grad():
        assert torch.allclose(task.module(theta)(data.x_train[:6]), logits[0], atol=1e-5)


def test_vit_config_validation() -> None:
    with pytest.raises(OptionError, match="patch=5 must divide image_size=32"):
        VitConfig(patch=5)
    with pytest.raises(OptionError, match="fractions must lie in"):
        PruningConfig(fractions=(0.0,))
    with pytest.raises(OptionError, match="c_grid"):
        PruningConfig(c_grid=(-1.0,))


def test_arms_remove_exactly_the_intended_examples() -> None:
    rng = np.random.default_rng(0)
    seeds, n_train, fraction = [0, 1, 2], 40, 0.1
    scores = rng.standard_normal((3, n_train))
    n = n_removed(fraction, n_train)
    assert n == 4
    assert all(len(r) == 0 for r in arm_removals("full", scores, fraction, seeds, "t"))
    fixed = arm_removals("fixed_seed", scores, fraction, seeds, "t")
    for i in range(3):
        assert set(fixed[i]) == set(np.argsort(scores[i])[:n])
        assert scores[i][fixed[i]].max() < np.delete(scores[i], fixed[i]).min()  # the n most negative
    dist = arm_removals("distributional", scores, fraction, seeds, "t")
    assert all(np.array_equal(d, dist[0]) for d in dist)
    assert set(dist[0]) == set(np.argsort(scores.mean(0))[:n])
    var = arm_removals("distributional_var", scores, fraction, seeds, "t", c=1.0)
    assert set(var[0]) == set(np.argsort(scores.mean(0) + scores.std(0, ddof=1))[:n])
    rand = arm_removals("random", scores, fraction, seeds, "t")
    assert all(len(set(r)) == n for r in rand) and not np.array_equal(rand[0], rand[1])
    assert all(np.array_equal(a, b) for a, b in zip(rand, arm_removals("random", scores, fraction, seeds, "t")))
    # negative control: reversed scores remove other examples
    assert set(arm_removals("distributional", -scores, fraction, seeds, "t")[0]) != set(dist[0])
    with pytest.raises(ValueError, match="arm must be one of"):
        arm_removals("best", scores, fraction, seeds, "t")


def test_pruned_schedule_rebatches_without_the_removed_examples() -> None:
    from benchmark.config import TrainConfig

    cfg = TrainConfig(batch_size=8, epochs=2)
    removed = torch.tensor([3, 7, 11, 19])
    sched = build_schedule("t", 40, cfg, 0, removed, Coupling.DELETED)
    per_epoch = 5
    for e in range(2):
        rows = slice(e * per_epoch, (e + 1) * per_epoch)
        used = sched.idx[rows][sched.weight[rows] > 0]
        assert sorted(used.tolist()) == sorted(set(range(40)) - set(removed.tolist()))  # each kept once
    assert sched.denom[:per_epoch].tolist() == [8, 8, 8, 8, 4]  # re-batched: the last batch is short


def test_paired_difference_and_mde() -> None:
    a, b = np.array([1.0, 2.0, 3.0, 4.0]), np.array([0.5, 1.0, 2.5, 3.0])
    p = paired(a, b)
    d = a - b
    half = stats.t.ppf(0.975, 3) * d.std(ddof=1) / 2
    assert p["mean"] == pytest.approx(d.mean()) and p["ci_low"] == pytest.approx(d.mean() - half)
    assert p["mde"] == pytest.approx((stats.t.ppf(0.975, 3) + stats.t.ppf(0.8, 3)) * d.std(ddof=1) / 2)


def test_c_is_chosen_on_validation_loss_and_summary_pairs_by_seed() -> None:
    cfg = PruningConfig(n_seeds=3, c_grid=(0.5, 1.0))
    rows = []
    for arm, c, val, acc in (("full", np.nan, 1.0, 0.5), ("fixed_seed", np.nan, 0.9, 0.55),
                             ("distributional", np.nan, 0.8, 0.6), ("distributional_var", 0.5, 0.7, 0.4),
                             ("distributional_var", 1.0, 0.95, 0.9)):
        for s in range(3):
            rows.append({"fraction": np.nan if arm == "full" else 0.1, "arm": arm, "c": c, "seed": s,
                         "test_acc": acc + 0.01 * s, "test_loss": 1 - acc, "val_loss": val, "removed": ()})
    per_seed = _expand_full_and_choose_c(pd.DataFrame(rows), cfg)
    chosen = per_seed[(per_seed.arm == "distributional_var") & per_seed.reported]
    assert set(chosen["c"]) == {0.5}  # lowest validation loss, although c = 1 has the better test accuracy
    summary = summarise(per_seed)
    dist = summary[(summary.arm == "distributional") & (summary.metric == "test_acc")].iloc[0]
    assert dist["diff_vs_fixed_seed"] == pytest.approx(0.05) and dist["diff_vs_full"] == pytest.approx(0.1)


def test_mean_validation_loss_as_one_query_equals_the_mean_of_per_query_predictions() -> None:
    """Scoring the mean validation loss as one query (``MeanLossTask``) = the mean of V per-query predictions."""
    import methods  # noqa: F401
    from benchmark.engine import initial_params
    from benchmark.pruning import MeanLossTask
    from benchmark.registry import METHODS
    from methods.base import RemovalContext
    from tasks.base import TaskData

    task = VitPruning(VitPruning.scales["smoke"])
    data = task.load_data()
    x_val, y_val, _ = task.load_validation(12)
    theta = initial_params(task, [0], torch.float64, "cpu")
    data64 = TaskData(data.x_train.double(), data.y_train, x_val.double(), y_val, data.train_index)
    common = {"scale": task.scale, "theta_full": theta, "seeds": [0], "targets": torch.arange(40),
              "coupling": Coupling.DELETED}
    per_query = METHODS.get("grad_dot")().predict(RemovalContext(task=task, data=data64, queries=torch.arange(12),
                                                                 **common))
    one = METHODS.get("grad_dot")().predict(RemovalContext(
        task=MeanLossTask(task), queries=torch.zeros(1, dtype=torch.long), **common,  # type: ignore[arg-type]
        data=TaskData(data64.x_train, data64.y_train, data64.x_test.unsqueeze(0), y_val.unsqueeze(0),
                      data.train_index)))
    assert one.shape == (1, 40, 1, 1)
    torch.testing.assert_close(one[:, :, 0, 0], per_query[..., 0].mean(2), rtol=1e-9, atol=1e-12)
    assert not torch.allclose(one[:, :, 0, 0], per_query[..., 0, 0], rtol=1e-3)  # negative control: one query
