"""Downsampled ImageNet 32x32 (Chrabaszcz et al. 2017) as published.

``Imagenet32_train`` unpacks to ``train_data_batch_1`` .. ``train_data_batch_10`` (the
training set, about 1.28M images) and ``Imagenet32_val`` to ``val_data`` (50000 images, our
test split). Each file is a Python pickle (no extension) or a numpy ``.npz`` (same name +
.npz) holding ``data`` -- uint8 (N, 3072), channel-planar like CIFAR-10 -- and ``labels`` --
N ints in 1..1000 (kept as published, 1-based). A pickle may also hold ``mean``; it is
ignored. Values are raw 8-bit levels (256 levels).
"""
from __future__ import annotations

import os
import zipfile

import numpy as np
import torch

from .base import Dataset, DataError, locate
from .cifar import read_batch
from .safe_pickle import safe_load

TRAIN = [f"train_data_batch_{i}" for i in range(1, 11)]
TEST = ["val_data"]
LAYOUT = ("train_data_batch_1 .. train_data_batch_10 and val_data (pickles, or the same "
          "names + .npz) directly in the directory or in imagenet32/, Imagenet32_train/, "
          "Imagenet32_val/")


def read_npz(path: str) -> dict:
    """The 'data' and 'labels' arrays of an .npz file (no pickled objects allowed)."""
    try:
        with np.load(path, allow_pickle=False) as archive:
            return {key: archive[key] for key in ("data", "labels") if key in archive}
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as err:
        raise DataError(f"{path}: not a valid .npz file ({err})") from None


def read_file(path: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(images (N,3,32,32) uint8, labels (N,) int64 in 1..1000) from one batch file."""
    batch = read_npz(path) if path.endswith(".npz") else safe_load(path, fmt="ImageNet32")
    images, labels = read_batch(path, "ImageNet32", batch)
    if labels.numel() and (labels.min() < 1 or labels.max() > 1000):
        raise DataError(f"{path}: labels outside 1..1000")
    return images, labels


def load_imagenet32(split: str, data_dir: str, image_size: int = 32) -> Dataset:
    """ImageNet32 train (all ten batches required) or test (val_data)."""
    sub = "Imagenet32_train" if split == "train" else "Imagenet32_val"
    dirs = [data_dir, os.path.join(data_dir, "imagenet32"), os.path.join(data_dir, sub),
            os.path.join(data_dir, "imagenet32", sub)]
    names = TRAIN if split == "train" else TEST
    paths = locate("imagenet32", "ImageNet32", dirs, names, ("", ".npz"), data_dir, LAYOUT)
    parts = [read_file(paths[name]) for name in names]
    images = torch.cat([p[0] for p in parts]) if len(parts) > 1 else parts[0][0]
    labels = torch.cat([p[1] for p in parts]) if len(parts) > 1 else parts[0][1]
    return Dataset("imagenet32", split, images, 256, labels)
