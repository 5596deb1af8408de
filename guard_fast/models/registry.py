"""Classifiers by name: ``build_model(name, num_classes, in_channels, mean, std, image_size=...)``.

ResNets end in a global average pool, so they take any image size and ``image_size`` only
has its value checked; the ConvNets size their classifier from it (default per entry)."""
from __future__ import annotations

from typing import Any, Callable, NamedTuple, Sequence

from torch import nn

from guard_fast.models.convnet import ConvNet
from guard_fast.models.resnet import Normalized, resnet18, resnet50


class _Entry(NamedTuple):
    factory: Callable[..., nn.Module]
    image_size: int | None  # default input side; None: any size (global pooling)
    options: tuple[str, ...]  # keyword options build_model forwards to the factory


_REGISTRY: dict[str, _Entry] = {
    "resnet18": _Entry(lambda **kw: resnet18(stem="imagenet", **kw), None, ()),
    "resnet18_small": _Entry(lambda **kw: resnet18(stem="small", **kw), None, ()),
    "resnet50": _Entry(lambda **kw: resnet50(stem="imagenet", **kw), None, ()),
    "resnet50_small": _Entry(lambda **kw: resnet50(stem="small", **kw), None, ()),
    # DC/DSA/DM/MTT/TESLA ConvNet (depth 3, width 128, instance norm) for 32x32 (28x28 with
    # one channel); MTT's ConvNetD4 for Tiny-ImageNet (64x64) and ConvNetD5 for ImageNet
    # subsets such as ImageNette (128x128).
    "convnet": _Entry(lambda **kw: ConvNet(**kw), 32, ("width", "depth", "norm")),
    "convnet_d4": _Entry(lambda **kw: ConvNet(depth=4, **kw), 64, ("width", "norm")),
    "convnet_d5": _Entry(lambda **kw: ConvNet(depth=5, **kw), 128, ("width", "norm")),
}


def list_models() -> list[str]:
    return sorted(_REGISTRY)


def build_model(name: str, num_classes: int, in_channels: int = 3,
                mean: Sequence[float] | None = None, std: Sequence[float] | None = None, *,
                image_size: int | None = None, **options: Any) -> nn.Module:
    """A registered classifier; with mean/std it takes [0, 1] pixels (normalizes inside).

    Args:
        name: one of ``list_models()``.
        num_classes, in_channels: classifier outputs and image channels.
        mean, std: per-channel normalization put inside the model (``Normalized``); both or
            neither.
        image_size: side of the square input. The ConvNets size their classifier from it
            (default 32 for "convnet", 64 for "convnet_d4", 128 for "convnet_d5"); the
            ResNets accept any size and only check that it is positive.
        options: model-specific keywords, e.g. ``width``/``depth``/``norm`` for "convnet".
    """
    if name not in _REGISTRY:
        raise ValueError(f"unknown model {name!r}; known: {', '.join(list_models())}")
    entry = _REGISTRY[name]
    bad = sorted(set(options) - set(entry.options))
    if bad:
        raise ValueError(f"model {name!r} takes no option(s) {bad}; it takes "
                         f"{list(entry.options) or 'none'}")
    if image_size is not None and (not isinstance(image_size, int) or image_size < 1):
        raise ValueError(f"image_size must be a positive int, got {image_size!r}")
    kw = dict(options)
    if entry.image_size is not None:
        kw["image_size"] = entry.image_size if image_size is None else image_size
    m = entry.factory(num_classes=num_classes, in_channels=in_channels, **kw)
    if mean is not None or std is not None:
        if mean is None or std is None:
            raise ValueError("give both mean and std, or neither")
        if len(mean) not in (1, in_channels):
            raise ValueError(f"mean/std have {len(mean)} channels but in_channels is {in_channels}")
        m = Normalized(m, mean, std)
    return m
