"""Train/val transforms, one pair per dataset kind, shared by every data path.

Every path (bundled MNIST arrays, CIFAR pickles, ImageFolder JPEGs) first turns its raw
image into a uint8 CHW tensor (``v2.ToImage``) and then runs the *same* tensor ops, so a
given kind is augmented identically whatever the source. Outputs are float32 in [0, 1];
there is NO normalization here: models normalize inside, and each dataset carries its
mean/std (see ``DataBundle``).

Kinds:
  "imagenet"  ImageNet-1K, ImageNette, generic ImageFolder (SRe2L / timm convention).
              train: RandomResizedCrop(s, scale=(0.08, 1), ratio=(3/4, 4/3)) + h-flip
              val:   Resize(int(s / 0.875)) (shorter side) + CenterCrop(s)
  "small"     CIFAR-10/100, Tiny-ImageNet (native 32 / 64 px).
              train: [Resize(s) if native != s] + RandomCrop(s, padding=4) + h-flip
              val:   [Resize(s) if native != s]
  "mnist"     bundled MNIST digits (native 28 px).
              base:  Pad(2) when s == 32 (28 -> 32, as LeNet/DC-bench pipelines do), else Resize(s)
              train: base + RandomCrop(s, padding=2), no flip (digits are not mirror-symmetric)
              val:   base
              then grey is replicated to ``channels`` (3 by default).

Randomness comes from torch's global RNG; ``make_loader`` seeds it per sample from
(seed, epoch, index), which makes augmentation independent of worker count and rank.
"""
from __future__ import annotations

import torch
from torchvision.transforms import v2

KINDS = ("imagenet", "small", "mnist")

# The val resize ratio of the ImageNet protocol (224 / 256), as in torchvision/timm/SRe2L.
IMAGENET_CROP_PCT = 0.875
IMAGENET_SCALE = (0.08, 1.0)
IMAGENET_RATIO = (3.0 / 4.0, 4.0 / 3.0)
SMALL_PADDING = 4
MNIST_PADDING = 2


class RepeatChannels(torch.nn.Module):
    """(1, H, W) -> (channels, H, W) by replicating grey; a no-op when already right."""

    def __init__(self, channels: int):
        super().__init__()
        if channels not in (1, 3):
            raise ValueError(f"channels must be 1 or 3, got {channels}")
        self.channels = channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-3] == self.channels:
            return x
        if x.shape[-3] != 1:
            raise ValueError(f"cannot turn {x.shape[-3]} channels into {self.channels}")
        return x.expand(*x.shape[:-3], self.channels, *x.shape[-2:]).contiguous()

    def extra_repr(self) -> str:
        return f"channels={self.channels}"


def rrc_fallback(height: int, width: int, ratio=(3 / 4, 4 / 3)) -> tuple[int, int, int, int]:
    """torchvision RandomResizedCrop's box when its 10 tries fail: the central crop at the
    nearest allowed aspect ratio, as (top, left, h, w)."""
    in_ratio = width / height
    if in_ratio < min(ratio):
        w, h = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        h, w = height, int(round(height * max(ratio)))
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


def build_transform(kind: str, image_size: int, train: bool, *, native_size: int | None = None,
                    channels: int | None = None) -> v2.Compose:
    """The transform of one dataset kind and split.

    kind: one of ``KINDS``. image_size: output side length. train: augmenting or not.
    native_size: the side of the stored images for "small" kinds (32 for CIFAR, 64 for
    Tiny-ImageNet); a resize is added only when it differs from image_size (None: always
    resize, which is a no-op in value for images already of that size).
    channels: for "mnist", 1 or 3 (grey replicated); ignored by RGB kinds (None there).
    Input: a PIL image or a uint8 (C, H, W) tensor. Output: float32 (C, s, s) in [0, 1].
    """
    if kind not in KINDS:
        raise ValueError(f"unknown transform kind {kind!r}; known: {', '.join(KINDS)}")
    if not isinstance(image_size, int) or image_size < 1:
        raise ValueError(f"image_size must be a positive int, got {image_size!r}")
    s = image_size
    ops: list = [v2.ToImage()]
    if kind == "imagenet":
        if channels not in (None, 3):
            raise ValueError("ImageFolder kinds are RGB: channels must be 3")
        ops.append(v2.RGB())
        if train:
            ops += [v2.RandomResizedCrop(s, scale=IMAGENET_SCALE, ratio=IMAGENET_RATIO, antialias=True),
                    v2.RandomHorizontalFlip()]
        else:
            ops += [v2.Resize(int(s / IMAGENET_CROP_PCT), antialias=True), v2.CenterCrop(s)]
    elif kind == "small":
        if channels not in (None, 3):
            raise ValueError("CIFAR / Tiny-ImageNet are RGB: channels must be 3")
        ops.append(v2.RGB())
        if native_size != s:
            ops.append(v2.Resize((s, s), antialias=True))
        if train:
            ops += [v2.RandomCrop(s, padding=SMALL_PADDING), v2.RandomHorizontalFlip()]
    else:  # mnist
        ops.append(v2.Pad(MNIST_PADDING) if s == 32 else v2.Resize((s, s), antialias=True))
        if train:
            ops.append(v2.RandomCrop(s, padding=MNIST_PADDING))
        ops.append(RepeatChannels(3 if channels is None else channels))
    ops += [v2.ToDtype(torch.float32, scale=True), v2.ToPureTensor()]  # plain tensors, not tv_tensors.Image
    return v2.Compose(ops)
