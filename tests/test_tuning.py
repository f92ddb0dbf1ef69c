"""Honest tuning (benchmark.tuning): the tuning split excludes the reported one, the best tuning score wins,
ties go to the first value listed, provenance is complete, and the CLI runs end to end at `smoke`."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from dataclasses import dataclass, replace
from pathlib import Path
from typing import ClassVar

import numpy as np
import pytest
import torch

from benchmark.config import OptionError, TaskScale, derive_seed
from benchmark.ground_truth import select_targets_and_queries
from benchmark.tuning import (
    TuningOptions,
    choose,
    main,
    make_split,
    parse_value,
    parse_values,
    prepare,
    tune,
    tuning_split,
)
from methods.base import Method, RemovalContext
from methods.grad_dot import GradDot
from methods.influence import Influence
from tests.conftest import make_task, tiny_scale

REPO = Path(__file__).resolve().parent.parent
N_SEEDS = 8  # tuning seeds S_t in these tests (cross-fitting needs >= 4)
N_BOOT = 20
NOISE_VALUES = (3.0, 0.0, 1.0)  # noisy-oracle settings: 0 is the oracle (best), listed second on purpose
PROVENANCE_FIELDS = {
    "task", "scale", "method", "param", "default", "values", "results", "chosen", "chosen_index", "rule", "metric",
    "measurement", "n_seeds", "tuning_targets", "tuning_queries", "tuning_seeds", "reported_excluded",
    "reported_targets", "reported_queries", "excluded_statement", "ground_truth_key", "commit",
}


@pytest.fixture(scope="module")
def scale() -> TaskScale:
    return tiny_scale(n_train=64, momentum=0.0, epochs=2)


@pytest.fixture(scope="module")
def opts(tmp_path_factory: pytest.TempPathFactory) -> TuningOptions:
    root = tmp_path_factory.mktemp("tuning")
    return TuningOptions(n_seeds=N_SEEDS, n_targets=6, n_queries=5, n_boot=N_BOOT, n_splits=5, out=root / "out",
                         cache=root / "cache", dtype=torch.float64, scale_label="tiny")


@dataclass(frozen=True)
class NoisyOracleConfig:
    noise: float = 0.0  # Gaussian noise in units of the truth's spread
    tag: str = "a"  # changes nothing: two tags tie exactly


class NoisyOracle(Method):
    """Predicts the tuning ground truth's own per-seed effect plus seeded noise (not registered)."""

    name = "noisy_oracle"
    config_cls = NoisyOracleConfig
    truth: ClassVar[np.ndarray]  # [S, K, Q, M]
    targets: ClassVar[torch.Tensor]

    def predict(self, ctx: RemovalContext) -> torch.Tensor:
        assert torch.equal(ctx.targets, self.targets)  # the tuning split, not the reported one
        rng = np.random.default_rng(0)
        noise = self.config.noise * self.truth.std() * rng.standard_normal(self.truth.shape)
        return torch.as_tensor(self.truth + noise)


@pytest.fixture(scope="module")
def oracle(scale: TaskScale, opts: TuningOptions) -> type[NoisyOracle]:
    task, _ = make_task(scale)
    problem = prepare(task, "tiny", opts)  # trains the tuning ground truth into the store; tune reuses it
    NoisyOracle.truth = problem.gt.removed - problem.gt.full[:, None]
    NoisyOracle.targets = problem.split.targets
    return NoisyOracle


@pytest.mark.parametrize("from_complement", [True, False])
def test_tuning_split_is_disjoint_from_the_reported_split(scale: TaskScale, from_complement: bool) -> None:
    """Negative control: the same seeded draw from the whole pool (not the complement) hits reported indices."""
    task, data = make_task(scale)
    gt_cfg = scale.ground_truth
    reported_t, reported_q = select_targets_and_queries(data, gt_cfg, task.name)
    n_targets, n_queries = 40, 60
    if from_complement:
        targets, queries = tuning_split(data, gt_cfg, task.name, n_targets, n_queries, seed=0)
    else:
        gen = torch.Generator().manual_seed(derive_seed("tuning_targets_queries", task.name, gt_cfg.selection_seed, 0))
        targets = torch.randperm(data.n_train, generator=gen)[:n_targets]
        queries = torch.randperm(int(data.y_test.shape[0]), generator=gen)[:n_queries]
    overlap = np.intersect1d(targets, reported_t).size + np.intersect1d(queries, reported_q).size
    assert (overlap == 0) is from_complement
    assert len(set(targets.tolist())) == n_targets and len(set(queries.tolist())) == n_queries


def test_tuning_split_is_reproducible_and_seeded(scale: TaskScale, opts: TuningOptions) -> None:
    task, data = make_task(scale)
    a = tuning_split(data, scale.ground_truth, task.name, 10, 10, seed=0)
    b = tuning_split(data, scale.ground_truth, task.name, 10, 10, seed=0)
    c = tuning_split(data, scale.ground_truth, task.name, 10, 10, seed=1)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not (torch.equal(a[0], c[0]) and torch.equal(a[1], c[1]))
    assert torch.equal(a[0], a[0].sort().values) and int(a[0].max()) < data.n_train
    split = make_split(task, data, scale, opts)
    assert not set(split.seeds) & set(scale.ground_truth.seeds)  # seeds are disjoint too
    with pytest.raises(OptionError, match="left after the 6 reported targets"):
        tuning_split(data, scale.ground_truth, task.name, data.n_train - 5, 5, seed=0)


def test_tune_picks_the_best_tuning_score_and_writes_provenance(scale: TaskScale, opts: TuningOptions,
                                                                oracle: type[NoisyOracle]) -> None:
    result = tune("mnist_mlp", scale, oracle, "noise", list(NOISE_VALUES), opts)
    scores = [r["score"] for r in result.records]
    assert [r["value"] for r in result.records] == list(NOISE_VALUES)
    assert result.chosen == 0.0 and scores[1] > max(scores[0], scores[2])
    exact = result.records[1]  # the oracle scores its own noise ceiling (same procedure, same splits)
    assert exact["score"] == pytest.approx(exact["noise_ceiling"], abs=1e-12)
    assert all(r["ci_low"] <= r["score"] <= r["ci_high"] for r in result.records)
    path = opts.out / "mnist_mlp" / "tiny" / "tuning" / "noisy_oracle__noise.json"
    assert result.path == path
    prov = json.loads(path.read_text())
    assert PROVENANCE_FIELDS <= set(prov)
    assert prov["chosen"] == 0.0 and prov["values"] == list(NOISE_VALUES) and prov["param"] == "noise"
    assert prov["metric"] == "loo_mean_spearman" and prov["measurement"] == "loss" and prov["n_seeds"] == N_SEEDS
    assert prov["reported_excluded"] is True and "excluded" in prov["excluded_statement"]
    assert not set(prov["tuning_targets"]) & set(prov["reported_targets"])
    assert not set(prov["tuning_queries"]) & set(prov["reported_queries"])
    assert prov["tuning_targets"] == oracle.targets.tolist()
    assert [r["score"] for r in prov["results"]] == pytest.approx(scores)


@pytest.mark.parametrize("order", [("b", "a"), ("a", "b")])
def test_ties_go_to_the_first_value_listed(scale: TaskScale, opts: TuningOptions, oracle: type[NoisyOracle],
                                        order: tuple[str, str]) -> None:
    result = tune("mnist_mlp", scale, oracle, "tag", list(order), replace(opts, n_boot=0))
    assert result.records[0]["score"] == result.records[1]["score"]  # identical predictions: an exact tie
    assert result.chosen == order[0]


def test_choose_rule() -> None:
    assert choose([0.5, 0.5, 0.2]) == 0
    assert choose([0.1, 0.3, 0.3]) == 1
    assert choose([math.nan, 0.1, 0.1]) == 1  # nan never wins
    with pytest.raises(ValueError, match="nan"):
        choose([math.nan, math.nan])


def test_bad_params_and_values_name_the_choices(scale: TaskScale, opts: TuningOptions) -> None:
    with pytest.raises(OptionError, match=r"unknown parameter 'dampng' for method 'influence'; allowed: curvature, "
                                          r"damping_scale"):
        tune("mnist_mlp", scale, "influence", "dampng", [0.1], opts)
    with pytest.raises(OptionError, match="distinct"):
        tune("mnist_mlp", scale, "influence", "damping_scale", [0.1, 0.1], opts)
    with pytest.raises(OptionError, match="damping_scale"):
        tune("mnist_mlp", scale, "influence", "damping_scale", [-1.0], opts)
    with pytest.raises(OptionError, match="must be one of: loo_mean_spearman, loo_seed_spearman"):
        tune("mnist_mlp", scale, "trak_ensemble", "proj_dim", [8], replace(opts, metric="distribution_skill"))
    assert parse_values(Influence, "damping_scale", "0.1, 0.01,1") == [0.1, 0.01, 1.0]
    assert [parse_value(int | None, v, "depth") for v in ("none", "50")] == [None, 50]
    assert [parse_value(bool, v, "centre") for v in ("true", "0")] == [True, False]
    assert [v.value for v in parse_values(GradDot, "scale", "schedule,expected")] == ["schedule", "expected"]
    with pytest.raises(OptionError, match="schedule, expected"):
        parse_values(GradDot, "scale", "schedule,bogus")
    with pytest.raises(OptionError, match="takes float"):
        parse_values(Influence, "damping_scale", "abc")


def test_cli_end_to_end_at_smoke(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["--task", "mnist_mlp", "--scale", "smoke", "--method", "grad_dot", "--param", "scale",
                 "--values", "schedule,expected", "--seeds", "8", "--targets", "8", "--queries", "8",
                 "--n-boot", "20", "--device", "cpu", "--quiet", "--out", str(tmp_path / "out"),
                 "--cache", str(tmp_path / "cache")])
    assert code == 0
    lines = capsys.readouterr().out.strip().splitlines()
    prov = json.loads((tmp_path / "out/mnist_mlp/smoke/tuning/grad_dot__scale.json").read_text())
    assert lines[-1] == f"chosen scale={prov['chosen']}" and prov["values"] == ["schedule", "expected"]
    assert prov["n_seeds"] == 8 and len(prov["tuning_targets"]) == 8 and prov["tuning_seeds"][0] == 1_000_000


def test_cli_bad_input_exits_2_with_one_error(tmp_path: Path) -> None:
    proc = subprocess.run([sys.executable, "-m", "benchmark.tuning", "--task", "mnist_mlp", "--scale", "smoke",
                           "--method", "influence", "--param", "dampng", "--values", "0.1", "--out", str(tmp_path)],
                          cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [proc.stderr.strip()] and "allowed: curvature" in proc.stderr
    assert main(["--task", "mnist_mlp", "--scale", "huge", "--method", "influence", "--param", "damping_scale",
                 "--values", "0.1"]) == 2
