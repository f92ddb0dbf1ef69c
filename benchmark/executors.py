"""Executors: hand a list of independent work units to an engine, and get every unit into the store.

A :class:`WorkUnit` is a content key, the config that key hashes, and a *picklable* job (a callable
returning a tensor dict: e.g. :class:`benchmark.ground_truth.TrainRemovalsJob`). Whoever runs the job
writes the result into the shared :class:`~benchmark.store.UnitStore` (atomic rename, sha256 in the file),
so the parent only needs the store afterwards, whichever engine ran the work:

- ``local``: in this process, one unit after another (the default);
- ``process``: a ``concurrent.futures.ProcessPoolExecutor`` (spawn) of ``workers`` processes;
- ``slurm``: submitit job arrays (``cluster="local"`` runs them as local subprocesses, as the tests do);
- ``ray``: remote tasks on ``ray.init(address=...)`` (an optional extra: ``pip install -e ".[ray]"``).

Bit-identity across engines holds *by construction* at equal device, threads and unit shape: the unit's
thread count and model-batch size are part of its key (``threads``, ``max_models`` in the config) and the
worker sets ``torch.set_num_threads(unit.threads)`` before running the job. A unit already in the store is
never recomputed; two runs racing on one unit both write identical bytes and the store keeps one.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import os
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from tqdm.auto import tqdm

from benchmark.config import OptionError
from benchmark.store import UnitStore

EXECUTORS = ("local", "process", "slurm", "ray")


@dataclass(frozen=True)
class WorkUnit:
    """One independent piece of work: ``job()`` → tensor dict, stored under ``key`` with ``config``.

    ``threads`` is the torch intra-op thread count the job runs with (also inside ``config``, so a unit
    computed with another thread count is another unit); ``runs`` is the number of training runs it holds
    (for ``--dry-run`` estimates)."""

    key: str
    config: dict[str, Any]
    job: Callable[[], dict[str, Tensor]]
    kind: str
    tags: dict[str, Any]
    threads: int
    runs: int = 0


class UnitFailedError(RuntimeError):
    """A work unit raised inside an executor; the message names the unit."""


def compute_into_store(store_root: str, unit: WorkUnit) -> str:
    """Run ``unit.job`` with ``unit.threads`` threads and put the result in the store at ``store_root``
    (skipped when the unit is already there). Runs inside whichever worker the executor uses; returns the key."""
    store = UnitStore(store_root)
    if store.has(unit.key) and store.get(unit.key, unit.config) is not None:
        return unit.key
    previous = torch.get_num_threads()
    torch.set_num_threads(unit.threads)
    try:
        tensors = unit.job()
    finally:
        torch.set_num_threads(previous)
    store.put(unit.key, unit.config, tensors, kind=unit.kind, tags=unit.tags)
    return unit.key


def _worker_init(threads: int) -> None:
    torch.set_num_threads(threads)
    os.environ.setdefault("OMP_NUM_THREADS", str(threads))


class Executor(ABC):
    """Computes the missing units of a list into a store. ``threads``: each unit's torch thread count."""

    name: str = ""

    def __init__(self, threads: int) -> None:
        if threads < 1:
            raise OptionError(f"--threads must be >= 1, got {threads}")
        self.threads = threads

    def run(self, store: UnitStore, units: Sequence[WorkUnit], desc: str = "units", progress: bool = True) -> None:
        """Compute every unit of ``units`` not yet in ``store``; raises :class:`UnitFailedError` naming the
        first unit that failed (the others that finished stay stored)."""
        missing = [u for u in units if not store.has(u.key)]
        if missing:
            self._run_missing(store, missing, desc, progress)

    @abstractmethod
    def _run_missing(self, store: UnitStore, units: list[WorkUnit], desc: str, progress: bool) -> None: ...

    def describe(self) -> str:
        return f"{self.name} (threads per unit {self.threads})"


class LocalExecutor(Executor):
    """In this process, one unit after another."""

    name = "local"

    def _run_missing(self, store: UnitStore, units: list[WorkUnit], desc: str, progress: bool) -> None:
        for unit in tqdm(units, desc=desc, unit="unit", disable=not progress):
            compute_into_store(str(store.root), unit)


class ProcessExecutor(Executor):
    """A ``ProcessPoolExecutor`` of ``workers`` spawned processes, each unit with ``threads`` threads."""

    name = "process"

    def __init__(self, threads: int, workers: int) -> None:
        super().__init__(threads)
        if workers < 1:
            raise OptionError(f"--workers must be >= 1, got {workers}")
        self.workers = workers

    def describe(self) -> str:
        return f"process ({self.workers} workers × {self.threads} thread(s))"

    def _run_missing(self, store: UnitStore, units: list[WorkUnit], desc: str, progress: bool) -> None:
        import multiprocessing

        ctx = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(max_workers=min(self.workers, len(units)), mp_context=ctx,
                                 initializer=_worker_init, initargs=(self.threads,)) as pool:
            futures = {pool.submit(compute_into_store, str(store.root), u): u for u in units}
            bar = tqdm(total=len(units), desc=desc, unit="unit", disable=not progress)
            try:
                for fut in as_completed(futures):
                    _result_or_raise(futures[fut], fut.result)
                    bar.update()
            finally:
                bar.close()


@dataclass(frozen=True)
class SlurmSettings:
    """submitit settings: ``cluster`` None (auto: SLURM when ``sbatch`` exists), ``"slurm"``, ``"local"``
    (local subprocesses, as in the tests) or ``"debug"`` (in-process)."""

    folder: str = ".cache/submitit"
    partition: str | None = None
    time_min: int = 60
    gpus: int = 0
    array_parallelism: int = 64
    cluster: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)


class SlurmExecutor(Executor):
    """submitit job arrays: one array task per unit (``map_array``), results written to the shared store."""

    name = "slurm"

    def __init__(self, threads: int, settings: SlurmSettings) -> None:
        super().__init__(threads)
        if settings.cluster not in (None, "slurm", "local", "debug"):
            raise OptionError(f"--slurm-cluster must be one of: slurm, local, debug; got {settings.cluster!r}")
        if settings.time_min < 1 or settings.gpus < 0 or settings.array_parallelism < 1:
            raise OptionError("--slurm-time must be >= 1, --slurm-gpus >= 0, --slurm-array-parallelism >= 1")
        self.settings = settings

    def describe(self) -> str:
        s = self.settings
        return f"slurm (cluster {s.cluster or 'auto'}, partition {s.partition}, {self.threads} cpu(s) per task)"

    def _run_missing(self, store: UnitStore, units: list[WorkUnit], desc: str, progress: bool) -> None:
        try:
            import submitit
        except ImportError as exc:  # pragma: no cover - dev installs it
            raise OptionError("--executor slurm needs submitit: pip install submitit") from exc
        s = self.settings
        executor = submitit.AutoExecutor(folder=s.folder, cluster=s.cluster)
        params: dict[str, Any] = {"timeout_min": s.time_min, "cpus_per_task": self.threads,
                                  "slurm_array_parallelism": s.array_parallelism, **s.extra}
        if s.gpus:
            params["gpus_per_node"] = s.gpus
        if s.partition:
            params["slurm_partition"] = s.partition
        executor.update_parameters(**params)
        jobs = executor.map_array(compute_into_store, [str(store.root)] * len(units), units)
        bar = tqdm(total=len(units), desc=desc, unit="unit", disable=not progress)
        try:
            for job, unit in zip(jobs, units):
                _result_or_raise(unit, job.result)
                bar.update()
        finally:
            bar.close()


class RayExecutor(Executor):
    """Ray remote tasks (``num_cpus = threads`` each) on ``ray.init(address=address)``; ``address`` None
    starts a local Ray instance."""

    name = "ray"

    def __init__(self, threads: int, address: str | None = None, num_cpus: int | None = None) -> None:
        super().__init__(threads)
        self.address = address
        self.num_cpus = num_cpus

    def describe(self) -> str:
        return f"ray (address {self.address or 'local'}, {self.threads} cpu(s) per task)"

    def _run_missing(self, store: UnitStore, units: list[WorkUnit], desc: str, progress: bool) -> None:
        try:
            import ray
        except ImportError as exc:
            raise OptionError('--executor ray needs Ray: pip install -e ".[ray]"') from exc
        if not ray.is_initialized():
            root = str(Path(__file__).resolve().parent.parent)
            env = {"env_vars": {"PYTHONPATH": os.pathsep.join([root, os.environ.get("PYTHONPATH", "")]),
                                "OMP_NUM_THREADS": str(self.threads)}}
            kwargs: dict[str, Any] = {"runtime_env": env, "include_dashboard": False, "log_to_driver": False}
            if self.address is None:
                kwargs["num_cpus"] = self.num_cpus or os.cpu_count() or 1
            ray.init(address=self.address, **kwargs)
        remote = ray.remote(num_cpus=self.threads)(compute_into_store)
        refs = {remote.remote(str(store.root), u): u for u in units}
        bar = tqdm(total=len(units), desc=desc, unit="unit", disable=not progress)
        try:
            pending = list(refs)
            while pending:
                (ref,), pending = ray.wait(pending, num_returns=1)
                _result_or_raise(refs[ref], functools.partial(ray.get, ref))
                bar.update()
        finally:
            bar.close()


def _result_or_raise(unit: WorkUnit, get: Callable[[], Any]) -> Any:
    try:
        return get()
    except Exception as exc:
        raise UnitFailedError(f"work unit {unit.key[:12]} ({unit.kind}, tags {unit.tags}) failed: "
                              f"{type(exc).__name__}: {exc}") from exc


@dataclass(frozen=True)
class ExecutorSpec:
    """What ``run_all.py`` parsed: the engine's name and its options (frozen; :func:`make_executor` builds it)."""

    name: str = "local"
    threads: int | None = None  # None: local → this process's torch threads; others → cores // workers
    workers: int = 2
    slurm: SlurmSettings = field(default_factory=SlurmSettings)
    ray_address: str | None = None

    def __post_init__(self) -> None:
        if self.name not in EXECUTORS:
            raise OptionError(f"--executor must be one of: {', '.join(EXECUTORS)}; got {self.name!r}")
        if self.workers < 1:
            raise OptionError(f"--workers must be >= 1, got {self.workers}")
        if self.threads is not None and self.threads < 1:
            raise OptionError(f"--threads must be >= 1, got {self.threads}")

    def resolved_threads(self) -> int:
        if self.threads is not None:
            return self.threads
        if self.name == "local":
            return torch.get_num_threads()
        return max(1, (os.cpu_count() or 1) // self.workers) if self.name == "process" else 1


def make_executor(spec: ExecutorSpec | None = None) -> Executor:
    """The executor ``spec`` names (default: local with this process's thread count)."""
    spec = spec or ExecutorSpec()
    threads = spec.resolved_threads()
    if spec.name == "local":
        return LocalExecutor(threads)
    if spec.name == "process":
        return ProcessExecutor(threads, spec.workers)
    if spec.name == "slurm":
        return SlurmExecutor(threads, spec.slurm)
    return RayExecutor(threads, spec.ray_address, num_cpus=spec.workers * threads if spec.ray_address is None
                       else None)


# ---------------------------------------------------------------- a worker's loaded task and data
_LOADED: dict[str, tuple[Any, Any]] = {}


def loaded_task(task_name: str, scale: Any, dtype: str, device: str, data_sha: str = "") -> tuple[Any, Any]:
    """(task, data) for ``task_name`` at ``scale``, loaded once per process (a worker reloads the data from
    disk: units carry names and settings, never arrays). The parent registers what it already loaded.
    ``data_sha`` (:func:`data_fingerprint` of the caller's data) guards against a worker whose reloaded data
    differ from the caller's (e.g. data the caller built by hand, which only ``local`` can see)."""
    key = _memo_key(task_name, scale, dtype, device)
    if key not in _LOADED:
        import tasks  # noqa: F401  (registers the tasks)
        from benchmark.registry import TASKS

        task = TASKS.get(task_name)(scale)
        data = task.load_data().to(torch.device(device), getattr(torch, dtype.removeprefix("torch.")))
        _LOADED[key] = (task, data)
    task, data = _LOADED[key]
    if data_sha and data_fingerprint(data) != data_sha:
        raise ValueError(f"this worker's {task_name!r} data (task.load_data()) differ from the data the work was "
                         "planned on; executors other than 'local' need data that task.load_data() reproduces")
    return task, data


def data_fingerprint(data: Any) -> str:
    """sha256 of the training and test arrays (bytes, shapes, dtypes), memoised per data object."""
    cached = _FINGERPRINTS.get(id(data))
    if cached is not None and cached[0] is data:
        return cached[1]
    digest = hashlib.sha256()
    for t in (data.x_train, data.y_train, data.x_test, data.y_test, data.train_index):
        digest.update(f"{tuple(t.shape)}{t.dtype}".encode())
        digest.update(t.detach().cpu().contiguous().numpy().tobytes())
    _FINGERPRINTS[id(data)] = (data, digest.hexdigest())
    return _FINGERPRINTS[id(data)][1]


_FINGERPRINTS: dict[int, tuple[Any, str]] = {}


def register_loaded(task: Any, data: Any) -> None:
    """Let in-process jobs reuse the caller's task and data (no reload)."""
    key = _memo_key(task.name, task.scale, str(data.x_train.dtype), data.x_train.device.type)
    _LOADED[key] = (task, data)


def _memo_key(task_name: str, scale: Any, dtype: str, device: str) -> str:
    return repr((task_name, dataclasses.asdict(scale), dtype, torch.device(device).type))


__all__ = ["EXECUTORS", "Executor", "ExecutorSpec", "LocalExecutor", "ProcessExecutor", "RayExecutor",
           "SlurmExecutor", "SlurmSettings", "UnitFailedError", "WorkUnit", "compute_into_store",
           "data_fingerprint", "loaded_task", "make_executor", "register_loaded"]
