"""Formatting numbers and GitHub-flavoured markdown tables for the report."""

from __future__ import annotations

import math
import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

DASH = "—"  # an undefined or missing value


def finite(x: Any) -> bool:
    """Whether ``x`` converts to a finite float."""
    try:
        return math.isfinite(float(x))
    except (TypeError, ValueError):
        return False


def fmt(x: Any, digits: int = 3) -> str:
    """``x`` with ``digits`` decimals, or a dash if it is not finite."""
    return f"{float(x):.{digits}f}" if finite(x) else DASH


def fmt_t(x: float) -> str:
    """A |t| statistic: two decimals, three significant digits when large, ∞ when infinite."""
    if math.isinf(x):
        return "∞"
    if not math.isfinite(x):
        return DASH
    return f"{x:.2f}" if abs(x) < 1000 else f"{x:.3g}"


def fmt_ci(value: Any, lo: Any, hi: Any, digits: int = 3) -> str:
    """``value [lo, hi]``; just ``value`` without a finite CI; a dash without a finite value."""
    if not finite(value):
        return DASH
    if finite(lo) and finite(hi):
        return f"{float(value):.{digits}f} [{float(lo):.{digits}f}, {float(hi):.{digits}f}]"
    return f"{float(value):.{digits}f}"


def label(method: str, variant: str) -> str:
    """A row label: the method, with its variant in parentheses if it has one."""
    return f"{method} ({variant})" if variant else method


def _cell(text: Any) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def md_table(header: Sequence[str], rows: Iterable[Sequence[Any]], align: Sequence[str] | None = None) -> str:
    """A GitHub-flavoured markdown table; ``align`` entries are ``"l"`` or ``"r"``.

    By default the first column is left-aligned and the others right-aligned.
    """
    align = align or ["l"] + ["r"] * (len(header) - 1)
    lines = [
        "| " + " | ".join(_cell(h) for h in header) + " |",
        "|" + "|".join(":---" if a == "l" else "---:" for a in align) + "|",
    ]
    lines += ["| " + " | ".join(_cell(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def rel(path: Path, base: Path) -> str:
    """``path`` relative to the directory ``base``, with forward slashes (a markdown link target)."""
    return Path(os.path.relpath(path, base)).as_posix()


def image(alt: str, path: Path, base: Path) -> list[str]:
    """The lines of an image paragraph linking ``path`` relative to the markdown file's directory ``base``."""
    return [f"![{alt}]({rel(path, base)})", ""]
