"""Scale-out and hardening: executors give bit-identical ground truth, --dry-run trains nothing, store gc
removes only unused units, an incompatible cache is refused untouched, kill/resume, and property-based
tests of the command line and the config constructors."""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import run_all
from benchmark import faults
from benchmark.config import CACHE_VERSION, GroundTruthConfig, LdsConfig, OptionError, TrainConfig
from benchmark.executors import (
    ExecutorSpec,
    LocalExecutor,
    ProcessExecutor,
    RayExecutor,
    SlurmExecutor,
    SlurmSettings,
    UnitFailedError,
    WorkUnit,
    make_executor,
)
from benchmark.ground_truth import build_ground_truth, unit_key
from benchmark.store import UnitStore
from benchmark.store.cli import main as store_main
from tasks.mnist_mlp import MnistMlp
from tests.conftest import make_task, tiny_scale


def _ground_truth(tmp_path: Path, name: str, executor):  # noqa: ANN001, ANN202
    scale = dataclasses.replace(tiny_scale(n_train=48), ground_truth=GroundTruthConfig(
        n_seeds=4, n_targets=3, n_queries=4, seeds_per_unit=2))
    task, data = make_task(scale)
    store = UnitStore(tmp_path / name)
    return build_ground_truth(task, data, scale, store, torch.device("cpu"), progress=False, executor=executor), store


def _same(a, b) -> None:  # noqa: ANN001
    assert np.array_equal(a.measurements, b.measurements)
    assert torch.equal(a.theta_full, b.theta_full) and torch.equal(a.checkpoints, b.checkpoints)
    assert a.key == b.key


def test_executors_give_bit_identical_ground_truth(tmp_path: Path) -> None:
    """local, process (spawn) and submitit's local executor (real subprocesses) at 1 thread: same bytes."""
    local, local_store = _ground_truth(tmp_path, "local", LocalExecutor(threads=1))
    process, _ = _ground_truth(tmp_path, "process", ProcessExecutor(threads=1, workers=2))
    slurm_settings = SlurmSettings(folder=str(tmp_path / "submitit"), cluster="local", time_min=10)
    slurm, _ = _ground_truth(tmp_path, "slurm", SlurmExecutor(threads=1, settings=slurm_settings))
    _same(local, process)
    _same(local, slurm)
    assert len(local_store.ls()) == 2  # 4 seeds in units of 2
    # negative control: another thread count is another unit (another key), not a silent cache hit
    other, _ = _ground_truth(tmp_path, "local", LocalExecutor(threads=2))
    assert other.key != local.key and len(local_store.ls()) == 4


def test_ray_executor_bit_identical(tmp_path: Path) -> None:
    ray = pytest.importorskip("ray", reason="Ray is not installed (pip install -e '.[ray]')")
    local, _ = _ground_truth(tmp_path, "local", LocalExecutor(threads=1))
    try:
        got, _ = _ground_truth(tmp_path, "ray", RayExecutor(threads=1, num_cpus=2))
    except Exception as exc:  # noqa: BLE001 - e.g. no shared memory in a sandbox
        if ray.is_initialized():
            ray.shutdown()
        pytest.skip(f"a local Ray instance could not start or run here: {type(exc).__name__}: {exc}")
    ray.shutdown()
    _same(local, got)


def _failing_job() -> dict[str, torch.Tensor]:
    raise RuntimeError("boom")


def test_a_failing_unit_is_named_and_finished_units_stay(tmp_path: Path) -> None:
    store = UnitStore(tmp_path)
    good = WorkUnit("aa" * 8, {"x": 1}, _constant_job, "test", {}, threads=1)
    bad = WorkUnit("bb" * 8, {"x": 2}, _failing_job, "test", {"seeds": [3, 4]}, threads=1)
    with pytest.raises(UnitFailedError, match="bbbbbbbbbbbb .*seeds.*RuntimeError: boom"):
        ProcessExecutor(threads=1, workers=1).run(store, [good, bad], progress=False)
    assert store.has(good.key) and not store.has(bad.key)


def _constant_job() -> dict[str, torch.Tensor]:
    return {"x": torch.arange(3.0)}


def test_unit_key_includes_threads_and_model_batch() -> None:
    scale = tiny_scale()
    task = MnistMlp(scale)
    args = (task, scale, [0, 1], torch.tensor([1, 2]), torch.tensor([3]), scale.ground_truth.coupling,
            torch.float64, torch.device("cpu"))
    k1, c1 = unit_key(*args, threads=1)
    assert c1["threads"] == 1 and c1["max_models"] == 1024
    assert unit_key(*args, threads=2)[0] != k1 and unit_key(*args, threads=1, max_models=64)[0] != k1


def test_dry_run_plans_and_trains_nothing(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cache = tmp_path / "cache"
    args = ["--scale", "smoke", "--eval", "loo,lds", "--quiet", "--device", "cpu", "--cache", str(cache),
            "--out", str(tmp_path / "out"), "--dry-run"]
    assert run_all.main(args) == 0
    out = capsys.readouterr().out
    assert "plan on cpu with executor local" in out and "est. min" in out
    loo = next(line for line in out.splitlines() if line.startswith("mnist_mlp") and " loo " in line)
    units, cached = int(loo.split()[3]), int(loo.split()[4])
    assert units >= 1 and cached == 0
    assert UnitStore(cache).ls() == []  # nothing trained or stored
    assert not (tmp_path / "out" / "leaderboard.csv").exists()


def test_store_gc_removes_only_units_no_configuration_uses(tmp_path: Path,
                                                           capsys: pytest.CaptureFixture[str]) -> None:
    store = UnitStore(tmp_path)
    scale = asdict(MnistMlp.scales["smoke"])
    scale.pop("ground_truth")
    current = {"version": CACHE_VERSION, "kind": "loo_ground_truth", "task": "mnist_mlp", "scale": scale}
    stale_version = {**current, "version": CACHE_VERSION - 1}
    changed_scale = {**current, "scale": {**scale, "n_train": scale["n_train"] + 1}}
    gone_task = {**current, "task": "no_such_task"}
    gone_method = {"version": CACHE_VERSION, "kind": "prediction", "method": "no_such_method"}
    kept_method = {"version": CACHE_VERSION, "kind": "prediction", "method": "unroll", "sources": [["ab", 0]]}
    whole_run_method = {"version": CACHE_VERSION, "kind": "prediction", "method": "unroll"}  # before method units
    keys = {}
    for i, cfg in enumerate([current, stale_version, changed_scale, gone_task, gone_method, kept_method,
                             whole_run_method]):
        keys[i] = f"{i:02d}" * 8
        store.put(keys[i], cfg, {"x": torch.zeros(1)}, kind=cfg["kind"])
    assert store_main(["gc", "--dry-run", "--root", str(tmp_path)]) == 0
    assert "5 unit(s) no current configuration uses" in capsys.readouterr().out
    assert len(store.ls()) == 7  # dry run removed nothing
    assert store_main(["gc", "--root", str(tmp_path)]) == 0
    assert "removed 5 unused unit(s)" in capsys.readouterr().out
    assert {i.key for i in store.ls()} == {keys[0], keys[5]}


def test_incompatible_cache_is_refused_untouched(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cache = tmp_path / "cache"
    UnitStore(cache).put("ab" * 8, {"a": 1}, {"x": torch.zeros(1)})
    (cache / "store.json").write_text(json.dumps({"store_format": 99}))
    before = sorted((p.relative_to(cache), p.stat().st_mtime_ns) for p in cache.rglob("*") if p.is_file())
    assert run_all.main(["--cache", str(cache), "--out", str(tmp_path / "out"), "--scale", "smoke"]) == 2
    assert "written by store format 99" in capsys.readouterr().err
    after = sorted((p.relative_to(cache), p.stat().st_mtime_ns) for p in cache.rglob("*") if p.is_file())
    assert after == before


def test_faults_checks_can_fail(tmp_path: Path) -> None:
    """The kill/resume checks detect a rewritten unit, a changed score and a changed array (negative controls)."""
    unit = tmp_path / "cache" / "units" / "ab" / ("ab" * 8 + ".safetensors")
    unit.parent.mkdir(parents=True)
    unit.write_bytes(b"x")
    stamps = faults.unit_stamps(tmp_path / "cache")
    assert faults.rewritten_units(stamps, tmp_path / "cache") == []
    os.utime(unit, ns=(1, 1))
    assert faults.rewritten_units(stamps, tmp_path / "cache") == [unit.name]
    frame = ("task,scale,method,variant,measurement,metric,coupling,regime,value,runtime_s\n"
             "t,s,m,v,loss,x,c,distributional,{v},{r}\nt,s,m,v,all,seconds_per_seed,c,info,{r},{r}\n")
    (tmp_path / "a.csv").write_text(frame.format(v=0.5, r=1.0))
    (tmp_path / "b.csv").write_text(frame.format(v=0.5, r=9.0))
    (tmp_path / "c.csv").write_text(frame.format(v=0.6, r=1.0))
    assert faults.leaderboard_difference(tmp_path / "a.csv", tmp_path / "b.csv") == ""  # timings ignored
    assert "value" in faults.leaderboard_difference(tmp_path / "a.csv", tmp_path / "c.csv")
    for name, arr in (("ra", np.zeros(3)), ("rb", np.ones(3))):
        (tmp_path / name).mkdir()
        np.savez(tmp_path / name / "ground_truth.npz", measurements=arr)
    assert "measurements" in faults.arrays_difference(tmp_path / "ra", tmp_path / "rb")


def test_kill_resume_fast(tmp_path: Path) -> None:
    """The faster version of ``python -m benchmark.faults kill``: two kills of a small smoke job."""
    args = ("--scale", "smoke", "--eval", "loo", "--methods", "grad_dot", "--no-further-training-gold",
            "--no-report", "--quiet", "--device", "cpu")
    results = faults.kill_resume(2, args, seed=1, workdir=tmp_path, verbose=False)
    assert all(r.ok for r in results), [(r.rewritten, r.leaderboard_diff, r.arrays_diff) for r in results]


# ---------------------------------------------------------------- property-based: CLI and config constructors
_PROPS = settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


@_PROPS
@given(st.integers(max_value=3))
def test_cli_rejects_too_few_seeds(tmp_path: Path, n: int) -> None:
    assert run_all.main(["--seeds", str(n), "--out", str(tmp_path), "--dry-run"]) == 2


@_PROPS
@given(st.text(min_size=1, max_size=12).filter(lambda s: s not in ("local", "process", "slurm", "ray")
                                               and not s.startswith("-")))
def test_cli_rejects_unknown_executor(tmp_path: Path, name: str) -> None:
    with pytest.raises(OptionError, match="--executor must be one of: local, process, slurm, ray"):
        ExecutorSpec(name=name)


@_PROPS
@given(st.integers(max_value=0))
def test_cli_rejects_bad_workers_and_threads(tmp_path: Path, n: int) -> None:
    for option in ("--workers", "--threads"):
        assert run_all.main(["--executor", "process", option, str(n), "--out", str(tmp_path), "--dry-run"]) == 2


@_PROPS
@given(st.floats(allow_nan=False).filter(lambda a: not 0 < a < 1))
def test_lds_alpha_outside_unit_interval_is_rejected(alpha: float) -> None:
    with pytest.raises(OptionError, match="alpha must lie in \\(0, 1\\)"):
        LdsConfig(alpha=alpha)


@_PROPS
@given(st.integers(max_value=-1))
def test_negative_first_seed_is_rejected(seed: int) -> None:
    with pytest.raises(OptionError, match="first_seed must be >= 0"):
        GroundTruthConfig(first_seed=seed)
    with pytest.raises(OptionError, match="first_seed and subset_seed must be >= 0"):
        LdsConfig(first_seed=seed)


@_PROPS
@given(st.floats().filter(lambda x: not 0 < x < float("inf")),
       st.floats(allow_nan=False).filter(lambda m: not 0 <= m < 1),
       st.floats().filter(lambda x: not 0 <= x < float("inf")))
def test_train_config_rejects_bad_lr_momentum_and_decay(lr: float, momentum: float, wd: float) -> None:
    with pytest.raises(OptionError, match="TrainConfig.lr must be finite and > 0"):
        TrainConfig(lr=lr)
    with pytest.raises(OptionError, match="TrainConfig.weight_decay must be finite and >= 0"):
        TrainConfig(weight_decay=wd)
    with pytest.raises(OptionError, match="TrainConfig.momentum must be in"):
        TrainConfig(momentum=momentum)


@_PROPS
@given(st.lists(st.sampled_from(["unroll", "grad_dot", "trak"]), min_size=2, max_size=4).filter(
    lambda xs: len(set(xs)) < len(xs)))
def test_cli_rejects_duplicate_methods(tmp_path: Path, names: list[str]) -> None:
    assert run_all.main(["--methods", ",".join(names), "--out", str(tmp_path), "--dry-run"]) == 2


def test_make_executor_defaults() -> None:
    assert isinstance(make_executor(), LocalExecutor)
    assert make_executor(ExecutorSpec(name="process", workers=2)).threads >= 1
    with pytest.raises(OptionError, match="--slurm-cluster must be one of"):
        SlurmExecutor(1, SlurmSettings(cluster="pbs"))


def test_two_runs_on_one_cache_at_once(tmp_path: Path) -> None:
    """Two suite runs share a cache concurrently: both finish, every unit verifies, the arrays agree."""
    import subprocess
    import sys

    cache = tmp_path / "cache"
    base = [sys.executable, str(faults.REPO / "run_all.py"), "--scale", "smoke", "--eval", "loo", "--methods",
            "grad_dot", "--no-further-training-gold", "--no-report", "--quiet", "--device", "cpu",
            "--cache", str(cache)]
    procs = [subprocess.Popen([*base, "--out", str(tmp_path / f"out{i}")], cwd=faults.REPO,
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE) for i in range(2)]
    errors = [p.communicate(timeout=600)[1].decode() for p in procs]
    assert [p.returncode for p in procs] == [0, 0], errors
    assert UnitStore(cache).verify() == []
    assert faults.arrays_difference(tmp_path / "out0", tmp_path / "out1") == ""
    boards = [tmp_path / f"out{i}" / "leaderboard.csv" for i in range(2)]
    assert faults.leaderboard_difference(*boards) == ""


def test_worker_refuses_data_it_cannot_reproduce(tmp_path: Path) -> None:
    """A worker reloads the data itself; hand-built data (here doubled inputs) is refused, not silently swapped."""
    scale = dataclasses.replace(tiny_scale(n_train=48), ground_truth=GroundTruthConfig(
        n_seeds=4, n_targets=2, n_queries=3, seeds_per_unit=4))
    task, data = make_task(scale)
    doubled = dataclasses.replace(data, x_train=data.x_train * 2)
    with pytest.raises(UnitFailedError, match="differ from the data the work was planned on"):
        build_ground_truth(task, doubled, scale, UnitStore(tmp_path), torch.device("cpu"), progress=False,
                           executor=ProcessExecutor(threads=1, workers=1))
    gt = build_ground_truth(task, doubled, scale, UnitStore(tmp_path / "local"), torch.device("cpu"),
                            progress=False, executor=LocalExecutor(threads=1))  # local sees the caller's data
    assert np.isfinite(gt.measurements).all()
