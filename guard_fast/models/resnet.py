"""ResNets with the ImageNet stem (as torchvision builds them) or the small-image stem the
public SRe2L/GUARD code uses for CIFAR and Tiny-ImageNet (3x3 stride-1 conv1, no max-pool),
and the name registry."""
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
        self.register_buffer("mean", torch.tensor(mean).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, -1, 1, 1), persistent=False)

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


_REGISTRY: dict[str, Callable[..., nn.Module]] = {
    "resnet18": lambda **kw: resnet18(stem="imagenet", **kw),
    "resnet18_small": lambda **kw: resnet18(stem="small", **kw),
    "resnet50": lambda **kw: resnet50(stem="imagenet", **kw),
    "resnet50_small": lambda **kw: resnet50(stem="small", **kw),
}


def list_models() -> list[str]:
    return sorted(_REGISTRY)


def build_model(name: str, num_classes: int, in_channels: int = 3,
                mean: Sequence[float] | None = None, std: Sequence[float] | None = None) -> nn.Module:
    """A registered classifier; with mean/std it takes [0, 1] pixels (normalizes inside)."""
    if name not in _REGISTRY:
        raise ValueError(f"unknown model {name!r}; known: {', '.join(list_models())}")
    m = _REGISTRY[name](num_classes=num_classes, in_channels=in_channels)
    if mean is not None or std is not None:
        if mean is None or std is None:
            raise ValueError("give both mean and std, or neither")
        m = Normalized(m, mean, std)
    return m
