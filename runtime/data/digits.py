"""scikit-learn's bundled 8x8 handwritten digits (UCI optdigits test set, 1797 images).

Each image is 8x8 with integer values 0..16 (17 levels; a count of set pixels in a 4x4
block of the original 32x32 bitmap). Nothing is read from the data directory. The split
is fixed: the permutation of ``numpy.random.RandomState(0)``, first 360 test, next 1437
train (what ``sklearn.model_selection.train_test_split(test_size=0.2, random_state=0)``
gives, checked by a test).

The file is read where scikit-learn installed it (``sklearn/datasets/data/digits.csv.gz``:
one image per row, 64 pixel counts then the label, comma-separated) without importing
scikit-learn, whose import costs seconds at every ``sdec train`` start and in every rank.
"""
from __future__ import annotations

import importlib.util
import os

import numpy as np
import torch

from .base import DataError, Dataset

LEVELS = 17
N_IMAGES, N_TEST = 1797, 360


def digits_file() -> str:
    spec = importlib.util.find_spec("sklearn")
    if spec is None or spec.origin is None:
        raise DataError("the embedded digits come with scikit-learn, which is not installed "
                        "(pip install scikit-learn)")
    path = os.path.join(os.path.dirname(spec.origin), "datasets", "data", "digits.csv.gz")
    if not os.path.isfile(path):
        raise DataError(f"{path} is missing: the digits file of scikit-learn (1797 rows of 64 "
                        "pixel counts 0..16 and a label, comma-separated, gzip)")
    return path


def load_digits_split(split: str, data_dir: str | None = None, image_size: int = 32) -> Dataset:
    """The digits train or test split as uint8 (N, 1, 8, 8), values 0..16, with labels."""
    path = digits_file()
    try:
        table = np.loadtxt(path, delimiter=",", dtype=np.float64, ndmin=2)
    except (OSError, ValueError, EOFError) as err:
        raise DataError(f"{path}: cannot read ({err})") from None
    if table.shape != (N_IMAGES, 65) or table.min() < 0 or table[:, :64].max() > LEVELS - 1:
        raise DataError(f"{path}: expected 1797 rows of 64 pixel counts 0..16 and a label, got shape {table.shape}")
    images = np.rint(table[:, :64]).astype(np.uint8).reshape(-1, 8, 8)
    labels = np.rint(table[:, 64]).astype(np.int64)
    order = np.random.RandomState(0).permutation(N_IMAGES)
    pick = order[N_TEST:] if split == "train" else order[:N_TEST]
    data = torch.from_numpy(np.ascontiguousarray(images[pick])).unsqueeze(1)
    return Dataset("digits", split, data, LEVELS, torch.from_numpy(labels[pick]))
