"""Per-seed method work as work units: a method's predictions for a chunk of seeds, computed by any executor.

A method's Δm[s, k, q] for seed s depends only on seed s's recorded run (θ_s, its checkpoints, its batch
order) for every *seed-separable* method (``Method.seed_separable``, the default): each seed's prediction is
that seed's own sample of the predicted law (d-TDA Alg. 1). Such a method's work is split into one
:class:`~benchmark.executors.WorkUnit` per chunk of seeds, the chunks being the ground truth's own units
(``seeds_per_unit`` seeds each), so ``--executor process|slurm|ray`` spreads method work exactly as it spreads
training. A method that pools seeds (``trak_ensemble``: one score averaged over all seeds) is one unit.

A unit ships names, indices and store keys, never arrays: its job reads its seeds' θ_s and checkpoints from
the ground truth's stored units (``GroundTruth.param_sources``: per seed, the unit key and row), reloads the
task's data (:func:`benchmark.executors.loaded_task`, guarded by the data's fingerprint), builds the seeds'
:class:`~methods.base.RemovalContext` and calls ``predict``. Its key hashes the method and config, those
source rows, targets, queries, scale, data fingerprint, dtype, device type and thread count, so a unit is
computed once, a larger seed count reuses the smaller run's units, and every executor stores the same bytes
(at equal device, threads and chunk). The chunks are concatenated in seed order; runtime is their sum (compute
seconds), peak RSS their maximum, and logged info merged by :func:`merge_info`.
"""

from __future__ import annotations

import json
import threading
import time
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor

from benchmark.config import CACHE_VERSION, Coupling, TaskScale
from benchmark.executors import Executor, WorkUnit, compute_into_store, data_fingerprint, loaded_task, make_executor
from benchmark.store import UnitStore, content_key


class PeakRss:
    """Samples this process's resident set size (Linux /proc) while a block runs; ``peak_mb`` after."""

    def __init__(self, interval: float = 0.05) -> None:
        self.interval, self.peak_mb, self._stop = interval, float("nan"), threading.Event()

    @staticmethod
    def current_mb() -> float:
        try:
            with open("/proc/self/status") as fh:
                for line in fh:
                    if line.startswith("VmRSS:"):
                        return int(line.split()[1]) / 1024
        except OSError:
            pass
        return float("nan")

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak_mb = np.nanmax([self.peak_mb, self.current_mb()])
            self._stop.wait(self.interval)

    def __enter__(self) -> PeakRss:
        self.peak_mb = self.current_mb()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak_mb = float(np.nanmax([self.peak_mb, self.current_mb()]))


def load_params(store_root: str, sources: tuple[tuple[str, int], ...]) -> tuple[Tensor, Tensor]:
    """(theta_full [s, P], checkpoints [s, E+1, P]) of the seeds at ``sources`` (ground-truth unit key, row)."""
    store = UnitStore(store_root)
    loaded: dict[str, dict[str, Tensor]] = {}
    thetas, ckpts = [], []
    for key, row in sources:
        if key not in loaded:
            tensors = store.get(key)
            if tensors is None:
                raise RuntimeError(f"ground-truth unit {key[:12]} is not in the store at {store_root}; "
                                   "a method unit reads its seeds' parameters from there")
            loaded[key] = tensors
        thetas.append(loaded[key]["theta_full"][row])
        ckpts.append(loaded[key]["checkpoints"][row])
    return torch.stack(thetas), torch.stack(ckpts)


@dataclass(frozen=True)
class PredictSeedsJob:
    """A picklable unit job: ``method_cls(config).predict`` on the seeds ``seeds`` (parameters from the store at
    ``store_root`` by ``sources``, or ``params`` for a ground truth built by hand). Returns ``delta`` [s, K, Q, M]
    (float, CPU), ``runtime_s``, ``peak_rss_mb`` and ``info_json`` (the method's logged info, UTF-8 bytes)."""

    method_cls: type
    config: Any
    task: str
    scale: TaskScale
    dtype: str
    device: str
    data_sha: str
    seeds: tuple[int, ...]
    targets: tuple[int, ...]
    queries: tuple[int, ...]
    coupling: Coupling
    store_root: str
    sources: tuple[tuple[str, int], ...] = ()
    params: tuple[Tensor, Tensor | None] | None = None
    progress: bool = False

    def __call__(self) -> dict[str, Tensor]:
        from methods.base import RemovalContext

        task, data = loaded_task(self.task, self.scale, self.dtype, self.device, self.data_sha)
        theta, ckpt = self.params if self.params is not None else load_params(self.store_root, self.sources)
        like = data.x_train
        ctx = RemovalContext(task=task, data=data, scale=self.scale, theta_full=theta.to(like.device, like.dtype),
                             seeds=list(self.seeds), targets=torch.tensor(self.targets, dtype=torch.long),
                             queries=torch.tensor(self.queries, dtype=torch.long), coupling=self.coupling,
                             progress=self.progress,
                             checkpoints=None if ckpt is None else ckpt.to(like.device, like.dtype))
        method = self.method_cls(self.config)
        with PeakRss() as rss:
            start = time.perf_counter()
            delta = method.predict(ctx).detach().cpu()
            runtime = time.perf_counter() - start
        return {"delta": delta, "runtime_s": torch.tensor(runtime), "peak_rss_mb": torch.tensor(rss.peak_mb),
                "info_json": torch.tensor(list(json.dumps(method.info).encode()), dtype=torch.uint8)}


def seed_chunks(n_seeds: int, sources: tuple[tuple[str, int], ...], separable: bool) -> list[range]:
    """Seed-index ranges, one per method unit: runs of consecutive seeds from the same ground-truth unit
    (one range of all seeds for a method that is not seed-separable, or when the sources are unknown)."""
    if not separable or len(sources) != n_seeds:
        return [range(n_seeds)]
    chunks, start = [], 0
    for i in range(1, n_seeds + 1):
        if i == n_seeds or sources[i][0] != sources[i - 1][0]:
            chunks.append(range(start, i))
            start = i
    return chunks


def method_units(method: Any, ctx: Any, gt: Any, store: UnitStore, threads: int, progress: bool = False
                 ) -> list[WorkUnit]:
    """The work units of ``method`` on context ``ctx`` (whose seeds are ``gt``'s): one per seed chunk."""
    scale_dict = asdict(ctx.scale)
    scale_dict.pop("ground_truth")
    data_sha = data_fingerprint(ctx.data)
    sources = tuple((str(k), int(r)) for k, r in gt.param_sources)
    targets, queries = tuple(int(t) for t in ctx.targets), tuple(int(q) for q in ctx.queries)
    like = ctx.data.x_train
    units = []
    for chunk in seed_chunks(ctx.n_seeds, sources, method.seed_separable):
        seeds = tuple(ctx.seeds[i] for i in chunk)
        chunk_sources = sources[chunk.start:chunk.stop] if sources else ()
        config = {"version": CACHE_VERSION, "kind": "prediction", "method": method.name,
                  "config": method.config_dict(), "task": ctx.task.name, "scale": scale_dict, "seeds": list(seeds),
                  # a ground truth built by hand has no stored sources: its key and seed positions stand in
                  "sources": [list(s) for s in chunk_sources] or [gt.key, chunk.start, chunk.stop],
                  "targets": content_key(list(targets)), "queries": content_key(list(queries)),
                  "coupling": ctx.coupling.value, "data_sha": data_sha, "dtype": str(like.dtype),
                  "device": like.device.type, "threads": threads}
        params = None
        if not chunk_sources:
            ckpt = None if ctx.checkpoints is None else ctx.checkpoints[chunk.start:chunk.stop].detach().cpu()
            params = (ctx.theta_full[chunk.start:chunk.stop].detach().cpu(), ckpt)
        job = PredictSeedsJob(type(method), method.config, ctx.task.name, ctx.scale, str(like.dtype),
                              like.device.type, data_sha, seeds, targets, queries, ctx.coupling, str(store.root),
                              chunk_sources, params, progress)
        units.append(WorkUnit(content_key(config), config, job, "prediction",
                              {"method": method.name, "task": ctx.task.name, "seeds": [seeds[0], seeds[-1]]}, threads))
    return units


def merge_info(infos: list[dict[str, Any]], weights: list[int]) -> dict[str, Any]:
    """One method-info dict from the chunks': a key containing ``max`` takes the maximum, ``invalid_…`` counts
    add up, other numbers take the seed-weighted mean (the chunks' per-seed means → the all-seed mean), and
    anything else the first chunk's value."""
    out: dict[str, Any] = {}
    for key in dict.fromkeys(k for info in infos for k in info):
        pairs = [(info[key], w) for info, w in zip(infos, weights) if key in info]
        values = [v for v, _ in pairs]
        if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
            out[key] = values[0]
        elif "max" in key:
            out[key] = max(values)
        elif key.startswith("invalid_"):
            out[key] = sum(values)
        else:
            out[key] = float(sum(v * w for v, w in pairs) / sum(w for _, w in pairs))
    return out


def predict_in_units(method: Any, ctx: Any, gt: Any, store: UnitStore, executor: Executor | None = None
                     ) -> tuple[np.ndarray, float, float, dict[str, Any]]:
    """Predictions [S, K, Q, M] (float64), runtime (s, summed over units), peak RSS (MB, max over units) and
    merged info: the method's units computed by ``executor`` (default local) into ``store``, or loaded."""
    executor = executor or make_executor()
    progress = bool(ctx.progress) and executor.name == "local"
    units = method_units(method, ctx, gt, store, executor.threads, progress)
    executor.run(store, units, desc=f"{method.name} ({ctx.n_seeds} seeds)",
                 progress=bool(ctx.progress) and len(units) > 1)
    parts = []
    for unit in units:
        tensors = store.get(unit.key, unit.config)
        if tensors is None:  # removed as corrupt between the executor's write and this read: recompute here
            compute_into_store(str(store.root), unit)
            tensors = store.get(unit.key, unit.config)
        if tensors is None:
            raise RuntimeError(f"method unit {unit.key[:12]} ({method.name}) could not be computed into {store.root}")
        parts.append(tensors)
    delta = torch.cat([p["delta"] for p in parts]).double().numpy()
    infos = [json.loads(bytes(p["info_json"].tolist()).decode()) for p in parts]
    weights = [int(p["delta"].shape[0]) for p in parts]
    return (delta, float(sum(float(p["runtime_s"]) for p in parts)),
            float(np.nanmax([float(p["peak_rss_mb"]) for p in parts])), merge_info(infos, weights))


__all__ = ["PeakRss", "PredictSeedsJob", "load_params", "merge_info", "method_units", "predict_in_units",
           "seed_chunks"]
