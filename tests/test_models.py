"""Model registry: shapes, exact parameter counts, the Normalized wrapper, the ConvNet."""
import pytest
import torch
from torch import nn
from guard_fast.models.instance_norm import InstanceNorm
from guard_fast.models.pool import AvgPool2x2

from guard_fast.models import (IMAGENET_MEAN, IMAGENET_STD, ConvNet, Normalized, build_model,
                               list_models, resnet18)


def n_params(m: nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


# Independent counts. ResNet-18/50 with the ImageNet stem and 1000 classes: 11,689,512 and
# 25,557,032 (torchvision's published numbers). Small stem: conv1 7x7 (3*64*49 = 9,408)
# becomes 3x3 (3*64*9 = 1,728), -7,680; a 10-class fc is 512*10+10 = 5,130 (ResNet-18) or
# 2048*10+10 = 20,490 (ResNet-50) instead of 513,000 / 2,049,000.
# ConvNet, width 128, 10 classes, per block: conv 128*c_in*9 + 128, GroupNorm 2*128; the
# classifier 128 * s*s * 10 + 10 with s the final side:
#   3 ch, 32px, depth 3: 3,584 + 2*147,584 + 3*256 + 128*16*10+10 = 320,010 (DC's figure)
#   1 ch, 28px (padding 3 -> 32), depth 3: 1,280 + 2*147,584 + 768 + 20,490 = 317,706
#   depth 4 at 64px / depth 5 at 128px: s = 4 again, one/two more 147,840 blocks:
#   467,850 / 615,690 (3 ch) and 465,546 / 613,386 (1 ch).
CASES = [
    # name, classes, channels, image side, params
    ("resnet18", 1000, 3, 64, 11_689_512),
    ("resnet18", 10, 3, 64, 11_689_512 - 513_000 + 5_130),
    ("resnet18_small", 10, 3, 32, 11_689_512 - 7_680 - 513_000 + 5_130),
    ("resnet50", 1000, 3, 64, 25_557_032),
    ("resnet50_small", 10, 3, 32, 25_557_032 - 7_680 - 2_049_000 + 20_490),
    ("convnet", 10, 3, 32, 320_010),
    ("convnet", 10, 1, 28, 317_706),
    ("convnet_d4", 10, 3, 64, 467_850),
    ("convnet_d4", 10, 1, 64, 465_546),
    ("convnet_d5", 10, 3, 128, 615_690),
    ("convnet_d5", 10, 1, 128, 613_386),
]


def test_every_registered_model_is_covered():
    assert {c[0] for c in CASES} == set(list_models())


@pytest.mark.parametrize("name,classes,c,side,count", CASES)
def test_shape_and_param_count(name, classes, c, side, count):
    m = build_model(name, classes, c, image_size=side)
    assert n_params(m) == count
    if name.startswith("resnet50") or side > 64:
        return  # forward of the big ones costs time; shape rule is the same
    out = m.eval()(torch.rand(2, c, side, side))
    assert out.shape == (2, classes)


def test_resnet50_and_convnet_d5_forward():
    m = build_model("convnet_d5", 7, 3)  # default image_size 128
    assert m(torch.rand(1, 3, 128, 128)).shape == (1, 7)
    m = build_model("resnet50_small", 7, 3)
    assert m.eval()(torch.rand(1, 3, 16, 16)).shape == (1, 7)


def test_convnet_structure_matches_dc():
    m = build_model("convnet", 10, 3)
    kinds = [type(l) for l in m.features]
    assert kinds == [nn.Conv2d, InstanceNorm, nn.ReLU, AvgPool2x2] * 3
    assert isinstance(m.features[1], nn.GroupNorm)  # same parameters and state_dict
    assert isinstance(m.features[3], nn.AvgPool2d)
    gn = m.features[1]
    assert gn.num_groups == gn.num_channels == 128 and gn.affine
    assert m.features[0].padding == (1, 1) and m.features[0].kernel_size == (3, 3)
    assert m.classifier.in_features == 128 * 4 * 4
    m1 = build_model("convnet", 10, 1, image_size=28)
    assert m1.features[0].padding == (3, 3) and m1.features[4].padding == (1, 1)


@pytest.mark.parametrize("c,side", [(1, 28), (1, 32), (3, 32), (3, 28), (3, 64), (1, 64)])
def test_convnet_channels_and_sizes(c, side):
    m = build_model("convnet", 5, c, image_size=side, width=16)
    out = m(torch.rand(3, c, side, side))
    assert out.shape == (3, 5)
    # instance norm keeps no running statistics: train and eval agree
    x = torch.rand(2, c, side, side)
    torch.testing.assert_close(m.train()(x), m.eval()(x))


def test_convnet_instance_norm_is_per_sample_per_channel():
    torch.manual_seed(0)
    m = ConvNet(3, 3, 32, width=8, depth=1)
    x = torch.randn(2, 3, 32, 32)
    h = m.features[0](x)
    ref = (h - h.mean((2, 3), keepdim=True)) / torch.sqrt(h.var((2, 3), unbiased=False,
                                                            keepdim=True) + 1e-5)
    torch.testing.assert_close(m.features[1](h), ref, atol=1e-5, rtol=1e-4)


def test_convnet_options_and_errors():
    m = build_model("convnet", 10, 3, width=32, depth=2, norm="batchnorm")
    assert isinstance(m.features[1], nn.BatchNorm2d) and m.classifier.in_features == 32 * 8 * 8
    assert len(build_model("convnet", 10, 3, norm="none").features) == 9
    with pytest.raises(ValueError, match="norm"):
        build_model("convnet", 10, 3, norm="layer")
    with pytest.raises(ValueError, match="takes no option"):
        build_model("resnet18", 10, 3, width=4)
    with pytest.raises(ValueError, match="image_size"):
        build_model("convnet", 10, 3, image_size=0)
    with pytest.raises(ValueError, match="too small"):
        build_model("convnet", 10, 3, image_size=4)
    with pytest.raises(ValueError, match=r"\(N, 3, 32, 32\)"):
        build_model("convnet", 10, 3)(torch.rand(1, 3, 28, 28))
    with pytest.raises(ValueError, match="num_classes"):
        build_model("convnet", 1, 3)


def test_unknown_name():
    with pytest.raises(ValueError, match=r"unknown model 'vgg11'.*convnet.*resnet18"):
        build_model("vgg11", 10)


def test_old_entry_points_still_work():
    from guard_fast.models.resnet import build_model as old_build, list_models as old_list
    assert old_list() == list_models()
    m = old_build("resnet18", 10, 3, mean=IMAGENET_MEAN, std=IMAGENET_STD)
    assert isinstance(m, Normalized)
    assert n_params(resnet18(10, stem="small")) == 11_173_962


def test_normalized_math():
    torch.manual_seed(0)
    inner = build_model("convnet", 4, 3, width=8).double()
    mean, std = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)
    m = Normalized(inner, mean, std)
    x = torch.rand(2, 3, 32, 32, dtype=torch.float64)
    z = (x - torch.tensor(mean, dtype=torch.float64)[:, None, None]) / \
        torch.tensor(std, dtype=torch.float64)[:, None, None]
    torch.testing.assert_close(m(x), inner(z), rtol=0, atol=1e-12)
    # the chain rule through the wrapper: d/dx = (d/dz) / std
    x.requires_grad_(True)
    g = torch.autograd.grad(m(x).sum(), x)[0]
    z = z.requires_grad_(True)
    gz = torch.autograd.grad(inner(z).sum(), z)[0]
    torch.testing.assert_close(g, gz / torch.tensor(std, dtype=torch.float64)[:, None, None])
    # normalization buffers are not parameters and not in the state dict
    assert n_params(m) == n_params(inner)
    assert set(m.state_dict()) == {"model." + k for k in inner.state_dict()}
    built = build_model("convnet", 4, 1, mean=(0.1307,), std=(0.3081,), image_size=28)
    assert isinstance(built, Normalized) and built(torch.rand(1, 1, 28, 28)).shape == (1, 4)
    with pytest.raises(ValueError, match="both mean and std"):
        build_model("convnet", 4, 3, mean=(0.5,) * 3)
    with pytest.raises(ValueError, match="std must be positive"):
        Normalized(inner, (0.5,) * 3, (0.2, 0.0, 0.2))
    with pytest.raises(ValueError, match="channels"):
        Normalized(inner, (0.5,) * 3, (0.2,) * 2)
