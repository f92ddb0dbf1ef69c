"""Group removal (LDS): subsets, group schedules, additivity, and the scores' oracle / reference behaviour."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from benchmark.config import Coupling, LdsConfig, OptionError
from benchmark.engine import build_schedule, train_models
from benchmark.harness import RunOptions, reference_delta, score_rows
from benchmark.lds import build_lds_ground_truth, draw_subsets, group_predictions, lds_metric_name
from benchmark.store import UnitStore
from methods.base import RemovalContext
from methods.unroll import Unroll
from tests.conftest import UNROLL_FD_RTOL, make_task, tiny_scale


def test_subsets_reproducible_from_the_seed() -> None:
    cfg = LdsConfig(n_subsets=12, alpha=0.3, n_seeds=4)
    a, b = draw_subsets(100, cfg, "mnist_mlp"), draw_subsets(100, cfg, "mnist_mlp")
    assert np.array_equal(a, b) and a.shape == (12, 100) and (a.sum(1) == 30).all()
    other = draw_subsets(100, dataclasses.replace(cfg, subset_seed=1), "mnist_mlp")
    assert not np.array_equal(a, other)
    assert len({row.tobytes() for row in a}) == 12  # distinct subsets


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"alpha": 1.0}, "alpha must lie in (0, 1)"),
    ({"alpha": 0.0}, "alpha must lie in (0, 1)"),
    ({"n_subsets": 2}, "n_subsets must be >= 3"),
    ({"n_seeds": 3}, "n_seeds must be >= 4"),
    ({"coupling": "paired"}, "LdsConfig.coupling must be one of: masked, deleted, independent"),
])
def test_bad_lds_config(kwargs: dict, message: str) -> None:
    with pytest.raises(OptionError, match=message.replace("(", r"\(").replace(")", r"\)")):
        LdsConfig(**kwargs)


def test_group_schedules() -> None:
    scale = tiny_scale(n_train=40, batch=8, epochs=2)
    gone = torch.tensor([3, 7, 11, 30])
    full = build_schedule("t", 40, scale.train, 5, None, Coupling.MASKED)
    masked = build_schedule("t", 40, scale.train, 5, gone, Coupling.MASKED)
    assert torch.equal(masked.idx, full.idx) and torch.equal(masked.denom, full.denom)  # same batches, same B
    assert torch.equal(masked.weight == 0, torch.isin(full.idx, gone))
    deleted = build_schedule("t", 40, scale.train, 5, gone, Coupling.DELETED)
    live = deleted.idx[deleted.weight > 0]
    assert not torch.isin(live, gone).any() and live.numel() == 2 * 36
    with pytest.raises(ValueError, match="needs a run label"):
        build_schedule("t", 40, scale.train, 5, gone, Coupling.INDEPENDENT)
    a = build_schedule("t", 40, scale.train, 5, gone, Coupling.INDEPENDENT, label="lds:0:1")
    b = build_schedule("t", 40, scale.train, 5, gone, Coupling.INDEPENDENT, label="lds:0:2")
    assert not torch.equal(a.idx, b.idx)  # a fresh batch order per run


def test_group_prediction_is_the_sum_over_removed_examples() -> None:
    rng = np.random.default_rng(0)
    delta = rng.standard_normal((3, 20, 4, 2))
    keep = rng.random((5, 20)) < 0.5
    got = group_predictions(delta, keep)
    for j in range(5):
        np.testing.assert_allclose(got[:, j], delta[:, ~keep[j]].sum(1), rtol=1e-12, atol=1e-12)
    with pytest.raises(ValueError, match="predicts 19 examples"):
        group_predictions(delta[:, :19], keep)


def test_unroll_group_prediction_matches_finite_difference_of_the_group_weight() -> None:
    """Σ_{n∈G} Δm_n of unroll = d m/dε with w_n = 1 − ε on the group (masked), by central differences:
    the group prediction the harness forms is the exact first-order effect of removing the group."""
    scale = tiny_scale()
    task, data = make_task(scale)
    seeds = [0, 1]
    gone = torch.tensor([2, 9, 17, 30, 41, 55])
    queries = torch.arange(5)
    ctx = RemovalContext(task=task, data=data, scale=scale, theta_full=torch.zeros(len(seeds), task.n_params,
                         dtype=torch.float64), seeds=seeds, targets=torch.arange(data.n_train), queries=queries)
    theta_T, _ = Unroll().tangents(ctx, [0, 1])
    ctx = dataclasses.replace(ctx, theta_full=theta_T)
    per_example = Unroll().predict(ctx).numpy()  # [S, N, Q, M]
    keep = np.ones((1, data.n_train), dtype=bool)
    keep[0, gone.numpy()] = False
    predicted = group_predictions(per_example, keep)[:, 0]  # [S, Q, M]

    eps = 1e-4
    runs = []
    for sign in (1.0, -1.0):
        scheds = []
        for s in seeds:
            full = build_schedule(task.name, data.n_train, scale.train, s, None, Coupling.MASKED)
            group = build_schedule(task.name, data.n_train, scale.train, s, gone, Coupling.MASKED)
            weight = full.weight - sign * eps * (full.weight - group.weight)  # w = 1 − ε on the group
            scheds.append(dataclasses.replace(full, weight=weight))
        from benchmark.engine import initial_params

        theta0 = initial_params(task, seeds, torch.float64, "cpu")
        theta = train_models(task, data, scale.train, scheds, theta0).theta
        runs.append(task.measurements_batched(theta, data.x_test[queries], data.y_test[queries]).numpy())
    fd = (runs[0] - runs[1]) / (2 * eps)  # d m / d ε, ε = 1 is the removal
    scale_ = np.abs(fd).max()
    assert np.abs(predicted - fd).max() <= UNROLL_FD_RTOL * scale_
    # negative control: the sum over the kept examples instead is far off
    wrong = group_predictions(per_example, ~keep)[:, 0]
    assert np.abs(wrong - fd).max() > 10 * UNROLL_FD_RTOL * scale_


@pytest.fixture(scope="module")
def lds_tiny(tmp_path_factory: pytest.TempPathFactory):  # noqa: ANN201
    scale = tiny_scale(n_train=64, momentum=0.0, epochs=2)
    task, data = make_task(scale)
    data = data.to("cpu", torch.float32)
    cfg = LdsConfig(n_subsets=24, alpha=0.5, n_seeds=8, seeds_per_unit=4)
    store = UnitStore(tmp_path_factory.mktemp("lds_store"))
    lds = build_lds_ground_truth(task, data, scale, cfg, store, torch.device("cpu"), progress=False)
    return task, data, scale, cfg, store, lds


def test_lds_ground_truth_shapes_cache_and_pairing(lds_tiny) -> None:  # noqa: ANN001
    task, data, scale, cfg, store, lds = lds_tiny
    gt = lds.gt
    assert gt.measurements.shape == (8, 25, 5, 2) and lds.keep.shape == (24, 64)
    again = build_lds_ground_truth(task, data, scale, cfg, store, torch.device("cpu"), progress=False)
    assert np.array_equal(again.gt.measurements, gt.measurements) and again.gt.key == gt.key  # from the store
    # removing half the data moves the measurement: the group effects are far above float noise
    effects = gt.removed - gt.full[:, None]
    assert np.abs(effects).mean() > 1e-3


def test_oracle_reaches_its_ceiling_and_references_score_zero(lds_tiny) -> None:  # noqa: ANN001
    *_, lds = lds_tiny
    gt = lds.gt
    opts = RunOptions(task="mnist_mlp", scale="tiny", methods=(), n_boot=20, n_splits=5)
    base: dict = {}
    oracle = gt.removed - gt.full[:, None]
    rows, _ = score_rows(gt, oracle, True, base, opts)
    for r in rows:
        if r["metric"] in ("loo_mean_spearman", "var_influence_spearman", "w2_influence_spearman"):
            assert r["value"] == pytest.approx(r["noise_ceiling"], abs=1e-12), r["metric"]
    lds_mean = [r for r in rows if r["metric"] == "loo_mean_spearman" and r["measurement"] == "loss"][0]
    assert lds_mean["noise_ceiling"] > 0.5  # half-data removals are far above the seed noise
    rows, _ = score_rows(gt, reference_delta("random", gt), True, base, opts)
    rand = [r for r in rows if r["metric"] == "loo_mean_spearman"]
    assert all(abs(r["value"]) < 0.3 for r in rand)
    assert lds_metric_name("loo_mean_spearman") == "lds_mean" and lds_metric_name("w2_influence_spearman") == "lds_w2"


@pytest.mark.parametrize("coupling", [Coupling.DELETED, Coupling.INDEPENDENT])
def test_other_couplings_build(coupling: Coupling, tmp_path) -> None:  # noqa: ANN001
    scale = tiny_scale(n_train=48, momentum=0.0, epochs=1)
    task, data = make_task(scale)
    cfg = LdsConfig(n_subsets=3, alpha=0.5, n_seeds=4, coupling=coupling, seeds_per_unit=4)
    lds = build_lds_ground_truth(task, data, scale, cfg, UnitStore(tmp_path), torch.device("cpu"), progress=False)
    assert lds.gt.measurements.shape[:2] == (4, 4) and np.isfinite(lds.gt.measurements).all()
    if coupling is Coupling.INDEPENDENT:
        assert lds.gt.seeds.shape == (4, 4) and len(np.unique(lds.gt.seeds[:, 1:])) == 12  # a fresh init per run
