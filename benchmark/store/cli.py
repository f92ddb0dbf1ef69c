"""Command line of the unit store: ``python -m benchmark.store {ls,verify,gc} --root PATH``."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from benchmark.store.keys import canonical_json
from benchmark.store.unit_store import UnitStore

__all__ = ["main"]


def _human_size(n: int) -> str:
    """Formats a byte count (``1.5 MiB``)."""
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{int(size)} B" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{n} B"  # pragma: no cover


def _print_table(store: UnitStore) -> None:
    """Prints one line per unit (key, kind, tags, size) and a total."""
    infos = store.ls()
    rows = [(i.key, i.kind, canonical_json(i.tags), _human_size(i.nbytes)) for i in infos]
    header = ("key", "kind", "tags", "size")
    widths = [max([len(header[c])] + [len(r[c]) for r in rows]) for c in range(4)]
    for r in [header, *rows]:
        print(
            "  ".join(
                [
                    r[0].ljust(widths[0]),
                    r[1].ljust(widths[1]),
                    r[2].ljust(widths[2]),
                    r[3].rjust(widths[3]),
                ]
            ).rstrip()
        )
    print(f"{len(infos)} unit(s), {_human_size(sum(i.nbytes for i in infos))}")


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point: ``python -m benchmark.store {ls,verify,gc} --root PATH``.

    Args:
        argv: Arguments (defaults to ``sys.argv[1:]``).

    Returns:
        Process exit status (``verify`` returns 1 when problems were found).
    """
    import benchmark.store as package  # the package docstring describes the store

    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--root", required=True, help="store root directory")
    parser = argparse.ArgumentParser(prog="python -m benchmark.store", description=package.__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("ls", parents=[common], help="list units: key, kind, tags, size")
    sub.add_parser("verify", parents=[common], help="check every unit's checksum and metadata")
    gc = sub.add_parser("gc", parents=[common],
                        help="remove units no current configuration uses, stray temp files and .corrupt files")
    gc.add_argument("--keep-unused", action="store_true", help="only remove stray temp and .corrupt files")
    gc.add_argument("--dry-run", action="store_true", help="list the units gc would remove; remove nothing")
    args = parser.parse_args(argv)
    try:
        store = UnitStore(args.root)
    except PermissionError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2

    if args.command == "ls":
        _print_table(store)
        return 0
    if args.command == "verify":
        problems = store.verify()
        for key, problem in problems:
            print(f"{key}: {problem}")
        print(f"{len(problems)} problem(s)")
        return 1 if problems else 0
    from benchmark.cache_usage import unit_use  # imports the task and method registries

    unused = {} if args.keep_unused else {i.key: unit_use(i.config)[1] for i in store.ls() if not unit_use(i.config)[0]}
    for key, why in sorted(unused.items()):
        print(f"{'would remove' if args.dry_run else 'remove'} {key}: {why}")
    if args.dry_run:
        print(f"{len(unused)} unit(s) no current configuration uses")
        return 0
    counts = store.gc_detailed(lambda info: info.key not in unused)
    print(f"removed {counts['units']} unused unit(s), {counts['temp']} stray temp file(s) and "
          f"{counts['corrupt']} corrupt file(s)")
    return 0
