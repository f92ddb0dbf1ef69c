"""The SQLite (WAL) index of a store: a cache of the unit files' metadata, never the truth.

Every function opens its own short-lived connection, so no handle outlives one operation and several threads
or processes may share one index. Errors are ``sqlite3.Error``; the store decides which ones only warn.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import sqlite3
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

__all__ = [
    "INDEX_NAME",
    "Row",
    "UnitInfo",
    "connect",
    "delete_rows",
    "index_row",
    "indexed_keys",
    "read_infos",
    "replace_rows",
    "upsert_row",
    "write_txn",
]

INDEX_NAME = "index.sqlite"
_BUSY_TIMEOUT_S = 30.0

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
_INSERT = "INSERT OR REPLACE INTO units VALUES (?, ?, ?, ?, ?, ?, ?, ?)"

Row = tuple[str, str, str, str, int, str, str, str]  # the columns of _SCHEMA, in order


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


@contextlib.contextmanager
def connect(index_path: Path) -> Iterator[sqlite3.Connection]:
    """Opens a fresh autocommit connection (WAL, 30 s busy timeout) and closes it afterwards.

    The ``units`` table is created if missing.

    Args:
        index_path: The SQLite file.
    """
    deadline = time.monotonic() + _BUSY_TIMEOUT_S
    while True:
        conn = sqlite3.connect(str(index_path), timeout=_BUSY_TIMEOUT_S, isolation_level=None)
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
def write_txn(index_path: Path) -> Iterator[sqlite3.Connection]:
    """Yields a connection inside ``BEGIN IMMEDIATE``; commits on success, rolls back on error.

    Args:
        index_path: The SQLite file.
    """
    with connect(index_path) as conn:
        conn.execute("BEGIN IMMEDIATE")
        try:
            yield conn
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        conn.execute("COMMIT")


def index_row(key: str, rel_path: str, metadata: Mapping[str, str], nbytes: int) -> Row:
    """Builds an index row from unit metadata.

    Args:
        key: The unit key.
        rel_path: The unit file's path relative to the store root, POSIX style.
        metadata: The unit file's safetensors metadata.
        nbytes: Size of the unit file in bytes.
    """
    return (
        key,
        rel_path,
        metadata["sha256"],
        metadata["config"],
        nbytes,
        metadata["created"],
        metadata.get("kind", "unit"),
        metadata.get("tags", "{}"),
    )


def upsert_row(index_path: Path, row: Row) -> None:
    """Inserts or replaces one index row."""
    with connect(index_path) as conn:
        conn.execute(_INSERT, row)


def delete_rows(index_path: Path, keys: Sequence[str]) -> None:
    """Removes the rows of ``keys`` in one transaction."""
    with write_txn(index_path) as conn:
        conn.executemany("DELETE FROM units WHERE key = ?", [(k,) for k in keys])


def replace_rows(conn: sqlite3.Connection, rows: Iterable[Row]) -> None:
    """Replaces the whole index with ``rows`` (call inside :func:`write_txn`)."""
    conn.execute("DELETE FROM units")
    conn.executemany(_INSERT, rows)


def indexed_keys(index_path: Path) -> set[str]:
    """Returns the keys of all index rows."""
    with connect(index_path) as conn:
        return {row[0] for row in conn.execute("SELECT key FROM units")}


def read_infos(index_path: Path, root: Path) -> list[UnitInfo]:
    """Returns one :class:`UnitInfo` per index row, sorted by key.

    Args:
        index_path: The SQLite file.
        root: The store root (index paths are relative to it).
    """
    with connect(index_path) as conn:
        rows = conn.execute("SELECT key, kind, tags, nbytes, created, path, config FROM units ORDER BY key").fetchall()
    return [
        UnitInfo(
            key=key,
            kind=kind,
            tags=json.loads(tags),
            nbytes=int(nbytes),
            created=created,
            path=root / rel,
            config=json.loads(config),
        )
        for key, kind, tags, nbytes, created, rel, config in rows
    ]
