"""``python -m benchmark.speed executors``: the ``process`` executor's speed-up over ``local`` on one
ground truth, measured in one run.

Builds the same LOO ground truth (default ``mnist_mlp`` ``small``: S × (1+K) trainings) into a fresh store
three times — ``local`` with all of this process's torch threads, ``local`` with 1 thread, and ``process``
with ``--workers`` workers × ``cores // workers`` threads — and prints the wall times, the ratios and
whether the arrays are bit-identical to the ``local`` run of equal thread count (a unit's key includes its
thread count, so the ``local`` 1-thread and ``process`` 1-thread runs must agree to the bit).
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

import tasks  # noqa: F401  (registers the tasks)
from benchmark.executors import LocalExecutor, ProcessExecutor
from benchmark.ground_truth import build_ground_truth
from benchmark.registry import TASKS
from benchmark.store import UnitStore


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmark.speed executors", description=__doc__.splitlines()[0])
    p.add_argument("--task", default="mnist_mlp")
    p.add_argument("--scale", default="small")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--seeds", type=int, default=None, help="S (default: the scale's)")
    args = p.parse_args(argv)
    task_cls = TASKS.get(args.task)
    scale = task_cls.scales[args.scale]
    if args.seeds is not None:
        scale = scale.with_overrides(n_seeds=args.seeds)
    task = task_cls(scale)
    data = task.load_data().to("cpu", torch.float32)
    cores = os.cpu_count() or 1
    all_threads = torch.get_num_threads()
    per_worker = max(1, cores // args.workers)
    runs = {
        f"local_{all_threads}t": LocalExecutor(all_threads),
        "local_1t": LocalExecutor(1),
        f"process_{args.workers}w_{per_worker}t": ProcessExecutor(per_worker, args.workers),
    }
    walls, arrays = {}, {}
    with tempfile.TemporaryDirectory(prefix="dtda-speed-") as tmp:
        for name, executor in runs.items():
            start = time.perf_counter()
            gt = build_ground_truth(task, data, scale, UnitStore(Path(tmp) / name), torch.device("cpu"),
                                    progress=False, executor=executor)
            walls[name] = time.perf_counter() - start
            arrays[name] = gt.measurements
            print(f"{name}: {walls[name]:.1f} s for {gt.measurements.shape[0]} seeds × "
                  f"{gt.measurements.shape[1]} runs", flush=True)
    base, proc = f"local_{all_threads}t", f"process_{args.workers}w_{per_worker}t"
    print(f"process_speedup_vs_local={walls[base] / walls[proc]:.2f}")
    print(f"process_speedup_vs_local_1thread={walls['local_1t'] / walls[proc]:.2f}")
    twin = f"local_{per_worker}t" if f"local_{per_worker}t" in arrays else None
    if twin:
        print(f"bit_identical_process_vs_{twin}={np.array_equal(arrays[twin], arrays[proc])}")
    return 0
