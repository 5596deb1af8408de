"""What every loss in guard_fast.losses shares: the input checks, the DDP unwrap, the
BatchNorm-mode vocabulary and the one context manager that applies it, the numerically
stable cross-entropy, and the output tuple of the regularized losses.

BatchNorm mode. Each loss here runs *extra passes* besides its training forward: GUARD's
penalty passes, the gradient-norm pass, the adversarial losses' crafting passes. ``bn_mode``
says which module mode those passes run in, with one meaning for every loss:

  "eval"   every module in eval mode (BatchNorm uses its running statistics, dropout is
           off), each module's own flag restored afterwards, also on error; running
           statistics are not touched. What the GUARD paper's code does for the penalty.
  "model"  the model as the caller left it (in a training loop: train mode, so BatchNorm
           normalizes with the batch's statistics). What the public GUARD code does while
           crafting adversarial examples.

Whether the extra passes in "model" mode also *update* the running statistics is the one
thing that differs between losses, and each says so: GUARD and gradient-norm update them
once per step, as a plain CE step would (their extra passes are frozen); the adversarial
losses update them on every crafting forward, as the public code's train-mode crafting does.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import NamedTuple

import torch
from torch import Tensor, nn

from guard_fast.attacks.base import eval_mode

BN_MODES = ("eval", "model")
#: older spellings, accepted where they were accepted before: GuardLoss and GradNormLoss
#: (and so squeeze's --bn-mode) called "model" "train"
BN_MODE_ALIASES = {"train": "model"}

TINY = 1e-12


class GuardOutput(NamedTuple):
    """loss = ce + penalty (differentiable); the parts are detached."""

    loss: Tensor
    ce: Tensor
    penalty: Tensor
    grad_norm: Tensor  # mean over the batch of ||grad_x l(x_i)||, per-sample CE gradients


def check_bn_mode(bn_mode, *, aliases: bool) -> str:
    """The canonical name of `bn_mode` (one of BN_MODES); `aliases`: also accept the older
    spellings of BN_MODE_ALIASES."""
    if aliases and bn_mode in BN_MODE_ALIASES:
        return BN_MODE_ALIASES[bn_mode]
    if bn_mode not in BN_MODES:
        also = (" (or " + ", ".join(f"{k!r} for {v!r}" for k, v in BN_MODE_ALIASES.items())
                + ")") if aliases else ""
        raise ValueError(f"bn_mode must be one of {BN_MODES}{also}, got {bn_mode!r}")
    return bn_mode


@contextmanager
def extra_passes(net: nn.Module, bn_mode: str, *, update_running_stats: bool):
    """The module mode of a loss's extra passes (see the module docstring): "eval", or
    "model" with BatchNorm's running statistics updated by them or left alone."""
    if bn_mode == "eval":
        with eval_mode(net, freeze_params=False):
            yield
    elif update_running_stats:
        yield
    else:
        with frozen_running_stats(net):
            yield


@contextmanager
def frozen_running_stats(net: nn.Module):
    """BatchNorm layers in train mode use batch statistics but leave running stats alone
    (in eval mode they use the running statistics either way)."""
    bns = [m for m in net.modules()
           if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
    for m in bns:
        m.track_running_stats = False
    try:
        yield
    finally:
        for m in bns:
            m.track_running_stats = True


def unwrap(model: nn.Module) -> nn.Module:
    """The module under DistributedDataParallel. Extra passes bypass DDP: crafting needs
    input gradients only (no all-reduce), and the penalty's parameter gradients reach the
    parameters through the returned loss's backward, where DDP's hooks see them like any
    other. A torch.compile'd module is not unwrapped: the first-order modes run its compiled
    graph (double backprop goes through compile_guard_step instead)."""
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def check_inputs(model, x, y) -> None:
    """model an nn.Module, x (N, ...) floating point, y (N,) integer labels on x's device."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module classifier, got {type(model).__name__}")
    if not isinstance(x, Tensor) or not x.is_floating_point():
        raise TypeError(f"x must be a floating-point tensor, got "
                        f"{x.dtype if isinstance(x, Tensor) else type(x).__name__}")
    if x.dim() < 2 or x.shape[0] < 1:
        raise ValueError(f"x must have shape (N, ...) with N >= 1, got {tuple(x.shape)}")
    if not isinstance(y, Tensor) or y.dtype not in (torch.int64, torch.int32, torch.int16,
                                                    torch.int8, torch.uint8):
        raise TypeError(f"y must be an integer tensor of class indices, got "
                        f"{y.dtype if isinstance(y, Tensor) else type(y).__name__}")
    if y.shape != (x.shape[0],):
        raise ValueError(f"y must have shape ({x.shape[0]},) to match x, got {tuple(y.shape)}")
    if y.device != x.device:
        raise ValueError(f"x is on {x.device} but y is on {y.device}")


def logits_of(model: nn.Module, inp: Tensor, y: Tensor | None = None) -> Tensor:
    """model(inp), checked to be (N, num_classes) logits; with `y`, also that the labels lie
    in [0, num_classes) (one host sync; CUDA would device-assert otherwise)."""
    out = model(inp)
    n = inp.shape[0]
    if not isinstance(out, Tensor) or out.dim() != 2 or out.shape[0] != n:
        shape = tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__
        raise ValueError(f"model must return logits of shape (N={n}, num_classes); got {shape}: "
                         "is it a classifier?")
    if y is not None:
        lo, hi = torch.aminmax(y)
        lo, hi = int(lo), int(hi)
        if lo < 0 or hi >= out.shape[1]:
            raise ValueError(f"labels y must lie in [0, {out.shape[1]}), got min {lo}, max {hi}")
    return out


def stable_cross_entropy(logits: Tensor, y: Tensor) -> Tensor:
    """Per-sample cross-entropy whose gradient keeps full relative precision when the model
    is confident.

    F.cross_entropy's gradient for the true class is p_y - 1, which float32 rounds to 0 once
    p_y > 1 - 6e-8: on a trained teacher the input gradients of well-classified samples then
    lose their main component, and z = g/||g|| points the wrong way. Written as
        l = M + log1p(expm1(-M) + sum_{j != y} exp(a_j - M)),  a = logits - logits_y,
    M = max_j a_j (detached: l does not depend on it), autograd produces the true-class
    gradient as -sum_{j != y} p_j, accurate to float32 rounding, and double backprop works.
    Same value as F.cross_entropy(reduction="none") up to rounding; fp16/bf16 logits are
    computed in fp32, as autocast does for cross_entropy.
    """
    if logits.dtype in (torch.float16, torch.bfloat16):
        logits = logits.float()
    a = logits - logits.gather(1, y[:, None])
    m = a.max(dim=1, keepdim=True).values.detach()
    e = torch.exp(a - m).scatter(1, y[:, None], 0.0)
    m = m.squeeze(1)
    return m + torch.log1p(torch.expm1(-m) + e.sum(dim=1))


def flat_norm(t: Tensor) -> Tensor:
    """Per-sample L2 norm of an (N, ...) tensor, accumulated in fp32 at least."""
    t = t.flatten(1)
    return (t if t.dtype == torch.float64 else t.float()).norm(dim=1)


def check_finite_input(x: Tensor) -> None:
    if not bool(torch.isfinite(x).all()):
        raise ValueError("x contains NaN or inf")


def raise_nonfinite(ce, pen, gn, x, mode):
    raise FloatingPointError(
        f"GUARD penalty is not finite (mode={mode}): ce={float(ce):.6g}, penalty={float(pen):.6g}, "
        f"mean ||grad_x l||={float(gn):.6g}, max|x|={float(x.detach().abs().max()):.6g}, "
        f"batch={x.shape[0]}. Lower lam or h, or the learning rate, or use fp32.")
