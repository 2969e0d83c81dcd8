"""A folder of image files (``folder:PATH``).

Every .png, .jpg or .jpeg file (case-insensitive) under PATH, recursively, sorted by path.
If every image is greyscale (PIL modes 1, L, LA, I, I;16..., F) the set has 1 channel,
otherwise every image is converted to RGB (3 channels); alpha is dropped and 16-bit grey is
scaled to 8 bits. Each image is center-cropped to a square and resized (bicubic) to
image_size x image_size. uint8, 256 levels, no labels.

Split: if PATH has both ``train/`` and ``test/`` subfolders, those are the splits (images
elsewhere under PATH are then ignored).
Otherwise the sorted list is permuted with a torch.Generator seeded 0 and the first
max(1, N // 10) images of the permutation are the test split, the rest train (about 90/10,
the same every time; at least 2 images needed).
"""
from __future__ import annotations

import os

import numpy as np
import torch
from PIL import Image

from .base import Dataset, DataError

EXTENSIONS = (".png", ".jpg", ".jpeg")
GREY_MODES = ("1", "L", "LA", "I", "F")


def image_paths(root: str) -> list[str]:
    """All image files under root, sorted by path."""
    found = []
    for directory, _, files in os.walk(root):
        found.extend(os.path.join(directory, f) for f in files
                     if f.lower().endswith(EXTENSIONS))
    return sorted(found)


def is_grey(path: str) -> bool:
    """Whether the image's mode is greyscale (reads the header only)."""
    try:
        with Image.open(path) as image:
            return image.mode in GREY_MODES or image.mode.startswith("I;")
    except (OSError, ValueError, Image.DecompressionBombError) as err:
        raise DataError(f"{path}: unreadable image ({err})") from None


def to_array(image: Image.Image, grey: bool) -> np.ndarray:
    """The image as uint8 (H, W) if grey else (H, W, 3)."""
    if image.mode.startswith("I") or image.mode == "F":
        values = np.asarray(image, dtype=np.float64)
        scale = 257.0 if values.max(initial=0) > 255 else 1.0
        values = np.clip(np.rint(values / scale), 0, 255).astype(np.uint8)
        image = Image.fromarray(values)
    return np.asarray(image.convert("L" if grey else "RGB"))


def square_resize(array: np.ndarray, size: int) -> np.ndarray:
    """Center-crop to the largest square, then resize to size x size (bicubic)."""
    h, w = array.shape[:2]
    side = min(h, w)
    top, left = (h - side) // 2, (w - side) // 2
    crop = Image.fromarray(np.ascontiguousarray(array[top:top + side, left:left + side]))
    return np.asarray(crop.resize((size, size), Image.Resampling.BICUBIC))


def read_image(path: str, grey: bool, size: int) -> np.ndarray:
    """One image as uint8 (C, size, size)."""
    try:
        with Image.open(path) as image:
            image.load()
            array = square_resize(to_array(image, grey), size)
    except (OSError, ValueError, Image.DecompressionBombError) as err:
        raise DataError(f"{path}: unreadable image ({err})") from None
    return array[None] if grey else array.transpose(2, 0, 1)


def split_paths(root: str, split: str) -> tuple[list[str], list[str]]:
    """(all image paths under root, the paths of this split)."""
    train, test = os.path.join(root, "train"), os.path.join(root, "test")
    if os.path.isdir(train) and os.path.isdir(test):
        chosen = image_paths(train if split == "train" else test)
        if not chosen:
            raise DataError(f"folder: no .png/.jpg/.jpeg images in {os.path.join(root, split)}")
        return image_paths(train) + image_paths(test), chosen
    paths = image_paths(root)
    if len(paths) < 2:
        raise DataError(f"folder: {len(paths)} .png/.jpg/.jpeg images under {root}: need at "
                        f"least 2 (or train/ and test/ subfolders) for a train/test split")
    order = torch.randperm(len(paths), generator=torch.Generator().manual_seed(0)).tolist()
    n_test = max(1, len(paths) // 10)
    picked = order[:n_test] if split == "test" else order[n_test:]
    return paths, [paths[i] for i in sorted(picked)]


def load_folder(root: str, split: str, image_size: int = 32) -> Dataset:
    """The split of the image folder at root as uint8 (N, C, image_size, image_size)."""
    if not os.path.isdir(root):
        raise DataError(f"folder: {root} is not a directory")
    if image_size < 1:
        raise DataError(f"folder: image_size must be positive, got {image_size}")
    every, chosen = split_paths(root, split)
    grey = all(is_grey(p) for p in every)
    images = np.stack([read_image(p, grey, image_size) for p in chosen])
    return Dataset(f"folder:{root}", split, torch.from_numpy(images), 256, None)
