"""Atomic file writes, and the temp-file locks that tell an in-flight write from a stray one.

A write goes to ``.<name>.<rand>.tmp`` in the destination's directory, which the writer holds under an
exclusive ``flock`` until it has been ``os.replace``'d into place. A temp file nobody holds a lock on was left
by a killed process and may be deleted (:func:`remove_if_stray`).
"""

from __future__ import annotations

import contextlib
import functools
import os
import tempfile
from pathlib import Path

try:  # POSIX only; used to tell in-flight temp files from stray ones.
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]

__all__ = ["TMP_SUFFIX", "atomic_write_bytes", "atomic_write_text", "remove_if_stray"]

TMP_SUFFIX = ".tmp"


@functools.cache
def _umask() -> int:
    """Returns the process umask (read once)."""
    with contextlib.suppress(OSError, ValueError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _fsync_dir(directory: Path) -> None:
    """Best-effort fsync of a directory so a rename survives power loss."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes | bytearray | memoryview) -> None:
    """Atomically writes ``data`` to ``path``.

    The data goes to a uniquely named temporary file in the same directory (created if missing), is
    fsync'd and then ``os.replace``'d onto ``path``; readers see either the old or the new content, never a
    partial file. The temporary file is exclusively ``flock``'d while in flight so that
    :meth:`UnitStore.gc` can tell it from a stray one left by a killed process.

    Args:
        path: Destination file.
        data: Bytes to write.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=TMP_SUFFIX, dir=path.parent)
    try:
        if fcntl is not None:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        if hasattr(os, "fchmod"):
            os.fchmod(fd, 0o666 & ~_umask())
        view = memoryview(data).cast("B")
        while view:
            written = os.write(fd, view)
            view = view[written:]
        os.fsync(fd)
        os.replace(tmp_name, path)
    except BaseException:
        os.close(fd)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp_name)
        raise
    os.close(fd)  # releases the lock only after the rename
    _fsync_dir(path.parent)


def atomic_write_text(path: str | os.PathLike[str], text: str, encoding: str = "utf-8") -> None:
    """Atomically writes ``text`` to ``path`` (see :func:`atomic_write_bytes`).

    Args:
        path: Destination file.
        text: Text to write.
        encoding: Text encoding.
    """
    atomic_write_bytes(path, text.encode(encoding))


def remove_if_stray(path: Path) -> bool:
    """Deletes a temp file unless a live writer holds its lock; returns whether it was removed.

    Args:
        path: A temp file written by :func:`atomic_write_bytes`.

    Returns:
        True if the file was deleted; False if it is in flight in another process or already gone.
    """
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return False
    try:
        if fcntl is not None:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                return False  # in flight in another process
        try:
            os.unlink(path)
        except FileNotFoundError:
            return False
        return True
    finally:
        os.close(fd)
