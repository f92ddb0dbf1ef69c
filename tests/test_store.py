"""Tests for benchmark.store: the content-addressed unit store."""

from __future__ import annotations

import dataclasses
import enum
import json
import multiprocessing
import os
import pickle
import random
import sqlite3
import struct
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # plain `pytest` works without an install

from benchmark.store import (
    STORE_FORMAT_VERSION,
    ConfigMismatchError,
    CorruptUnitWarning,
    UnitConflictWarning,
    UnitInfo,
    UnitStore,
    atomic_write_bytes,
    atomic_write_text,
    canonical_json,
    content_key,
    main,
    tensors_sha256,
)

REPO_ROOT = Path(__file__).resolve().parents[1]
CONFIG: dict[str, Any] = {"task": "mnist_mlp", "train": {"lr": 0.1, "epochs": 3}, "seeds": [0, 1, 2]}


def _tensors(seed: int = 0) -> dict[str, torch.Tensor]:
    """Deterministic unit payload with several dtypes."""
    g = torch.Generator().manual_seed(seed)
    return {
        "loss": torch.randn(8, 5, generator=g),
        "margin": torch.randn(4, generator=g, dtype=torch.float64),
        "index": torch.arange(seed, seed + 6, dtype=torch.int64).reshape(2, 3),
    }


def _key(*parts: Any) -> str:
    return content_key("test", *parts)


def _subprocess_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO_ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    return env


def _payload_offset(path: Path) -> int:
    """Offset of the first tensor byte in a safetensors file."""
    with open(path, "rb") as fh:
        (n,) = struct.unpack("<Q", fh.read(8))
    return 8 + n


@pytest.fixture
def store(tmp_path: Path) -> UnitStore:
    return UnitStore(tmp_path / "store")


# ------------------------------------------------------------------------------------------ round trip
def test_put_get_round_trip(store: UnitStore) -> None:
    key = _key("round-trip")
    tensors = _tensors(1)
    assert not store.has(key)
    assert store.get(key) is None

    path = store.put(key, CONFIG, tensors, kind="measure", tags={"chunk": 3})
    assert path == store.key_path(key) == store.root / "units" / key[:2] / f"{key}.safetensors"
    assert path.is_file()
    assert store.has(key)

    got = store.get(key, CONFIG)
    assert got is not None
    assert set(got) == set(tensors)
    for name, tensor in tensors.items():
        assert got[name].dtype == tensor.dtype
        assert got[name].shape == tensor.shape
        assert torch.equal(got[name], tensor)
    assert store.get(key) is not None  # no config -> no check

    from safetensors import safe_open

    with safe_open(str(path), "pt") as fh:
        meta = fh.metadata()
    assert meta["key"] == key
    assert json.loads(meta["config"]) == CONFIG
    assert meta["config"] == canonical_json(CONFIG)
    assert meta["sha256"] == tensors_sha256(tensors)
    assert meta["format_version"] == str(STORE_FORMAT_VERSION) == "1"
    assert meta["created"]
    assert meta["kind"] == "measure"

    [info] = store.ls()
    assert isinstance(info, UnitInfo)
    assert (info.key, info.kind, info.tags, info.path) == (key, "measure", {"chunk": 3}, path)
    assert info.nbytes == path.stat().st_size
    assert info.config == CONFIG
    assert store.verify() == []
    assert not list(store.units_dir.rglob("*.tmp"))


def test_put_makes_tensors_contiguous_and_handles_shared_storage(store: UnitStore) -> None:
    base = torch.arange(12, dtype=torch.float32).reshape(3, 4)
    key = _key("views")
    store.put(key, {}, {"t": base.t(), "same": base, "alias": base})
    got = store.get(key)
    assert got is not None
    assert torch.equal(got["t"], base.t()) and got["t"].is_contiguous()
    assert torch.equal(got["alias"], base) and torch.equal(got["same"], base)


def test_invalid_keys_rejected(store: UnitStore) -> None:
    for bad in ["../../etc/passwd", "ABCDEF", "a", "", "zz12"]:
        with pytest.raises(ValueError, match="hex"):
            store.key_path(bad)


def test_unwritable_root_names_path(tmp_path: Path) -> None:
    blocker = tmp_path / "a_file"
    blocker.write_text("not a directory")
    with pytest.raises(PermissionError, match="a_file"):
        UnitStore(blocker / "store")


# ------------------------------------------------------------------------------------------ config mismatch
def test_config_mismatch_names_nested_field(store: UnitStore) -> None:
    key = _key("mismatch")
    store.put(key, CONFIG, _tensors())
    requested = {**CONFIG, "train": {"lr": 0.01, "epochs": 3}}
    with pytest.raises(ConfigMismatchError) as info:
        store.get(key, requested)
    message = str(info.value)
    assert "train.lr" in message
    assert "0.1" in message and "0.01" in message
    assert "epochs" not in message
    assert info.value.differences == [("train.lr", 0.1, 0.01)]
    assert isinstance(info.value, ValueError)

    # Several fields, including a missing one and a list element, are all named.
    requested = {"task": "mnist_mlp", "train": {"lr": 0.1, "epochs": 4, "wd": 0.0}, "seeds": [0, 1, 5]}
    with pytest.raises(ConfigMismatchError) as info:
        store.get(key, requested)
    message = str(info.value)
    for field in ("train.epochs", "train.wd", "seeds[2]"):
        assert field in message
    assert "<missing>" in message
    # Equivalent configs (tuple vs list, different order) do not raise.
    reordered = {"seeds": (0, 1, 2), "train": {"epochs": 3, "lr": 0.1}, "task": "mnist_mlp"}
    assert store.get(key, reordered) is not None
    # The error survives pickling (multiprocessing workers).
    clone = pickle.loads(pickle.dumps(info.value))
    assert str(clone) == message and clone.key == key

    # put with the same key and a different config is refused as well.
    with pytest.raises(ConfigMismatchError, match=r"train\.lr"):
        store.put(key, {**CONFIG, "train": {"lr": 0.5, "epochs": 3}}, _tensors())


def test_duplicate_put_is_harmless(store: UnitStore) -> None:
    key = _key("dup")
    first = store.put(key, CONFIG, _tensors(2))
    mtime = first.stat().st_mtime_ns
    second = store.put(key, dict(reversed(list(CONFIG.items()))), _tensors(2))
    assert first == second
    assert first.stat().st_mtime_ns == mtime  # kept, not rewritten
    assert len(store.ls()) == 1
    assert not list(store.units_dir.rglob("*.tmp"))

    # Different content for the same key (non-determinism): warn, keep the first unit.
    with pytest.warns(UnitConflictWarning, match=key):
        store.put(key, CONFIG, _tensors(3))
    got = store.get(key)
    assert got is not None and torch.equal(got["loss"], _tensors(2)["loss"])


# ------------------------------------------------------------------------------------------ corruption
def test_corrupt_payload_detected_warned_and_removed(store: UnitStore) -> None:
    good, bad = _key("good"), _key("bad")
    store.put(good, CONFIG, _tensors(0))
    path = store.put(bad, CONFIG, _tensors(1))

    raw = bytearray(path.read_bytes())
    raw[_payload_offset(path) + 5] ^= 0xFF  # flip one byte of tensor data; header stays valid
    path.write_bytes(bytes(raw))

    problems = store.verify()
    assert [k for k, _ in problems] == [bad]
    assert "sha256" in problems[0][1]
    assert store.has(bad)  # verify does not touch anything

    with pytest.warns(CorruptUnitWarning, match=bad) as record:
        assert store.get(bad, CONFIG) is None
    assert str(path) in str(record[0].message)
    assert not path.exists()
    assert not store.has(bad)
    assert path.with_name(path.name + ".corrupt").exists()
    assert store.verify() == []
    assert [i.key for i in store.ls()] == [good]
    assert store.get(good, CONFIG) is not None

    # The caller recomputes; gc clears the quarantined copy.
    store.put(bad, CONFIG, _tensors(1))
    assert store.get(bad, CONFIG) is not None
    assert store.gc(lambda info: True) == 1
    assert not path.with_name(path.name + ".corrupt").exists()


def test_garbage_file_is_unreadable_not_fatal(store: UnitStore) -> None:
    key = _key("garbage")
    path = store.key_path(key)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"\x00" * 3)
    assert [k for k, _ in store.verify()] == [key]
    with pytest.warns(CorruptUnitWarning, match=key):
        assert store.get(key) is None
    assert not path.exists()


# ------------------------------------------------------------------------------------------ atomicity
def _crashing_put(root: str, mode: str, key: str) -> None:
    """Child process: puts one unit and dies with ``os._exit(9)`` at the chosen point (like kill -9)."""
    import benchmark.store as store_module

    st_ = UnitStore(root)
    st_.put(content_key("warm-up"), {"n": 0}, {"x": torch.zeros(3)})
    if mode == "before_rename":  # temp file fully written and fsync'd, never renamed
        os.replace = lambda *a, **k: os._exit(9)  # type: ignore[assignment]
    else:  # renamed into place, never indexed
        store_module.UnitStore._index_upsert = lambda *a, **k: os._exit(9)  # type: ignore[method-assign]
    st_.put(key, {"n": 1}, {"x": torch.arange(1000.0)}, kind="k1", tags={"t": 1})
    os._exit(0)


def test_crash_leaves_no_partial_unit_and_index_recovers(tmp_path: Path) -> None:
    if "fork" not in multiprocessing.get_all_start_methods():
        pytest.skip("needs the fork start method")
    ctx = multiprocessing.get_context("fork")
    key = _key("crash")
    roots = {mode: tmp_path / mode for mode in ("before_rename", "after_rename")}
    for mode, root in roots.items():
        proc = ctx.Process(target=_crashing_put, args=(str(root), mode, key))
        proc.start()
        proc.join(60)
        assert proc.exitcode == 9, mode

    # Killed before the rename: only a stray temp file, no unit.
    crashed = UnitStore(roots["before_rename"])
    temps = list(crashed.units_dir.rglob("*.tmp"))
    assert len(temps) == 1 and temps[0].parent == crashed.key_path(key).parent
    assert not crashed.has(key)
    assert crashed.get(key) is None
    assert [i.key for i in crashed.ls()] == [content_key("warm-up")]
    assert crashed.verify() == []
    assert crashed.gc(lambda info: True) == 1
    assert not list(crashed.units_dir.rglob("*.tmp"))
    assert crashed.has(content_key("warm-up"))

    # Killed between rename and index insert: the file is the truth, ls() finds it.
    done = UnitStore(roots["after_rename"])
    with sqlite3.connect(done.index_path) as conn:
        assert conn.execute("SELECT key FROM units WHERE key = ?", (key,)).fetchone() is None
    assert done.has(key)
    got = done.get(key, {"n": 1})
    assert got is not None and torch.equal(got["x"], torch.arange(1000.0))
    infos = {i.key: i for i in done.ls()}
    assert infos[key].kind == "k1" and infos[key].tags == {"t": 1}


def test_gc_keeps_temp_files_of_live_writers(store: UnitStore) -> None:
    pytest.importorskip("fcntl")
    import fcntl

    stray = store.units_dir / "ab" / ".abcd.safetensors.x1.tmp"
    live = store.units_dir / "ab" / ".abcd.safetensors.x2.tmp"
    stray.parent.mkdir(parents=True)
    stray.write_bytes(b"partial")
    live.write_bytes(b"partial")
    with open(live, "rb") as fh:
        fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
        assert not store.has("abcd")
        assert store.gc(lambda info: True) == 1
        assert live.exists() and not stray.exists()
    assert store.gc(lambda info: True) == 1
    assert not live.exists()


def test_gc_during_a_write_leaves_the_in_flight_temp_file(
    store: UnitStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    real_replace = os.replace
    removed: list[int] = []

    def replace_after_gc(src: Any, dst: Any) -> None:
        assert Path(src).exists()
        removed.append(store.gc(lambda info: True))  # another process's gc, mid-write
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", replace_after_gc)
    key = _key("in-flight")
    store.put(key, CONFIG, _tensors())
    monkeypatch.setattr(os, "replace", real_replace)
    assert removed == [0]
    assert store.get(key, CONFIG) is not None


def test_gc_removes_units_not_kept(store: UnitStore) -> None:
    keys = [_key("gc", i) for i in range(4)]
    for i, key in enumerate(keys):
        store.put(key, {"i": i}, {"x": torch.full((2,), float(i))}, kind="even" if i % 2 == 0 else "odd")
    assert store.gc(lambda info: info.kind == "even") == 2
    assert sorted(i.key for i in store.ls()) == sorted(keys[::2])
    assert [store.has(k) for k in keys] == [True, False, True, False]


def test_atomic_write_helpers(tmp_path: Path) -> None:
    target = tmp_path / "sub" / "out.csv"
    atomic_write_text(target, "a,b\n1,2\n")
    assert target.read_text() == "a,b\n1,2\n"
    atomic_write_bytes(target, b"replaced")
    assert target.read_bytes() == b"replaced"
    assert sorted(p.name for p in target.parent.iterdir()) == ["out.csv"]
    assert target.stat().st_mode & 0o777 != 0o600  # not mkstemp's private mode


# ------------------------------------------------------------------------------------------ index
def test_index_rebuilt_when_it_disagrees_with_files(store: UnitStore) -> None:
    keys = [_key("idx", i) for i in range(3)]
    for i, key in enumerate(keys):
        store.put(key, {"i": i}, _tensors(i), kind="unit", tags={"i": i})

    # A file without a row (crash between rename and insert).
    with sqlite3.connect(store.index_path) as conn:
        conn.execute("DELETE FROM units WHERE key = ?", (keys[1],))
    with sqlite3.connect(store.index_path) as conn:
        assert conn.execute("SELECT COUNT(*) FROM units").fetchone()[0] == 2
    infos = {i.key: i for i in store.ls()}
    assert sorted(infos) == sorted(keys)
    assert infos[keys[1]].tags == {"i": 1}
    assert infos[keys[1]].path == store.key_path(keys[1])

    # A row without a file.
    store.key_path(keys[2]).unlink()
    assert sorted(i.key for i in store.ls()) == sorted(keys[:2])

    # The index deleted altogether.
    for suffix in ("", "-wal", "-shm"):
        Path(str(store.index_path) + suffix).unlink(missing_ok=True)
    assert sorted(i.key for i in UnitStore(store.root).ls()) == sorted(keys[:2])
    for suffix in ("", "-wal", "-shm"):
        Path(str(store.index_path) + suffix).unlink(missing_ok=True)
    assert sorted(i.key for i in store.ls()) == sorted(keys[:2])  # same object, index gone underneath
    assert store.rebuild_index() == 2
    with sqlite3.connect(store.index_path) as conn:
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


# ------------------------------------------------------------------------------------------ concurrency
_WORKER_SCRIPT = textwrap.dedent(
    """
    import sys, time, warnings
    from pathlib import Path
    import torch
    from benchmark.store import UnitStore, content_key

    root, who, go = sys.argv[1], int(sys.argv[2]), Path(sys.argv[3])
    store = UnitStore(root)
    warnings.simplefilter("error")  # index trouble or corruption warnings fail the worker

    def unit(i):
        g = torch.Generator().manual_seed(i)
        return {"x": torch.randn(256, 256, generator=g), "i": torch.arange(i + 1)}

    (go.parent / f"ready-{who}").touch()  # start together, after the slow imports
    deadline = time.time() + 60
    while not go.exists() and time.time() < deadline:
        time.sleep(0.002)
    shared = list(range(30))
    own = list(range(1000 * (who + 1), 1000 * (who + 1) + 15))
    for n, i in enumerate(shared + own):
        key = content_key("conc", i)
        store.put(key, {"i": i}, unit(i), kind="conc", tags={"i": i})
        got = store.get(key, {"i": i})
        assert got is not None and torch.equal(got["x"], unit(i)["x"]), i
        if n % 10 == 0:
            store.ls()
    print("ok", who)
    """
)


def test_concurrent_processes_share_one_root(tmp_path: Path) -> None:
    root = tmp_path / "shared"
    go = tmp_path / "go"
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", _WORKER_SCRIPT, str(root), str(who), str(go)],
            env=_subprocess_env(),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for who in range(2)
    ]
    deadline = time.time() + 60
    while not all((tmp_path / f"ready-{who}").exists() for who in range(2)) and time.time() < deadline:
        time.sleep(0.01)
    go.touch()
    for proc in procs:
        out, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, err
        assert out.startswith("ok"), (out, err)
        assert "Traceback" not in err

    store = UnitStore(root)
    expected = [*range(30), *range(1000, 1015), *range(2000, 2015)]
    infos = store.ls()
    assert sorted(i.key for i in infos) == sorted(content_key("conc", i) for i in expected)
    assert store.verify() == []
    for i in expected:
        got = store.get(content_key("conc", i), {"i": i})
        assert got is not None and got["i"].tolist() == list(range(i + 1))
    assert not list(store.units_dir.rglob("*.tmp"))
    assert store.rebuild_index() == len(expected)


# ------------------------------------------------------------------------------------------ keys / JSON
class Opt(enum.Enum):
    ADAM = "adam"
    SGD = "sgd"


@dataclasses.dataclass
class TrainCfg:
    lr: float
    opt: Opt
    sizes: tuple[int, ...]


def test_canonical_json_conversions() -> None:
    obj = {
        "b": TrainCfg(lr=0.1, opt=Opt.SGD, sizes=(1, 2)),
        "a": (np.int64(3), np.float32(0.5), np.bool_(True)),
        "dtype": torch.float32,
        "arr": np.arange(3),
    }
    assert canonical_json(obj) == (
        '{"a":[3,0.5,true],"arr":[0,1,2],"b":{"lr":0.1,"opt":"sgd","sizes":[1,2]},"dtype":"torch.float32"}'
    )
    assert canonical_json({"z": 1, "a": {"y": 2, "x": 3}}) == '{"a":{"x":3,"y":2},"z":1}'
    with pytest.raises(TypeError):
        canonical_json({"x": object()})


def test_content_key_changes_with_values() -> None:
    base = {"train": {"lr": 0.1, "epochs": 3}, "seed": 0}
    key = content_key(base)
    assert len(key) == 20 and all(c in "0123456789abcdef" for c in key)
    assert content_key({"seed": 0, "train": {"epochs": 3, "lr": 0.1}}) == key
    assert content_key({"train": {"lr": 0.2, "epochs": 3}, "seed": 0}) != key
    assert content_key({"train": {"lr": 0.1, "epochs": 3}, "seed": 1}) != key
    assert content_key(base, "extra") != key
    assert content_key("a", "b") != content_key("ab") != content_key(["a", "b"])


_json_leaf = st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=6)
_json_value = st.recursive(
    _json_leaf,
    lambda children: (
        st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=6), children, max_size=4)
    ),
    max_leaves=12,
)


def _shuffled(obj: Any, rnd: random.Random) -> Any:
    if isinstance(obj, dict):
        items = list(obj.items())
        rnd.shuffle(items)
        return {k: _shuffled(v, rnd) for k, v in items}
    if isinstance(obj, list):
        return [_shuffled(v, rnd) for v in obj]
    return obj


@settings(max_examples=75, deadline=None)
@given(st.dictionaries(st.text(max_size=8), _json_value, max_size=6), st.randoms(use_true_random=False))
def test_content_key_invariant_to_dict_order(config: dict[str, Any], rnd: random.Random) -> None:
    shuffled = _shuffled(config, rnd)
    assert content_key(shuffled) == content_key(config)
    assert canonical_json(shuffled) == canonical_json(config)
    assert json.loads(canonical_json(config)) == config
    changed = {**config, "__extra__": 1}
    assert content_key(changed) != content_key(config)


# ------------------------------------------------------------------------------------------ CLI
def test_cli(store: UnitStore, capsys: pytest.CaptureFixture[str]) -> None:
    key = _key("cli")
    store.put(key, CONFIG, _tensors(), kind="measure", tags={"chunk": 7})
    stray = store.key_path(key).parent / f".{key}.safetensors.zz.tmp"
    stray.write_bytes(b"partial")

    assert main(["ls", "--root", str(store.root)]) == 0
    out = capsys.readouterr().out
    assert key in out and "measure" in out and '{"chunk":7}' in out and "1 unit(s)" in out

    assert main(["verify", "--root", str(store.root)]) == 0
    assert "0 problem(s)" in capsys.readouterr().out

    assert main(["gc", "--keep-unused", "--root", str(store.root)]) == 0
    assert "removed 0 unused unit(s), 1 stray temp file(s) and 0 corrupt file(s)" in capsys.readouterr().out
    assert not stray.exists() and store.has(key)

    path = store.key_path(key)
    raw = bytearray(path.read_bytes())
    raw[_payload_offset(path)] ^= 0x01
    path.write_bytes(bytes(raw))
    assert main(["verify", "--root", str(store.root)]) == 1
    assert key in capsys.readouterr().out
