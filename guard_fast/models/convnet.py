"""The ConvNet of the DC / DSA / DM / MTT / TESLA dataset-distillation codes.

Each of ``depth`` blocks is

    Conv2d(c_in, width, 3, padding=1) -> norm -> ReLU -> AvgPool2d(2, 2)

and a single Linear layer classifies the flattened features. The defaults (depth 3, width
128, instance norm, ReLU, average pooling) are the "ConvNet" those papers evaluate with on
32x32 images; MTT names the depth-4 variant (64x64, Tiny-ImageNet) ConvNetD4 and the depth-5
one (128x128, ImageNette) ConvNetD5, registered here as ``convnet_d4`` and ``convnet_d5``.

Two details follow the public code (DC's ``utils.py``, copied by MTT/TESLA):

* "instance norm" is ``nn.GroupNorm(width, width, affine=True)``: one group per channel,
  which normalizes each sample's channel over its spatial extent (instance norm) with a
  learnable per-channel scale and shift, and keeps no running statistics, so the network
  behaves the same in train and eval mode. It is built as
  :class:`~guard_fast.models.instance_norm.InstanceNorm`, an ``nn.GroupNorm`` with the same
  parameters and state_dict whose double backward (MTT's unroll, DC's gradient matching) runs
  as one fused C++ kernel on the CPU; its 2x2 average pooling is
  :class:`~guard_fast.models.pool.AvgPool2x2`, an ``nn.AvgPool2d(2, 2)`` on fused CPU kernels.
* a one-channel input gets ``padding=3`` in the first conv (28x28 MNIST becomes 32x32, so
  the classifier sees 4x4 maps as for CIFAR). The public code keeps that padding for any
  one-channel image size; so does this class, and the classifier's input size is computed
  from the real geometry, so 3-channel 28x28 images also work here (they fail in the
  public code, which assumes 32x32 whenever the size is 28).
"""
from __future__ import annotations

from torch import Tensor, nn

from .instance_norm import InstanceNorm
from .pool import AvgPool2x2

NORMS = ("instancenorm", "batchnorm", "none")


def _feature_size(size: int, depth: int, first_padding: int) -> int:
    """Spatial side after `depth` blocks: a 3x3 conv with padding p maps s -> s + 2p - 2,
    the 2x2 average pool s -> s // 2."""
    s = size
    for d in range(depth):
        s = s + 2 * (first_padding if d == 0 else 1) - 2
        s //= 2
    return s


class ConvNet(nn.Module):
    """DC/MTT ConvNet.

    Args:
        num_classes: classifier outputs (>= 2).
        in_channels: image channels (1 gets the public code's first-conv padding of 3).
        image_size: side of the square input the classifier is sized for (default 32).
        width: channels of every conv (128 in the papers).
        depth: number of conv blocks (3; MTT uses 4 at 64x64 and 5 at 128x128).
        norm: "instancenorm" (GroupNorm(width, width), the papers' default), "batchnorm"
            (the public code's ConvNetBN), or "none".
    """

    def __init__(self, num_classes: int = 10, in_channels: int = 3, image_size: int = 32,
                 width: int = 128, depth: int = 3, norm: str = "instancenorm"):
        super().__init__()
        if num_classes < 2:
            raise ValueError(f"num_classes must be >= 2, got {num_classes}")
        if in_channels < 1:
            raise ValueError(f"in_channels must be >= 1, got {in_channels}")
        if width < 1:
            raise ValueError(f"width must be >= 1, got {width}")
        if depth < 1:
            raise ValueError(f"depth must be >= 1, got {depth}")
        if norm not in NORMS:
            raise ValueError(f"norm must be one of {NORMS}, got {norm!r}")
        first_padding = 3 if in_channels == 1 else 1
        side = _feature_size(image_size, depth, first_padding)
        if side < 1:
            raise ValueError(f"image_size {image_size} is too small for depth {depth}: the "
                             f"feature maps would vanish (need about 2**depth pixels)")
        layers: list[nn.Module] = []
        c = in_channels
        for d in range(depth):
            pad = first_padding if d == 0 else 1
            layers.append(nn.Conv2d(c, width, kernel_size=3, padding=pad))
            if norm == "instancenorm":
                layers.append(InstanceNorm(width))
            elif norm == "batchnorm":
                layers.append(nn.BatchNorm2d(width))
            layers.append(nn.ReLU(inplace=True))
            layers.append(AvgPool2x2())
            c = width
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Linear(width * side * side, num_classes)
        self.image_size = image_size
        self.in_channels = in_channels

    def forward(self, x: Tensor) -> Tensor:
        s = self.image_size
        if x.dim() != 4 or x.shape[1] != self.in_channels or x.shape[2] != s or x.shape[3] != s:
            raise ValueError(f"this ConvNet was built for (N, {self.in_channels}, {s}, {s}) "
                             f"input, got {tuple(x.shape)}")
        return self.classifier(self.features(x).flatten(1))


def convnet(num_classes: int = 10, in_channels: int = 3, image_size: int = 32, *,
            width: int = 128, depth: int = 3, norm: str = "instancenorm") -> ConvNet:
    return ConvNet(num_classes, in_channels, image_size, width=width, depth=depth, norm=norm)
