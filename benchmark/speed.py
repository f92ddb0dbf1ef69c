"""Speed benchmarks, each a ratio measured in one process.

    python -m benchmark.speed [engine] [--models 64] [--loop-models 8] [--repeats 3]
    python -m benchmark.speed ekfac [--queries 100]          (see ``benchmark.speed_ekfac``)
    python -m benchmark.speed executors [--workers 2]        (see ``benchmark.speed_executors``)

``engine``: engine throughput against a plain torch.optim loop and a torch.func vmap ensemble.
All three train the ``small`` MNIST MLP on the same schedules (one shared batch order, as the vmap
recipe requires). Speed is reported as ratios of trainings per second measured in this run (medians
over repeats), never as absolute claims; the achieved fraction of this machine's matmul peak counts
6·B·Σ(d_in·d_out) FLOPs per model per step (forward + both backward matmuls) against a 2048³ GEMM.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch

import tasks  # noqa: F401
from benchmark.config import Coupling
from benchmark.engine import build_schedule, initial_params, resolve_device, train_models
from benchmark.reference_training import train_torch_loop, train_vmap_ensemble
from tasks.mnist_mlp import MnistMlp


def matmul_peak_gflops(device: torch.device, size: int = 2048, repeats: int = 10) -> float:
    a, b = torch.randn(size, size, device=device), torch.randn(size, size, device=device)
    for _ in range(3):
        a @ b
    sync(device)
    start = time.perf_counter()
    for _ in range(repeats):
        a @ b
    sync(device)
    return 2 * size**3 * repeats / (time.perf_counter() - start) / 1e9


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device: torch.device) -> float:  # noqa: ANN001
    sync(device)
    start = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - start


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "ekfac":
        from benchmark import speed_ekfac

        return speed_ekfac.main(argv[1:])
    if argv and argv[0] == "executors":
        from benchmark import speed_executors

        return speed_executors.main(argv[1:])
    if argv and argv[0] == "engine":
        argv = argv[1:]
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", type=int, default=64, help="models trained at once by engine and vmap")
    p.add_argument("--loop-models", type=int, default=8, help="models trained one by one by the loop")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--device", default="auto")
    args = p.parse_args(argv)
    device = resolve_device(args.device)
    task = MnistMlp(MnistMlp.scales["small"])
    data = task.load_data().to(device, torch.float32)
    cfg = task.scale.train
    sched = build_schedule(task.name, data.n_train, cfg, 0, None, Coupling.MASKED)
    theta0 = initial_params(task, list(range(args.models)), torch.float32, device)
    rates: dict[str, list[float]] = {"engine": [], "vmap": [], "loop": []}
    for _ in range(args.repeats):
        rates["engine"].append(args.models / timed(lambda: train_models(task, data, cfg, [sched] * args.models,
                                                                         theta0), device))
        rates["vmap"].append(args.models / timed(lambda: train_vmap_ensemble(task, data, cfg, sched, theta0), device))
        rates["loop"].append(args.loop_models / timed(
            lambda: [train_torch_loop(task, data, cfg, sched, theta0[i]) for i in range(args.loop_models)], device))
    med = {k: statistics.median(v) for k, v in rates.items()}
    sizes = task.layer_sizes()
    flops_per_training = 6 * cfg.batch_size * sum(a * b for a, b in zip(sizes[:-1], sizes[1:])) * sched.idx.shape[0]
    peak = matmul_peak_gflops(device)
    achieved = med["engine"] * flops_per_training / 1e9
    print(f"device={device} threads={torch.get_num_threads()} models={args.models} P={task.n_params} "
          f"steps={sched.idx.shape[0]}")
    for k, v in med.items():
        print(f"{k}: {v:.1f} trainings/s (median of {args.repeats}; runs {', '.join(f'{x:.1f}' for x in rates[k])})")
    print(f"engine_speedup_vs_torch_loop={med['engine'] / med['loop']:.2f}")
    print(f"engine_speedup_vs_vmap={med['engine'] / med['vmap']:.2f}")
    print(f"matmul_peak_gflops={peak:.1f} engine_gflops={achieved:.1f} "
          f"engine_fraction_of_matmul_peak={achieved / peak:.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
