"""The data-pruning experiment of d-TDA (Mlodozeniec et al. 2025, Fig. 6): does ranking examples by their
influence *averaged over seeds* prune better than each seed's own ranking?

Protocol (``PruningConfig`` per scale; the task supplies data, model and validation set):

1. Train S seeds on the pool D (N examples): θ_s.
2. Score every k ∈ D per seed with the ``scorer`` method (default EK-FAC influence): its predicted change of
   the mean validation loss on removing k, ``u_s[k] = (1/V) Σ_v Δℓ_v(s, k)`` (removed − full; negative =
   removing k is predicted to *lower* the validation loss).
3. Arms, each removing n = round(x·N) examples and **retrained on the pruned set** (the ``deleted``
   coupling: each epoch's permutation with the removed examples deleted, re-batched) **with the same S
   seeds** (same initialisation and batch-order seed as the full run):
   - ``full``: nothing removed;
   - ``random``: a fresh uniformly random n-subset per seed;
   - ``fixed_seed``: seed s removes its own n lowest u_s;
   - ``distributional``: every seed removes the n lowest ū = mean_s u_s (d-TDA Fig. 6);
   - ``distributional_var``: every seed removes the n lowest ū + c·sd_s(u) (risk-averse: an example that
     helps on average but hurts on some seeds is penalised); c from ``c_grid`` minimising the mean
     validation loss of its retrained models, so the choice never sees the test set.
4. Report test accuracy and loss per seed, mean ± SE, and the paired differences (same seed) to ``full``
   and to ``fixed_seed``: mean d̄, 95 % CI d̄ ± t_{.975,S−1}·sd/√S, and the minimum detectable paired
   difference at 80 % power, MDE = (t_{.975,S−1} + t_{.80,S−1})·sd/√S.

Every training (the full runs and each arm) is a content-keyed :class:`~benchmark.executors.WorkUnit`, so a
rerun reuses them and any executor can compute them. Outputs: ``<out>/pruning.csv`` (per seed and arm),
``<run_dir>/pruning_summary.csv`` and ``pruning_scores.npz``, leaderboard rows (regime ``pruning``).
"""

from __future__ import annotations

import io
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from scipy import stats
from torch import Tensor

from benchmark.config import CACHE_VERSION, Coupling, PruningConfig, TaskScale, derive_seed
from benchmark.engine import build_schedule, initial_params, train_models
from benchmark.executors import (
    Executor,
    WorkUnit,
    data_fingerprint,
    loaded_task,
    make_executor,
    register_loaded,
)
from benchmark.further_training_gold import theta_digest
from benchmark.leaderboard import write_csv
from benchmark.store import UnitStore, atomic_write_bytes, content_key
from tasks.base import Task, TaskData, cross_entropy

ARMS = ("full", "random", "fixed_seed", "distributional", "distributional_var")
EVAL_CHUNK = 500  # images per forward when evaluating


def n_removed(fraction: float, n_train: int) -> int:
    """n = round(x·N), at least 1."""
    return max(1, int(np.floor(fraction * n_train + 0.5)))


def arm_removals(arm: str, scores: np.ndarray, fraction: float, seeds: list[int], task_name: str,
                 c: float | None = None) -> list[np.ndarray]:
    """Sorted removed indices per seed for ``arm``; ``scores [S, N]`` = predicted Δ validation loss."""
    n_seeds, n_train = scores.shape
    n = n_removed(fraction, n_train)
    if arm == "full":
        return [np.array([], dtype=np.int64) for _ in seeds]
    if arm == "random":
        return [np.sort(np.random.default_rng(derive_seed("prune_random", task_name, s, fraction) % 2**32)
                        .choice(n_train, n, replace=False)) for s in seeds]
    if arm == "fixed_seed":
        return [np.sort(np.argsort(scores[i], kind="stable")[:n]) for i in range(n_seeds)]
    if arm == "distributional":
        chosen = np.sort(np.argsort(scores.mean(0), kind="stable")[:n])
        return [chosen for _ in seeds]
    if arm == "distributional_var":
        if c is None:
            raise ValueError("arm 'distributional_var' needs c")
        risk = scores.mean(0) + c * scores.std(0, ddof=1)
        chosen = np.sort(np.argsort(risk, kind="stable")[:n])
        return [chosen for _ in seeds]
    raise ValueError(f"arm must be one of: {', '.join(ARMS)}; got {arm!r}")


def evaluate(task: Task, theta: Tensor, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
    """Mean loss and accuracy per model, [n] each, for θ [n, P] on (x, y)."""
    losses, correct = [], []
    with torch.no_grad():
        for i in range(0, x.shape[0], EVAL_CHUNK):
            xb, yb = x[i:i + EVAL_CHUNK], y[i:i + EVAL_CHUNK]
            logits = task.logits_batched(theta, xb.unsqueeze(0).expand(theta.shape[0], *xb.shape))
            losses.append(cross_entropy(logits, yb.expand(theta.shape[0], -1)).double())
            correct.append((logits.argmax(-1) == yb).double())
    return torch.cat(losses, 1).mean(1), torch.cat(correct, 1).mean(1)


@dataclass(frozen=True)
class PruningArmJob:
    """A picklable unit: train ``seeds`` on the pool minus ``removals[i]`` (deleted coupling), evaluate on the
    test and validation sets. ``keep_checkpoints``: epoch-end parameters (the scorer may need them)."""

    task: str
    scale: TaskScale
    seeds: tuple[int, ...]
    removals: tuple[tuple[int, ...], ...]
    n_val: int
    dtype: str
    device: str
    keep_checkpoints: bool = False
    data_sha: str = ""

    def __call__(self) -> dict[str, Tensor]:
        task, data = loaded_task(self.task, self.scale, self.dtype, self.device, self.data_sha)
        return train_and_evaluate(task, data, self.scale, list(self.seeds), [list(r) for r in self.removals],
                                  self.n_val, self.keep_checkpoints)


def train_and_evaluate(task: Task, data: TaskData, scale: TaskScale, seeds: list[int], removals: list[list[int]],
                       n_val: int, keep_checkpoints: bool) -> dict[str, Tensor]:
    """θ [S, P] (and checkpoints), test/val loss and accuracy [S], failed [S] for the pruned retrainings."""
    schedules = [build_schedule(task.name, data.n_train, scale.train, s,
                                torch.as_tensor(r, dtype=torch.long) if len(r) else None, Coupling.DELETED)
                 for s, r in zip(seeds, removals)]
    theta0 = initial_params(task, seeds, data.x_train.dtype, data.x_train.device)
    result = train_models(task, data, scale.train, schedules, theta0,
                          checkpoint_models=list(range(len(seeds))) if keep_checkpoints else None)
    x_val, y_val, _ = task.load_validation(n_val)  # type: ignore[attr-defined]
    x_val, y_val = x_val.to(data.x_train), y_val.to(data.y_train.device)
    test_loss, test_acc = evaluate(task, result.theta, data.x_test, data.y_test)
    val_loss, val_acc = evaluate(task, result.theta, x_val, y_val)
    out = {"theta": result.theta, "test_loss": test_loss, "test_acc": test_acc, "val_loss": val_loss,
           "val_acc": val_acc, "failed": result.failed | ~torch.isfinite(test_loss)}
    if keep_checkpoints:
        out["checkpoints"] = result.checkpoints
    return {k: v.detach().cpu() for k, v in out.items()}


def arm_unit(task: Task, data: TaskData, scale: TaskScale, cfg: PruningConfig, arm: str, removals: list[np.ndarray],
             threads: int, keep_checkpoints: bool = False, **label: Any) -> WorkUnit:
    scale_dict = asdict(scale)
    scale_dict.pop("ground_truth")
    frozen = tuple(tuple(int(i) for i in r) for r in removals)
    config = {"version": CACHE_VERSION, "kind": "pruning_arm", "task": task.name, "scale": scale_dict,
              "seeds": cfg.seeds, "n_val": cfg.n_val, "removals_sha": content_key(frozen),
              "dtype": str(data.x_train.dtype), "device": data.x_train.device.type, "threads": threads,
              "checkpoints": keep_checkpoints}
    job = PruningArmJob(task.name, scale, tuple(cfg.seeds), frozen, cfg.n_val, str(data.x_train.dtype),
                        data.x_train.device.type, keep_checkpoints, data_fingerprint(data))
    return WorkUnit(content_key(config), config, job, "pruning_arm", {"task": task.name, "arm": arm, **label},
                    threads, runs=len(cfg.seeds))


def paired(a: np.ndarray, b: np.ndarray) -> dict[str, float]:
    """Paired difference a − b over seeds: mean, 95 % t-CI and the 80 %-power minimum detectable difference."""
    d = np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)
    n = len(d)
    sd = float(d.std(ddof=1)) if n > 1 else float("nan")
    t975, t80 = stats.t.ppf(0.975, n - 1), stats.t.ppf(0.80, n - 1)
    half = t975 * sd / np.sqrt(n)
    return {"mean": float(d.mean()), "ci_low": float(d.mean() - half), "ci_high": float(d.mean() + half),
            "mde": float((t975 + t80) * sd / np.sqrt(n))}


def summarise(per_seed: pd.DataFrame) -> pd.DataFrame:
    """Per (fraction, arm, metric): mean ± SE over seeds and paired differences to ``full`` and ``fixed_seed``."""
    rows = []
    reported = per_seed[per_seed["reported"]]
    for fraction, part in reported.groupby("fraction", sort=True):
        by_arm = {arm: g.sort_values("seed") for arm, g in part.groupby("arm")}
        for arm in [a for a in ARMS if a in by_arm]:
            g = by_arm[arm]
            for metric in ("test_acc", "test_loss"):
                v = g[metric].to_numpy()
                row = {"fraction": fraction, "arm": arm, "metric": metric, "c": g["c"].iloc[0],
                       "n_seeds": len(v), "mean": float(v.mean()), "se": float(v.std(ddof=1) / np.sqrt(len(v)))}
                for ref in ("full", "fixed_seed"):
                    if ref in by_arm and ref != arm:
                        p = paired(v, by_arm[ref][metric].to_numpy())
                        row.update({f"diff_vs_{ref}": p["mean"], f"diff_vs_{ref}_ci_low": p["ci_low"],
                                    f"diff_vs_{ref}_ci_high": p["ci_high"], f"mde_vs_{ref}": p["mde"]})
                rows.append(row)
    return pd.DataFrame(rows)


class MeanLossTask:
    """The task with one measurement, the mean loss over a whole evaluation set: a "query" is a set x [V, ...]
    and m(θ) = (1/V) Σ_v ℓ_v(θ). Scoring the validation loss as one query costs one gradient instead of V
    (the predicted change of a mean is the mean of the predicted changes: every method here is linear in m).
    Everything else is the wrapped task's."""

    measurement_names = ("loss",)

    def __init__(self, task: Task) -> None:
        self._task = task

    def __getattr__(self, name: str) -> Any:
        return getattr(self._task, name)

    def measurements(self, theta: Tensor, x: Tensor, y: Tensor) -> Tensor:
        """[Q, 1] for query sets x [Q, V, ...], y [Q, V]."""
        return torch.stack([cross_entropy(self._task.logits(theta, xq), yq).mean() for xq, yq in zip(x, y)])[:, None]

    def measurements_batched(self, theta: Tensor, x: Tensor, y: Tensor) -> Tensor:
        return torch.stack([self.measurements(th, x, y) for th in theta])


def _scores_key(task: Task, cfg: PruningConfig, method: Any, val_index: Tensor, theta_sha: str) -> tuple[str, dict]:
    config = {"version": CACHE_VERSION, "kind": "pruning_scores", "task": task.name, "scorer": cfg.scorer,
              "method_config": method.config_dict(), "val_index": val_index.tolist(), "theta_sha256": theta_sha}
    return content_key(config), config


def cached_scores(task: Task, cfg: PruningConfig, full_unit: WorkUnit, store: UnitStore) -> np.ndarray | None:
    """u [S, N] from the store when the full runs and their scores are both cached (for ``--dry-run``)."""
    import methods  # noqa: F401  (registers the methods)
    from benchmark.registry import METHODS

    full = store.get(full_unit.key, full_unit.config) if store.has(full_unit.key) else None
    if full is None:
        return None
    _, _, val_index = task.load_validation(cfg.n_val)  # type: ignore[attr-defined]
    key, config = _scores_key(task, cfg, METHODS.get(cfg.scorer)(), val_index,
                              theta_digest(full["theta"]))
    cached = store.get(key, config) if store.has(key) else None
    return None if cached is None else cached["scores"].double().numpy()


def score_examples(task: Task, data: TaskData, scale: TaskScale, cfg: PruningConfig, full: dict[str, Tensor],
                   store: UnitStore, progress: bool) -> tuple[np.ndarray, float, dict]:
    """u [S, N]: the scorer's predicted change of the mean validation loss on removing each example
    (the validation set is one query of :class:`MeanLossTask`)."""
    import methods  # noqa: F401  (registers the methods)
    from benchmark.registry import METHODS
    from methods.base import RemovalContext

    method = METHODS.get(cfg.scorer)()
    x_val, y_val, val_index = task.load_validation(cfg.n_val)  # type: ignore[attr-defined]
    key, config = _scores_key(task, cfg, method, val_index,
                              theta_digest(full["theta"]))
    cached = store.get(key, config)
    if cached is not None:
        return cached["scores"].double().numpy(), float(cached["runtime_s"]), {}
    score_data = TaskData(x_train=data.x_train, y_train=data.y_train, x_test=x_val.to(data.x_train).unsqueeze(0),
                          y_test=y_val.to(data.y_train.device).unsqueeze(0), train_index=data.train_index)
    dtype, device = data.x_train.dtype, data.x_train.device
    ctx = RemovalContext(task=MeanLossTask(task), data=score_data, scale=scale,  # type: ignore[arg-type]
                         theta_full=full["theta"].to(device, dtype), seeds=cfg.seeds,
                         targets=torch.arange(data.n_train), queries=torch.zeros(1, dtype=torch.long),
                         coupling=Coupling.DELETED, progress=progress,
                         checkpoints=full["checkpoints"].to(device, dtype) if "checkpoints" in full else None)
    start = time.perf_counter()
    delta = method.predict(ctx).detach().cpu().double()  # [S, N, 1, 1], removed − full
    runtime = time.perf_counter() - start
    scores = delta[:, :, 0, 0]  # [S, N]
    store.put(key, config, {"scores": scores, "runtime_s": torch.tensor(runtime)}, kind="pruning_scores",
              tags={"task": task.name, "scorer": cfg.scorer})
    return scores.numpy(), runtime, dict(method.info)


def run_pruning(task: Task, data: TaskData, scale: TaskScale, cfg: PruningConfig, store: UnitStore, out_dir: Path,
                run_dir: Path, common: dict, executor: Executor | None = None, progress: bool = True
                ) -> tuple[list[dict], dict]:
    """The whole experiment (module docstring); returns leaderboard rows and run information."""
    executor = executor or make_executor()
    register_loaded(task, data)
    info: dict[str, Any] = {"pruning": {**asdict(cfg)}}
    full_unit = arm_unit(task, data, scale, cfg, "full", [np.array([], dtype=np.int64)] * cfg.n_seeds,
                         executor.threads, keep_checkpoints=True)
    executor.run(store, [full_unit], desc=f"pruning {task.name}: full runs", progress=progress)
    full = store.get(full_unit.key, full_unit.config)
    assert full is not None
    scores, score_runtime, score_info = score_examples(task, data, scale, cfg, full, store, progress)
    info["pruning"]["scorer_runtime_s"] = score_runtime
    info["pruning"]["scorer_info"] = {k: v for k, v in score_info.items() if isinstance(v, (int, float, str))}
    plans: list[tuple[float, str, float | None, list[np.ndarray]]] = []
    for fraction in cfg.fractions:
        for arm in ("random", "fixed_seed", "distributional"):
            plans.append((fraction, arm, None, arm_removals(arm, scores, fraction, cfg.seeds, task.name)))
        for c in cfg.c_grid:
            plans.append((fraction, "distributional_var", c,
                          arm_removals("distributional_var", scores, fraction, cfg.seeds, task.name, c)))
    units = [arm_unit(task, data, scale, cfg, arm, rem, executor.threads, fraction=f, c=c) for f, arm, c, rem in plans]
    executor.run(store, units, desc=f"pruning {task.name}: arms", progress=progress)
    records = _records(full, None, "full", None, cfg, np.nan)
    for (fraction, arm, c, rem), unit in zip(plans, units):
        out = store.get(unit.key, unit.config)
        assert out is not None
        records += _records(out, rem, arm, c, cfg, fraction)
    per_seed = pd.DataFrame(records)
    per_seed = _expand_full_and_choose_c(per_seed, cfg)
    summary = summarise(per_seed)
    info["pruning"]["chosen_c"] = {str(f): float(per_seed[(per_seed.fraction == f) & per_seed.reported
                                                          & (per_seed.arm == "distributional_var")]["c"].iloc[0])
                                   for f in cfg.fractions}
    write_csv(summary, run_dir / "pruning_summary.csv")
    write_csv(per_seed.drop(columns=["removed"]), run_dir / "pruning_per_seed.csv")
    merged = per_seed.drop(columns=["removed"]).assign(task=task.name, scale=common["scale"])
    _merge_csv(out_dir / "pruning.csv", merged, task.name, common["scale"])
    buf = io.BytesIO()
    np.savez(buf, scores=scores, seeds=np.asarray(cfg.seeds), train_index=data.train_index.numpy())
    atomic_write_bytes(run_dir / "pruning_scores.npz", buf.getvalue())
    return leaderboard_rows(summary, common, cfg, score_runtime), info


def _records(out: dict[str, Tensor], removals: list[np.ndarray] | None, arm: str, c: float | None,
             cfg: PruningConfig, fraction: float) -> list[dict]:
    rows = []
    for i, seed in enumerate(cfg.seeds):
        rows.append({"fraction": fraction, "arm": arm, "c": np.nan if c is None else c, "seed": seed,
                     "n_removed": 0 if removals is None else len(removals[i]),
                     "removed": () if removals is None else tuple(int(k) for k in removals[i]),
                     "test_acc": float(out["test_acc"][i]), "test_loss": float(out["test_loss"][i]),
                     "val_acc": float(out["val_acc"][i]), "val_loss": float(out["val_loss"][i]),
                     "failed": bool(out["failed"][i])})
    return rows


def _expand_full_and_choose_c(per_seed: pd.DataFrame, cfg: PruningConfig) -> pd.DataFrame:
    """One ``full`` block per fraction (the same runs), and ``reported`` = False for the risk-averse arm's
    candidates other than the c with the lowest mean validation loss."""
    full = per_seed[per_seed.arm == "full"]
    parts = [full.assign(fraction=f) for f in cfg.fractions] + [per_seed[per_seed.arm != "full"]]
    out = pd.concat(parts, ignore_index=True)
    out["reported"] = True
    for f in cfg.fractions:
        cand = out[(out.fraction == f) & (out.arm == "distributional_var")]
        best = cand.groupby("c")["val_loss"].mean().idxmin()
        out.loc[cand.index, "reported"] = cand["c"] == best
    return out


def leaderboard_rows(summary: pd.DataFrame, common: dict, cfg: PruningConfig, score_runtime: float) -> list[dict]:
    """Rows with regime ``pruning``: per arm and measurement (test_acc, test_loss) the mean over seeds (CI
    ± t·SE) and the paired differences to ``full`` and ``fixed_seed`` (95 % CI); the MDEs as info rows."""
    rows = []
    t975 = stats.t.ppf(0.975, cfg.n_seeds - 1)
    for r in summary.itertuples():
        base = {**common, "method": r.arm, "variant": f"fraction={r.fraction:g}" + (
            f",c={r.c:g}" if r.arm == "distributional_var" else ""), "measurement": r.metric, "regime": "pruning",
            "coupling": "deleted", "n_seeds": r.n_seeds, "seeds": _seed_text(cfg), "distributional":
            r.arm.startswith("distributional"), "config_hash": content_key(asdict(cfg))}
        rows.append({**base, "metric": "pruning_mean", "value": r.mean, "ci_low": r.mean - t975 * r.se,
                     "ci_high": r.mean + t975 * r.se})
        for ref in ("full", "fixed_seed"):
            diff = getattr(r, f"diff_vs_{ref}", np.nan)
            if isinstance(diff, float) and np.isfinite(diff):
                rows.append({**base, "metric": f"pruning_diff_vs_{ref}", "value": diff,
                             "ci_low": getattr(r, f"diff_vs_{ref}_ci_low"),
                             "ci_high": getattr(r, f"diff_vs_{ref}_ci_high")})
                rows.append({**base, "metric": f"pruning_mde_vs_{ref}", "regime": "info",
                             "value": getattr(r, f"mde_vs_{ref}")})
    rows.append({**common, "method": cfg.scorer, "variant": "pruning_scorer", "measurement": "all",
                 "metric": "runtime_s", "regime": "cost", "value": score_runtime, "n_seeds": cfg.n_seeds,
                 "coupling": "deleted", "seeds": _seed_text(cfg)})
    return rows


def _seed_text(cfg: PruningConfig) -> str:
    from benchmark.leaderboard import seed_ranges

    return seed_ranges(cfg.seeds)


def _merge_csv(path: Path, frame: pd.DataFrame, task: str, scale: str) -> None:
    """Replace this (task, scale)'s rows of ``path`` (the cross-task ``results/pruning.csv``)."""
    if path.is_file():
        old = pd.read_csv(path)
        old = old[~((old["task"] == task) & (old["scale"] == scale))]
        frame = pd.concat([old, frame], ignore_index=True) if len(old) else frame
    write_csv(frame, path)
