"""Classifiers by name. Each takes [0, 1] pixels when built with ``mean``/``std``: the
mean/std normalization lives inside the model (``Normalized``), so attacks' eps and GUARD's h
are measured in pixel units. The public GUARD code normalizes in the data pipeline instead,
so its h = 3 is in normalized units (about 3 * 0.226 = 0.68 in pixel units for ImageNet std).
"""
from guard_fast.models.convnet import ConvNet, convnet
from guard_fast.models.registry import build_model, list_models
from guard_fast.models.resnet import IMAGENET_MEAN, IMAGENET_STD, Normalized, resnet18, resnet50

__all__ = ["build_model", "list_models", "resnet18", "resnet50", "ConvNet", "convnet",
           "Normalized", "IMAGENET_MEAN", "IMAGENET_STD"]
