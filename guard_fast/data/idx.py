"""IDX files (the MNIST / Fashion-MNIST format) and the Fashion-MNIST data set.

An IDX file is a 4-byte magic (two zero bytes, a type code, the number of dimensions), one
big-endian uint32 per dimension, then the values in C order. Only unsigned bytes (type 0x08)
occur in these data sets; the reader accepts the other IDX types too. Files may be gzipped
(Debian's ``dataset-fashion-mnist`` ships them as ``*-idx?-ubyte.gz``). Every check names the
file: a wrong magic, a dimension count that does not fit, and a payload shorter or longer than
the header says (a truncated download) are refused before an array is made.

Fashion-MNIST (Xiao et al. 2017): 60,000 train and 10,000 test images of 28x28 grey clothing
items, 10 classes. The test split is this package's validation split (as for the bundled
digits, nothing from it is used for training or model selection inside a stage).
"""
from __future__ import annotations

import functools
import gzip
import os
import struct
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from guard_fast.data.transforms import build_transform

__all__ = ["read_idx", "write_idx", "FashionMNIST", "FASHION_MNIST_DIRS", "FASHION_INSTALL",
           "find_fashion_mnist"]

# IDX type code -> numpy dtype (big-endian where multi-byte)
_IDX_TYPES = {0x08: np.dtype(np.uint8), 0x09: np.dtype(np.int8), 0x0B: np.dtype(">i2"),
              0x0C: np.dtype(">i4"), 0x0D: np.dtype(">f4"), 0x0E: np.dtype(">f8")}
_CODES = {v: k for k, v in _IDX_TYPES.items()}

# where the Debian package puts the files; a --data folder is looked at first
FASHION_MNIST_DIRS = ("/usr/share/datasets/fashion-mnist",)
FASHION_INSTALL = "apt-get install dataset-fashion-mnist"
_FILES = {"train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
          "val": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")}
CLASS_NAMES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt",
               "Sneaker", "Bag", "Ankle boot"]


def _read_bytes(path: Path) -> bytes:
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            return f.read()
    except (OSError, EOFError) as e:   # gzip: a truncated or corrupt stream
        raise ValueError(f"{path}: cannot read it as an IDX file{' (gzip)' if opener is gzip.open else ''}: {e}") from e


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """The array stored in the IDX file `path` (gzipped or not); ValueError naming the file
    for anything that is not a complete IDX file."""
    path = Path(path)
    raw = _read_bytes(path)
    if len(raw) < 4:
        raise ValueError(f"{path}: {len(raw)} bytes, too short for an IDX header")
    zero, code, ndim = struct.unpack(">HBB", raw[:4])
    if zero != 0 or code not in _IDX_TYPES or ndim == 0:
        raise ValueError(f"{path}: not an IDX file (magic {raw[:4].hex()}; expected 0000 then "
                         f"a type code in {sorted(hex(c) for c in _IDX_TYPES)} and ndim >= 1)")
    head = 4 + 4 * ndim
    if len(raw) < head:
        raise ValueError(f"{path}: truncated header ({len(raw)} bytes, {ndim} dimensions need {head})")
    dims = struct.unpack(f">{ndim}I", raw[4:head])
    dtype = _IDX_TYPES[code]
    want = int(np.prod(dims, dtype=np.int64)) * dtype.itemsize
    got = len(raw) - head
    if got != want:
        kind = "truncated" if got < want else "longer than its header says"
        raise ValueError(f"{path}: {kind}: shape {tuple(dims)} needs {want} bytes of data, "
                         f"the file has {got}")
    return np.frombuffer(raw, dtype=dtype, offset=head).reshape(dims).astype(dtype.newbyteorder("="))


def write_idx(path: str | os.PathLike, array: np.ndarray) -> None:
    """Write `array` as an IDX file (gzipped when the name ends in .gz); for tests and tools."""
    a = np.ascontiguousarray(array)
    dt = a.dtype.newbyteorder(">") if a.dtype.itemsize > 1 else a.dtype
    if dt not in _CODES:
        raise ValueError(f"IDX has no type for dtype {a.dtype}")
    payload = struct.pack(">HBB", 0, _CODES[dt], a.ndim) + struct.pack(f">{a.ndim}I", *a.shape)
    payload += a.astype(dt).tobytes()
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "wb") as f:
        f.write(payload)


def _locate(folder: Path, stem: str) -> Path | None:
    for name in (stem, stem + ".gz"):
        if (folder / name).is_file():
            return folder / name
    return None


def find_fashion_mnist(root: str | None = None) -> Path:
    """The folder holding the four Fashion-MNIST files: `root` when given, else the Debian
    package's. FileNotFoundError saying what is missing and which command installs it."""
    folders = [Path(root)] if root else [Path(d) for d in FASHION_MNIST_DIRS]
    stems = [s for pair in _FILES.values() for s in pair]
    for folder in folders:
        missing = [s for s in stems if _locate(folder, s) is None]
        if not missing:
            return folder
    where = folders[0]
    hint = (f"pass the folder holding {', '.join(stems)} (optionally .gz) as --data" if root else
            f"install them with `{FASHION_INSTALL}` (Debian/Ubuntu; nothing is downloaded at "
            f"run time), or pass your copy's folder as --data")
    raise FileNotFoundError(f"Fashion-MNIST files not found in {where}: {hint}")


@functools.lru_cache(maxsize=4)
def _arrays(folder: str, split: str) -> tuple[np.ndarray, np.ndarray]:
    f_img, f_lab = (_locate(Path(folder), s) for s in _FILES[split])
    x, y = read_idx(f_img), read_idx(f_lab)
    if x.ndim != 3 or x.dtype != np.uint8:
        raise ValueError(f"{f_img}: expected uint8 images (N, H, W), got {x.dtype} {x.shape}")
    if y.ndim != 1 or len(y) != len(x):
        raise ValueError(f"{f_lab}: expected {len(x)} labels, got shape {y.shape}")
    if y.size and (y.min() < 0 or y.max() > 9):
        raise ValueError(f"{f_lab}: labels outside 0..9 ([{y.min()}, {y.max()}])")
    return x, y.astype(np.int64)


class FashionMNIST(Dataset):
    """Fashion-MNIST from its IDX files: (image float (C, s, s) in [0, 1], int label), with
    the bundled digits' transforms (28 px padded to 32, grey replicated to 3 channels by
    default). split "train" (60,000) or "val" (the 10,000 test images). mean/std: the
    training split's, computed from the files (one value, replicated per channel)."""

    num_classes = 10
    class_names = CLASS_NAMES

    def __init__(self, root: str | None = None, split: str = "train", image_size: int = 32,
                 channels: int = 3, train: bool | None = None):
        if split not in _FILES:
            raise ValueError(f"split must be 'train' or 'val', got {split!r}")
        if channels not in (1, 3):
            raise ValueError(f"channels must be 1 or 3, got {channels}")
        folder = str(find_fashion_mnist(root))
        x, y = _arrays(folder, split)
        self.images = torch.from_numpy(x).unsqueeze(1)   # (N, 1, 28, 28) uint8, read-only view
        self.targets = torch.from_numpy(y)
        m, s = _train_stats(folder)
        self.mean, self.std = (m,) * channels, (s,) * channels
        self.split, self.image_size, self.channels = split, image_size, channels
        self.transform = build_transform("mnist", image_size, split == "train" if train is None else train,
                                         channels=channels)

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        return self.transform(self.images[i]), int(self.targets[i])


@functools.lru_cache(maxsize=4)
def _train_stats(folder: str) -> tuple[float, float]:
    x = _arrays(folder, "train")[0].astype(np.float64) / 255.0
    return round(float(x.mean()), 4), round(float(x.std()), 4)
