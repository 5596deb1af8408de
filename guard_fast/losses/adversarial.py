"""Adversarial-training baselines the GUARD paper (Xue et al., AAAI 2025) compares against,
as drop-in losses with GuardLoss's call shape::

    crit = PGDATLoss(eps=1/255)          # "SRe2L + Adv" of Table 1
    loss = crit(model, x, y)             # x in the model's input space, y class indices
    loss.backward()

Each loss crafts its adversarial batch inside the call (gradients w.r.t. the input only:
parameter ``.grad`` is never touched while crafting) and returns a scalar that is
differentiable in the model's parameters. ``return_parts=True`` returns an ``AdvOutput``.

Three losses:

* ``PGDATLoss``: Madry et al. (ICLR 2018) PGD adversarial training, L-inf. The paper says
  only that SRe2L + Adv uses "a weak PGD attack with eps = 1/255"; the public code has no
  plain PGD-AT. So the defaults are Madry's CIFAR-10 training attack scaled to eps: 7 steps
  of alpha = eps / 4 (Madry: eps 8/255, 7 steps of 2/255), uniform random start in the eps
  ball. Crafted with every module in eval mode (BatchNorm running statistics, no dropout;
  modes restored after), the training CE then runs in the model's own mode.
* ``TRADESLoss`` and ``FBFLoss``: what the public GUARD code's ``pretrain/pretrain.py``
  computes under ``--adv t`` and ``--adv f`` (``trades_attack`` + ``trades_loss`` and
  ``fast_is_better_than_free``). These are NOT the algorithms of the TRADES (Zhang et al.
  2019) and FBF (Wong et al. 2020) papers; the quirks reproduced are listed on each class.

The inner attack. All three craft with L-inf signed-gradient steps on the batch-mean CE,
each followed by the projection onto the eps ball and the clamp to the valid box: the PGD
step of guard_fast.attacks (``kernels.attack_steps.pgd_step_ref``, the PGD step's one reference, with the box as an argument), on a
start that is each loss's own (uniform, Gaussian, none). The crafting loop is not
``attacks.PGD`` itself because training needs three things an evaluation attack does not
do: the global RNG for the start (so ``torch.manual_seed`` reproduces a run, and each step
draws anew; an Attack reseeds its own generator per call), a box other than [0, 1]
(normalized inputs), and crafting in the model's own mode (``bn_mode="model"``, the public
code's train-mode crafting; an Attack always runs the model in eval mode). The step writes
the projection as torchattacks does, x + clamp(x_adv - x, -eps, eps); the public code writes
min(max(x_adv, x - eps), x + eps). Both are the same point whenever x_adv - x is exact in
floating point (always for pixels x >= 2 eps, by Sterbenz's lemma), else within one
rounding of each other.

``bn_mode`` is the package's one vocabulary (guard_fast.losses._common): "eval" crafts with
running statistics and leaves them alone; "model" crafts in the model's own mode and, in
train mode, updates the running statistics on every crafting forward, as the public code does.

Units. The public code normalizes images in its data pipeline, so its constants (TRADES
eps 0.031, step 0.007; FBF eps = ``--h`` = 3, step 0.007) and its ``clamp(0, 1)`` act on
*normalized* tensors. To reproduce it literally, feed normalized images to a model without
a ``Normalized`` wrapper and keep ``clip=(0, 1)``. With this package's convention (models
that take [0, 1] pixels), the same defaults are pixel-unit budgets and the clamp is the
valid-pixel box.
"""
from __future__ import annotations

import math
import numbers
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from guard_fast.attacks.pgd import random_start_linf
from guard_fast.kernels.attack_steps import pgd_step_ref
from guard_fast.losses._common import (check_bn_mode, check_inputs, extra_passes, logits_of,
                                       unwrap)

__all__ = ["AdvOutput", "PGDATLoss", "TRADESLoss", "FBFLoss", "pgd_at_loss", "trades_at_loss",
           "fbf_loss", "pgd_examples", "trades_examples", "fbf_examples"]


class AdvOutput(NamedTuple):
    """``loss`` is differentiable; the other fields are detached.

    loss:   the training objective (a scalar).
    ce_adv: mean cross-entropy of the adversarial batch, as in the loss (label smoothing
            included), from the forward whose graph the loss keeps.
    robust: TRADESLoss: the unweighted KL term, sum_i KL(p(x_i) || p(x_adv_i)) / N, so that
            loss = ce_adv + beta * robust; zero for PGDATLoss and FBFLoss.
    x_adv:  the adversarial batch the loss was computed on.
    """

    loss: Tensor
    ce_adv: Tensor
    robust: Tensor
    x_adv: Tensor


# ----------------------------------------------------------------------------- checks


def _check_number(name: str, v, *, positive: bool = False, allow_none: bool = False) -> None:
    if v is None and allow_none:
        return
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        raise ValueError(f"{name} must be a finite number, got {v!r}")
    if positive and v <= 0:
        raise ValueError(f"{name} must be > 0, got {v!r}")
    if not positive and v < 0:
        raise ValueError(f"{name} must be >= 0, got {v!r}")


def _check_smoothing(label_smoothing) -> None:
    if not 0.0 <= label_smoothing <= 1.0:
        raise ValueError(f"label_smoothing must be in [0, 1], got {label_smoothing!r}")


def _check_common(eps, alpha, steps, clip, bn_mode, label_smoothing) -> tuple[float, float]:
    """The options every adversarial loss has; returns the box (lo, hi)."""
    _check_number("eps", eps)
    _check_number("alpha", alpha, positive=True, allow_none=True)
    if isinstance(steps, bool) or not isinstance(steps, numbers.Integral) or steps < 1:
        raise ValueError(f"steps must be an int >= 1, got {steps!r}")
    if clip is None or len(clip) != 2:
        raise ValueError(f"clip must be a (min, max) pair, got {clip!r}")
    lo, hi = float(clip[0]), float(clip[1])
    if not lo < hi:
        raise ValueError(f"clip must have min < max, got {clip!r}")
    check_bn_mode(bn_mode, aliases=False)  # these losses never spelled "model" otherwise
    _check_smoothing(label_smoothing)
    return lo, hi


def _options(obj: nn.Module) -> str:
    return ", ".join(f"{k}={v}" for k, v in obj.kw.items())


# ----------------------------------------------------------------------------- crafting


def _craft(model, x, y, start, *, alpha, eps, steps, lo, hi, bn_mode) -> Tensor:
    """`steps` PGD steps from `start(x)` (drawn inside the crafting mode, as the public code
    draws it after model.train()): x_adv <- pgd_step_ref(x_adv, x, grad of the mean CE), the
    attacks' L-inf step, projected onto the eps ball around x and clamped to [lo, hi].
    Input gradients only (torch.autograd.grad), on the module under DDP."""
    check_inputs(model, x, y)
    net = unwrap(model)
    x, y = x.detach(), y.long()
    with torch.enable_grad(), extra_passes(net, bn_mode, update_running_stats=True):
        x_adv = start(x)
        for _ in range(steps):
            xa = x_adv.detach().requires_grad_(True)
            (g,) = torch.autograd.grad(F.cross_entropy(logits_of(net, xa), y), xa)
            x_adv = pgd_step_ref(x_adv.detach(), x, g, alpha, eps, lo=lo, hi=hi)
    return x_adv.detach()


def _ce_output(model, x, y, x_adv, label_smoothing, return_parts):
    """CE(model(x_adv), y) in the model's own mode; robust = 0."""
    loss = F.cross_entropy(logits_of(model, x_adv), y.long(), label_smoothing=label_smoothing)
    if return_parts:
        return AdvOutput(loss, loss.detach(), loss.new_zeros(()).detach(), x_adv)
    return loss


# ----------------------------------------------------------------------------- PGD-AT


def pgd_examples(model: nn.Module, x: Tensor, y: Tensor, *, eps: float = 1 / 255,
                 alpha: float | None = None, steps: int = 7, random_start: bool = True,
                 clip: tuple[float, float] = (0.0, 1.0), bn_mode: str = "eval") -> Tensor:
    """L-inf PGD (Madry et al. 2018) examples for training: uniform start in the eps ball
    (global RNG), clamped to clip, then `steps` signed-gradient steps of alpha (default
    eps / 4) on the mean CE. Returns a detached tensor with ||x_adv - x||_inf <= eps and
    values in clip."""
    lo, hi = _check_common(eps, alpha, steps, clip, bn_mode, 0.0)
    alpha = eps / 4 if alpha is None else alpha
    if random_start and eps > 0:
        def start(x0):
            return random_start_linf(x0, eps, None, lo=lo, hi=hi)
    else:
        start = torch.clone
    return _craft(model, x, y, start, alpha=alpha, eps=eps, steps=steps, lo=lo, hi=hi,
                  bn_mode=bn_mode)


def pgd_at_loss(model: nn.Module, x: Tensor, y: Tensor, *, eps: float = 1 / 255,
                alpha: float | None = None, steps: int = 7, random_start: bool = True,
                clip: tuple[float, float] = (0.0, 1.0), bn_mode: str = "eval",
                label_smoothing: float = 0.0, return_parts: bool = False):
    """Madry PGD adversarial training: CE(model(x_adv), y) with x_adv = pgd_examples(...).
    See PGDATLoss."""
    _check_smoothing(label_smoothing)
    x_adv = pgd_examples(model, x, y, eps=eps, alpha=alpha, steps=steps,
                         random_start=random_start, clip=clip, bn_mode=bn_mode)
    return _ce_output(model, x, y, x_adv, label_smoothing, return_parts)


class PGDATLoss(nn.Module):
    """PGD adversarial training (Madry et al., ICLR 2018), L-inf: the "SRe2L + Adv" baseline
    of the GUARD paper's Table 1 (eps = 1/255).

    Args:
        eps: L-inf radius in the model's input units (1/255: the paper).
        alpha: step size; None means eps / 4 (Madry's CIFAR-10 ratio, 2/255 for 8/255).
        steps: PGD iterations (7: Madry's CIFAR-10 training attack; the paper gives none).
        random_start: start from x + U(-eps, eps), clamped to clip (Madry).
        clip: the valid input box (default [0, 1]: pixel inputs; give the normalized box for
            models fed normalized images).
        bn_mode: "eval" (default: craft with running BN statistics, modes restored after)
            or "model" (craft in the model's own mode; BN running statistics then update).
        label_smoothing: of the training CE (the crafting CE has none).

    ``forward(model, x, y, return_parts=False)`` returns the mean CE on the adversarial
    batch, run in the model's own mode; or an ``AdvOutput`` (robust = 0).
    """

    def __init__(self, eps: float = 1 / 255, alpha: float | None = None, steps: int = 7, *,
                 random_start: bool = True, clip: tuple[float, float] = (0.0, 1.0),
                 bn_mode: str = "eval", label_smoothing: float = 0.0):
        super().__init__()
        _check_common(eps, alpha, steps, clip, bn_mode, label_smoothing)
        self.kw = dict(eps=float(eps), alpha=None if alpha is None else float(alpha),
                       steps=int(steps), random_start=bool(random_start),
                       clip=(float(clip[0]), float(clip[1])), bn_mode=bn_mode,
                       label_smoothing=float(label_smoothing))

    def forward(self, model: nn.Module, x: Tensor, y: Tensor, return_parts: bool = False):
        return pgd_at_loss(model, x, y, return_parts=return_parts, **self.kw)

    extra_repr = _options


# ----------------------------------------------------------------------------- TRADES (public code)


def trades_examples(model: nn.Module, x: Tensor, y: Tensor, *, eps: float = 0.031,
                    alpha: float = 0.007, steps: int = 10, init_std: float = 0.001,
                    clip: tuple[float, float] = (0.0, 1.0), bn_mode: str = "model") -> Tensor:
    """The public code's ``trades_attack``: start at x + init_std * N(0, 1) (not clamped),
    then `steps` signed-gradient steps of alpha on the mean CE (not the KL of TRADES),
    each followed by the eps-ball projection and the clamp. The first RNG draw is
    ``torch.randn_like(x)``, as in the public code, so seeded runs match it."""
    lo, hi = _check_common(eps, alpha, steps, clip, bn_mode, 0.0)
    _check_number("init_std", init_std)
    x_adv = _craft(model, x, y, lambda x0: x0 + init_std * torch.randn_like(x0), alpha=alpha,
                   eps=eps, steps=steps, lo=lo, hi=hi, bn_mode=bn_mode)
    # the training loop's extra torch.clamp(image_adv, 0, 1): a no-op after the last step's
    # clamp (steps >= 1), kept for the record
    return x_adv.clamp(lo, hi)


def trades_at_loss(model: nn.Module, x: Tensor, y: Tensor, *, beta: float = 1e-4,
                   eps: float = 0.031, alpha: float = 0.007, steps: int = 10,
                   init_std: float = 0.001, clip: tuple[float, float] = (0.0, 1.0),
                   bn_mode: str = "model", label_smoothing: float = 0.0,
                   return_parts: bool = False):
    """CE(model(x_adv), y) + beta * KL(p(x) || p(x_adv)) as the public GUARD code computes it.
    See TRADESLoss."""
    _check_number("beta", beta)
    x_adv = trades_examples(model, x, y, eps=eps, alpha=alpha, steps=steps, init_std=init_std,
                            clip=clip, bn_mode=bn_mode)
    _check_smoothing(label_smoothing)
    y = y.long()
    # Three forwards in the public code's order: adv (for the CE), natural, adv again
    # (inside trades_loss). In train mode each updates the BN running statistics; the two
    # adv forwards give the same logits (same batch statistics) unless the model has dropout.
    ce = F.cross_entropy(logits_of(model, x_adv), y, label_smoothing=label_smoothing)
    nat = logits_of(model, x)
    adv2 = logits_of(model, x_adv)
    # F.kl_div(log q, p, "sum") / N = sum_i KL(p_i || q_i) / N with p = softmax(nat): both
    # branches carry gradient (the natural logits are not detached, as in TRADES).
    kl = F.kl_div(F.log_softmax(adv2, dim=1), F.softmax(nat, dim=1), reduction="sum") / x.shape[0]
    loss = ce + beta * kl
    if return_parts:
        return AdvOutput(loss, ce.detach(), kl.detach(), x_adv)
    return loss


class TRADESLoss(nn.Module):
    """The public GUARD code's ``--adv t`` ("TRADES") objective, reproduced.

    loss = CE_ls(model(x_adv), y)
           + beta * (1/N) sum_i KL(softmax(model(x)_i) || softmax(model(x_adv)_i))

    Public-code behaviour reproduced (pretrain/pretrain.py: trades_attack, trades_loss and
    their use in train_one_epoch):

    1. The attack maximizes the mean cross-entropy, not the KL divergence of the TRADES
       paper (Zhang et al. 2019), and starts at x + 0.001 * N(0, 1) without clamping.
    2. Attack constants are hard-coded there: eps = 0.031, step 0.007, 10 steps (TRADES's
       CIFAR values); they are not command-line arguments, and in that code they are in
       normalized units (see the module docstring).
    3. Each step projects onto the eps ball (the public code with min/max; here the attacks'
       PGD step, the same point up to one rounding: see the module docstring), then clamps
       to [0, 1] (in that code, a clamp of *normalized* images); the loop clamps once more
       (a no-op).
    4. The model stays in train mode while crafting (train_one_epoch calls model.train()):
       BatchNorm uses batch statistics and updates its running statistics on every one of
       the 10 crafting forwards. bn_mode="model" (default) reproduces this; "eval" crafts
       with running statistics and leaves them alone.
    5. The training loss makes three forwards, all in train mode: model(x_adv) for the CE
       (with the criterion's label smoothing), then model(x) and model(x_adv) inside
       trades_loss; the KL uses reduction="sum" / N, kappa = 1, and does not detach the
       natural logits. These three forwards are kept so running statistics match.
    6. The weight is ``args.beta``, whose default 1e-4 is shared with the GR and CURE
       regularizers; with it the KL term is negligible and the objective is almost plain
       CE on the adversarial batch (TRADES uses beta = 6). Default beta=1e-4 here.
    7. The attack's parameter gradients: the public code uses torch.autograd.grad w.r.t. the
       input, so parameter .grad is untouched; same here.

    Args: eps, alpha, steps, init_std (the start's noise scale), clip, bn_mode,
    label_smoothing, beta: as above. ``forward(model, x, y, return_parts=False)``.
    """

    def __init__(self, beta: float = 1e-4, eps: float = 0.031, alpha: float = 0.007,
                 steps: int = 10, *, init_std: float = 0.001,
                 clip: tuple[float, float] = (0.0, 1.0), bn_mode: str = "model",
                 label_smoothing: float = 0.0):
        super().__init__()
        _check_number("beta", beta)
        _check_number("init_std", init_std)
        _check_common(eps, alpha, steps, clip, bn_mode, label_smoothing)
        self.kw = dict(beta=float(beta), eps=float(eps), alpha=float(alpha), steps=int(steps),
                       init_std=float(init_std), clip=(float(clip[0]), float(clip[1])),
                       bn_mode=bn_mode, label_smoothing=float(label_smoothing))

    def forward(self, model: nn.Module, x: Tensor, y: Tensor, return_parts: bool = False):
        return trades_at_loss(model, x, y, return_parts=return_parts, **self.kw)

    extra_repr = _options


# ----------------------------------------------------------------------------- FBF (public code)


def fbf_examples(model: nn.Module, x: Tensor, y: Tensor, *, eps: float = 3.0,
                 alpha: float = 0.007, steps: int = 10,
                 clip: tuple[float, float] = (0.0, 1.0), bn_mode: str = "model") -> Tensor:
    """The public code's ``fast_is_better_than_free`` attack: start at x itself, then
    `steps` signed-gradient steps of alpha on the mean CE, each followed by the eps-ball
    projection and the [lo, hi] clamp."""
    lo, hi = _check_common(eps, alpha, steps, clip, bn_mode, 0.0)
    return _craft(model, x, y, torch.clone, alpha=alpha, eps=eps, steps=steps, lo=lo, hi=hi,
                  bn_mode=bn_mode)


def fbf_loss(model: nn.Module, x: Tensor, y: Tensor, *, eps: float = 3.0, alpha: float = 0.007,
             steps: int = 10, clip: tuple[float, float] = (0.0, 1.0), bn_mode: str = "model",
             label_smoothing: float = 0.0, return_parts: bool = False):
    """CE(model(x_adv), y) with the public code's FBF examples. See FBFLoss."""
    _check_smoothing(label_smoothing)
    x_adv = fbf_examples(model, x, y, eps=eps, alpha=alpha, steps=steps, clip=clip,
                         bn_mode=bn_mode)
    return _ce_output(model, x, y, x_adv, label_smoothing, return_parts)


class FBFLoss(nn.Module):
    """The public GUARD code's ``--adv f`` ("fast is better than free") objective, reproduced.

    loss = CE_ls(model(x_adv), y), x_adv from ``fbf_examples``.

    Public-code behaviour reproduced (pretrain/pretrain.py: fast_is_better_than_free):

    1. Not the FBF of Wong et al. (2020), which takes ONE FGSM step of 1.25 * eps from a
       uniform random start: this is 10 steps of 0.007 starting at x itself (no random
       start), i.e. BIM/I-FGSM.
    2. Its epsilon is ``args.h`` (the CURE/GUARD step, default 3.0; help text: "h for CURE
       method, and epsilon for FBF"), so eps defaults to 3.0 here. With 10 steps of 0.007
       the perturbation never exceeds 0.07, so the eps ball never binds at the default:
       the only effective constraints are steps * alpha and the clamp.
    3. Each step clamps to [x - eps, x + eps] and then to [0, 1] (in that code, a clamp of
       *normalized* images; see the module docstring; here the attacks' PGD step, the same
       point up to one rounding).
    4. The model stays in train mode while crafting: BatchNorm uses batch statistics and
       updates its running statistics on all 10 crafting forwards (bn_mode="model",
       default), then once more in the training forward.
    5. The optimizer: the public function takes the optimizer only to call
       ``optimizer.zero_grad()`` before each crafting ``loss.backward()``, which (besides
       the input gradient it needs) accumulates parameter gradients. train_one_epoch calls
       ``optimizer.zero_grad()`` again before the training backward, so those parameter
       gradients never reach an update. This loss form takes input gradients with
       torch.autograd.grad instead: parameter .grad is never written while crafting, so the
       optimizer step is the same. What differs: gradients already in .grad when the loss is
       called are kept here (the public code zeroes them, and its caller zeroes them anyway),
       and under DDP the public code all-reduces each crafting backward while this form
       crafts on the unwrapped module (same numbers, no gradient traffic).
    6. The crafting CE has no label smoothing; the training CE uses the criterion's.

    Args: eps (default 3.0 = args.h), alpha (0.007), steps (10), clip, bn_mode,
    label_smoothing. ``forward(model, x, y, return_parts=False)``; robust = 0.
    """

    def __init__(self, eps: float = 3.0, alpha: float = 0.007, steps: int = 10, *,
                 clip: tuple[float, float] = (0.0, 1.0), bn_mode: str = "model",
                 label_smoothing: float = 0.0):
        super().__init__()
        _check_common(eps, alpha, steps, clip, bn_mode, label_smoothing)
        self.kw = dict(eps=float(eps), alpha=float(alpha), steps=int(steps),
                       clip=(float(clip[0]), float(clip[1])), bn_mode=bn_mode,
                       label_smoothing=float(label_smoothing))

    def forward(self, model: nn.Module, x: Tensor, y: Tensor, return_parts: bool = False):
        return fbf_loss(model, x, y, return_parts=return_parts, **self.kw)

    extra_repr = _options
