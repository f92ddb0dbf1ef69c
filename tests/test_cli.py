"""The command line end to end on `smoke`: outputs, regression check, bad input, resume after kill -9.

One smoke run is shared by the tests (module fixture) to keep CI fast. The committed baseline
``results/baselines/smoke.csv`` is regenerated with
``python run_all.py --scale smoke --out /tmp/b && cp /tmp/b/leaderboard.csv results/baselines/smoke.csv``.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

import run_all
from benchmark.leaderboard import COLUMNS

REPO = Path(__file__).resolve().parent.parent
SMOKE_TASKS = ("mnist_mlp", "vit_pruning")  # cifar_resnet's smoke rows are checked by CI's regression run


@pytest.fixture(scope="module")
def smoke(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("smoke")
    code = run_all.main(["--scale", "smoke", "--tasks", ",".join(SMOKE_TASKS), "--quiet", "--device", "cpu",
                         "--out", str(out / "results"), "--cache", str(out / "cache")])
    assert code == 0
    return out


def test_smoke_outputs(smoke: Path) -> None:
    res = smoke / "results"
    board = pd.read_csv(res / "leaderboard.csv")
    assert list(board.columns) == list(COLUMNS)
    assert {"unroll", "influence", "zero", "random"} <= set(board["method"])
    gt = np.load(res / "mnist_mlp/smoke/ground_truth.npz", allow_pickle=False)
    s, k1, q, m = gt["measurements"].shape
    assert (k1 - 1, q, m) == (len(gt["targets"]), len(gt["queries"]), 2) and s == 16
    pred = np.load(res / "mnist_mlp/smoke/predictions/unroll.npz", allow_pickle=False)
    assert pred["delta"].shape == (s, k1 - 1, q, m)
    assert (res / "report.md").is_file() and (res / "mnist_mlp/smoke/score_vs_seeds.csv").is_file()
    # reference rows score ≈ 0; zero's distribution_skill is exactly 0
    zero = board[(board.method == "zero") & (board.metric == "distribution_skill")]
    assert np.allclose(zero["value"], 0.0)
    # every score row carries its ceiling
    scores = board[board.regime.isin(["distributional", "fixed_seed"])]
    assert scores["noise_ceiling"].notna().all()
    # influence logs its damping per run as rows: λ and λ / mean eigenvalue (default 0.1)
    info = board[(board.method == "influence") & (board.regime == "info")].set_index("metric")["value"]
    assert info["damping_over_mean_eig"] == pytest.approx(0.1) and info["damping_mean"] > 0
    # group removal: LDS ground truth, group predictions and lds_* rows with ceilings
    lds = np.load(res / "mnist_mlp/smoke/lds_ground_truth.npz", allow_pickle=False)
    r, m1, q_lds, _ = lds["measurements"].shape
    assert lds["keep"].shape == (m1 - 1, 256) and q_lds == q
    assert np.load(res / "mnist_mlp/smoke/predictions/lds_unroll.npz")["delta"].shape == (r, m1 - 1, q, m)
    lds_rows = board[board.metric == "lds_mean"]
    assert {"unroll", "influence", "random"} <= set(lds_rows["method"]) and lds_rows["noise_ceiling"].notna().all()
    assert "further_training" not in set(lds_rows["method"])  # too costly for K = N: listed as not run
    report = (res / "report.md").read_text()
    assert "Group removal: LDS and distributional LDS" in report and "Replications" in report


def test_check_passes_on_committed_baseline_and_fails_on_doctored(smoke: Path, tmp_path: Path) -> None:
    """The committed baseline's rows of the fixture's tasks (cifar_resnet's are CI's regression check's)."""
    board = smoke / "results" / "leaderboard.csv"
    base = pd.read_csv(REPO / "results/baselines/smoke.csv")
    base = base[base.task.isin(SMOKE_TASKS)]
    base.to_csv(tmp_path / "baseline.csv", index=False)
    assert run_all.check_regression(pd.read_csv(board), tmp_path / "baseline.csv") == []
    assert len(run_all.check_regression(pd.read_csv(board), REPO / "results/baselines/smoke.csv")) > 0  # no cifar
    doctored = base.copy()
    row = (doctored.method == "unroll") & (doctored.metric == "loo_seed_spearman") & (doctored.measurement == "loss")
    doctored.loc[row, ["value", "ci_low"]] = 0.99 + 0.05 + 1.0  # the check uses min(ci_low, value)
    path = tmp_path / "doctored.csv"
    doctored.to_csv(path, index=False)
    failures = run_all.check_regression(pd.read_csv(board), path)
    assert len(failures) == 1 and "unroll" in str(failures[0]) and "loo_seed_spearman" in str(failures[0])


def test_check_cli_exit_code_on_doctored_baseline(smoke: Path, tmp_path: Path) -> None:
    """The CLI's exit status: 0 against the committed baseline's own rows for this run, 1 once one is doctored."""
    base = pd.read_csv(REPO / "results/baselines/smoke.csv")
    mine = base[(base.task == "mnist_mlp") & base.method.isin(["unroll", "influence"])
                & base.metric.str.startswith("loo_")]
    mine.to_csv(tmp_path / "clean.csv", index=False)
    doctored = mine.copy()
    doctored.loc[doctored.metric == "loo_mean_pearson", ["value", "ci_low"]] = 2.0
    doctored.to_csv(tmp_path / "b.csv", index=False)
    args = ["--scale", "smoke", "--tasks", "mnist_mlp", "--quiet", "--no-report", "--device", "cpu",
            "--methods", "unroll,influence", "--eval", "loo", "--no-further-training-gold",
            "--out", str(tmp_path / "r"), "--cache", str(smoke / "cache")]
    assert run_all.main([*args, "--check", str(tmp_path / "clean.csv")]) == 0
    assert run_all.main([*args, "--check", str(tmp_path / "b.csv")]) == 1


def test_check_clips_scores_at_the_floor(tmp_path: Path) -> None:
    """Below SCORE_FLOOR an unbounded skill is ill-conditioned (−116 on one CPU, −336 on another, same code):
    not a regression. A fall from real skill to the floor still is (negative control)."""
    from benchmark.leaderboard import KEY_COLUMNS, SCORE_FLOOR, check_regression

    def frame(value: float, ci_low: float, method: str) -> pd.DataFrame:
        row = dict.fromkeys(KEY_COLUMNS, "x") | {"metric": "distribution_skill", "method": method}
        return pd.DataFrame([row | {"value": value, "ci_low": ci_low}])

    base = pd.concat([frame(-116.5, -184.6, "ill"), frame(0.7, 0.4, "skilled")])
    path = tmp_path / "b.csv"
    base.to_csv(path, index=False)
    ok = pd.concat([frame(-336.3, -500.0, "ill"), frame(0.69, 0.3, "skilled")])
    assert check_regression(ok, path) == []
    bad = pd.concat([frame(-336.3, -500.0, "ill"), frame(SCORE_FLOOR, -5.0, "skilled")])
    failures = check_regression(bad, path)
    assert len(failures) == 1 and "skilled" in str(failures[0])


@pytest.mark.parametrize(("args", "message"), [
    (["--methods", "infleunce"], "unknown method 'infleunce'; allowed: datainf, dattri_if_cg"),
    (["--tasks", "cifar"], "unknown task 'cifar'; allowed: cifar_resnet, mnist_mlp"),
    (["--scale", "huge"], "--scale must be one of: smoke, small, paper"),
    (["--coupling", "paired"], "--coupling must be one of: masked, deleted, independent"),
    (["--seeds", "2"], "--seeds must be >= 4"),
    (["--device", "tpu"], "--device must be one of: auto, cpu, cuda"),
    (["--methods", "unroll,unroll"], "lists the same method twice"),
    (["--eval", "loo,datamodels"], "unknown evaluation 'datamodels'; allowed: loo, lds, mechanism"),
    (["--eval", "lds,lds"], "--eval lists the same evaluation twice"),
    (["--lds-seeds", "3"], "--lds-seeds must be >= 4"),
])
def test_bad_input_gives_clear_error(args: list[str], message: str, capsys: pytest.CaptureFixture[str],
                                     tmp_path: Path) -> None:
    assert run_all.main([*args, "--out", str(tmp_path)]) == 2
    assert message in capsys.readouterr().err


def test_unwritable_out(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("x")
    assert run_all.main(["--out", str(blocker / "sub")]) == 2
    assert "is not writable" in capsys.readouterr().err


def test_resume_after_kill_recomputes_nothing(smoke: Path, tmp_path: Path) -> None:
    """kill -9 a run after its first ground-truth unit lands; the rerun reuses it and equals a clean run."""
    cache, out = tmp_path / "cache", tmp_path / "out"
    cmd = [sys.executable, str(REPO / "run_all.py"), "--scale", "smoke", "--quiet", "--no-report", "--device", "cpu",
           "--methods", "unroll", "--eval", "loo", "--out", str(out), "--cache", str(cache)]
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    units: list[Path] = []
    while time.time() < deadline and not units:
        units = list((cache / "units").glob("*/*.safetensors")) if (cache / "units").exists() else []
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert units, "no unit was written before the deadline"
    before = {p: (p.stat().st_ino, p.stat().st_mtime_ns) for p in (cache / "units").glob("*/*.safetensors")}
    assert run_all.main(cmd[2:]) == 0
    for p, stamp in before.items():  # nothing finished was recomputed or rewritten
        assert (p.stat().st_ino, p.stat().st_mtime_ns) == stamp
    resumed = np.load(out / "mnist_mlp/smoke/ground_truth.npz")["measurements"]
    clean = np.load(smoke / "results/mnist_mlp/smoke/ground_truth.npz")["measurements"]
    assert np.array_equal(resumed, clean)
