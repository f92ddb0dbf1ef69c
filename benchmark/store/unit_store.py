"""UnitStore: a content-addressed, crash-safe, multi-process store of tensor dicts (see :mod:`benchmark.store`)."""

from __future__ import annotations

import contextlib
import json
import os
import re
import sqlite3
import tempfile
import warnings
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import safetensors.torch
import torch

from benchmark.store import index
from benchmark.store.atomic import TMP_SUFFIX, atomic_write_bytes, remove_if_stray
from benchmark.store.config_diff import config_diff
from benchmark.store.errors import (
    ConfigMismatchError,
    CorruptUnitError,
    CorruptUnitWarning,
    IncompatibleStoreError,
    UnitConflictWarning,
)
from benchmark.store.index import UnitInfo
from benchmark.store.keys import canonical_json
from benchmark.store.unit_file import (
    STORE_FORMAT_VERSION,
    UNIT_SUFFIX,
    check_metadata,
    load_unit,
    prepare_tensors,
    read_header,
    tensors_sha256,
    unit_metadata,
)

__all__ = ["UnitStore"]

_CORRUPT_SUFFIX = ".corrupt"
_KEY_RE = re.compile(r"[0-9a-f]{2,128}")


class UnitStore:
    """Content-addressed, crash-safe, multi-process store of tensor dicts (see :mod:`benchmark.store`).

    Args:
        root: Store directory (created if missing).

    Raises:
        PermissionError: If ``root`` cannot be created or written to; the message names the path.
    """

    def __init__(self, root: str | os.PathLike[str]) -> None:
        """Creates the directory layout and the index."""
        self.root = Path(root).expanduser().absolute()
        self.units_dir = self.root / "units"
        self.index_path = self.root / index.INDEX_NAME
        try:
            self.units_dir.mkdir(parents=True, exist_ok=True)
            fd, probe = tempfile.mkstemp(prefix=".write-probe.", suffix=TMP_SUFFIX, dir=self.root)
            os.close(fd)
            os.unlink(probe)
        except OSError as exc:
            raise PermissionError(f"unit store root {str(self.root)!r} is not writable: {exc}") from exc
        self._check_format()
        try:
            with index.connect(self.index_path):
                pass
        except sqlite3.Error as exc:
            raise PermissionError(
                f"unit store index {str(self.index_path)!r} cannot be opened for writing: {exc}"
            ) from exc

    def _check_format(self) -> None:
        """Refuse a root written by another store format (nothing is touched); stamp a new root."""
        marker = self.root / "store.json"
        try:
            found = json.loads(marker.read_text())
        except FileNotFoundError:
            atomic_write_bytes(marker, json.dumps({"store_format": STORE_FORMAT_VERSION}).encode())
            return
        except (OSError, ValueError) as exc:
            raise IncompatibleStoreError(f"unit store {str(self.root)!r}: unreadable store.json ({exc}); "
                                         "use another --cache or remove this one") from None
        if not isinstance(found, dict) or found.get("store_format") != STORE_FORMAT_VERSION:
            got = found.get("store_format") if isinstance(found, dict) else found
            raise IncompatibleStoreError(
                f"unit store {str(self.root)!r} was written by store format {got!r}; this version reads format "
                f"{STORE_FORMAT_VERSION}: use another --cache (nothing in this one was changed)")

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
        return self.units_dir / key[:2] / f"{key}{UNIT_SUFFIX}"

    def _unit_files(self) -> dict[str, Path]:
        """Maps key -> path for every unit file on disk."""
        out: dict[str, Path] = {}
        for path in self.units_dir.glob(f"*/*{UNIT_SUFFIX}"):
            key = path.name[: -len(UNIT_SUFFIX)]
            if _KEY_RE.fullmatch(key) and path.parent.name == key[:2]:
                out[key] = path
        return out

    # ---------------------------------------------------------------- index
    def _row(self, key: str, path: Path, metadata: Mapping[str, str], nbytes: int) -> index.Row:
        """Builds an index row from unit metadata (the path is stored relative to the root, POSIX style)."""
        return index.index_row(key, path.relative_to(self.root).as_posix(), metadata, nbytes)

    def _index_upsert(self, row: index.Row) -> None:
        """Inserts or replaces one index row; index failures only warn (the file is the truth)."""
        try:
            index.upsert_row(self.index_path, row)
        except sqlite3.Error as exc:
            warnings.warn(f"could not index unit {row[0]} in {self.index_path}: {exc}", stacklevel=3)

    def _index_delete(self, keys: Sequence[str]) -> None:
        """Removes index rows (best effort)."""
        if not keys:
            return
        try:
            index.delete_rows(self.index_path, keys)
        except sqlite3.Error as exc:
            warnings.warn(f"could not update index {self.index_path}: {exc}", stacklevel=3)

    def rebuild_index(self) -> int:
        """Rebuilds the SQLite index from the unit files (the files are the truth).

        Files whose header cannot be read are quarantined (moved to ``<path>.corrupt``) with a
        :class:`CorruptUnitWarning`.

        Returns:
            The number of units indexed.
        """
        with index.write_txn(self.index_path) as conn:
            rows: list[index.Row] = []
            for key, path in sorted(self._unit_files().items()):
                try:
                    metadata = read_header(path)
                    check_metadata(metadata, key)
                    nbytes = path.stat().st_size
                except FileNotFoundError:
                    continue
                except (OSError, CorruptUnitError) as exc:
                    self._quarantine(key, path, str(exc), None, update_index=False)
                    continue
                rows.append(self._row(key, path, metadata, nbytes))
            index.replace_rows(conn, rows)
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
            loaded, problem, file_id = load_unit(path, key)
        except FileNotFoundError:
            return None
        if loaded is None:
            self._quarantine(key, path, problem or "unknown problem", file_id)
            return None
        if requested is not None:
            diffs = config_diff(loaded.config, requested)
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

        prepared = prepare_tensors(key, tensors)
        sha = tensors_sha256(prepared)
        metadata = unit_metadata(key, config_json, sha, kind, tags_json)

        try:
            existing, problem, file_id = load_unit(path, key)
        except FileNotFoundError:
            pass
        else:
            if existing is None:
                self._quarantine(key, path, problem or "unknown problem", file_id)
            else:
                diffs = config_diff(existing.config, json.loads(config_json))
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
        if index.indexed_keys(self.index_path) != set(files):
            self.rebuild_index()
        return index.read_infos(self.index_path, self.root)

    def verify(self) -> list[tuple[str, str]]:
        """Fully checks every unit file (checksum and metadata) without modifying anything.

        Returns:
            ``(key, problem)`` for every bad unit, sorted by key; ``[]`` when all are fine.
        """
        problems: list[tuple[str, str]] = []
        for key, path in sorted(self._unit_files().items()):
            try:
                loaded, problem, _ = load_unit(path, key)
            except FileNotFoundError:
                continue
            if loaded is None:
                problems.append((key, problem or "unknown problem"))
        return problems

    def _stray_files(self) -> tuple[list[Path], list[Path]]:
        """Returns (temp files, quarantined .corrupt files) under ``units/``."""
        temps = [p for p in self.units_dir.glob(f"*/.*{TMP_SUFFIX}") if p.is_file()]
        corrupt = [p for p in self.units_dir.glob(f"*/*{_CORRUPT_SUFFIX}") if p.is_file()]
        return temps, corrupt

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
        n_temp = sum(remove_if_stray(p) for p in temps)
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
