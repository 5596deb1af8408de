"""A small real data set held as tensors: the un-augmented train/val images of one named
in-memory data set, for the stages that index the real images directly (DC's class pools,
MTT's expert training and its real-image initialization).

Only data sets that fit in memory are offered (the bundled digits, Fashion-MNIST, CIFAR-10/100); the
ImageFolder kinds stream from disk through ``guard_fast.data.get_data`` instead.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = ["RealData", "load_real", "stack_dataset", "IN_MEMORY"]

IN_MEMORY = ("mnist", "fashion-mnist", "cifar10", "cifar100")


@dataclass
class RealData:
    """Un-augmented real images as tensors: pixels in [0, 1], (N, C, s, s) float32."""

    train_x: Tensor
    train_y: Tensor
    val_x: Tensor
    val_y: Tensor
    num_classes: int
    mean: tuple
    std: tuple
    class_names: list
    name: str


def stack_dataset(ds) -> tuple[Tensor, Tensor]:
    """(images (N, C, H, W) float32, labels (N,) int64) of a Dataset of (image, label)."""
    xs, ys = zip(*(ds[i] for i in range(len(ds))))
    return torch.stack(xs).float(), torch.tensor([int(y) for y in ys], dtype=torch.long)


def load_real(name: str = "mnist", root: str | None = None, image_size: int | None = None,
              channels: int | None = None) -> RealData:
    """The train/val images of ``name`` (one of IN_MEMORY) without augmentation.

    The last data set read is kept in memory (decoding runs the per-image transforms); each
    call returns fresh copies of its tensors."""
    r = _load_real_cached(name.lower(), root, image_size, channels)
    return RealData(r.train_x.clone(), r.train_y.clone(), r.val_x.clone(), r.val_y.clone(),
                    r.num_classes, r.mean, r.std, list(r.class_names), r.name)


@functools.lru_cache(maxsize=1)
def _load_real_cached(key: str, root: str | None, image_size: int | None,
                      channels: int | None) -> RealData:
    from guard_fast.data import get_data
    from guard_fast.data.bundled import BundledMNIST
    from guard_fast.data.cifar import CIFAR
    from guard_fast.data.idx import FashionMNIST

    if key not in IN_MEMORY:
        raise ValueError(f"{key!r} is not an in-memory data set; known: {', '.join(IN_MEMORY)}")
    b = get_data(key, root=root, image_size=image_size, channels=channels)  # validates options
    if key == "mnist":
        tr = BundledMNIST("train", b.image_size, b.channels, train=False)
        va = BundledMNIST("val", b.image_size, b.channels, train=False)
    elif key == "fashion-mnist":
        tr = FashionMNIST(root, "train", b.image_size, b.channels, train=False)
        va = FashionMNIST(root, "val", b.image_size, b.channels, train=False)
    else:
        tr = CIFAR(root, key, "train", b.image_size, train=False)
        va = CIFAR(root, key, "val", b.image_size, train=False)
    tx, ty = stack_dataset(tr)
    vx, vy = stack_dataset(va)
    return RealData(tx, ty, vx, vy, b.num_classes, tuple(b.mean), tuple(b.std),
                    list(b.class_names), key)
