"""MNIST in the IDX format as published (Y. LeCun's site and its mirrors).

Four files, each gzipped (``.gz``) or not: ``train-images-idx3-ubyte`` /
``train-labels-idx1-ubyte`` (60000 examples) and ``t10k-images-idx3-ubyte`` /
``t10k-labels-idx1-ubyte`` (10000, our test split). An IDX file is a big-endian header --
magic 0x00 0x00 <type> <ndim> (type 0x08 = uint8), then ndim big-endian int32 sizes --
followed by exactly prod(sizes) bytes, row-major. Images are 0x00000803 (N, H, W), labels
0x00000801 (N,). Values are raw 8-bit levels (256 levels).
"""
from __future__ import annotations

import gzip
import os
import struct
import zlib

import numpy as np

from .base import Dataset, DataError, label_tensor, locate, uint8_tensor

FILES = {"train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
         "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")}
LAYOUT = ("train-images-idx3-ubyte, train-labels-idx1-ubyte, t10k-images-idx3-ubyte, "
          "t10k-labels-idx1-ubyte (optionally .gz), directly in the directory or in mnist/ "
          "or MNIST/raw/")
IMAGES_MAGIC = 0x00000803
LABELS_MAGIC = 0x00000801


def read_bytes(path: str) -> bytes:
    """The file's content, gunzipped if its name ends in .gz."""
    try:
        if path.endswith(".gz"):
            with gzip.open(path, "rb") as file:
                return file.read()
        with open(path, "rb") as file:
            return file.read()
    except (OSError, EOFError, zlib.error) as err:
        raise DataError(f"{path}: cannot read ({err})") from None


def parse_idx(raw: bytes, path: str, magic: int) -> np.ndarray:
    """Parse one uint8 IDX file; DataError naming path on any mismatch of magic or size."""
    if len(raw) < 4:
        raise DataError(f"{path}: too short for an IDX header ({len(raw)} bytes)")
    (found,) = struct.unpack(">I", raw[:4])
    if found != magic:
        raise DataError(f"{path}: IDX magic 0x{found:08x}, expected 0x{magic:08x}")
    ndim = magic & 0xFF
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise DataError(f"{path}: truncated IDX header ({len(raw)} of {header} bytes)")
    dims = struct.unpack(f">{ndim}i", raw[4:header])
    if any(d < 0 for d in dims):
        raise DataError(f"{path}: negative IDX size in {dims}")
    expected = header + int(np.prod(dims, dtype=np.int64))
    if len(raw) != expected:
        what = "truncated" if len(raw) < expected else "has extra bytes"
        raise DataError(f"{path}: {what}: {len(raw)} bytes, expected {expected} for "
                        f"sizes {list(dims)}")
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(dims).copy()


def load_mnist(split: str, data_dir: str, image_size: int = 32) -> Dataset:
    """MNIST train (60000) or test (10000) images (N, 1, H, W) with labels."""
    dirs = [data_dir, os.path.join(data_dir, "mnist"), os.path.join(data_dir, "MNIST", "raw"),
            os.path.join(data_dir, "mnist", "MNIST", "raw")]
    image_name, label_name = FILES[split]
    paths = locate("mnist", "MNIST", dirs, [image_name, label_name], ("", ".gz"),
                   data_dir, LAYOUT)
    image_path, label_path = paths[image_name], paths[label_name]
    images = parse_idx(read_bytes(image_path), image_path, IMAGES_MAGIC)
    labels = parse_idx(read_bytes(label_path), label_path, LABELS_MAGIC)
    if labels.shape[0] != images.shape[0]:
        raise DataError(f"{label_path}: {labels.shape[0]} labels for {images.shape[0]} "
                        f"images in {image_path}")
    data = uint8_tensor(images).unsqueeze(1)
    return Dataset("mnist", split, data, 256, label_tensor(labels, label_path, len(labels)))
