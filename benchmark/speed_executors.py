"""``python -m benchmark.speed executors``: the ``process`` executor's speed-up over ``local`` on one
ground truth, measured in one run.

Builds the same LOO ground truth (default ``mnist_mlp`` ``small``: S × (1+K) trainings) into a fresh store
three times — ``local`` with all of this process's torch threads, ``local`` with 1 thread, and ``process``
with ``--workers`` workers × ``cores // workers`` threads — and prints the wall times, the ratios and
whether the arrays are bit-identical to the ``local`` run of equal thread count (a unit's key includes its
thread count, so the ``local`` 1-thread and ``process`` 1-thread runs must agree to the bit). With
``--method NAME`` it then times that method's work units (``benchmark.method_units``: one per ground-truth
unit) on each store with the same executor, and prints their speed-up and bit-identity the same way.
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
from benchmark.registry import METHODS, TASKS
from benchmark.store import UnitStore


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmark.speed executors", description=__doc__.splitlines()[0])
    p.add_argument("--task", default="mnist_mlp")
    p.add_argument("--scale", default="small")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--seeds", type=int, default=None, help="S (default: the scale's)")
    p.add_argument("--method", default=None, help="also time this method's work units (e.g. unroll)")
    args = p.parse_args(argv)
    if args.method is not None:
        import methods  # noqa: F401  (registers the methods)

        METHODS.get(args.method)  # an unknown name fails here, before any training
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
    walls, arrays, method_walls, predictions = {}, {}, {}, {}
    with tempfile.TemporaryDirectory(prefix="dtda-speed-") as tmp:
        for name, executor in runs.items():
            store = UnitStore(Path(tmp) / name)
            start = time.perf_counter()
            gt = build_ground_truth(task, data, scale, store, torch.device("cpu"), progress=False, executor=executor)
            walls[name] = time.perf_counter() - start
            arrays[name] = gt.measurements
            print(f"{name}: {walls[name]:.1f} s for {gt.measurements.shape[0]} seeds × "
                  f"{gt.measurements.shape[1]} runs", flush=True)
            if args.method is not None:
                from benchmark.harness import run_method
                from methods.base import RemovalContext

                ctx = RemovalContext(task=task, data=data, scale=scale, theta_full=gt.theta_full, seeds=gt.run_seeds,
                                     targets=torch.as_tensor(gt.targets), queries=torch.as_tensor(gt.queries),
                                     coupling=gt.coupling, checkpoints=gt.checkpoints)
                start = time.perf_counter()
                predictions[name] = run_method(METHODS.get(args.method)(), ctx, gt, store, executor)[0]
                method_walls[name] = time.perf_counter() - start
                print(f"{name}: {args.method} {method_walls[name]:.1f} s", flush=True)
    base, proc = f"local_{all_threads}t", f"process_{args.workers}w_{per_worker}t"
    twin = f"local_{per_worker}t" if f"local_{per_worker}t" in arrays else None
    for label, wall, out in [("", walls, arrays), (f"{args.method}_", method_walls, predictions)]:
        if not wall:
            continue
        print(f"{label}process_speedup_vs_local={wall[base] / wall[proc]:.2f}")
        print(f"{label}process_speedup_vs_local_1thread={wall['local_1t'] / wall[proc]:.2f}")
        if twin:
            print(f"{label}bit_identical_process_vs_{twin}={np.array_equal(out[twin], out[proc])}")
    return 0
