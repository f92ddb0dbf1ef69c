"""Content-addressed store for benchmark "units" (dicts of named tensors).

A *unit* is a mapping ``name -> torch.Tensor`` identified by a content key (a lowercase hex string computed
by the caller, typically :func:`content_key` of the canonical config) plus the JSON-serialisable config
that determined it.

Layout under ``root``::

    units/<key[:2]>/<key>.safetensors      the unit (the file is the truth and the done-marker)
    units/<key[:2]>/.<name>.<rand>.tmp     in-flight (or stray, after a crash) temporary files
    units/<key[:2]>/<key>.safetensors.corrupt   files quarantined by :meth:`UnitStore.get`
    index.sqlite                           SQLite (WAL) index, rebuilt from the files when it disagrees
    store.json                             {"store_format": N}: a root of another format is refused, untouched

Every unit file is written to a temporary file in its final directory, fsync'd and ``os.replace``'d into
place, so a process killed at any point (even ``kill -9``) leaves either no file or a complete one.
The safetensors metadata (string -> string) carries ``key``, ``config`` (canonical JSON), ``sha256`` (see
:func:`tensors_sha256`), ``format_version``, ``created``, ``kind`` and ``tags``; the index only caches it.

The store keeps no open handles: each operation opens its own SQLite connection, so one
:class:`UnitStore` may be used from several threads, and several processes may share one root.

Modules, one job each:

    keys.py         canonical JSON and content keys
    atomic.py       atomic writes and the temp-file locks that tell in-flight writes from stray ones
    unit_file.py    the safetensors unit format: metadata, checksums, verification
    config_diff.py  field-by-field config comparison for :class:`ConfigMismatchError`
    index.py        the SQLite index and :class:`UnitInfo`
    errors.py       errors and warnings
    unit_store.py   :class:`UnitStore`, tying the above together
    cli.py          the command line (run by ``__main__.py``)

Command line::

    python -m benchmark.store ls --root PATH
    python -m benchmark.store verify --root PATH
    python -m benchmark.store gc --root PATH     # removes units no current configuration uses
                                                 # (benchmark.cache_usage), stray temp and .corrupt files;
                                                 # --keep-unused: only the stray files; --dry-run: list
"""

from benchmark.store.atomic import atomic_write_bytes, atomic_write_text
from benchmark.store.cli import main
from benchmark.store.errors import (
    ConfigMismatchError,
    CorruptUnitWarning,
    IncompatibleStoreError,
    UnitConflictWarning,
)
from benchmark.store.index import UnitInfo
from benchmark.store.keys import canonical_json, content_key
from benchmark.store.unit_file import STORE_FORMAT_VERSION, tensors_sha256
from benchmark.store.unit_store import UnitStore

__all__ = [
    "STORE_FORMAT_VERSION",
    "ConfigMismatchError",
    "IncompatibleStoreError",
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
