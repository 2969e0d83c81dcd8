"""CIFAR-10, "python version" as published (cifar-10-python.tar.gz, unpacked).

The directory ``cifar-10-batches-py`` holds ``data_batch_1`` .. ``data_batch_5`` (the
training set, 10000 images each) and ``test_batch`` (10000 images): each a Python-2 pickle
of a dict with (bytes) keys ``data`` -- a uint8 numpy array (N, 3072) -- and ``labels`` -- a
list of N ints in 0..9. Each row is channel-planar: 1024 red values, then 1024 green, then
1024 blue, each plane row-major 32x32. Values are raw 8-bit levels (256 levels).
"""
from __future__ import annotations

import os

import numpy as np
import torch

from .base import Dataset, DataError, label_tensor, locate, uint8_tensor
from .safe_pickle import get_key, safe_load

TRAIN = [f"data_batch_{i}" for i in range(1, 6)]
TEST = ["test_batch"]
LAYOUT = ("data_batch_1 .. data_batch_5, test_batch (Python pickles) in cifar-10-batches-py/, "
          "in cifar10/cifar-10-batches-py/, or directly in the directory")


def planar_images(rows, path: str, side: int = 32) -> torch.Tensor:
    """Channel-planar uint8 rows (N, 3*side*side) -> uint8 tensor (N, 3, side, side).

    The layout of CIFAR-10 and Downsampled ImageNet: per row the R plane, the G plane, the
    B plane, each row-major. A row of another length or a non-uint8 array is a DataError.
    """
    if not isinstance(rows, np.ndarray):
        raise DataError(f"{path}: 'data' is a {type(rows).__name__}, expected a numpy array")
    width = 3 * side * side
    if rows.ndim != 2 or rows.shape[1] != width:
        raise DataError(f"{path}: 'data' has shape {rows.shape}, expected (N, {width})")
    if rows.dtype != np.uint8:
        raise DataError(f"{path}: 'data' has dtype {rows.dtype}, expected uint8")
    return uint8_tensor(rows).reshape(rows.shape[0], 3, side, side)


def read_batch(path: str, fmt: str, batch=None) -> tuple[torch.Tensor, torch.Tensor]:
    """(images (N,3,32,32) uint8, labels (N,) int64) from one pickled batch dict."""
    if batch is None:
        batch = safe_load(path, fmt=fmt)
    images = planar_images(get_key(batch, "data", path), path)
    labels = label_tensor(get_key(batch, "labels", path), path, images.shape[0])
    return images, labels


def load_cifar10(split: str, data_dir: str, image_size: int = 32) -> Dataset:
    """CIFAR-10 train (50000) or test (10000) from the published python batches."""
    dirs = [os.path.join(data_dir, "cifar-10-batches-py"), data_dir,
            os.path.join(data_dir, "cifar10", "cifar-10-batches-py")]
    names = TRAIN if split == "train" else TEST
    paths = locate("cifar10", "CIFAR-10", dirs, names, ("",), data_dir, LAYOUT)
    parts = [read_batch(paths[name], "CIFAR-10") for name in names]
    images = torch.cat([p[0] for p in parts]) if len(parts) > 1 else parts[0][0]
    labels = torch.cat([p[1] for p in parts]) if len(parts) > 1 else parts[0][1]
    return Dataset("cifar10", split, images, 256, labels)
