"""sdec.runtime.data: readers for the published data set formats (nothing is downloaded).

``load_dataset(name, split)`` returns a :class:`Dataset` for a registry name (``DATASETS``:
digits, mnist, cifar10, imagenet32), ``folder:PATH`` (a folder of images) or ``toy:NAME``
(2-D continuous toy sets). Files are looked for under ``data_dir``, which defaults to the
environment variable SDEC_DATA, else ./data. Every user error is a one-line DataError.
Each format is described in its module's docstring.
"""
from __future__ import annotations

import os

import torch

from .base import Dataset, DataError, check_split
from .cifar import load_cifar10
from .digits import load_digits_split
from .folder import load_folder
from .imagenet32 import load_imagenet32
from .mnist import load_mnist
from .safe_pickle import safe_load
from .toy import TOYS, load_toy

__all__ = ["DATASETS", "Dataset", "DataError", "describe", "format_description",
           "load_dataset", "safe_load", "default_data_dir"]

# name -> loader(split, data_dir, image_size) -> Dataset
DATASETS = {
    "digits": load_digits_split,
    "mnist": load_mnist,
    "cifar10": load_cifar10,
    "imagenet32": load_imagenet32,
}


def default_data_dir() -> str:
    """$SDEC_DATA if set (and non-empty), else ./data."""
    return os.environ.get("SDEC_DATA") or "data"


def valid_names() -> str:
    """The accepted data set names, for error messages."""
    toys = ", ".join(f"toy:{t}" for t in TOYS)
    return f"{', '.join(DATASETS)}, folder:PATH, {toys}"


def load_dataset(name: str, split: str, data_dir: str | None = None,
                 image_size: int = 32) -> Dataset:
    """One split ("train" or "test") of the named data set; DataError on any user error.

    ``image_size`` applies to ``folder:`` sets only; the published sets keep their size.
    """
    check_split(name, split)
    data_dir = default_data_dir() if data_dir is None else str(data_dir)
    if name.startswith("folder:"):
        path = name[len("folder:"):]
        if not path:
            raise DataError("folder: empty path: use folder:PATH")
        return load_folder(path, split, image_size)
    if name.startswith("toy:"):
        toy = name[len("toy:"):]
        if toy not in TOYS:
            raise DataError(f"unknown toy set {name!r}: expected one of "
                            f"{', '.join('toy:' + t for t in TOYS)}")
        return load_toy(toy, split)
    if name not in DATASETS:
        raise DataError(f"unknown data set {name!r}: expected one of {valid_names()}")
    return DATASETS[name](split, data_dir, image_size)


def channel_mean(data: torch.Tensor, chunk: int = 16384) -> list[float]:
    """Per-channel (images) or per-coordinate (continuous) mean, summed in chunks."""
    dims = (0, 2, 3) if data.dim() == 4 else (0,)
    total = torch.zeros(data.shape[1], dtype=torch.float64)
    for start in range(0, data.shape[0], chunk):
        total += data[start:start + chunk].to(torch.float64).sum(dim=dims)
    count = data.numel() // data.shape[1] if data.numel() else 1
    return [float(v) for v in total / count]


def describe(name: str, data_dir: str | None = None, image_size: int = 32) -> dict:
    """{"train": {...}, "test": {...}} with n, shape (list), levels and channel_mean."""
    info = {}
    for split in ("train", "test"):
        ds = load_dataset(name, split, data_dir, image_size)
        info[split] = {"n": ds.n, "shape": list(ds.shape), "levels": ds.levels,
                       "channel_mean": channel_mean(ds.data)}
    return info


def format_description(name: str, info: dict) -> str:
    """Human-readable lines for `sdec data`: one line per split."""
    lines = [name]
    for split in ("train", "test"):
        part = info[split]
        shape = "x".join(str(s) for s in part["shape"])
        levels = "continuous" if part["levels"] is None else f"{part['levels']} levels"
        label = "channel" if len(part["shape"]) == 3 else "coordinate"
        means = ", ".join(f"{m:.3f}" for m in part["channel_mean"])
        lines.append(f"  {split + ':':6} {part['n']} examples, shape {shape}, {levels}, "
                     f"{label} mean [{means}]")
    return "\n".join(lines)
