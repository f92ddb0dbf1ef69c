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


def _mnist_hf() -> dict[str, np.ndarray]:
    import datasets  # type: ignore[import-not-found]

    ds = datasets.load_dataset("ylecun/mnist")
    out = {}
    for split, tag in (("train", "train"), ("test", "test")):
        out[f"x_{tag}"] = np.stack([np.asarray(im, dtype=np.uint8) for im in ds[split]["image"]])
        out[f"y_{tag}"] = np.asarray(ds[split]["label"], dtype=np.uint8)
    return out


def load_mnist() -> dict[str, np.ndarray]:
    """MNIST as uint8 ``x_train [60000, 28, 28]``, ``y_train``, ``x_test [10000, 28, 28]``, ``y_test``."""
    return load_arrays("mnist", ("x_train", "y_train", "x_test", "y_test"),
                       [("torchvision MNIST", _mnist_torchvision), ("Hugging Face ylecun/mnist", _mnist_hf)])
