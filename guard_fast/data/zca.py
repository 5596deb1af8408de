"""ZCA whitening, the option MTT trains and distills CIFAR with (``--zca``).

The public code fits kornia's ZCAWhitening(eps=0.1) on the whole training set, with the
unbiased covariance of the flattened images: with mean m and covariance
C = U diag(S) U^T, an image x (flattened) maps to (x - m) U diag(1/sqrt(S + eps)) U^T, and
back by the inverse. Experts, distillation and evaluation then all see whitened images; the
network that takes [0, 1] pixels is ``nn.Sequential(zca, convnet)``.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

__all__ = ["ZCA", "ZCA_EPS", "ZCA_MAX_DIM"]

ZCA_EPS = 0.1  # the public code's kornia.enhance.ZCAWhitening(eps=0.1)
ZCA_MAX_DIM = 3 * 64 * 64  # values per image: a 12,288^2 float64 covariance is 1.1 GiB


class ZCA(nn.Module):
    """A fitted ZCA transform of (N, C, H, W) images (buffers: mean, transform, inverse)."""

    def __init__(self, mean: Tensor, transform: Tensor, inverse: Tensor):
        super().__init__()
        self.register_buffer("mean", mean.float())
        self.register_buffer("transform", transform.float())
        self.register_buffer("inverse", inverse.float())

    @classmethod
    def fit(cls, images: Tensor, eps: float = ZCA_EPS) -> "ZCA":
        """Fit on images (N, C, H, W) in float64 (N >= 2)."""
        if images.dim() != 4 or images.shape[0] < 2:
            raise ValueError(f"ZCA is fitted on (N >= 2, C, H, W) images, got "
                             f"{tuple(images.shape)}")
        dim = images[0].numel()
        if dim > ZCA_MAX_DIM:
            raise ValueError(
                f"ZCA whitening of {tuple(images.shape[1:])} images needs a {dim:,} x {dim:,} "
                f"covariance ({dim * dim * 8 / 2**30:.1f} GiB in float64) and its "
                f"eigendecomposition; it is offered up to {ZCA_MAX_DIM:,} values per image "
                "(3 x 64 x 64; MTT whitens only its 32 px CIFAR buffers): drop --zca")
        x = images.flatten(1).double()
        m = x.mean(0)
        xc = x - m
        cov = xc.T @ xc / (x.shape[0] - 1)
        s, u = torch.linalg.eigh(cov)  # symmetric PSD: eigh == svd
        s = s.clamp(min=0)
        t = (u * (s + eps).rsqrt()) @ u.T
        t_inv = (u * (s + eps).sqrt()) @ u.T
        return cls(m, t, t_inv)

    def state(self) -> dict:
        return {"mean": self.mean, "transform": self.transform, "inverse": self.inverse}

    def forward(self, x: Tensor) -> Tensor:
        shape = x.shape
        y = (x.flatten(1) - self.mean.to(x.dtype)) @ self.transform.to(x.dtype)
        return y.view(shape)

    def invert(self, y: Tensor) -> Tensor:
        shape = y.shape
        return (y.flatten(1) @ self.inverse.to(y.dtype) + self.mean.to(y.dtype)).view(shape)
