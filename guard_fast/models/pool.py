"""2x2 / stride-2 average pooling with fused CPU kernels, differentiable any number of times.

The ConvNet of DC/MTT/TESLA pools with ``nn.AvgPool2d(2, 2)``. MTT's unroll runs pooling's
forward, backward and (in its outer backward) their derivatives for every layer and step;
on the CPU PyTorch's generic avg_pool2d kernels (padding, ceil mode and divisor handling,
slower still on channels_last input) were ~15% of an iteration. Pooling is linear and its
backward is its adjoint, so two kernels (``torch.ops.guard_fast_C.avg_pool2x2`` and
``avg_pool2x2_backward``, csrc/pool_cpu.cpp) serve every order: the autograd function of
each calls the other. Floor mode as PyTorch's (an odd last row/column is dropped and gets
zero gradient). Used for contiguous or channels_last float32/float64 CPU tensors when the
extension has the ops and neither ``GUARD_FAST_BACKEND=torch`` nor
``GUARD_FAST_POOL=torch`` is set; otherwise ``F.avg_pool2d``. Results equal PyTorch's up to
rounding (tests/test_pool.py).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["AvgPool2x2", "avg_pool2x2", "fused_available"]


def fused_available() -> bool:
    """Whether the fused kernels can run here (see the module docstring)."""
    from guard_fast import ops

    return ops.cpu_layer_op("avg_pool2x2", "GUARD_FAST_POOL")


class _Pool(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        ctx.hw = x.shape[2:]
        return torch.ops.guard_fast_C.avg_pool2x2(x.contiguous())

    @staticmethod
    def backward(ctx, gy):
        return _Unpool.apply(gy, *ctx.hw)


class _Unpool(torch.autograd.Function):
    """The adjoint of _Pool: gy spread over each 2x2 window, / 4."""

    @staticmethod
    def forward(ctx, gy, h, w):
        return torch.ops.guard_fast_C.avg_pool2x2_backward(gy.contiguous(), h, w)

    @staticmethod
    def backward(ctx, gx):
        return _Pool.apply(gx), None, None


def avg_pool2x2(x: Tensor) -> Tensor:
    """``F.avg_pool2d(x, 2, 2)`` with the fused CPU kernels where they apply."""
    if (x.device.type == "cpu" and x.dim() == 4 and x.dtype in (torch.float32, torch.float64)
            and not torch.compiler.is_compiling() and fused_available()):
        return _Pool.apply(x)
    return F.avg_pool2d(x, 2, 2)


class AvgPool2x2(nn.AvgPool2d):
    """``nn.AvgPool2d(kernel_size=2, stride=2)`` running :func:`avg_pool2x2`."""

    def __init__(self):
        super().__init__(kernel_size=2, stride=2)

    def forward(self, x: Tensor) -> Tensor:
        return avg_pool2x2(x)
