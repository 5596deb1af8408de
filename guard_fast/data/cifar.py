"""CIFAR-10 / CIFAR-100 from the standard python-pickle batches in a user folder. No download.

root may be the batch folder itself (``cifar-10-batches-py`` / ``cifar-100-python``) or its
parent. CIFAR-10: data_batch_1..5 (train) and test_batch (val), key b"labels".
CIFAR-100: train and test, key b"fine_labels". Each batch holds b"data", (N, 3072) uint8
in channel-major (R plane, G plane, B plane) order. The batches are read by a restricted
unpickler (guard_fast.data.safe_pickle): a crafted batch cannot run code.
"""
from __future__ import annotations

import os
import pickle

import numpy as np
import torch
from torch.utils.data import Dataset

from guard_fast.data.safe_pickle import load_data_pickle
from guard_fast.data.transforms import build_transform

# Per-channel mean/std of the training sets (pixel values in [0, 1]); std is the true
# population std (the 0.2023/0.1994/0.2010 often quoted for CIFAR-10 is a known misfigure).
CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)
CIFAR100_MEAN = (0.5071, 0.4865, 0.4409)
CIFAR100_STD = (0.2673, 0.2564, 0.2762)

_SPEC = {
    "cifar10": dict(folder="cifar-10-batches-py", train=[f"data_batch_{i}" for i in range(1, 6)],
                    val=["test_batch"], label_key=b"labels", meta="batches.meta", names_key=b"label_names",
                    num_classes=10, mean=CIFAR10_MEAN, std=CIFAR10_STD),
    "cifar100": dict(folder="cifar-100-python", train=["train"], val=["test"], label_key=b"fine_labels",
                     meta="meta", names_key=b"fine_label_names", num_classes=100,
                     mean=CIFAR100_MEAN, std=CIFAR100_STD),
}


def find_cifar_dir(root: str, name: str) -> str:
    """The folder holding the batches of ``name`` ("cifar10" | "cifar100") under root."""
    spec = _SPEC[name]
    if not os.path.isdir(root):
        raise FileNotFoundError(f"{name}: data folder {root!r} does not exist")
    for d in (root, os.path.join(root, spec["folder"])):
        if all(os.path.isfile(os.path.join(d, f)) for f in spec["train"] + spec["val"]):
            return d
    d = os.path.join(root, spec["folder"]) if os.path.isdir(os.path.join(root, spec["folder"])) else root
    missing = [f for f in spec["train"] + spec["val"] if not os.path.isfile(os.path.join(d, f))]
    raise FileNotFoundError(f"{name}: {d!r} lacks {', '.join(missing)} (expected the python-pickle "
                            f"batches, i.e. the folder {spec['folder']!r} or its parent; nothing is downloaded)")


def _load_batch(path: str, label_key: bytes) -> tuple[np.ndarray, np.ndarray]:
    try:
        d = load_data_pickle(path)
    except (OSError, pickle.UnpicklingError) as e:  # load_data_pickle's one error type
        raise ValueError(f"{path!r} is not a readable CIFAR pickle batch: {e}") from e
    if not isinstance(d, dict) or b"data" not in d or label_key not in d:
        keys = sorted(map(repr, d)) if isinstance(d, dict) else type(d).__name__
        raise ValueError(f"{path!r} lacks keys b'data' and {label_key!r} (has {keys})")
    try:
        x = np.asarray(d[b"data"], dtype=np.uint8)
        y = np.asarray(d[label_key], dtype=np.int64)
    except (ValueError, TypeError, OverflowError) as e:
        raise ValueError(f"{path!r}: b'data' and {label_key!r} are not arrays of pixel values "
                         f"and labels ({e})") from None
    if x.ndim != 2 or x.shape[1] != 3072 or len(x) != len(y):
        raise ValueError(f"{path!r}: b'data' has shape {x.shape} with {len(y)} labels; want (N, 3072) and N labels")
    return x.reshape(-1, 3, 32, 32), y


class CIFAR(Dataset):
    """CIFAR-10/100: (image float (3, s, s) in [0, 1], int label).

    root: the batch folder or its parent. name: "cifar10" | "cifar100". split: "train" |
    "val" (the test batch). image_size: 32 by default (other sizes resize first).
    train: augment (default: split == "train"): RandomCrop(s, padding=4) + h-flip.
    """

    def __init__(self, root: str, name: str = "cifar10", split: str = "train", image_size: int = 32,
                 train: bool | None = None):
        if name not in _SPEC:
            raise ValueError(f"unknown CIFAR name {name!r}; known: {', '.join(_SPEC)}")
        if split not in ("train", "val"):
            raise ValueError(f"split must be 'train' or 'val', got {split!r}")
        spec = _SPEC[name]
        d = find_cifar_dir(root, name)
        parts = [_load_batch(os.path.join(d, f), spec["label_key"]) for f in spec[split]]
        x = np.concatenate([p[0] for p in parts])
        y = np.concatenate([p[1] for p in parts])
        if len(y) and (y.min() < 0 or y.max() >= spec["num_classes"]):
            raise ValueError(f"{name} in {d!r}: labels span [{y.min()}, {y.max()}], "
                             f"outside 0..{spec['num_classes'] - 1}")
        self.images = torch.from_numpy(x)  # (N, 3, 32, 32) uint8
        self.targets = torch.from_numpy(y)
        self.name, self.split, self.root = name, split, d
        self.num_classes = spec["num_classes"]
        self.mean, self.std = spec["mean"], spec["std"]
        self.image_size, self.channels = image_size, 3
        self.class_names = self._class_names(d, spec)
        self.transform = build_transform("small", image_size, split == "train" if train is None else train,
                                         native_size=32)

    def _class_names(self, d: str, spec: dict) -> list[str]:
        try:
            names = load_data_pickle(os.path.join(d, spec["meta"]))[spec["names_key"]]
            names = [n.decode() if isinstance(n, bytes) else str(n) for n in names]
            if len(names) == spec["num_classes"]:
                return names
        except (OSError, KeyError, pickle.UnpicklingError, EOFError, TypeError):
            pass  # the meta file is optional: labels are what matter
        return [str(i) for i in range(spec["num_classes"])]

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        return self.transform(self.images[i]), int(self.targets[i])
