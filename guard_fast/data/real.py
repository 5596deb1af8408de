"""A small real data set held as tensors: the un-augmented train/val images of one named
data set, for the stages that index the real images directly (DC's class pools, MTT's
expert training and its real-image initialization).

The bundled digits, Fashion-MNIST and CIFAR-10/100 always fit. The ImageFolder data sets
(ImageNette, Tiny-ImageNet, any ImageFolder) are decoded once into memory the way MTT's
loader reads them: each image resized to image_size x image_size (squashed, no crop; MTT's
``Resize(im_size)`` with a tuple size), Tiny-ImageNet's 64 px images taken as they are at 64.
They are refused, before any decoding, with the bytes they need when that exceeds
MEMORY_FRACTION of the memory available (ImageNette at 128 px: 9,469 + 3,925 images,
2.6 GB as float32; Tiny-ImageNet at 64 px: 110,000 images, 5.4 GB; ImageNet-1K does not
fit: stream it through ``guard_fast.data.get_data``).
"""
from __future__ import annotations

import functools
import os
from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = ["RealData", "load_real", "stack_dataset", "IN_MEMORY", "FOLDER_KINDS",
           "MEMORY_FRACTION"]

IN_MEMORY = ("mnist", "fashion-mnist", "cifar10", "cifar100")
FOLDER_KINDS = ("imagenette", "tiny-imagenet", "imagefolder", "imagenet-1k")
# the share of the available memory the decoded images (and the copy the stages make of
# them in their input space) may take
MEMORY_FRACTION = 0.7


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


def stack_dataset(ds, workers: int = 0) -> tuple[Tensor, Tensor]:
    """(images (N, C, H, W) float32, labels (N,) int64) of a Dataset of (image, label);
    workers > 0 decodes in that many processes (in order, the same result)."""
    if workers > 0 and len(ds) > 0:
        from torch.utils.data import DataLoader

        xs, ys = [], []
        for x, y in DataLoader(ds, batch_size=256, num_workers=workers, shuffle=False):
            xs.append(x)
            ys.append(y)
        return torch.cat(xs).float(), torch.cat(ys).long()
    xs, ys = zip(*(ds[i] for i in range(len(ds))))
    return torch.stack(xs).float(), torch.tensor([int(y) for y in ys], dtype=torch.long)


def available_memory() -> int:
    """Bytes of memory available now (MemAvailable; physical free pages where unreadable)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")


def _check_fits(key: str, n: int, side: int) -> None:
    need = 2 * n * 3 * side * side * 4   # float32, and the stages' input-space copy
    have = available_memory()
    if need > MEMORY_FRACTION * have:
        raise ValueError(
            f"{key} at {side} px is {n:,} images: held in memory as MTT holds them it needs "
            f"about {need / 2**30:.1f} GiB (the images and their normalized copy), more than "
            f"{MEMORY_FRACTION:.0%} of the {have / 2**30:.1f} GiB available; use a smaller "
            "--image-size or a machine with more memory (nothing was written)")


def _folder_sets(key: str, root: str | None, image_size: int | None):
    """The un-augmented train/val ImageFolder sets of ``key`` as MTT reads them."""
    from torchvision.transforms import v2

    from guard_fast.data import get_data

    b = get_data(key, root=root, image_size=image_size)   # validates the folder and names
    side = b.image_size if image_size is not None else (64 if key == "tiny-imagenet" else 128)
    ops = [v2.ToImage(), v2.RGB()]
    if not (key == "tiny-imagenet" and side == 64):
        ops.append(v2.Resize((side, side), antialias=True))
    ops += [v2.ToDtype(torch.float32, scale=True), v2.ToPureTensor()]
    for ds in (b.train, b.val):
        ds.transform = v2.Compose(ops)
    _check_fits(key, len(b.train) + len(b.val), side)
    return b


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

    if key not in IN_MEMORY + FOLDER_KINDS:
        raise ValueError(f"{key!r} is not a data set held in memory; known: "
                         f"{', '.join(IN_MEMORY + FOLDER_KINDS)}")
    if key in FOLDER_KINDS:
        if channels not in (None, 3):
            raise ValueError(f"{key} is RGB: channels must be 3, got {channels}")
        b = _folder_sets(key, root, image_size)
        workers = min(8, os.cpu_count() or 1) if len(b.train) > 2048 else 0
        tx, ty = stack_dataset(b.train, workers)
        vx, vy = stack_dataset(b.val, workers)
        return RealData(tx, ty, vx, vy, b.num_classes, tuple(b.mean), tuple(b.std),
                        list(b.class_names), key)
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
