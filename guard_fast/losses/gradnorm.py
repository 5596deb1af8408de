"""Gradient-norm regularization (GR), the GUARD paper's Table 3 ablation, as a drop-in loss:

    l_GR(x) = l(x) + lam * mean_i || grad_x l(x_i) ||      (lambda_g from 1e-4 to 1)

with GuardLoss's call shape (``crit(model, x, y)``) and output (``GuardOutput``). The gradient
pass is the loss's extra pass: its module mode is ``bn_mode`` ("eval" by default, or "model";
see guard_fast.losses._common) and it never updates BatchNorm's running statistics (the CE
pass does, once, as in plain training).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from guard_fast import ops
from guard_fast.losses._common import TINY as _TINY
from guard_fast.losses._common import (GuardOutput, check_bn_mode, check_finite_input,
                                       check_inputs, extra_passes, logits_of, raise_nonfinite,
                                       stable_cross_entropy, unwrap)

__all__ = ["GradNormLoss", "grad_norm_loss"]

GR_MODES = ("exact", "official")


def _resolve(*, lam, mode, bn_mode) -> dict:
    """Check GR's options (shared by the module and the function, so a bad option fails at
    construction); bn_mode comes back in its canonical spelling."""
    if mode not in GR_MODES:
        raise ValueError(f"mode must be 'exact' or 'official', got {mode!r}")
    bn_mode = check_bn_mode(bn_mode, aliases=True)
    if not (math.isfinite(lam) and lam >= 0):
        raise ValueError(f"lam must be a finite number >= 0, got {lam}")
    return dict(lam=lam, mode=mode, bn_mode=bn_mode)


def grad_norm_loss(model: nn.Module, x: Tensor, y: Tensor, *, lam: float = 1e-2,
                   mode: str = "exact", bn_mode: str = "eval", check: bool = True,
                   return_parts: bool = False):
    """CE + lam * mean_i ||grad_x l(x_i)||: gradient-norm regularization (GR).

    mode="exact": per-sample CE gradients, the penalty differentiated by double backprop.
    mode="official": what the public code computes: the gradient of the batch-MEAN CE (each
    norm carries 1/B), read through ``.grad.data`` and so DETACHED: the term adds a constant to
    the loss and contributes no gradient (the public GR runs train like plain CE).
    bn_mode: module mode of the gradient pass, "eval" or "model" ("train": older spelling).
    check: validate labels and raise on a non-finite penalty (host syncs).
    """
    bn_mode = _resolve(lam=lam, mode=mode, bn_mode=bn_mode)["bn_mode"]
    check_inputs(model, x, y)
    y = y.long()
    n = x.shape[0]
    if check:
        check_finite_input(x)
    ce = F.cross_entropy(logits_of(model, x, y if check else None), y)
    net = unwrap(model)
    need = torch.is_grad_enabled() and mode == "exact"
    with extra_passes(net, bn_mode, update_running_stats=False):
        xa = x.detach().requires_grad_(True)
        l0 = (stable_cross_entropy(net(xa), y).sum() if mode == "exact"
              else F.cross_entropy(net(xa), y))
        (g,) = torch.autograd.grad(l0, xa, create_graph=need)
    norms = ops.sqdiff_norm(g, torch.zeros_like(g)).clamp_min(_TINY * _TINY).sqrt()
    pen = lam * norms.mean()
    if mode == "official":
        pen = pen.detach()
    loss = ce + pen
    if check and not bool(torch.isfinite(pen.detach())):
        raise_nonfinite(ce.detach(), pen.detach(), norms.mean(), x, "gr-" + mode)
    if return_parts:
        gn = norms.mean() * (n if mode == "official" else 1)
        return GuardOutput(loss, ce.detach(), pen.detach(), gn.detach())
    return loss


class GradNormLoss(nn.Module):
    """CE + lam * mean ||grad_x l||; see :func:`grad_norm_loss`."""

    def __init__(self, lam: float = 1e-2, mode: str = "exact", *, bn_mode: str = "eval",
                 check: bool = True):
        super().__init__()
        self.kw = _resolve(lam=lam, mode=mode, bn_mode=bn_mode)
        self.kw["check"] = check

    def forward(self, model: nn.Module, x: Tensor, y: Tensor, return_parts: bool = False):
        return grad_norm_loss(model, x, y, return_parts=return_parts, **self.kw)

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v!r}" for k, v in self.kw.items())
