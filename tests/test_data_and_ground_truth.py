"""Data search order and errors; ground-truth assembly (targets/queries, dropped seeds, caching)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

import benchmark.data as data_mod
import benchmark.ground_truth as gt_mod
from benchmark.config import GroundTruthConfig
from benchmark.ground_truth import build_ground_truth, select_targets_and_queries
from benchmark.store import UnitStore
from tests.conftest import make_task, tiny_scale


def write_fake_mnist(folder: Path, n: int = 30) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    np.savez(folder / "mnist.npz", x_train=rng.integers(0, 255, (n, 28, 28), dtype=np.uint8),
             y_train=np.arange(n, dtype=np.uint8) % 10, x_test=rng.integers(0, 255, (n, 28, 28), dtype=np.uint8),
             y_test=np.arange(n, dtype=np.uint8) % 10)


def test_data_dir_env_comes_first(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    write_fake_mnist(tmp_path / "mine")
    monkeypatch.setenv("DTDA_DATA_DIR", str(tmp_path / "mine"))
    arrays = data_mod.load_mnist()
    assert arrays["x_train"].shape == (30, 28, 28) and arrays["x_train"].dtype == np.uint8


def test_shared_mnist_is_found_and_complete(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("DTDA_DATA_DIR", raising=False)
    arrays = data_mod.load_mnist()
    assert arrays["x_train"].shape == (60000, 28, 28) and arrays["x_test"].shape == (10000, 28, 28)
    assert np.bincount(arrays["y_train"]).tolist()[:2] == [5923, 6742]  # the official label counts


def test_missing_data_lists_every_place_tried(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    places = [tmp_path / "a" / "mnist.npz", tmp_path / "b" / "mnist.npz"]
    (tmp_path / "b").mkdir()
    np.savez(places[1], x_train=np.zeros((1, 28, 28), np.uint8))  # present but incomplete
    monkeypatch.setattr(data_mod, "candidate_paths", lambda name: places)
    monkeypatch.setenv("DTDA_OFFLINE", "1")
    with pytest.raises(data_mod.DataNotFoundError) as err:
        data_mod.load_mnist()
    msg = str(err.value)
    assert str(places[0]) in msg and "no such file" in msg
    assert str(places[1]) in msg and "missing arrays" in msg
    assert "online loaders: skipped" in msg and "DTDA_DATA_DIR" in msg


def test_targets_and_queries_are_reproducible_and_validated() -> None:
    task, data = make_task(tiny_scale(n_train=40))
    cfg = GroundTruthConfig(n_seeds=4, n_targets=5, n_queries=6, selection_seed=3)
    t1, q1 = select_targets_and_queries(data, cfg, task.name)
    t2, q2 = select_targets_and_queries(data, cfg, task.name)
    assert torch.equal(t1, t2) and torch.equal(q1, q2) and len(set(t1.tolist())) == 5
    other, _ = select_targets_and_queries(data, GroundTruthConfig(n_seeds=4, n_targets=5, selection_seed=4), task.name)
    assert not torch.equal(t1, other)
    with pytest.raises(ValueError, match=r"K\) = 41 exceeds the training-set size N = 40"):
        select_targets_and_queries(data, GroundTruthConfig(n_seeds=4, n_targets=41), task.name)


def test_diverged_seed_is_dropped_whole_and_counted(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    scale = tiny_scale(n_train=40)
    task, data = make_task(scale)
    real = gt_mod.train_removal_runs

    def one_removal_run_diverges(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        out = real(*args, **kwargs)
        out["failed"][1, 2] = True  # second seed of the unit, one removal run
        return out

    monkeypatch.setattr(gt_mod, "train_removal_runs", one_removal_run_diverges)
    with pytest.warns(UserWarning, match="diverged"):
        gt = build_ground_truth(task, data, scale, UnitStore(tmp_path), torch.device("cpu"), progress=False)
    assert gt.n_failed == 1 and gt.measurements.shape[0] == scale.ground_truth.n_seeds - 1
    assert 1 not in gt.seeds.tolist()


def test_more_seeds_reuse_cached_units(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    scale = tiny_scale(n_train=40).with_overrides(n_seeds=4, seeds_per_unit=2)
    task, data = make_task(scale)
    store = UnitStore(tmp_path)
    small = build_ground_truth(task, data, scale, store, torch.device("cpu"), progress=False)
    calls = []
    real = gt_mod.train_removal_runs
    monkeypatch.setattr(gt_mod, "train_removal_runs", lambda *a, **k: calls.append(a[3]) or real(*a, **k))
    larger = build_ground_truth(task, data, scale.with_overrides(n_seeds=6), store, torch.device("cpu"), progress=False)
    assert calls == [[4, 5]]  # only the new unit was trained
    assert np.array_equal(larger.measurements[:4], small.measurements)
