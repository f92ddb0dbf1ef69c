"""The unit file format: a safetensors file whose metadata carries the key, config and a tensor checksum.

The safetensors metadata (string -> string) carries ``key``, ``config`` (canonical JSON), ``sha256`` (see
:func:`tensors_sha256`), ``format_version``, ``created``, ``kind`` and ``tags``. Bump
:data:`STORE_FORMAT_VERSION` when this format changes: files of another version read as corrupt.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import hashlib
import json
import os
import struct
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import safetensors
import safetensors.torch
import torch

from benchmark.store.errors import CorruptUnitError

__all__ = [
    "STORE_FORMAT_VERSION",
    "UNIT_SUFFIX",
    "LoadedUnit",
    "check_metadata",
    "load_unit",
    "prepare_tensors",
    "read_header",
    "tensors_sha256",
    "unit_metadata",
]

STORE_FORMAT_VERSION: int = 1

UNIT_SUFFIX = ".safetensors"
_REQUIRED_METADATA = ("key", "config", "sha256", "format_version", "created")
_MAX_HEADER_BYTES = 100 * 1024 * 1024


# --------------------------------------------------------------------------------------------------------
# Tensor checksums
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


# --------------------------------------------------------------------------------------------------------
# Writing
# --------------------------------------------------------------------------------------------------------
def prepare_tensors(key: str, tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Detaches, moves to CPU and makes contiguous every tensor of a unit about to be written.

    Tensors that share storage are cloned, since safetensors refuses tensors that share memory.

    Args:
        key: The unit key (named in errors).
        tensors: Named tensors.

    Returns:
        The tensors, ready for ``safetensors.torch.save``.

    Raises:
        TypeError: If a tensor name is not a non-empty string or a value is not a tensor.
    """
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
    return prepared


def unit_metadata(key: str, config_json: str, sha: str, kind: str, tags_json: str) -> dict[str, str]:
    """Builds the safetensors metadata of a new unit, stamped with the current time.

    Args:
        key: The unit key.
        config_json: Canonical JSON of the config.
        sha: :func:`tensors_sha256` of the tensors.
        kind: Free-form kind label.
        tags_json: Canonical JSON of the tags.

    Returns:
        The metadata (string -> string).
    """
    return {
        "key": key,
        "config": config_json,
        "sha256": sha,
        "format_version": str(STORE_FORMAT_VERSION),
        "created": _now_iso(),
        "kind": kind,
        "tags": tags_json,
    }


def _now_iso() -> str:
    """Returns the current UTC time in ISO-8601 format."""
    return _dt.datetime.now(_dt.UTC).isoformat()


# --------------------------------------------------------------------------------------------------------
# Reading and verifying
# --------------------------------------------------------------------------------------------------------
def _parse_header(data: bytes) -> dict[str, str]:
    """Returns the ``__metadata__`` of a safetensors blob (``data`` may be just the header prefix)."""
    if len(data) < 8:
        raise CorruptUnitError("file too short for a safetensors header")
    (n,) = struct.unpack("<Q", data[:8])
    if n > _MAX_HEADER_BYTES or 8 + n > len(data):
        raise CorruptUnitError(f"invalid safetensors header length {n}")
    try:
        header = json.loads(data[8 : 8 + n])
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CorruptUnitError(f"unparseable safetensors header: {exc}") from None
    metadata = header.get("__metadata__") if isinstance(header, dict) else None
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise CorruptUnitError("missing or invalid safetensors metadata")
    return metadata


def read_header(path: Path) -> dict[str, str]:
    """Reads only the safetensors header of ``path`` and returns its metadata.

    Raises:
        CorruptUnitError: If the header is missing or invalid.
        OSError: If the file cannot be read (``FileNotFoundError`` if it does not exist).
    """
    with open(path, "rb") as fh:
        prefix = fh.read(8)
        if len(prefix) < 8:
            raise CorruptUnitError("file too short for a safetensors header")
        (n,) = struct.unpack("<Q", prefix)
        if n > _MAX_HEADER_BYTES:
            raise CorruptUnitError(f"invalid safetensors header length {n}")
        return _parse_header(prefix + fh.read(n))


def check_metadata(metadata: Mapping[str, str], key: str) -> dict[str, Any]:
    """Validates unit metadata; returns the decoded config.

    Raises:
        CorruptUnitError: If a field is missing, the key or format version is wrong, or JSON is invalid.
    """
    missing = [name for name in _REQUIRED_METADATA if name not in metadata]
    if missing:
        raise CorruptUnitError(f"metadata lacks {', '.join(missing)}")
    if metadata["key"] != key:
        raise CorruptUnitError(f"metadata key {metadata['key']!r} does not match file key {key!r}")
    if metadata["format_version"] != str(STORE_FORMAT_VERSION):
        raise CorruptUnitError(
            f"unsupported format_version {metadata['format_version']!r} (expected {STORE_FORMAT_VERSION})"
        )
    try:
        config = json.loads(metadata["config"])
        json.loads(metadata.get("tags", "{}"))
    except json.JSONDecodeError as exc:
        raise CorruptUnitError(f"config/tags metadata is not valid JSON: {exc}") from None
    if not isinstance(config, dict):
        raise CorruptUnitError("config metadata is not a JSON object")
    return config


@dataclasses.dataclass
class LoadedUnit:
    """A fully verified unit file."""

    tensors: dict[str, torch.Tensor]
    metadata: dict[str, str]
    config: dict[str, Any]
    nbytes: int


def load_unit(path: Path, key: str) -> tuple[LoadedUnit | None, str | None, tuple[int, int] | None]:
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
        config = check_metadata(metadata, key)
        try:
            tensors = safetensors.torch.load(data)
        except (safetensors.SafetensorError, RuntimeError, ValueError, TypeError, OverflowError) as exc:
            raise CorruptUnitError(f"unreadable tensor payload: {exc}") from None
        actual = tensors_sha256(tensors)
        if actual != metadata["sha256"]:
            raise CorruptUnitError(f"sha256 mismatch: recorded {metadata['sha256']}, actual {actual}")
    except CorruptUnitError as exc:
        return None, str(exc), file_id
    return LoadedUnit(tensors, dict(metadata), config, len(data)), None, file_id
