"""dtda-bench: score attribution methods against many-seed leave-one-out retraining.

    python run_all.py                                   # every task and method at the `small` scale
    python run_all.py --scale smoke --check results/baselines/smoke.csv   # the CI regression check
    python run_all.py --scale paper --dry-run          # the plan: units, cached, runs, estimated minutes
    python run_all.py --executor process --workers 2   # ground truth on a process pool (also slurm, ray)

Writes results/leaderboard.csv, results/report.md (+ plots) and raw arrays under results/<task>/<scale>/.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import warnings
from pathlib import Path

import numpy as np
import torch

import methods  # noqa: F401  (registers the methods)
import tasks  # noqa: F401  (registers the tasks)
from benchmark.config import Coupling, OptionError, Scale, parse_enum
from benchmark.engine import resolve_device
from benchmark.executors import EXECUTORS, ExecutorSpec, SlurmSettings, make_executor
from benchmark.harness import EVALUATIONS, REFERENCE_METHODS, RunOptions, run
from benchmark.leaderboard import check_regression, merge_into, to_frame
from benchmark.registry import METHODS, TASKS, UnknownNameError
from benchmark.store import UnitStore


def parse_list(value: str, registry_names: list[str], kind: str, option: str | None = None) -> tuple[str, ...]:
    option = option or f"--{kind}s"
    if value == "all":
        return tuple(registry_names)
    names = tuple(v.strip() for v in value.split(",") if v.strip())
    if not names:
        raise OptionError(f"{option} is empty; allowed: all, {', '.join(registry_names)}")
    for n in names:
        if n not in registry_names:
            raise UnknownNameError(kind, n, registry_names)
    if len(set(names)) != len(names):
        raise OptionError(f"{option} lists the same {kind} twice: {value!r}")
    return names


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tasks", default="all", help=f"comma-separated, or all ({', '.join(TASKS.names())})")
    p.add_argument("--methods", default="all", help=f"comma-separated, or all ({', '.join(METHODS.names())})")
    p.add_argument("--scale", default="small", help="smoke, small (default) or paper")
    p.add_argument("--coupling", default=None, help="masked (default), deleted or independent")
    p.add_argument("--seeds", type=int, default=None, help="number of seeds S (default: the scale's)")
    p.add_argument("--out", default="results", help="output folder (default results/)")
    p.add_argument("--cache", default=".cache/dtda", help="unit store folder (default .cache/dtda)")
    p.add_argument("--device", default="auto", help="auto (cuda when present), cpu or cuda")
    p.add_argument("--n-boot", type=int, default=200, help="bootstrap replicates for CIs")
    p.add_argument("--check", default=None, help="baseline leaderboard CSV: exit 1 if a score regressed")
    p.add_argument("--tol", type=float, default=0.05, help="regression tolerance below the baseline's ci_low")
    p.add_argument("--no-report", action="store_true", help="skip report.md and plots")
    p.add_argument("--no-further-training-gold", action="store_true",
                   help="skip Wei et al.'s further-training gold standard and its curves")
    p.add_argument("--eval", default="loo,lds,mechanism",
                   help="comma-separated evaluations: loo (leave-one-out), lds (group removal: LDS and "
                        "distributional LDS), mechanism (the d-TDA mechanism study and SOURCE segments); "
                        "default all three")
    p.add_argument("--lds-seeds", type=int, default=None, help="seeds R of the LDS ground truth (default: the scale's)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    g = p.add_argument_group("scale-out (who computes the ground truth's work units; benchmark.executors)")
    g.add_argument("--executor", default="local", help=f"{', '.join(EXECUTORS)} (default local)")
    g.add_argument("--workers", type=int, default=2, help="process/ray: concurrent workers (default 2)")
    g.add_argument("--threads", type=int, default=None,
                   help="torch threads per unit (part of the unit's key; default: local → this process's, "
                        "process → cores // workers, slurm/ray → 1)")
    g.add_argument("--slurm-partition", default=None, help="slurm: partition")
    g.add_argument("--slurm-time", type=int, default=60, help="slurm: time limit per array task, minutes")
    g.add_argument("--slurm-gpus", type=int, default=0, help="slurm: GPUs per task")
    g.add_argument("--slurm-array-parallelism", type=int, default=64, help="slurm: array tasks running at once")
    g.add_argument("--slurm-folder", default=".cache/submitit", help="slurm: submitit log folder")
    g.add_argument("--slurm-cluster", default=None, help="slurm: slurm, local (subprocesses) or debug; default auto")
    g.add_argument("--ray-address", default=None, help="ray: cluster address (default: start a local instance)")
    g.add_argument("--dry-run", action="store_true",
                   help="print the plan (units, cached, training runs, estimated minutes) and exit")
    return p


def executor_spec(args: argparse.Namespace) -> ExecutorSpec:
    """The frozen executor settings from the command line (errors name the option)."""
    slurm = SlurmSettings(folder=args.slurm_folder, partition=args.slurm_partition, time_min=args.slurm_time,
                          gpus=args.slurm_gpus, array_parallelism=args.slurm_array_parallelism,
                          cluster=args.slurm_cluster)
    spec = ExecutorSpec(name=args.executor, threads=args.threads, workers=args.workers, slurm=slurm,
                        ray_address=args.ray_address)
    make_executor(spec)  # validates the engine's own options now, before any work
    return spec


def options_from_args(args: argparse.Namespace) -> tuple[list[RunOptions], Path, Path]:
    scale = parse_enum(Scale, args.scale, "--scale").value
    coupling = parse_enum(Coupling, args.coupling, "--coupling") if args.coupling is not None else None
    task_names = parse_list(args.tasks, TASKS.names(), "task")
    method_names = parse_list(args.methods, METHODS.names(), "method")
    if args.seeds is not None and args.seeds < 4:
        raise OptionError(f"--seeds must be >= 4 (cross-fitting needs two halves of >= 2), got {args.seeds}")
    if args.n_boot < 10:
        raise OptionError(f"--n-boot must be >= 10, got {args.n_boot}")
    evaluations = parse_list(args.eval, list(EVALUATIONS), "evaluation", "--eval")
    if args.lds_seeds is not None and args.lds_seeds < 4:
        raise OptionError(f"--lds-seeds must be >= 4 (cross-fitting needs two halves of >= 2), got {args.lds_seeds}")
    device = resolve_device(args.device)
    out = Path(args.out)
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / ".write_probe"
        probe.write_text("")
        probe.unlink()
    except OSError as exc:
        raise OptionError(f"--out {out} is not writable: {exc}") from None
    opts = [RunOptions(task=t, scale=scale, methods=method_names, coupling=coupling, n_seeds=args.seeds,
                       device=device, n_boot=args.n_boot, progress=not args.quiet,
                       further_training_gold=not args.no_further_training_gold, evaluations=evaluations,
                       lds_seeds=args.lds_seeds, executor=executor_spec(args)) for t in task_names]
    return opts, out, Path(args.cache)


def print_leaderboard(frame) -> None:  # noqa: ANN001
    prune = frame[(frame["regime"] == "pruning") & frame["metric"].isin(["pruning_mean", "pruning_diff_vs_fixed_seed"])]
    for (task, scale), part in prune.groupby(["task", "scale"], sort=False):
        print(f"\n== {task} / {scale} / pruning (S={part['n_seeds'].max()}; mean [95% CI]) ==")
        cells = part.assign(cell=[f"{v:.4f} [{lo:+.4f},{hi:+.4f}]" for v, lo, hi in
                                  zip(part["value"], part["ci_low"], part["ci_high"])],
                            column=part["measurement"] + " " + part["metric"].str.replace("pruning_", ""))
        print(cells.pivot_table(index=["variant", "method"], columns="column", values="cell", aggfunc="first",
                                sort=False).to_string())
    view = frame[frame["regime"].isin(["distributional", "fixed_seed"])]
    view = view.assign(evaluation=np.where(view["metric"].str.startswith("lds_"), "lds", "loo"))
    for (task, scale, ev, meas), part in view.groupby(["task", "scale", "evaluation", "measurement"], sort=False):
        columns = "subsets M" if ev == "lds" else "K"
        print(f"\n== {task} / {scale} / {ev} / {meas} (coupling {part['coupling'].iloc[0]}, "
              f"S={part['n_seeds'].max()}, {columns}={part['n_targets'].iloc[0]}, Q={part['n_queries'].iloc[0]}) ==")
        cells = part.assign(cell=[f"{v:+.3f} [{lo:+.3f},{hi:+.3f}] c={c:.3f}" if v == v else "—"
                                  for v, lo, hi, c in zip(part["value"], part["ci_low"], part["ci_high"],
                                                          part["noise_ceiling"])])
        table = cells.pivot_table(index="metric", columns="method", values="cell", aggfunc="first", sort=False)
        order = [m for m in part["method"].unique() if m not in REFERENCE_METHODS] + list(REFERENCE_METHODS)
        print(table[[m for m in order if m in table.columns]].to_string())


def dry_run(opts: list[RunOptions], store: UnitStore) -> str:
    """The plan of every (task, scale) in ``opts``: nothing is trained except a short calibration."""
    from benchmark.harness import resolve_scale
    from benchmark.lds import lds_config_for
    from benchmark.plan import format_plan, plan_rows

    rows = []
    executor = make_executor(opts[0].executor)
    for o in opts:
        task_cls = TASKS.get(o.task)
        scale = resolve_scale(task_cls, o)
        task = task_cls(scale)
        data = task.load_data().to(o.device, o.dtype)
        lds_cfg = lds_config_for(task, o.scale)
        if o.lds_seeds is not None:
            lds_cfg = dataclasses.replace(lds_cfg, n_seeds=o.lds_seeds)
        rows += plan_rows(task, data, scale, o.scale, o.evaluations, lds_cfg, store, executor, o.device, o.methods)
    return format_plan(rows, executor, opts[0].device)


def main(argv: list[str] | None = None) -> int:
    # raised inside torch itself on the first torch.func call; nothing for a user to act on
    warnings.filterwarnings("ignore", message="`torch.jit.script` is deprecated", category=FutureWarning)
    args = build_parser().parse_args(argv)
    try:
        opts, out, cache = options_from_args(args)
        store = UnitStore(cache)
    except (OptionError, UnknownNameError, ValueError, PermissionError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.threads is not None and opts[0].executor.name == "local":
        torch.set_num_threads(args.threads)
    rows = []
    try:
        if args.dry_run:
            print(dry_run(opts, store))
            return 0
        for o in opts:
            rows += run(o, out, store)
    except OptionError as exc:  # a setting only checkable against the data (e.g. K > N): nothing was damaged
        print(f"error: {exc}", file=sys.stderr)
        return 2
    merge_into(out / "leaderboard.csv", to_frame(rows))
    if not args.no_report:
        from benchmark.report import write_index, write_report

        sections = [write_report(out, o.task, o.scale) for o in opts]
        write_index(out, sections)
    print_leaderboard(to_frame(rows))
    print(f"\nleaderboard: {out / 'leaderboard.csv'}" + ("" if args.no_report else f"; report: {out / 'report.md'}"))
    if args.check:
        failures = check_regression(to_frame(rows), Path(args.check), args.tol)
        if failures:
            print(f"\nREGRESSION: {len(failures)} score(s) below baseline ci_low − {args.tol}:", file=sys.stderr)
            for f in failures:
                print(f"  {f}", file=sys.stderr)
            return 1
        print(f"regression check passed against {args.check} (tol {args.tol})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
