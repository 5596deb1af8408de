"""A pickle reader that builds data and never runs code.

pickle can call any importable function while it reads (a crafted ``__reduce__`` runs
``os.system`` the moment the file is loaded), and CIFAR's batches are pickles that users
download from wherever they find them. :func:`load_data_pickle` admits only the globals a
real CIFAR batch needs: numpy's array reconstruction (``_reconstruct``, ``ndarray``,
``dtype``, ``scalar``, ``_frombuffer``, under both numpy 1's ``numpy.core`` and numpy 2's
``numpy._core`` paths) and ``codecs.encode`` (how protocol 2 stores bytes). Dicts, lists, tuples, bytes, str and numbers need no global at all. Any other global
is refused when the unpickler meets it, before anything it names is called. Arrays are
admitted with a plain (object-free) dtype and exactly the bytes their shape needs, and every
length the file claims must fit in the file, so a patched header cannot make the reader
allocate gigabytes or crash numpy.
"""
from __future__ import annotations

import io
import math
import pickle
import pickletools
from typing import Any

import numpy as np

__all__ = ["load_data_pickle", "ALLOWED_GLOBALS"]

ALLOWED_GLOBALS = frozenset(
    [(mod, name) for mod in ("numpy.core.multiarray", "numpy._core.multiarray")
     for name in ("_reconstruct", "scalar")]
    # pickle protocol 5 rebuilds an array from its raw buffer
    + [(mod, "_frombuffer") for mod in ("numpy.core.numeric", "numpy._core.numeric")]
    # protocol 2 written by Python 3 turns byte strings back into bytes with
    # codecs.encode(text, "latin1"): a pure data conversion
    + [("_codecs", "encode"), ("numpy", "ndarray"), ("numpy", "dtype")])


def _plain_dtype(dt: Any, path: str) -> np.dtype:
    """dt if it is a numpy dtype without Python objects inside, else a refusal: an object
    array's state is a list that numpy trusts to match the shape (a short one crashed the
    interpreter with a segmentation fault)."""
    if not isinstance(dt, np.dtype) or dt.hasobject:
        raise pickle.UnpicklingError(f"{path}: refused an array of dtype {dt!r}: a data batch "
                                     "holds numbers, not Python objects")
    return dt


class _CheckedArray(np.ndarray):
    """What the array reconstruction returns: its __setstate__ checks the pickled state (a
    plain dtype, raw bytes whose length is what the shape needs) before numpy reads it.
    np.asarray turns it into a plain ndarray."""

    _path = "?"

    def __setstate__(self, state):
        if not isinstance(state, tuple) or len(state) not in (4, 5):
            raise pickle.UnpicklingError(f"{self._path}: malformed array state")
        shape, dt, data = state[-4], _plain_dtype(state[-3], self._path), state[-1]
        if not (isinstance(shape, tuple) and all(type(n) is int and n >= 0 for n in shape)):
            raise pickle.UnpicklingError(f"{self._path}: malformed array shape {shape!r}")
        if not isinstance(data, (bytes, bytearray)) or len(data) != math.prod(shape) * dt.itemsize:
            raise pickle.UnpicklingError(f"{self._path}: an array of shape {shape} and dtype {dt} "
                                         f"with {len(data) if isinstance(data, bytes) else data!r}"
                                         " bytes of data")
        super().__setstate__(state)


class _DataUnpickler(pickle.Unpickler):
    def __init__(self, file, path: str):
        super().__init__(file, encoding="bytes")
        self._path = path

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in ALLOWED_GLOBALS:
            raise pickle.UnpicklingError(
                f"{self._path}: refused to load the global {module}.{name}: a data batch holds "
                "only dicts, lists, bytes, numbers and numpy arrays, and this file asks for code "
                "to run while it is read (a crafted or foreign file?); nothing from it was "
                "executed")
        real = super().find_class(module, name)
        if name == "_reconstruct":
            return self._reconstruct
        if name in ("scalar", "_frombuffer"):
            def checked(*args, _real=real):
                if len(args) >= 2 and name == "_frombuffer":
                    _plain_dtype(args[1], self._path)
                elif args:
                    _plain_dtype(args[0], self._path)
                return _real(*args)
            return checked
        return real

    def _reconstruct(self, subtype, shape, dtype_code):
        # numpy pickles an array as _reconstruct(ndarray, (0,), b"b") then its state: an
        # empty placeholder; any other shape would allocate before the state is checked
        if subtype is not np.ndarray or shape != (0,):
            raise pickle.UnpicklingError(f"{self._path}: malformed array reconstruction "
                                         f"({subtype!r}, {shape!r})")
        out = np.ndarray.__new__(_CheckedArray, (0,), np.uint8)
        out._path = self._path
        return out


def _check_lengths(data: bytes, path: str) -> None:
    """Walk the opcodes (pickletools, which builds nothing) so that every length a header
    claims (bytes, strings, longs, frames) fits in the file: the C unpickler allocates a
    claimed length before it reads, so a patched length asked for gigabytes."""
    try:
        for op, arg, pos in pickletools.genops(data):
            if op.name == "FRAME" and arg > len(data) - pos:
                raise pickle.UnpicklingError(f"{path}: a frame of {arg} bytes at offset {pos}, "
                                             f"beyond the file's {len(data)} bytes")
    except ValueError as e:  # what genops raises for a truncated or malformed stream
        raise pickle.UnpicklingError(f"{path}: not a well-formed pickle ({e})") from None


def load_data_pickle(path: str) -> Any:
    """Unpickle a data file (Python 2 string semantics: str fields come back as bytes)
    admitting only ALLOWED_GLOBALS, plain-dtype arrays whose bytes match their shape, and
    lengths that fit in the file. Raises pickle.UnpicklingError naming the file and what
    was refused."""
    with open(path, "rb") as f:
        data = f.read()
    _check_lengths(data, str(path))
    try:
        return _DataUnpickler(io.BytesIO(data), str(path)).load()
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, KeyError,
            IndexError, OverflowError, MemoryError, RecursionError, SystemError) as e:
        # what a corrupted stream makes the unpickler (or numpy's dtype and array state,
        # SystemError included) raise: one error type, naming the file
        if isinstance(e, pickle.UnpicklingError) and str(e).startswith(str(path)):
            raise  # ours: already names the file and what was refused
        raise pickle.UnpicklingError(f"{path}: not a readable data pickle "
                                     f"({type(e).__name__}: {e})") from None
