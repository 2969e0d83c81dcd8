"""scikit-learn's bundled 8x8 handwritten digits (UCI optdigits test set, 1797 images).

Each image is 8x8 with integer values 0..16 (17 levels; a count of set pixels in a 4x4
block of the original 32x32 bitmap). Nothing is read from the data directory. The split
is fixed: ``train_test_split(test_size=0.2, random_state=0)`` -> 1437 train, 360 test.
"""
from __future__ import annotations

import numpy as np
import torch

from .base import Dataset

LEVELS = 17


def load_digits_split(split: str, data_dir: str | None = None, image_size: int = 32) -> Dataset:
    """The digits train or test split as uint8 (N, 1, 8, 8), values 0..16, with labels."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    bunch = load_digits()
    images = np.rint(bunch.images).astype(np.uint8)
    x_train, x_test, y_train, y_test = train_test_split(
        images, bunch.target, test_size=0.2, random_state=0)
    images, labels = (x_train, y_train) if split == "train" else (x_test, y_test)
    data = torch.from_numpy(np.ascontiguousarray(images)).unsqueeze(1)
    return Dataset("digits", split, data, LEVELS, torch.from_numpy(labels.astype(np.int64)))
