"""Finding data on disk or online, with one error listing every place tried.

Search order for a data set named ``<name>``: ``$DTDA_DATA_DIR/<name>.npz``, ``./data/<name>.npz``,
``../shared/data/<name>.npz`` (next to the checkout), then the online loader (torchvision, then
Hugging Face ``datasets``) unless ``DTDA_OFFLINE=1`` or ``HF_DATASETS_OFFLINE=1`` is set.
Arrays are loaded with ``allow_pickle=False``.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import numpy as np

REPO_ROOT = Path(__file__).resolve().parent.parent


class DataNotFoundError(FileNotFoundError):
    """No copy of the data set could be found; the message lists each place tried and a fix."""


def candidate_paths(name: str) -> list[Path]:
    paths = []
    if os.environ.get("DTDA_DATA_DIR"):
        paths.append(Path(os.environ["DTDA_DATA_DIR"]) / f"{name}.npz")
    paths.append(Path.cwd() / "data" / f"{name}.npz")
    paths.append(REPO_ROOT / "data" / f"{name}.npz")
    paths.append(REPO_ROOT.parent / "shared" / "data" / f"{name}.npz")
    seen: list[Path] = []
    for p in paths:
        if p not in seen:
            seen.append(p)
    return seen


def is_offline() -> bool:
    return any(os.environ.get(v) == "1" for v in ("DTDA_OFFLINE", "HF_DATASETS_OFFLINE"))


def load_arrays(
    name: str, required: tuple[str, ...], online: list[tuple[str, Callable[[], dict[str, np.ndarray]]]]
) -> dict[str, np.ndarray]:
    """Load a dict of arrays from the first place that has them.

    Args:
        name: file stem, e.g. ``"mnist"``.
        required: array names that must be present.
        online: (description, loader) pairs tried in order after the files.
    """
    tried: list[str] = []
    for path in candidate_paths(name):
        if not path.is_file():
            tried.append(f"{path}: no such file")
            continue
        with np.load(path, allow_pickle=False) as z:
            missing = [k for k in required if k not in z.files]
            if missing:
                tried.append(f"{path}: missing arrays {missing}")
                continue
            return {k: z[k] for k in z.files}
    if is_offline():
        tried.append("online loaders: skipped (DTDA_OFFLINE=1 or HF_DATASETS_OFFLINE=1)")
    else:
        for desc, loader in online:
            try:
                return loader()
            except Exception as exc:  # noqa: BLE001 - any failure means "try the next place"
                tried.append(f"{desc}: {type(exc).__name__}: {exc}"[:300])
    lines = "\n  ".join(tried)
    raise DataNotFoundError(
        f"could not find the {name!r} data set. Tried:\n  {lines}\n"
        f"Fix: put {name}.npz (arrays {', '.join(required)}) in $DTDA_DATA_DIR or ./data/, "
        "or allow network access for the online loader."
    )


def _mnist_torchvision() -> dict[str, np.ndarray]:
    from torchvision.datasets import MNIST

    root = Path(os.environ.get("DTDA_DATA_DIR", REPO_ROOT / "data")) / "torchvision"
    tr, te = MNIST(str(root), train=True, download=True), MNIST(str(root), train=False, download=True)
    return {"x_train": tr.data.numpy(), "y_train": tr.targets.numpy(),
            "x_test": te.data.numpy(), "y_test": te.targets.numpy()}


def _hf_arrays(name: str, image_column: str) -> dict[str, np.ndarray]:
    """A Hugging Face image data set as uint8 arrays x_train, y_train, x_test, y_test (official order)."""
    import datasets  # type: ignore[import-not-found]

    ds = datasets.load_dataset(name)
    out = {}
    for split in ("train", "test"):
        out[f"x_{split}"] = np.stack([np.asarray(im, dtype=np.uint8) for im in ds[split][image_column]])
        out[f"y_{split}"] = np.asarray(ds[split]["label"], dtype=np.uint8)
    return out


def _mnist_hf() -> dict[str, np.ndarray]:
    return _hf_arrays("ylecun/mnist", "image")


def load_mnist() -> dict[str, np.ndarray]:
    """MNIST as uint8 ``x_train [60000, 28, 28]``, ``y_train``, ``x_test [10000, 28, 28]``, ``y_test``."""
    return load_arrays("mnist", ("x_train", "y_train", "x_test", "y_test"),
                       [("torchvision MNIST", _mnist_torchvision), ("Hugging Face ylecun/mnist", _mnist_hf)])


# ---------------------------------------------------------------- CIFAR-10
# Official positions absent from the shared offline copy (../shared/data/README.md): every selection skips
# them, so a full copy (torchvision, Hugging Face) selects exactly the same images.
CIFAR10_UNAVAILABLE_TRAIN: tuple[int, ...] = (
    4298, 5949, 7066, 7237, 7248, 7630, 8006, 8831, 8968, 9415, 11027, 12762, 12834, 13546, 21493, 25728, 26098,
    26927, 27621, 28435, 28670, 28728, 29694, 29747, 31066, 31367, 31462, 31625, 31663, 32777, 33446, 33641, 33661,
    34067, 34276, 34387, 34471, 34825, 35160, 35646, 36733, 37329, 37474, 37567, 38089, 38384, 38925, 39069, 39358,
    39385, 39613, 39840, 39888, 39971, 41761, 41779, 42004, 42389, 42611, 43357, 43883, 44420, 44882, 45168, 45240,
    46175, 46435, 46538, 46624, 47393, 47597, 48081, 48124, 48333, 48821, 48836, 49321, 49429, 49631, 49830, 49857,
)
CIFAR10_UNAVAILABLE_TEST: tuple[int, ...] = (
    1259, 1369, 1422, 1556, 2245, 2737, 2935, 3630, 3695, 3718, 4085, 4496, 5791, 5896, 6286, 7580, 7707, 7724,
    7832, 8117, 8541, 8551, 9254,
)
CIFAR10_OFFICIAL_SIZES = (50000, 10000)
CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)  # per-channel normalisation (TRAK / kronfluence ResNet-9 recipe)
CIFAR10_STD = (0.247, 0.243, 0.261)


def _cifar_torchvision() -> dict[str, np.ndarray]:
    from torchvision.datasets import CIFAR10

    root = Path(os.environ.get("DTDA_DATA_DIR", REPO_ROOT / "data")) / "torchvision"
    tr, te = CIFAR10(str(root), train=True, download=True), CIFAR10(str(root), train=False, download=True)
    return {"x_train": np.asarray(tr.data, dtype=np.uint8), "y_train": np.asarray(tr.targets, dtype=np.uint8),
            "x_test": np.asarray(te.data, dtype=np.uint8), "y_test": np.asarray(te.targets, dtype=np.uint8)}


def _cifar_hf() -> dict[str, np.ndarray]:
    return _hf_arrays("uoft-cs/cifar10", "img")


def load_cifar10() -> dict[str, np.ndarray]:
    """CIFAR-10 as uint8 ``x_train [n, 32, 32, 3]`` (height, width, RGB), ``y_train``, ``x_test``, ``y_test``,
    and ``idx_train`` / ``idx_test``: each image's position in the official order (``data_batch_1..5``
    joined; ``test_batch``). A complete online copy is in the official order, so its positions are 0..n−1."""
    arrays = load_arrays("cifar10", ("x_train", "y_train", "x_test", "y_test"),
                         [("torchvision CIFAR10", _cifar_torchvision), ("Hugging Face uoft-cs/cifar10", _cifar_hf)])
    for split in ("train", "test"):
        if f"idx_{split}" not in arrays:
            arrays[f"idx_{split}"] = np.arange(len(arrays[f"y_{split}"]), dtype=np.int64)
    return arrays


def select_official(available: np.ndarray, n: int, seed: int, official_size: int,
                    unavailable: tuple[int, ...] = (), exclude: np.ndarray | None = None) -> np.ndarray:
    """Positions (into the arrays) of ``n`` images drawn by *official index*: a seeded permutation of
    0..official_size−1, skipping the ``unavailable`` positions (missing from some copies) and ``exclude``
    (e.g. a disjoint split drawn before), first ``n`` kept. The same seed selects the same official images
    from any copy that holds them. ``available [n_arr]``: the official position of each stored image."""
    skip = np.zeros(official_size, dtype=bool)
    skip[list(unavailable)] = True
    if exclude is not None:
        skip[np.asarray(exclude, dtype=np.int64)] = True
    order = np.random.default_rng(seed).permutation(official_size)
    chosen = order[~skip[order]][:n]
    if len(chosen) < n:
        raise ValueError(f"select_official: only {len(chosen)} official images are selectable, {n} requested")
    where = np.full(official_size, -1, dtype=np.int64)
    where[np.asarray(available, dtype=np.int64)] = np.arange(len(available))
    positions = where[chosen]
    if (positions < 0).any():
        missing = chosen[positions < 0][:5].tolist()
        raise ValueError(f"select_official: official images {missing}… are not in this copy of the data set")
    return positions
