"""Unpickling restricted to the data the published pickle formats hold.

CIFAR-10 batches and Downsampled-ImageNet batches are Python pickles, and unpickling an
arbitrary pickle can run arbitrary code. :func:`safe_load` admits only dicts, lists, tuples,
bytes, str, numbers (none of which need a global) and numpy array reconstruction; any other
global named in the pickle (``os.system``, ``builtins.eval``...) is refused with a DataError
before anything is called.
"""
from __future__ import annotations

import pickle

import numpy as np

from .base import DataError

try:  # numpy >= 2 keeps these in numpy._core; numpy.core is a deprecated alias
    from numpy._core import multiarray as _multiarray
    from numpy._core import numeric as _numeric
except ImportError:  # numpy 1.x
    from numpy.core import multiarray as _multiarray
    from numpy.core import numeric as _numeric


def _allowed() -> dict[tuple[str, str], object]:
    """(module, name) -> object for every global a numpy array pickle may name."""
    table: dict[tuple[str, str], object] = {
        ("numpy", "ndarray"): np.ndarray,
        ("numpy", "dtype"): np.dtype,
    }
    for module in ("numpy.core", "numpy._core"):
        table[(module + ".multiarray", "_reconstruct")] = _multiarray._reconstruct
        table[(module + ".multiarray", "scalar")] = _multiarray.scalar
        # protocol-5 pickles (the default from Python 3.14) rebuild arrays from a buffer
        if hasattr(_numeric, "_frombuffer"):
            table[(module + ".numeric", "_frombuffer")] = _numeric._frombuffer
    return table


_ALLOWED = _allowed()


class _RestrictedUnpickler(pickle.Unpickler):
    """An Unpickler whose find_class resolves only the numpy array globals."""

    def __init__(self, file, path: str, fmt: str, encoding: str):
        super().__init__(file, encoding=encoding)
        self._path = path
        self._fmt = fmt

    def find_class(self, module: str, name: str):
        found = _ALLOWED.get((module, name))
        if found is None:
            raise DataError(
                f"{self._path}: refused to unpickle {module}.{name}: only dicts, lists, bytes, "
                f"str, numbers and numpy arrays are allowed in {self._fmt} files")
        return found

    def persistent_load(self, pid):
        raise DataError(f"{self._path}: refused persistent id in a {self._fmt} file")


def safe_load(path_or_fileobj, fmt: str = "pickle", encoding: str = "bytes"):
    """Unpickle one object from a path or binary file object, admitting only plain data.

    ``encoding`` decodes Python-2 ``str`` objects: "bytes" (the default) keeps them as bytes,
    so Python-2 dict keys come back as b"data"; "latin1" turns them into str. Both rebuild
    numpy arrays. A refused global, a truncated or a corrupt pickle is a DataError naming
    the file.
    """
    if isinstance(path_or_fileobj, (str, bytes)) or hasattr(path_or_fileobj, "__fspath__"):
        path = str(path_or_fileobj)
        try:
            with open(path_or_fileobj, "rb") as file:
                return _load(file, path, fmt, encoding)
        except OSError as err:
            raise DataError(f"{path}: cannot read ({err.strerror or err})") from None
    path = str(getattr(path_or_fileobj, "name", "<stream>"))
    return _load(path_or_fileobj, path, fmt, encoding)


def _load(file, path: str, fmt: str, encoding: str):
    """Run the restricted unpickler; every failure becomes a DataError naming path."""
    try:
        return _RestrictedUnpickler(file, path, fmt, encoding).load()
    except DataError:
        raise
    except EOFError:
        raise DataError(f"{path}: truncated {fmt} file (ended before the pickle did)") from None
    except Exception as err:  # corrupt pickles fail in many ways (UnpicklingError, ValueError...)
        if "truncated" in str(err):
            raise DataError(f"{path}: truncated {fmt} file ({err})") from None
        raise DataError(f"{path}: not a valid {fmt} file ({type(err).__name__}: {err})") from None


def get_key(batch, key: str, path: str):
    """batch[key] for a dict with str or bytes keys (Python-2 pickles have bytes keys)."""
    if not isinstance(batch, dict):
        raise DataError(f"{path}: expected a pickled dict, found {type(batch).__name__}")
    for candidate in (key, key.encode("ascii")):
        if candidate in batch:
            return batch[candidate]
    raise DataError(f"{path}: no {key!r} entry (found keys {sorted(map(repr, batch))})")
