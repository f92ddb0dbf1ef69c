"""Per-seed method work as work units (``benchmark.method_units``): every registered method is seed-separable
as declared (chunked predictions equal the all-seed prediction), the harness's units give the same
predictions as one ``predict`` call, are cached and reused by a larger seed count, and the ``process``
executor computes bit-identical units to ``local``."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch

from benchmark.config import GroundTruthConfig
from benchmark.executors import LocalExecutor, ProcessExecutor
from benchmark.ground_truth import build_ground_truth
from benchmark.harness import run_method
from benchmark.method_units import merge_info, method_units, seed_chunks
from benchmark.registry import METHODS
from benchmark.store import UnitStore
from methods.base import RemovalContext
from tests.conftest import make_task, tiny_scale

SEPARABLE_RTOL = 1e-6  # chunked vs all-seed predictions (float64), relative to max |Δm|


def _setup(tmp_path: Path, n_seeds: int = 4, seeds_per_unit: int = 3, dtype: torch.dtype = torch.float64,
           store_name: str = "store"):  # noqa: ANN202
    scale = dataclasses.replace(tiny_scale(n_train=40, epochs=2), ground_truth=GroundTruthConfig(
        n_seeds=n_seeds, n_targets=3, n_queries=3, seeds_per_unit=seeds_per_unit))
    task, data = make_task(scale)
    data = data.to("cpu", dtype)
    store = UnitStore(tmp_path / store_name)
    gt = build_ground_truth(task, data, scale, store, torch.device("cpu"), progress=False,
                            executor=LocalExecutor(threads=1))
    ctx = RemovalContext(task=task, data=data, scale=scale, theta_full=gt.theta_full.to(dtype), seeds=gt.run_seeds,
                         targets=torch.as_tensor(gt.targets), queries=torch.as_tensor(gt.queries),
                         coupling=gt.coupling, checkpoints=gt.checkpoints.to(dtype))
    return ctx, gt, store


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory):  # noqa: ANN201
    return _setup(tmp_path_factory.mktemp("units"))


@pytest.mark.parametrize("name", METHODS.names())
def test_every_method_is_seed_separable_as_declared(tiny, name: str) -> None:  # noqa: ANN001
    """Chunks [0, 1] and [2, 3] predicted separately equal one all-seed prediction, for every method that
    declares ``seed_separable``; a pooled method (``trak_ensemble``) must differ, or its flag is wasted."""
    ctx, _, _ = tiny
    cls = METHODS.get(name)
    whole = cls().predict(ctx).double()
    chunked = torch.cat([cls().predict(ctx.subset(2, 0)), cls().predict(ctx.subset(2, 2))]).double()
    assert whole.shape == chunked.shape == (4, 3, 3, len(ctx.task.measurement_names))
    err = float((whole - chunked).abs().max() / whole.abs().max().clamp_min(1e-30))
    if cls.seed_separable:
        assert err <= SEPARABLE_RTOL, f"{name}: chunked predictions differ by {err:.2e} (relative)"
    else:
        assert err > 1e-3, f"{name} pools seeds but chunked predictions equal the pooled ones ({err:.2e})"


def test_units_follow_the_ground_truths_units_and_match_one_predict(tmp_path: Path) -> None:
    ctx, gt, store = _setup(tmp_path)
    method = METHODS.get("grad_dot")()
    units = method_units(method, ctx, gt, store, threads=1)
    assert [u.config["seeds"] for u in units] == [[0, 1, 2], [3]]  # the ground truth's units of 3 seeds
    delta, runtime, _, info = run_method(method, ctx, gt, store, LocalExecutor(threads=1))
    direct = METHODS.get("grad_dot")().predict(ctx).double().numpy()
    np.testing.assert_allclose(delta, direct, rtol=SEPARABLE_RTOL, atol=1e-12)
    assert runtime > 0 and "step_weight_mean" in info
    n_units = len(store.ls())
    again, runtime_again, _, _ = run_method(METHODS.get("grad_dot")(), ctx, gt, store, LocalExecutor(threads=1))
    assert len(store.ls()) == n_units and np.array_equal(again, delta) and runtime_again == runtime  # cached
    pooled = method_units(METHODS.get("trak_ensemble")(), ctx, gt, store, threads=1)
    assert len(pooled) == 1 and pooled[0].config["seeds"] == [0, 1, 2, 3]


def test_a_larger_seed_count_reuses_the_smaller_runs_method_units(tmp_path: Path) -> None:
    ctx4, gt4, store = _setup(tmp_path, n_seeds=4, seeds_per_unit=2)
    run_method(METHODS.get("tracin")(), ctx4, gt4, store, LocalExecutor(threads=1))
    predictions = [u for u in store.ls() if u.kind == "prediction"]
    ctx6, gt6, _ = _setup(tmp_path, n_seeds=6, seeds_per_unit=2)  # same store: seeds 0–3 are the same GT units
    delta6, *_ = run_method(METHODS.get("tracin")(), ctx6, gt6, store, LocalExecutor(threads=1))
    after = [u for u in store.ls() if u.kind == "prediction"]
    assert len(predictions) == 2 and len(after) == 3 and delta6.shape[0] == 6


def test_process_executor_gives_bit_identical_method_units(tmp_path: Path) -> None:
    """Workers reload the data, read θ and checkpoints from the store by key, and store the same bytes.
    Negative control: another thread count is another unit, not a silent cache hit."""
    ctx, gt, store = _setup(tmp_path, dtype=torch.float32)
    ctx_p, gt_p, store_p = _setup(tmp_path, dtype=torch.float32, store_name="process")
    for name in ("grad_dot", "influence_ekfac"):
        local, *_ = run_method(METHODS.get(name)(), ctx, gt, store, LocalExecutor(threads=1))
        process, *_ = run_method(METHODS.get(name)(), ctx_p, gt_p, store_p, ProcessExecutor(threads=1, workers=2))
        assert np.array_equal(local, process), name
    keys = {u.key for u in method_units(METHODS.get("grad_dot")(), ctx, gt, store, threads=1)}
    assert keys.isdisjoint(u.key for u in method_units(METHODS.get("grad_dot")(), ctx, gt, store, threads=2))


def test_a_hand_built_ground_truth_runs_as_one_unit(tmp_path: Path) -> None:
    ctx, gt, store = _setup(tmp_path)
    bare = dataclasses.replace(gt, param_sources=())
    units = method_units(METHODS.get("grad_dot")(), ctx, bare, store, threads=1)
    assert len(units) == 1 and units[0].job.params is not None
    delta, *_ = run_method(METHODS.get("grad_dot")(), ctx, bare, store, LocalExecutor(threads=1))
    np.testing.assert_allclose(delta, METHODS.get("grad_dot")().predict(ctx).double().numpy(),
                               rtol=SEPARABLE_RTOL, atol=1e-12)


def test_seed_chunks_and_merge_info() -> None:
    sources = (("a", 0), ("a", 1), ("b", 0), ("c", 0), ("c", 1))
    assert seed_chunks(5, sources, separable=True) == [range(0, 2), range(2, 3), range(3, 5)]
    assert seed_chunks(5, sources, separable=False) == [range(0, 5)]
    assert seed_chunks(5, (), separable=True) == [range(0, 5)]
    merged = merge_info([{"damping_mean": 1.0, "cg_iterations_max": 3.0, "invalid_replicates": 1, "fisher": "true"},
                         {"damping_mean": 4.0, "cg_iterations_max": 7.0, "invalid_replicates": 2, "fisher": "true"}],
                        weights=[2, 1])
    assert merged == {"damping_mean": 2.0, "cg_iterations_max": 7.0, "invalid_replicates": 3, "fisher": "true"}


def test_dry_run_counts_method_units_and_finds_them_cached_after_a_run(tmp_path: Path,
                                                                       capsys: pytest.CaptureFixture[str]) -> None:
    """The plan's ``loo:methods`` row names the same units (keys) the harness then computes."""
    import run_all

    args = ["--tasks", "mnist_mlp", "--scale", "smoke", "--eval", "loo", "--methods", "grad_dot,trak_ensemble",
            "--quiet", "--device", "cpu", "--cache", str(tmp_path / "cache"), "--out", str(tmp_path / "out"),
            "--no-further-training-gold", "--no-report"]

    def methods_row() -> list[str]:
        assert run_all.main([*args, "--dry-run"]) == 0
        line = next(x for x in capsys.readouterr().out.splitlines() if "loo:methods" in x)
        return line.split()

    before = methods_row()
    assert int(before[3]) == 3 and int(before[4]) == 0  # grad_dot: the GT's 2 units of 8 seeds; trak_ensemble: 1
    assert run_all.main(args) == 0
    capsys.readouterr()
    after = methods_row()
    assert int(after[3]) == 3 and int(after[4]) == 3


def test_speed_executors_times_method_units(capsys: pytest.CaptureFixture[str]) -> None:
    """``python -m benchmark.speed executors --method``: the method's units through every executor, with the
    process run's predictions bit-identical to local's at equal threads."""
    from benchmark import speed_executors

    assert speed_executors.main(["--scale", "smoke", "--seeds", "4", "--method", "grad_dot"]) == 0
    out = capsys.readouterr().out
    assert "grad_dot_process_speedup_vs_local=" in out
    assert "grad_dot_bit_identical_process_vs_local_1t=True" in out
