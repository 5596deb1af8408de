"""Instance normalisation with a fused CPU double backward, for trajectory matching.

The ConvNet of MTT/TESLA/DC normalises each channel of each image on its own
(``nn.GroupNorm(C, C)``). MTT differentiates through SGD steps of that network, so its
outer backward runs instance norm's *double* backward once per layer and step. PyTorch's
double backward of ``native_group_norm`` is a composite of ~30 full-size elementwise ops
and reductions; on the CPU it was ~30% of an MTT iteration (bench/bench_mtt.py, ConvNet
width 32 under the profiler). :class:`InstanceNorm` keeps PyTorch's fused forward and
first backward (``native_group_norm``, ``native_group_norm_backward``) and replaces the
double backward by one C++ kernel, two passes per (n, c) group
(``torch.ops.guard_fast_C.instance_norm_double_backward``, csrc/instance_norm_cpu.cpp, which
has the formulas). Its results equal PyTorch's up to rounding (tests/test_instance_norm.py:
float64 against PyTorch's double backward and gradgradcheck, channels_last inputs, an MTT
unroll).

The fused path runs for float32/float64 CPU tensors with autograd recording, when the
extension has the op and the ops backend is not forced to "torch"
(``GUARD_FAST_BACKEND=torch``) and ``GUARD_FAST_INSTANCE_NORM`` is not ``torch``; everything
else (CUDA, no grad, other dtypes, torch.compile) is ``F.group_norm``. The fused double
backward is not itself differentiable: a backward with create_graph=True through it (a
third derivative) raises and names the switch.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["InstanceNorm", "instance_norm", "fused_available"]

_aten = torch.ops.aten


def fused_available() -> bool:
    """Whether the fused double backward can run here (the extension has the op and
    neither GUARD_FAST_BACKEND=torch nor GUARD_FAST_INSTANCE_NORM=torch asks otherwise)."""
    from guard_fast import ops

    return ops.cpu_layer_op("instance_norm_double_backward", "GUARD_FAST_INSTANCE_NORM")


class _Backward(torch.autograd.Function):
    """Instance norm's first backward as a function of (gy, x, weight); its backward is the
    fused double backward."""

    @staticmethod
    def forward(ctx, gy, x, weight, mean, rstd):
        n, c = x.shape[:2]
        gx, gw, gb = _aten.native_group_norm_backward(gy, x, mean, rstd, weight, n, c,
                                                      x.numel() // max(n * c, 1), c,
                                                      [True, True, True])
        ctx.save_for_backward(gy, x, weight, mean, rstd)
        return gx, gw, gb

    @staticmethod
    def backward(ctx, u, g_w, g_b):
        if torch.is_grad_enabled():  # create_graph=True here: a third derivative was asked
            raise RuntimeError(
                "guard_fast InstanceNorm: the fused double backward is not differentiable "
                "(a third derivative through instance norm was requested); set "
                "GUARD_FAST_INSTANCE_NORM=torch to use PyTorch's GroupNorm")
        gy, x, weight, mean, rstd = ctx.saved_tensors
        u = torch.zeros_like(x) if u is None else u.contiguous()
        g_w = torch.zeros_like(weight) if g_w is None else g_w.contiguous()
        g_b = torch.zeros_like(weight) if g_b is None else g_b.contiguous()
        ggy, gx, gw_nc = torch.ops.guard_fast_C.instance_norm_double_backward(
            u, gy, x, mean, rstd, weight, g_w, g_b)
        return ggy, gx, gw_nc.sum(0), None, None


class _InstanceNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, eps):
        n, c = x.shape[:2]
        y, mean, rstd = _aten.native_group_norm(x.contiguous(), weight, bias, n, c,
                                                x.numel() // max(n * c, 1), c, eps)
        # x itself (not a contiguous copy) is saved, so the double backward reaches it
        ctx.save_for_backward(x, weight, mean, rstd)
        return y

    @staticmethod
    def backward(ctx, gy):
        x, weight, mean, rstd = ctx.saved_tensors
        gx, gw, gb = _Backward.apply(gy.contiguous(), x.contiguous(), weight, mean, rstd)
        return gx, gw, gb, None


def instance_norm(x: Tensor, weight: Tensor, bias: Tensor, eps: float = 1e-5) -> Tensor:
    """``F.group_norm(x, x.shape[1], weight, bias, eps)``, with the fused CPU double
    backward where it applies (see the module docstring)."""
    if (x.device.type == "cpu" and x.dtype in (torch.float32, torch.float64)
            and x.dim() >= 3 and weight is not None and bias is not None
            and weight.dtype == x.dtype and bias.dtype == x.dtype
            and torch.is_grad_enabled()
            and (x.requires_grad or weight.requires_grad or bias.requires_grad)
            and not torch.compiler.is_compiling() and fused_available()):
        return _InstanceNorm.apply(x, weight, bias, eps)
    return F.group_norm(x, x.shape[1], weight, bias, eps)


class InstanceNorm(nn.GroupNorm):
    """``nn.GroupNorm(num_channels, num_channels, affine=True)`` (same parameters, same
    state_dict) whose double backward on the CPU is the fused kernel."""

    def __init__(self, num_channels: int, eps: float = 1e-5, device=None, dtype=None):
        super().__init__(num_channels, num_channels, eps=eps, affine=True, device=device,
                         dtype=dtype)

    def forward(self, x: Tensor) -> Tensor:
        return instance_norm(x, self.weight, self.bias, self.eps)
