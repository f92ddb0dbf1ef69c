"""Fault injection: ``python -m benchmark.faults kill --repeats 10``.

Runs a ``smoke`` job once uninterrupted (the reference), then ``repeats`` times: starts the same job on a
fresh cache, ``kill -9`` s it at a random moment (uniform over the reference's wall time, from a seeded
generator), records every finished unit file (inode and mtime), resumes the job to completion, and checks

1. no unit finished before the kill was recomputed or rewritten (same inode, same mtime);
2. the final leaderboard equals the reference's on every column but the timing ones (``runtime_s``,
   ``peak_rss_mb`` and the value of ``cost`` rows and ``seconds_*`` info rows: a prediction recomputed after
   the kill is timed again, and each run times its own reference training), NaN = NaN;
3. the exported ground-truth arrays equal the reference's bit for bit.

It prints one line per repeat and, last, ``kill_resume_ok=<passed>/<repeats>``; exit status 0 only when
all passed. ``--run-args`` replaces the job's arguments (default: :data:`DEFAULT_RUN_ARGS`).
"""

from __future__ import annotations

import argparse
import os
import random
import shlex
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

REPO = Path(__file__).resolve().parent.parent
DEFAULT_RUN_ARGS = ("--scale", "smoke", "--eval", "loo,lds", "--methods", "unroll,influence_ekfac,trak,grad_dot",
                    "--no-report", "--quiet", "--device", "cpu")
TIMING_COLUMNS = ("runtime_s", "peak_rss_mb")


@dataclass(frozen=True)
class RepeatResult:
    kill_after_s: float
    killed: bool  # False when the job had already finished at the kill moment
    units_before: int
    rewritten: list[str]
    leaderboard_diff: str
    arrays_diff: str

    @property
    def ok(self) -> bool:
        return not self.rewritten and not self.leaderboard_diff and not self.arrays_diff


def unit_stamps(cache: Path) -> dict[str, tuple[int, int]]:
    """{unit file name: (inode, mtime_ns)} of every finished unit under ``cache``."""
    units = cache / "units"
    if not units.exists():
        return {}
    out = {}
    for p in units.glob("*/*.safetensors"):
        try:
            st = p.stat()
        except FileNotFoundError:
            continue
        out[p.name] = (st.st_ino, st.st_mtime_ns)
    return out


def rewritten_units(before: dict[str, tuple[int, int]], cache: Path) -> list[str]:
    """Units present in ``before`` that are now missing or were rewritten (another inode or mtime)."""
    after = unit_stamps(cache)
    return sorted(name for name, stamp in before.items() if after.get(name) != stamp)


def leaderboard_difference(reference: Path, other: Path) -> str:
    """'' when the two leaderboards agree on every non-timing column (rows matched by their key), else why."""
    from benchmark.leaderboard import KEY_COLUMNS

    a, b = pd.read_csv(reference), pd.read_csv(other)
    if len(a) != len(b):
        return f"{len(b)} rows, reference {len(a)}"
    cols = [c for c in a.columns if c not in TIMING_COLUMNS]
    if list(b.columns) != list(a.columns):
        return f"columns differ: {sorted(set(a.columns) ^ set(b.columns))}"
    a = a[cols].sort_values(list(KEY_COLUMNS)).reset_index(drop=True)
    b = b[cols].sort_values(list(KEY_COLUMNS)).reset_index(drop=True)
    for frame in (a, b):  # timings: cost rows (relative to a training timed in this run), seconds_* info rows
        timing = (frame["regime"] == "cost") | frame["metric"].astype(str).str.contains("seconds")
        frame.loc[timing, "value"] = np.nan
    for c in cols:
        x, y = a[c].to_numpy(), b[c].to_numpy()
        same = (x == y) | (pd.isna(x) & pd.isna(y))
        if not same.all():
            i = int(np.flatnonzero(~same)[0])
            return f"column {c!r} differs, e.g. {dict(a.loc[i, list(KEY_COLUMNS)])}: {x[i]!r} vs {y[i]!r}"
    return ""


def arrays_difference(reference: Path, other: Path) -> str:
    """'' when every ``*ground_truth.npz`` under ``reference`` has a bit-identical twin under ``other``."""
    for ref in sorted(reference.rglob("*ground_truth.npz")):
        twin = other / ref.relative_to(reference)
        if not twin.exists():
            return f"{twin} missing"
        with np.load(ref, allow_pickle=False) as x, np.load(twin, allow_pickle=False) as y:
            for name in x.files:
                if name not in y.files or not np.array_equal(x[name], y[name], equal_nan=x[name].dtype.kind == "f"):
                    return f"{ref.relative_to(reference)}: array {name!r} differs"
    return ""


def _command(run_args: Sequence[str], out: Path, cache: Path) -> list[str]:
    return [sys.executable, str(REPO / "run_all.py"), *run_args, "--out", str(out), "--cache", str(cache)]


def _run(cmd: list[str], log: Path) -> None:
    with log.open("ab") as fh:
        proc = subprocess.run(cmd, cwd=REPO, stdout=fh, stderr=subprocess.STDOUT, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"{shlex.join(cmd)} exited {proc.returncode}; see {log}")


def kill_resume(repeats: int, run_args: Sequence[str] = DEFAULT_RUN_ARGS, seed: int = 0,
                workdir: Path | None = None, verbose: bool = True) -> list[RepeatResult]:
    """The kill/resume experiment (module docstring); returns one :class:`RepeatResult` per repeat."""
    work = Path(workdir or tempfile.mkdtemp(prefix="dtda-faults-"))
    work.mkdir(parents=True, exist_ok=True)
    log = work / "runs.log"
    ref_out, ref_cache = work / "reference" / "out", work / "reference" / "cache"
    start = time.perf_counter()
    _run(_command(run_args, ref_out, ref_cache), log)
    wall = time.perf_counter() - start
    if verbose:
        print(f"reference run: {wall:.1f} s ({shlex.join(run_args)}); work dir {work}", flush=True)
    rng = random.Random(seed)
    results = []
    for i in range(repeats):
        out, cache = work / f"repeat{i}" / "out", work / f"repeat{i}" / "cache"
        delay = rng.uniform(0.05, 0.95) * wall
        with log.open("ab") as fh:
            proc = subprocess.Popen(_command(run_args, out, cache), cwd=REPO, stdout=fh, stderr=subprocess.STDOUT)
            try:
                proc.wait(timeout=delay)
                killed = False
            except subprocess.TimeoutExpired:
                os.kill(proc.pid, signal.SIGKILL)
                proc.wait()
                killed = True
        before = unit_stamps(cache)
        _run(_command(run_args, out, cache), log)
        result = RepeatResult(delay, killed, len(before), rewritten_units(before, cache),
                              leaderboard_difference(ref_out / "leaderboard.csv", out / "leaderboard.csv"),
                              arrays_difference(ref_out, out))
        results.append(result)
        if verbose:
            what = "killed" if killed else "finished before the kill"
            problems = "; ".join(filter(None, [f"rewritten {result.rewritten[:3]}" if result.rewritten else "",
                                               result.leaderboard_diff, result.arrays_diff]))
            print(f"repeat {i + 1}/{repeats}: {what} at {delay:.1f} s with {len(before)} unit(s) done; "
                  f"resumed: {'ok' if result.ok else 'FAILED: ' + problems}", flush=True)
    return results


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmark.faults", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    kill = sub.add_parser("kill", help="kill -9 a smoke run at random moments, resume, compare")
    kill.add_argument("--repeats", type=int, default=10)
    kill.add_argument("--seed", type=int, default=0, help="seed of the kill moments")
    kill.add_argument("--workdir", default=None, help="where runs and caches go (default: a new temp folder)")
    kill.add_argument("--run-args", default=shlex.join(DEFAULT_RUN_ARGS),
                      help="run_all.py arguments of the job (quoted); --out and --cache are added")
    args = parser.parse_args(argv)
    if args.repeats < 1:
        print(f"error: --repeats must be >= 1, got {args.repeats}", file=sys.stderr)
        return 2
    results = kill_resume(args.repeats, shlex.split(args.run_args), args.seed,
                          Path(args.workdir) if args.workdir else None)
    passed = sum(r.ok for r in results)
    print(f"kill_resume_ok={passed}/{len(results)}")
    return 0 if passed == len(results) else 1


if __name__ == "__main__":
    sys.exit(main())
