"""ResNets with the ImageNet stem (as torchvision builds them) or the small-image stem the
public SRe2L/GUARD code uses for CIFAR and Tiny-ImageNet (3x3 stride-1 conv1, no max-pool),
and (for older imports) thin forwards to the name registry in registry.py."""
from __future__ import annotations

from typing import Callable, Sequence

import torch
from torch import Tensor, nn
from torchvision.models import resnet as tv_resnet

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class Normalized(nn.Module):
    """(x - mean) / std in front of a classifier, so the model takes [0, 1] pixels."""

    def __init__(self, model: nn.Module, mean: Sequence[float], std: Sequence[float]):
        super().__init__()
        if len(mean) != len(std):
            raise ValueError(f"mean has {len(mean)} channels but std has {len(std)}")
        if any(s <= 0 for s in std):
            raise ValueError(f"std must be positive, got {tuple(std)}")
        self.model = model
        # float64, cast to the input's dtype in forward: a float64 model then normalizes with
        # the exact constants (float32 buffers would carry ~1e-8 relative error into it)
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float64).view(1, -1, 1, 1),
                             persistent=False)
        self.register_buffer("std", torch.tensor(std, dtype=torch.float64).view(1, -1, 1, 1),
                             persistent=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.model((x - self.mean.to(x.dtype)) / self.std.to(x.dtype))


def _small_stem(m: tv_resnet.ResNet, in_channels: int) -> tv_resnet.ResNet:
    m.conv1 = nn.Conv2d(in_channels, 64, kernel_size=3, stride=1, padding=1, bias=False)
    m.maxpool = nn.Identity()
    return m


def _build(factory: Callable, num_classes: int, stem: str, in_channels: int) -> nn.Module:
    if stem not in ("imagenet", "small"):
        raise ValueError(f"stem must be 'imagenet' or 'small', got {stem!r}")
    if num_classes < 2:
        raise ValueError(f"num_classes must be >= 2, got {num_classes}")
    m = factory(weights=None, num_classes=num_classes)
    if stem == "small":
        return _small_stem(m, in_channels)
    if in_channels != 3:
        m.conv1 = nn.Conv2d(in_channels, 64, kernel_size=7, stride=2, padding=3, bias=False)
    return m


def resnet18(num_classes: int = 1000, stem: str = "imagenet", in_channels: int = 3) -> nn.Module:
    return _build(tv_resnet.resnet18, num_classes, stem, in_channels)


def resnet50(num_classes: int = 1000, stem: str = "imagenet", in_channels: int = 3) -> nn.Module:
    return _build(tv_resnet.resnet50, num_classes, stem, in_channels)


def list_models() -> list[str]:
    """Kept here for older imports; the registry lives in guard_fast.models.registry."""
    from guard_fast.models.registry import list_models as _list
    return _list()


def build_model(name: str, num_classes: int, in_channels: int = 3,
                mean: Sequence[float] | None = None, std: Sequence[float] | None = None,
                **kwargs) -> nn.Module:
    """Kept here for older imports: see guard_fast.models.registry.build_model."""
    from guard_fast.models.registry import build_model as _build_model
    return _build_model(name, num_classes, in_channels, mean, std, **kwargs)
