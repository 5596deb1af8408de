"""A pickle reader that builds data and never runs code.

pickle can call any importable function while it reads (a crafted ``__reduce__`` runs
``os.system`` the moment the file is loaded), and CIFAR's batches are pickles that users
download from wherever they find them. :func:`load_data_pickle` admits only the globals a
real CIFAR batch needs: numpy's array reconstruction (``_reconstruct``, ``ndarray``,
``dtype``, ``scalar``, ``_frombuffer``, under both numpy 1's ``numpy.core`` and numpy 2's
``numpy._core`` paths) and ``codecs.encode`` (how protocol 2 stores bytes). Dicts, lists, tuples, bytes, str and numbers need no global at all. Any other global
is refused when the unpickler meets it, before anything it names is called.
"""
from __future__ import annotations

import pickle
from typing import Any

__all__ = ["load_data_pickle", "ALLOWED_GLOBALS"]

ALLOWED_GLOBALS = frozenset(
    [(mod, name) for mod in ("numpy.core.multiarray", "numpy._core.multiarray")
     for name in ("_reconstruct", "scalar")]
    # pickle protocol 5 rebuilds an array from its raw buffer
    + [(mod, "_frombuffer") for mod in ("numpy.core.numeric", "numpy._core.numeric")]
    # protocol 2 written by Python 3 turns byte strings back into bytes with
    # codecs.encode(text, "latin1"): a pure data conversion
    + [("_codecs", "encode"), ("numpy", "ndarray"), ("numpy", "dtype")])


class _DataUnpickler(pickle.Unpickler):
    def __init__(self, file, path: str):
        super().__init__(file, encoding="bytes")
        self._path = path

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in ALLOWED_GLOBALS:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(
            f"{self._path}: refused to load the global {module}.{name}: a data batch holds only "
            "dicts, lists, bytes, numbers and numpy arrays, and this file asks for code to run "
            "while it is read (a crafted or foreign file?); nothing from it was executed")


def load_data_pickle(path: str) -> Any:
    """Unpickle a data file (Python 2 string semantics: str fields come back as bytes)
    admitting only ALLOWED_GLOBALS. Raises pickle.UnpicklingError naming the file and the
    refused global."""
    with open(path, "rb") as f:
        return _DataUnpickler(f, str(path)).load()
