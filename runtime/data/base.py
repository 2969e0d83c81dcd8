"""Shared pieces of the data readers: the error type, the dataset container, file search.

Every reader returns a :class:`Dataset`; every user error (missing, truncated or malformed
files, unknown names) is a :class:`DataError` whose message is one line naming the file or
directory, so the command line can print it without a traceback.
"""
from __future__ import annotations

import os

import attrs
import numpy as np
import torch

SPLITS = ("train", "test")


class DataError(Exception):
    """A user error in the data: missing files, a wrong format, a bad name or split.

    The message is one line (newlines from wrapped library errors become spaces).
    """

    def __str__(self) -> str:
        return " ".join(super().__str__().splitlines())


@attrs.frozen(eq=False)
class Dataset:
    """One split of a data set, held in memory.

    Image sets: ``data`` is uint8 (N, C, H, W) with values 0..levels-1.
    Continuous sets (toy): ``data`` is float32 (N, d) and ``levels`` is None.
    ``labels`` is an int64 tensor (N,) when the format has labels, else None.
    """

    name: str
    split: str
    data: torch.Tensor
    levels: int | None
    labels: torch.Tensor | None

    @property
    def n(self) -> int:
        """Number of examples."""
        return int(self.data.shape[0])

    @property
    def shape(self) -> tuple[int, ...]:
        """Shape of one example: (C, H, W) for images, (d,) for continuous sets."""
        return tuple(int(s) for s in self.data.shape[1:])


def check_split(name: str, split: str) -> None:
    """Raise DataError unless split is "train" or "test"."""
    if split not in SPLITS:
        raise DataError(f"{name}: unknown split {split!r}: expected 'train' or 'test'")


def uint8_tensor(array: np.ndarray) -> torch.Tensor:
    """A torch uint8 tensor sharing memory with a numpy array (copied only if read-only)."""
    if not array.flags.writeable:
        array = array.copy()
    return torch.from_numpy(np.ascontiguousarray(array, dtype=np.uint8))


def label_tensor(labels, path: str, n: int) -> torch.Tensor:
    """Labels (list or array of ints) as int64 (n,); DataError naming path if the count differs."""
    try:
        array = np.asarray(labels, dtype=np.int64).reshape(-1)
    except (TypeError, ValueError) as err:
        raise DataError(f"{path}: labels are not a list of integers ({err})") from None
    if array.shape[0] != n:
        raise DataError(f"{path}: {array.shape[0]} labels for {n} images")
    return torch.from_numpy(array.copy())


def find_file(directory: str, name: str, suffixes: tuple[str, ...] = ("",)) -> str | None:
    """The first of directory/name+suffix that is a file, or None."""
    for suffix in suffixes:
        path = os.path.join(directory, name + suffix)
        if os.path.isfile(path):
            return path
    return None


def locate(dataset: str, title: str, dirs: list[str], names: list[str],
           suffixes: tuple[str, ...], searched: str, layout: str) -> dict[str, str]:
    """Find all of ``names`` in one of ``dirs`` (first complete directory wins).

    ``title`` is the set's published name (e.g. "MNIST"), ``layout`` the expected files and
    where they may live, ``searched`` the data directory. Returns name -> path. If no directory holds them all, raises one DataError: either the
    files missing from the directory that holds some of them, or (none found anywhere)
    the files expected, the layout and the directory searched.
    """
    best: tuple[str, dict[str, str]] | None = None
    for directory in dirs:
        found = {}
        for name in names:
            path = find_file(directory, name, suffixes)
            if path is not None:
                found[name] = path
        if len(found) == len(names):
            return found
        if found and (best is None or len(found) > len(best[1])):
            best = (directory, found)
    if best is not None:
        directory, found = best
        missing = ", ".join(n for n in names if n not in found)
        raise DataError(f"{dataset}: {directory} is missing {missing} ({layout})")
    raise DataError(f"{dataset}: no {title} files in {searched}: expected {layout}")
