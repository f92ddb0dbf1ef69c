"""Content-addressed store for benchmark "units" (dicts of named tensors).

A *unit* is a mapping ``name -> torch.Tensor`` identified by a content key (a lowercase hex string computed
by the caller, typically :func:`content_key` of the canonical config) plus the JSON-serialisable config
that determined it.

Layout under ``root``::

    units/<key[:2]>/<key>.safetensors      the unit (the file is the truth and the done-marker)
    units/<key[:2]>/.<name>.<rand>.tmp     in-flight (or stray, after a crash) temporary files
    units/<key[:2]>/<key>.safetensors.corrupt   files quarantined by :meth:`UnitStore.get`
    index.sqlite                           SQLite (WAL) index, rebuilt from the files when it disagrees

Every unit file is written to a temporary file in its final directory, fsync'd and ``os.replace``'d into
place, so a process killed at any point (even ``kill -9``) leaves either no file or a complete one.
The safetensors metadata (string -> string) carries ``key``, ``config`` (canonical JSON), ``sha256`` (see
:func:`tensors_sha256`), ``format_version``, ``created``, ``kind`` and ``tags``; the index only caches it.

The store keeps no open handles: each operation opens its own SQLite connection, so one
:class:`UnitStore` may be used from several threads, and several processes may share one root.

Command line::

    python -m benchmark.store ls --root PATH
    python -m benchmark.store verify --root PATH
    python -m benchmark.store gc --root PATH     # removes stray temp files and quarantined .corrupt files
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime as _dt
import enum
import functools
import hashlib
import json
import math
import os
import re
import sqlite3
import struct
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path, PurePath
from typing import Any

import numpy as np
import safetensors
import safetensors.torch
import torch

try:  # POSIX only; used to tell in-flight temp files from stray ones.
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]

__all__ = [
    "STORE_FORMAT_VERSION",
    "ConfigMismatchError",
    "CorruptUnitWarning",
    "UnitConflictWarning",
    "UnitInfo",
    "UnitStore",
    "atomic_write_bytes",
    "atomic_write_text",
    "canonical_json",
    "content_key",
    "main",
    "tensors_sha256",
]

STORE_FORMAT_VERSION: int = 1

_UNIT_SUFFIX = ".safetensors"
_CORRUPT_SUFFIX = ".corrupt"
_TMP_SUFFIX = ".tmp"
_INDEX_NAME = "index.sqlite"
_BUSY_TIMEOUT_S = 30.0
_KEY_RE = re.compile(r"[0-9a-f]{2,128}")
_REQUIRED_METADATA = ("key", "config", "sha256", "format_version", "created")
_MAX_HEADER_BYTES = 100 * 1024 * 1024
_MISSING = "<missing>"


# --------------------------------------------------------------------------------------------------------
# Errors and warnings
# --------------------------------------------------------------------------------------------------------
class ConfigMismatchError(ValueError):
    """The config stored with a unit differs from the config the caller asked for.

    Attributes:
        key: The unit key.
        differences: ``(dotted_path, stored_value, requested_value)`` for every differing field; a field
            absent on one side is reported as ``"<missing>"``.
    """

    def __init__(self, key: str, differences: Sequence[tuple[str, Any, Any]]) -> None:
        """Builds the error.

        Args:
            key: The unit key.
            differences: ``(dotted_path, stored_value, requested_value)`` triples.
        """
        self.key = key
        self.differences = [tuple(d) for d in differences]
        parts = [
            f"{path}: stored={stored!r} requested={requested!r}" for path, stored, requested in differences
        ]
        super().__init__(
            f"config mismatch for unit {key} ({len(parts)} differing field(s)): " + "; ".join(parts)
        )

    def __reduce__(self) -> tuple[Any, ...]:
        """Keeps the error picklable (e.g. across multiprocessing)."""
        return (type(self), (self.key, self.differences))


class CorruptUnitWarning(RuntimeWarning):
    """A unit file failed its checksum/metadata checks or could not be read and was quarantined."""


class UnitConflictWarning(RuntimeWarning):
    """``put`` found an existing valid unit with the same key and config but different tensor content."""


class _CorruptUnit(Exception):
    """Internal: a unit file is unreadable or inconsistent; ``args[0]`` describes the problem."""


# --------------------------------------------------------------------------------------------------------
# Canonical JSON and content keys
# --------------------------------------------------------------------------------------------------------
def _json_key(key: Any) -> str:
    """Converts a mapping key to the string JSON would use for it."""
    key = _normalize(key)
    if isinstance(key, str):
        return key
    if key is None or isinstance(key, bool | int | float):
        return json.dumps(key)
    raise TypeError(f"cannot use {type(key).__name__} as a JSON object key: {key!r}")


def _normalize(obj: Any) -> Any:
    """Recursively converts ``obj`` to plain JSON types (dict/list/str/int/float/bool/None)."""
    if obj is None:
        return None
    if isinstance(obj, enum.Enum):
        return _normalize(obj.value)
    if isinstance(obj, bool | np.bool_):
        return bool(obj)
    if isinstance(obj, int | np.integer):
        return int(obj)
    if isinstance(obj, float | np.floating):
        return float(obj)
    if isinstance(obj, str):
        return str(obj)
    if isinstance(obj, torch.dtype | torch.device):
        return str(obj)
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return _normalize(dataclasses.asdict(obj))
    if isinstance(obj, Mapping):
        out: dict[str, Any] = {}
        for k, v in obj.items():
            jk = _json_key(k)
            if jk in out:
                raise ValueError(f"mapping keys collide after JSON conversion: {jk!r}")
            out[jk] = _normalize(v)
        return out
    if isinstance(obj, list | tuple):
        return [_normalize(v) for v in obj]
    if isinstance(obj, set | frozenset):
        items = [_normalize(v) for v in obj]
        return sorted(items, key=lambda v: json.dumps(v, sort_keys=True, separators=(",", ":")))
    if isinstance(obj, np.generic):
        return _normalize(obj.item())
    if isinstance(obj, np.ndarray):
        return _normalize(obj.tolist())
    if isinstance(obj, PurePath):
        return obj.as_posix()
    raise TypeError(f"object of type {type(obj).__name__} is not canonically JSON-serialisable: {obj!r}")


def canonical_json(obj: Any) -> str:
    """Serialises ``obj`` to canonical JSON (sorted keys, compact separators, ASCII).

    Dataclasses are converted with ``dataclasses.asdict``, enums by their ``.value``, tuples/lists to lists,
    sets to sorted lists, numpy scalars/arrays to Python values/lists, ``torch.dtype``/``torch.device`` and
    paths via ``str``. Mapping keys are converted the way ``json`` converts them (``1`` -> ``"1"``).

    Args:
        obj: The object to serialise.

    Returns:
        The canonical JSON text.

    Raises:
        TypeError: If ``obj`` contains an unsupported type.
        ValueError: If two mapping keys collide after conversion to strings.
    """
    return json.dumps(_normalize(obj), sort_keys=True, separators=(",", ":"), ensure_ascii=True)


def content_key(*parts: Any) -> str:
    """Returns a stable 20-hex-digit content key: ``sha256(canonical_json(list(parts)))[:20]``.

    Args:
        *parts: Anything :func:`canonical_json` accepts.

    Returns:
        The key, independent of dict ordering.
    """
    return hashlib.sha256(canonical_json(list(parts)).encode("utf-8")).hexdigest()[:20]


# --------------------------------------------------------------------------------------------------------
# Atomic writes
# --------------------------------------------------------------------------------------------------------
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
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=_TMP_SUFFIX, dir=path.parent)
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


# --------------------------------------------------------------------------------------------------------
# Tensor checksums and unit files
# --------------------------------------------------------------------------------------------------------
def _tensor_bytes(tensor: torch.Tensor) -> memoryview:
    """Returns the raw bytes of a contiguous CPU tensor (native little-endian layout)."""
    if tensor.numel() == 0:
        return memoryview(b"")
    flat = tensor.reshape(-1).view(torch.uint8)
    return memoryview(flat.numpy()).cast("B")


def tensors_sha256(tensors: Mapping[str, torch.Tensor]) -> str:
    """Checksums a tensor dict the way unit files record it.

    For each tensor name in sorted order the digest absorbs the UTF-8 name, the dtype string, the shape (as
    JSON) - each NUL-terminated - and the raw contiguous bytes.

    Args:
        tensors: Named tensors (any device/layout; they are made contiguous on CPU for hashing).

    Returns:
        The hex sha256 digest.
    """
    digest = hashlib.sha256()
    for name in sorted(tensors):
        tensor = tensors[name].detach().cpu().contiguous()
        digest.update(name.encode("utf-8") + b"\0")
        digest.update(str(tensor.dtype).encode("ascii") + b"\0")
        digest.update(json.dumps(list(tensor.shape)).encode("ascii") + b"\0")
        digest.update(_tensor_bytes(tensor))
    return digest.hexdigest()


def _parse_header(data: bytes) -> dict[str, str]:
    """Returns the ``__metadata__`` of a safetensors blob (``data`` may be just the header prefix)."""
    if len(data) < 8:
        raise _CorruptUnit("file too short for a safetensors header")
    (n,) = struct.unpack("<Q", data[:8])
    if n > _MAX_HEADER_BYTES or 8 + n > len(data):
        raise _CorruptUnit(f"invalid safetensors header length {n}")
    try:
        header = json.loads(data[8 : 8 + n])
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise _CorruptUnit(f"unparseable safetensors header: {exc}") from None
    metadata = header.get("__metadata__") if isinstance(header, dict) else None
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise _CorruptUnit("missing or invalid safetensors metadata")
    return metadata


def _read_header(path: Path) -> dict[str, str]:
    """Reads only the safetensors header of ``path`` and returns its metadata."""
    with open(path, "rb") as fh:
        prefix = fh.read(8)
        if len(prefix) < 8:
            raise _CorruptUnit("file too short for a safetensors header")
        (n,) = struct.unpack("<Q", prefix)
        if n > _MAX_HEADER_BYTES:
            raise _CorruptUnit(f"invalid safetensors header length {n}")
        return _parse_header(prefix + fh.read(n))


def _check_metadata(metadata: Mapping[str, str], key: str) -> dict[str, Any]:
    """Validates unit metadata; returns the decoded config."""
    missing = [name for name in _REQUIRED_METADATA if name not in metadata]
    if missing:
        raise _CorruptUnit(f"metadata lacks {', '.join(missing)}")
    if metadata["key"] != key:
        raise _CorruptUnit(f"metadata key {metadata['key']!r} does not match file key {key!r}")
    if metadata["format_version"] != str(STORE_FORMAT_VERSION):
        raise _CorruptUnit(
            f"unsupported format_version {metadata['format_version']!r} (expected {STORE_FORMAT_VERSION})"
        )
    try:
        config = json.loads(metadata["config"])
        json.loads(metadata.get("tags", "{}"))
    except json.JSONDecodeError as exc:
        raise _CorruptUnit(f"config/tags metadata is not valid JSON: {exc}") from None
    if not isinstance(config, dict):
        raise _CorruptUnit("config metadata is not a JSON object")
    return config


@dataclasses.dataclass
class _Loaded:
    """Internal: a fully verified unit file."""

    tensors: dict[str, torch.Tensor]
    metadata: dict[str, str]
    config: dict[str, Any]
    nbytes: int


def _load_unit(path: Path, key: str) -> tuple[_Loaded | None, str | None, tuple[int, int] | None]:
    """Reads and fully verifies a unit file.

    Returns:
        ``(loaded, None, file_id)`` when fine, ``(None, problem, file_id)`` when corrupt/unreadable.

    Raises:
        FileNotFoundError: If the file does not exist.
    """
    file_id = None
    try:
        with open(path, "rb") as fh:
            st = os.fstat(fh.fileno())
            file_id = (st.st_dev, st.st_ino)
            data = fh.read()
    except FileNotFoundError:
        raise
    except OSError as exc:
        return None, f"unreadable: {exc}", file_id
    try:
        metadata = _parse_header(data)
        config = _check_metadata(metadata, key)
        try:
            tensors = safetensors.torch.load(data)
        except (safetensors.SafetensorError, RuntimeError, ValueError, TypeError, OverflowError) as exc:
            raise _CorruptUnit(f"unreadable tensor payload: {exc}") from None
        actual = tensors_sha256(tensors)
        if actual != metadata["sha256"]:
            raise _CorruptUnit(f"sha256 mismatch: recorded {metadata['sha256']}, actual {actual}")
    except _CorruptUnit as exc:
        return None, str(exc), file_id
    return _Loaded(tensors, dict(metadata), config, len(data)), None, file_id


def _leaf_equal(a: Any, b: Any) -> bool:
    """Equality for JSON leaves that keeps bools distinct from ints and treats NaN == NaN."""
    if isinstance(a, bool) or isinstance(b, bool):
        return type(a) is type(b) and a == b
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b):
        return True
    return a == b


def _config_diff(stored: Any, requested: Any, prefix: str = "") -> list[tuple[str, Any, Any]]:
    """Lists ``(dotted_path, stored, requested)`` for every differing leaf of two JSON values."""
    if isinstance(stored, dict) and isinstance(requested, dict):
        out: list[tuple[str, Any, Any]] = []
        for k in sorted(set(stored) | set(requested)):
            path = f"{prefix}.{k}" if prefix else str(k)
            out += _config_diff(stored.get(k, _MISSING), requested.get(k, _MISSING), path)
        return out
    if isinstance(stored, list) and isinstance(requested, list) and len(stored) == len(requested):
        out = []
        for i, (s, r) in enumerate(zip(stored, requested, strict=True)):
            out += _config_diff(s, r, f"{prefix}[{i}]")
        return out
    if isinstance(stored, dict | list) or isinstance(requested, dict | list):
        same = type(stored) is type(requested) and stored == requested
    else:
        same = _leaf_equal(stored, requested)
    return [] if same else [(prefix or "<root>", stored, requested)]


def _now_iso() -> str:
    """Returns the current UTC time in ISO-8601 format."""
    return _dt.datetime.now(_dt.UTC).isoformat()


# --------------------------------------------------------------------------------------------------------
# The store
# --------------------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class UnitInfo:
    """Index entry of one stored unit.

    Attributes:
        key: The unit key.
        kind: Free-form kind label given to :meth:`UnitStore.put`.
        tags: JSON tags given to :meth:`UnitStore.put`.
        nbytes: Size of the unit file in bytes.
        created: ISO-8601 creation time (UTC).
        path: Absolute path of the unit file.
        config: The stored config (extra; handy for ``gc`` predicates).
    """

    key: str
    kind: str
    tags: dict[str, Any]
    nbytes: int
    created: str
    path: Path
    config: dict[str, Any] = dataclasses.field(default_factory=dict)


_SCHEMA = """
CREATE TABLE IF NOT EXISTS units (
    key TEXT PRIMARY KEY,
    path TEXT NOT NULL,
    sha256 TEXT NOT NULL,
    config TEXT NOT NULL,
    nbytes INTEGER NOT NULL,
    created TEXT NOT NULL,
    kind TEXT NOT NULL,
    tags TEXT NOT NULL
)
"""

_Row = tuple[str, str, str, str, int, str, str, str]


class UnitStore:
    """Content-addressed, crash-safe, multi-process store of tensor dicts (see module docstring).

    Args:
        root: Store directory (created if missing).

    Raises:
        PermissionError: If ``root`` cannot be created or written to; the message names the path.
    """

    def __init__(self, root: str | os.PathLike[str]) -> None:
        """Creates the directory layout and the index."""
        self.root = Path(root).expanduser().absolute()
        self.units_dir = self.root / "units"
        self.index_path = self.root / _INDEX_NAME
        try:
            self.units_dir.mkdir(parents=True, exist_ok=True)
            fd, probe = tempfile.mkstemp(prefix=".write-probe.", suffix=_TMP_SUFFIX, dir=self.root)
            os.close(fd)
            os.unlink(probe)
        except OSError as exc:
            raise PermissionError(f"unit store root {str(self.root)!r} is not writable: {exc}") from exc
        try:
            with self._connect():
                pass
        except sqlite3.Error as exc:
            raise PermissionError(
                f"unit store index {str(self.index_path)!r} cannot be opened for writing: {exc}"
            ) from exc

    def __repr__(self) -> str:
        """Returns ``UnitStore('<root>')``."""
        return f"UnitStore({str(self.root)!r})"

    # ---------------------------------------------------------------- paths
    def key_path(self, key: str) -> Path:
        """Returns the file path of ``key``: ``<root>/units/<key[:2]>/<key>.safetensors``.

        Args:
            key: Lowercase hex key (2 to 128 digits).

        Raises:
            ValueError: If ``key`` is not a lowercase hex string.
        """
        if not isinstance(key, str) or not _KEY_RE.fullmatch(key):
            raise ValueError(f"unit key must be a lowercase hex string of 2-128 digits, got {key!r}")
        return self.units_dir / key[:2] / f"{key}{_UNIT_SUFFIX}"

    def _rel(self, path: Path) -> str:
        """Returns ``path`` relative to the root, POSIX style (stored in the index)."""
        return path.relative_to(self.root).as_posix()

    def _unit_files(self) -> dict[str, Path]:
        """Maps key -> path for every unit file on disk."""
        out: dict[str, Path] = {}
        for path in self.units_dir.glob(f"*/*{_UNIT_SUFFIX}"):
            key = path.name[: -len(_UNIT_SUFFIX)]
            if _KEY_RE.fullmatch(key) and path.parent.name == key[:2]:
                out[key] = path
        return out

    # ---------------------------------------------------------------- index
    @contextlib.contextmanager
    def _connect(self) -> Iterator[sqlite3.Connection]:
        """Opens a fresh autocommit connection (WAL, 30 s busy timeout) and closes it afterwards."""
        deadline = time.monotonic() + _BUSY_TIMEOUT_S
        while True:
            conn = sqlite3.connect(str(self.index_path), timeout=_BUSY_TIMEOUT_S, isolation_level=None)
            try:
                conn.execute(f"PRAGMA busy_timeout = {int(_BUSY_TIMEOUT_S * 1000)}")
                conn.execute("PRAGMA journal_mode = WAL")
                conn.execute("PRAGMA synchronous = NORMAL")
                if conn.execute("SELECT 1 FROM sqlite_master WHERE name = 'units'").fetchone() is None:
                    conn.execute(_SCHEMA)
                break
            except sqlite3.OperationalError as exc:
                conn.close()
                # Switching a brand-new database to WAL can report "locked" without waiting.
                if "locked" not in str(exc) or time.monotonic() > deadline:
                    raise
                time.sleep(0.05)
            except BaseException:
                conn.close()
                raise
        try:
            yield conn
        finally:
            conn.close()

    @contextlib.contextmanager
    def _write_txn(self) -> Iterator[sqlite3.Connection]:
        """Yields a connection inside ``BEGIN IMMEDIATE``; commits on success, rolls back on error."""
        with self._connect() as conn:
            conn.execute("BEGIN IMMEDIATE")
            try:
                yield conn
            except BaseException:
                conn.execute("ROLLBACK")
                raise
            conn.execute("COMMIT")

    def _row(self, key: str, path: Path, metadata: Mapping[str, str], nbytes: int) -> _Row:
        """Builds an index row from unit metadata."""
        return (
            key,
            self._rel(path),
            metadata["sha256"],
            metadata["config"],
            nbytes,
            metadata["created"],
            metadata.get("kind", "unit"),
            metadata.get("tags", "{}"),
        )

    def _index_upsert(self, row: _Row) -> None:
        """Inserts or replaces one index row; index failures only warn (the file is the truth)."""
        try:
            with self._connect() as conn:
                conn.execute("INSERT OR REPLACE INTO units VALUES (?, ?, ?, ?, ?, ?, ?, ?)", row)
        except sqlite3.Error as exc:
            warnings.warn(f"could not index unit {row[0]} in {self.index_path}: {exc}", stacklevel=3)

    def _index_delete(self, keys: Sequence[str]) -> None:
        """Removes index rows (best effort)."""
        if not keys:
            return
        try:
            with self._write_txn() as conn:
                conn.executemany("DELETE FROM units WHERE key = ?", [(k,) for k in keys])
        except sqlite3.Error as exc:
            warnings.warn(f"could not update index {self.index_path}: {exc}", stacklevel=3)

    def rebuild_index(self) -> int:
        """Rebuilds the SQLite index from the unit files (the files are the truth).

        Files whose header cannot be read are quarantined (moved to ``<path>.corrupt``) with a
        :class:`CorruptUnitWarning`.

        Returns:
            The number of units indexed.
        """
        with self._write_txn() as conn:
            rows: list[_Row] = []
            for key, path in sorted(self._unit_files().items()):
                try:
                    metadata = _read_header(path)
                    _check_metadata(metadata, key)
                    nbytes = path.stat().st_size
                except FileNotFoundError:
                    continue
                except (OSError, _CorruptUnit) as exc:
                    self._quarantine(key, path, str(exc), None, update_index=False)
                    continue
                rows.append(self._row(key, path, metadata, nbytes))
            conn.execute("DELETE FROM units")
            conn.executemany("INSERT OR REPLACE INTO units VALUES (?, ?, ?, ?, ?, ?, ?, ?)", rows)
        return len(rows)

    # ---------------------------------------------------------------- corruption handling
    def _quarantine(
        self,
        key: str,
        path: Path,
        problem: str,
        file_id: tuple[int, int] | None,
        *,
        update_index: bool = True,
    ) -> None:
        """Moves a bad unit file aside to ``<path>.corrupt`` and warns.

        When ``file_id`` is given, the file is only moved if ``path`` still refers to that file, so a good
        file another process just wrote in its place is left alone.
        """
        dest = path.with_name(path.name + _CORRUPT_SUFFIX)
        action = f"moved to {dest}"
        try:
            if file_id is not None:
                st = os.stat(path)
                if (st.st_dev, st.st_ino) != file_id:
                    raise FileNotFoundError
            os.replace(path, dest)
        except FileNotFoundError:
            action = "already replaced or removed by another process"
        except OSError as exc:
            action = f"could not be moved aside ({exc})"
        if update_index:
            self._index_delete([key])
        warnings.warn(
            f"unit {key} at {path} is corrupt ({problem}); {action}; it will be recomputed",
            CorruptUnitWarning,
            stacklevel=3,
        )

    # ---------------------------------------------------------------- public API
    def has(self, key: str) -> bool:
        """Returns whether the unit file for ``key`` exists (the file, not the index, is the truth)."""
        return self.key_path(key).is_file()

    def get(self, key: str, config: Mapping[str, Any] | None = None) -> dict[str, torch.Tensor] | None:
        """Loads a unit.

        Args:
            key: The unit key.
            config: If given, must equal the stored config (after canonicalisation).

        Returns:
            The tensors, or ``None`` when the unit is missing - or was corrupt/unreadable, in which case a
            :class:`CorruptUnitWarning` naming the key and path is emitted and the file is moved to
            ``<path>.corrupt`` so the caller recomputes it.

        Raises:
            ConfigMismatchError: If ``config`` differs from the stored config; the message names every
                differing field by dotted path with stored and requested values.
        """
        path = self.key_path(key)
        requested = json.loads(canonical_json(config)) if config is not None else None
        try:
            loaded, problem, file_id = _load_unit(path, key)
        except FileNotFoundError:
            return None
        if loaded is None:
            self._quarantine(key, path, problem or "unknown problem", file_id)
            return None
        if requested is not None:
            diffs = _config_diff(loaded.config, requested)
            if diffs:
                raise ConfigMismatchError(key, diffs)
        return loaded.tensors

    def put(
        self,
        key: str,
        config: Mapping[str, Any],
        tensors: Mapping[str, torch.Tensor],
        kind: str = "unit",
        tags: Mapping[str, Any] | None = None,
    ) -> Path:
        """Stores a unit atomically.

        Tensors are detached, moved to CPU and made contiguous. If a valid file for ``key`` already exists
        (e.g. another process computed it) it is kept: with the same checksum this is a harmless
        duplicate; with a different checksum (non-deterministic computation) a :class:`UnitConflictWarning`
        is emitted and the existing unit still wins, so every reader sees one consistent value. A corrupt
        existing file is quarantined and replaced. Two processes racing past that check both write
        complete files; the last rename wins.

        Args:
            key: Lowercase hex content key.
            config: JSON-serialisable config (stored as canonical JSON).
            tensors: Named tensors.
            kind: Free-form kind label (stored in metadata and index).
            tags: JSON-serialisable tags (stored in metadata and index).

        Returns:
            The path of the unit file.

        Raises:
            ConfigMismatchError: If an existing valid unit with this key has a different config.
            TypeError: If a tensor name is not a string or a value is not a tensor.
        """
        path = self.key_path(key)
        config_json = canonical_json(config)
        tags_json = canonical_json(tags if tags is not None else {})
        if not isinstance(kind, str):
            raise TypeError(f"kind must be a str, got {type(kind).__name__}")

        prepared: dict[str, torch.Tensor] = {}
        seen_storages: set[tuple[int, int]] = set()
        for name, tensor in tensors.items():
            if not isinstance(name, str) or not name:
                raise TypeError(f"tensor names must be non-empty strings, got {name!r}")
            if not isinstance(tensor, torch.Tensor):
                raise TypeError(f"tensor {name!r} of unit {key} is a {type(tensor).__name__}, not a Tensor")
            t = tensor.detach().cpu().contiguous()
            storage = t.untyped_storage()
            ident = (storage.data_ptr(), storage.nbytes())
            if ident[0] and ident[1]:
                if ident in seen_storages:
                    t = t.clone()  # safetensors refuses tensors that share memory
                else:
                    seen_storages.add(ident)
            prepared[name] = t
        sha = tensors_sha256(prepared)
        metadata = {
            "key": key,
            "config": config_json,
            "sha256": sha,
            "format_version": str(STORE_FORMAT_VERSION),
            "created": _now_iso(),
            "kind": kind,
            "tags": tags_json,
        }

        try:
            existing, problem, file_id = _load_unit(path, key)
        except FileNotFoundError:
            pass
        else:
            if existing is None:
                self._quarantine(key, path, problem or "unknown problem", file_id)
            else:
                diffs = _config_diff(existing.config, json.loads(config_json))
                if diffs:
                    raise ConfigMismatchError(key, diffs)
                if existing.metadata["sha256"] != sha:
                    warnings.warn(
                        f"unit {key} at {path} already exists with different tensor content (sha256 "
                        f"{existing.metadata['sha256']} vs {sha}); keeping the existing unit",
                        UnitConflictWarning,
                        stacklevel=2,
                    )
                self._index_upsert(self._row(key, path, existing.metadata, existing.nbytes))
                return path

        data = safetensors.torch.save(prepared, metadata=metadata)
        atomic_write_bytes(path, data)
        self._index_upsert(self._row(key, path, metadata, len(data)))
        return path

    def ls(self) -> list[UnitInfo]:
        """Lists all units, sorted by key.

        The index is rebuilt from the files first if its set of keys disagrees with the files on disk.

        Returns:
            One :class:`UnitInfo` per unit file.
        """
        files = self._unit_files()
        with self._connect() as conn:
            indexed = {row[0] for row in conn.execute("SELECT key FROM units")}
        if indexed != set(files):
            self.rebuild_index()
        with self._connect() as conn:
            rows = conn.execute(
                "SELECT key, kind, tags, nbytes, created, path, config FROM units ORDER BY key"
            ).fetchall()
        return [
            UnitInfo(
                key=key,
                kind=kind,
                tags=json.loads(tags),
                nbytes=int(nbytes),
                created=created,
                path=self.root / rel,
                config=json.loads(config),
            )
            for key, kind, tags, nbytes, created, rel, config in rows
        ]

    def verify(self) -> list[tuple[str, str]]:
        """Fully checks every unit file (checksum and metadata) without modifying anything.

        Returns:
            ``(key, problem)`` for every bad unit, sorted by key; ``[]`` when all are fine.
        """
        problems: list[tuple[str, str]] = []
        for key, path in sorted(self._unit_files().items()):
            try:
                loaded, problem, _ = _load_unit(path, key)
            except FileNotFoundError:
                continue
            if loaded is None:
                problems.append((key, problem or "unknown problem"))
        return problems

    def _stray_files(self) -> tuple[list[Path], list[Path]]:
        """Returns (temp files, quarantined .corrupt files) under ``units/``."""
        temps = [p for p in self.units_dir.glob(f"*/.*{_TMP_SUFFIX}") if p.is_file()]
        corrupt = [p for p in self.units_dir.glob(f"*/*{_CORRUPT_SUFFIX}") if p.is_file()]
        return temps, corrupt

    @staticmethod
    def _remove_if_stray(path: Path) -> bool:
        """Deletes a temp file unless a live writer holds its lock; returns whether it was removed."""
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

    def gc_detailed(self, keep: Callable[[UnitInfo], bool]) -> dict[str, int]:
        """Like :meth:`gc` but returns counts per category.

        Args:
            keep: Predicate; units for which it returns False are deleted.

        Returns:
            ``{"units": ..., "temp": ..., "corrupt": ...}`` counts of removed files.
        """
        doomed = [info for info in self.ls() if not keep(info)]
        removed_keys = []
        for info in doomed:
            with contextlib.suppress(FileNotFoundError):
                info.path.unlink()
                removed_keys.append(info.key)
        self._index_delete([info.key for info in doomed])
        temps, corrupt = self._stray_files()
        n_temp = sum(self._remove_if_stray(p) for p in temps)
        n_corrupt = 0
        for p in corrupt:
            with contextlib.suppress(FileNotFoundError):
                p.unlink()
                n_corrupt += 1
        return {"units": len(removed_keys), "temp": n_temp, "corrupt": n_corrupt}

    def gc(self, keep: Callable[[UnitInfo], bool]) -> int:
        """Removes units for which ``keep(info)`` is False, plus stray temp files and ``.corrupt`` files.

        Temp files still being written by a live process (they hold an exclusive ``flock``) are left alone.

        Args:
            keep: Predicate over :class:`UnitInfo`; use ``lambda info: True`` to only clean debris.

        Returns:
            The number of files removed.
        """
        return sum(self.gc_detailed(keep).values())


# --------------------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------------------
def _human_size(n: int) -> str:
    """Formats a byte count (``1.5 MiB``)."""
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{int(size)} B" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{n} B"  # pragma: no cover


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point: ``python -m benchmark.store {ls,verify,gc} --root PATH``.

    Args:
        argv: Arguments (defaults to ``sys.argv[1:]``).

    Returns:
        Process exit status (``verify`` returns 1 when problems were found).
    """
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--root", required=True, help="store root directory")
    parser = argparse.ArgumentParser(prog="python -m benchmark.store", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("ls", parents=[common], help="list units: key, kind, tags, size")
    sub.add_parser("verify", parents=[common], help="check every unit's checksum and metadata")
    sub.add_parser("gc", parents=[common], help="remove stray temp files and quarantined .corrupt files")
    args = parser.parse_args(argv)
    try:
        store = UnitStore(args.root)
    except PermissionError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2

    if args.command == "ls":
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
        return 0
    if args.command == "verify":
        problems = store.verify()
        for key, problem in problems:
            print(f"{key}: {problem}")
        print(f"{len(problems)} problem(s)")
        return 1 if problems else 0
    counts = store.gc_detailed(lambda info: True)
    print(f"removed {counts['temp']} stray temp file(s) and {counts['corrupt']} corrupt file(s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
