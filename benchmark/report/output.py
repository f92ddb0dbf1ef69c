"""Atomic output of the report's files: markdown text and PNG figures on explicit Agg canvases.

Every file goes to a temporary file in its own directory first and then :func:`os.replace`
puts it in place, so a reader never sees a half-written file. Figures are drawn on
:class:`~matplotlib.backends.backend_agg.FigureCanvasAgg`, never through ``pyplot``, so no
global backend state is touched and nothing needs closing.
"""

from __future__ import annotations

import math
import os
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path

import matplotlib
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

matplotlib.use("Agg")  # headless (pyplot is never imported; the figures use explicit Agg canvases)

_DPI = 100
_FILE_MODE = 0o644  # mkstemp creates 0o600; outputs are meant to be shared


def _atomic_write(path: Path, write: Callable[[str], None]) -> None:
    """Let ``write`` fill a temporary file beside ``path``, then :func:`os.replace` it onto ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, _FILE_MODE)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_markdown(path: Path, lines: Sequence[str]) -> None:
    """Write ``lines`` joined by newlines (trailing blank lines dropped, one final newline) as UTF-8."""
    data = ("\n".join(lines).rstrip() + "\n").encode("utf-8")
    _atomic_write(path, lambda tmp: Path(tmp).write_bytes(data))


def new_figure(n_panels: int, ncols_max: int = 4, panel: tuple[float, float] = (3.8, 3.3)) -> tuple[Figure, list[Axes]]:
    """A figure with an Agg canvas and ``n_panels`` axes on a grid (surplus grid cells are hidden)."""
    ncols = max(1, min(ncols_max, n_panels))
    nrows = max(1, math.ceil(n_panels / ncols))
    fig = Figure(figsize=(panel[0] * ncols, panel[1] * nrows), dpi=_DPI)
    FigureCanvasAgg(fig)
    axes = [fig.add_subplot(nrows, ncols, i + 1) for i in range(nrows * ncols)]
    for ax in axes[n_panels:]:
        ax.set_visible(False)
    return fig, axes[:n_panels]


def save_figure(fig: Figure, path: Path) -> Path:
    """Lay out ``fig``, render it as PNG and write it atomically to ``path``; returns ``path``."""
    fig.tight_layout()
    _atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=_DPI))
    return path
