"""GUARD's curvature-regularized loss as a drop-in loss.

GUARD (Xue et al., AAAI 2025, Eq. 11) trains a classifier with

    l_R(x) = l(x) + lam * || grad_x l(x + h z) - grad_x l(x) ||^2,   z = grad_x l(x) / ||grad_x l(x)||

per sample (z detached), h = 3 and lam = 100 in the paper. ``h`` is measured in the space of
the ``x`` you pass: pixels in [0, 1] when the model normalizes inside (guard_fast.models), the
normalized space when you feed normalized tensors (as the public code does).

Three layers, as for any torch loss: ``GuardLoss`` (nn.Module), ``guard_loss`` (functional)
and the custom ops in guard_fast.ops underneath. Modes:

  exact              Eq. 11 by double backprop. Per-sample input gradients (gradient of the
                     summed CE, so no 1/B factor), penalty averaged over the batch. Two
                     penalty passes (x and x + h z) instead of the public code's three.
  fd                 the same penalty value; its parameter gradient from first-order passes
                     only (finite differences of parameter gradients along d = g1 - g0).
  official-cifar     what the public CIFAR script computes: lam * mean_i ||grad_x(mean CE(x+z)
                     - mean CE(x))_i||_2 (unsquared, each gradient carries the 1/B of the
                     batch mean), z = h (g + 1e-7) / (||g|| + 1e-7), g = grad of the mean CE.
  official-imagenet  what the public ImageNet script computes: beta * |mean CE(x+z) - mean
                     CE(x)| with beta = 1e-4; lam plays no part (the public code parses and
                     ignores it), so passing lam in this mode is an error.

As published, the penalty passes run with the model in eval mode (BatchNorm running
statistics, dropout off) while the CE term runs in the model's own mode (``bn_mode="eval"``).
``bn_mode="model"`` (older spelling: "train") runs the penalty passes in the model's own mode
too, so in training with batch statistics; then, in the exact and official-cifar modes, the CE
term reuses the first penalty pass, running statistics are updated once (by that pass, as a
plain CE step would), and the step costs one forward pass less. The vocabulary is the one of
every loss in guard_fast.losses (see _common).

Gradients. The penalty's gradient flows to the model's parameters; ``x`` is data (the CE
term's gradient still reaches ``x`` if it requires grad). With ``fused=True`` (default) the
penalty's parameter gradients are computed inside the forward call and its double-backprop
graph is freed at once; the returned loss hands them back in ``backward()`` (the way
Liger-Kernel's fused linear cross-entropy does). Peak memory is then the larger of the
penalty graph and the CE graph, not their sum, and in eval mode the penalty can also be
computed in chunks of ``chunk_size`` samples (samples are independent there). ``fused=False``
keeps one autograd graph (needed only for higher-order gradients of the loss itself).
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from guard_fast import ops
from guard_fast.losses._common import TINY as _TINY
from guard_fast.losses._common import (GuardOutput, check_bn_mode, check_finite_input,
                                       check_inputs, extra_passes, flat_norm,
                                       logits_of, raise_nonfinite, stable_cross_entropy,
                                       unwrap)

__all__ = ["GuardLoss", "guard_loss", "guard_penalty_reference", "compile_guard_step", "MODES"]

MODES = ("exact", "fd", "official-cifar", "official-imagenet")
_OFFICIAL_EPS = 1e-7  # the public code's z = h (g + 1e-7) / (||g|| + 1e-7)


class _InjectGrads(torch.autograd.Function):
    """value -> value, whose backward returns precomputed gradients for `params`, scaled by
    the incoming gradient (so loss scaling, `loss * w` and GradScaler all behave).

    The gradients are owned by this node (distinct storages, see _owned) and scaled in place,
    so handing them back costs no copy; hence backward can run once per forward.
    """

    @staticmethod
    def forward(ctx, value, grads, *params):
        ctx.grads = grads
        return value.detach().clone()

    @staticmethod
    def backward(ctx, go):
        grads = ctx.grads
        if grads is None:
            raise RuntimeError("a fused GUARD loss can be backpropagated once; for "
                               "retain_graph=True or higher-order gradients use fused=False")
        ctx.grads = None
        if torch.compiler.is_compiling():  # traced graphs: stay functional
            return (None, None) + tuple(None if g is None else g * go.to(g.dtype) for g in grads)
        return (None, None) + tuple(None if g is None else g.mul_(go.to(g.dtype)) for g in grads)


def _owned(grads: Sequence[Tensor | None]) -> list[Tensor | None]:
    """autograd.grad may return one tensor for several inputs (e.g. both sides of an add):
    clone repeats so that each gradient can be updated in place. (Under torch.compile the
    updates are out of place, so there is nothing to do.)"""
    if torch.compiler.is_compiling():
        return list(grads)
    seen: set[int] = set()
    out = []
    for g in grads:
        if g is not None:
            key = g.untyped_storage().data_ptr()
            if key in seen:
                g = g.clone()
            else:
                seen.add(key)
        out.append(g)
    return out


# ----------------------------------------------------------------------------- penalty passes


def _penalty_ce(logits: Tensor, y: Tensor) -> Tensor:
    """Summed CE of the penalty passes of our own modes: precise gradients
    (stable_cross_entropy)."""
    return stable_cross_entropy(logits, y).sum()


def _official_ce(logits: Tensor, y: Tensor) -> Tensor:
    """Summed CE as the public code computes it (official modes reproduce its arithmetic)."""
    return F.cross_entropy(logits, y, reduction="sum")


def _step_point(x: Tensor, g0: Tensor, h: float, official_cifar: bool, total_n: int):
    """(x + h z, ||g0||) per sample, z per the mode. x and g0 detached."""
    if official_cifar:
        # Public CIFAR code: g is the gradient of the batch-MEAN CE (g0 / B), and
        # z = h (g + 1e-7) / (||g|| + 1e-7) with the 1e-7s exactly where the code has them.
        gb = g0 / total_n
        nb = gb.flatten(1).norm(dim=1).view((-1,) + (1,) * (gb.dim() - 1))
        return x + h * (gb + _OFFICIAL_EPS) / (nb + _OFFICIAL_EPS), flat_norm(g0)
    return ops.perturb(x, g0, h, _TINY)


def _per_sample(sq: Tensor, official_cifar: bool, total_n: int) -> Tensor:
    """Per-sample penalty from ||g1 - g0||^2: squared (Eq. 11), or the public CIFAR code's
    ||grad_x(meanCE(x+z) - meanCE(x))_i|| = ||g1_i - g0_i|| / B (clamp: finite d sqrt at 0)."""
    return sq.clamp_min(_TINY * _TINY).sqrt() / total_n if official_cifar else sq


def _exact_chunk(net, xc, yc, h, lam, official_cifar, total_n, create_graph):
    """Penalty of one chunk via the two passes at x and x + h z. Returns (pen_sum, gn_sum)
    where pen_sum is this chunk's share of the batch-mean penalty (already / total_n)."""
    ce = _official_ce if official_cifar else _penalty_ce
    xa = xc.detach().requires_grad_(True)
    l0 = ce(logits_of(net, xa), yc)
    (g0,) = torch.autograd.grad(l0, xa, create_graph=create_graph)
    xp, n0 = _step_point(xa.detach(), g0.detach(), h, official_cifar, total_n)
    xp.requires_grad_(True)
    l1 = ce(logits_of(net, xp), yc)
    (g1,) = torch.autograd.grad(l1, xp, create_graph=create_graph)
    per = _per_sample(ops.sqdiff_norm(g1, g0), official_cifar, total_n)
    return lam * per.sum() / total_n, n0.sum()


def _fd_chunk(net, xc, yc, h, lam, total_n, need_grads, params, fd_eps, fd_scheme):
    """Penalty value from two first-order passes; its parameter gradient by finite
    differences: with d = g1 - g0 (detached), grad_theta (d . g(x)) is the parameter gradient
    of the directional derivative of l along d, so
        grad_theta pen = (2 lam / B) sum_i grad_theta [d_i . g1_i - d_i . g0_i]
                      ~= (lam / B) sum_i (1/e_i) grad_theta [l(x1+e d) - l(x1-e d) - l(x0+e d) + l(x0-e d)]
    (central; forward uses x+e d and x with 2/e). The step e_i makes ||e_i d_i|| equal to
    fd_eps * sqrt(D), i.e. an RMS per-element step of fd_eps in input units."""
    n = xc.shape[0]
    xa = xc.detach().requires_grad_(True)
    l0 = stable_cross_entropy(logits_of(net, xa), yc)
    (g0,) = torch.autograd.grad(l0.sum(), xa, retain_graph=need_grads and fd_scheme == "forward")
    xp, n0 = ops.perturb(xa.detach(), g0, h, _TINY)
    xp.requires_grad_(True)
    l1 = stable_cross_entropy(logits_of(net, xp), yc)
    (g1,) = torch.autograd.grad(l1.sum(), xp, retain_graph=need_grads and fd_scheme == "forward")
    sq = ops.sqdiff_norm(g1, g0)
    pen = lam * sq.sum() / total_n
    grads = None
    if need_grads:
        d = (g1 - g0).detach()
        dnorm = sq.sqrt()
        dim = d[0].numel()
        e = fd_eps * math.sqrt(dim) / dnorm.clamp_min(_TINY)  # (n,)
        shape = (-1,) + (1,) * (d.dim() - 1)
        step = d * e.view(shape).to(d.dtype)
        live = (dnorm > _TINY).to(e.dtype)  # a zero difference contributes no gradient
        c = live * lam / (total_n * e)  # weight of each central-difference term
        x0, x1 = xa.detach(), xp.detach()
        y2 = torch.cat([yc, yc])
        if fd_scheme == "central":
            inp = torch.cat([x1 + step, x1 - step, x0 + step, x0 - step])
            w = torch.cat([c, -c, -c, c])
            y4 = torch.cat([y2, y2])
            lf = stable_cross_entropy(net(inp), y4)
            grads = torch.autograd.grad((w.to(lf.dtype) * lf).sum(), params, allow_unused=True)
        else:  # forward: reuse the graphs of the two passes for the l(x1), l(x0) terms
            inp = torch.cat([x1 + step, x0 + step])
            w = torch.cat([2 * c, -2 * c]).to(l0.dtype)
            lf = stable_cross_entropy(net(inp), y2)
            obj = (w * lf).sum() - (2 * c.to(l1.dtype) * l1).sum() + (2 * c.to(l0.dtype) * l0).sum()
            grads = torch.autograd.grad(obj, params, allow_unused=True)
    return pen.detach(), n0.sum(), grads


def _official_imagenet(net, x, y, h, beta, need_grads, params):
    """beta * |mean CE(x + z) - mean CE(x)|, both in the penalty's mode; two passes (the public
    code runs x three times: once for z, again for the loss)."""
    n = x.shape[0]
    xa = x.detach().requires_grad_(True)
    lm0 = F.cross_entropy(logits_of(net, xa), y)
    (g,) = torch.autograd.grad(lm0, xa, retain_graph=True)
    g = g.detach()
    ng = g.flatten(1).norm(dim=1).view((-1,) + (1,) * (g.dim() - 1))
    xp = xa.detach() + h * (g + _OFFICIAL_EPS) / (ng + _OFFICIAL_EPS)
    lm1 = F.cross_entropy(net(xp), y)
    reg = beta * (lm1 - lm0).abs()
    gn = flat_norm(g).sum() * n  # per-sample CE gradients = n * gradients of the mean
    grads = torch.autograd.grad(reg, params, allow_unused=True) if need_grads else None
    return reg, gn, grads


# ----------------------------------------------------------------------------- public API


def _resolve(*, h, lam, mode, bn_mode, fused, chunk_size, beta, fd_eps, fd_scheme) -> dict:
    """Check GUARD's options and fill the per-mode defaults; shared by the module and the
    function so that a bad option fails at construction, naming the option."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    bn_mode = check_bn_mode(bn_mode, aliases=True)
    if not (isinstance(h, (int, float)) and math.isfinite(h) and h >= 0):
        raise ValueError(f"h must be a finite number >= 0, got {h!r}")
    if mode == "official-imagenet":
        if lam is not None:
            raise ValueError("mode='official-imagenet' does not use lam (the public ImageNet code "
                             "parses it and ignores it); set beta (default 1e-4) instead")
        beta = 1e-4 if beta is None else float(beta)
    else:
        if beta is not None:
            raise ValueError(f"beta is only used by mode='official-imagenet', not {mode!r}")
        lam = 100.0 if lam is None else float(lam)
        if not math.isfinite(lam) or lam < 0:
            raise ValueError(f"lam must be a finite number >= 0, got {lam}")
    if mode != "fd" and (fd_eps is not None or fd_scheme is not None):
        raise ValueError(f"fd_eps and fd_scheme are only used by mode='fd', not {mode!r}")
    if mode == "fd":
        fd_eps = 1e-3 if fd_eps is None else float(fd_eps)
        fd_scheme = "central" if fd_scheme is None else fd_scheme
        if fd_scheme not in ("central", "forward"):
            raise ValueError(f"fd_scheme must be 'central' or 'forward', got {fd_scheme!r}")
        if not fd_eps > 0:
            raise ValueError(f"fd_eps must be > 0, got {fd_eps}")
        if not fused:
            raise ValueError("mode='fd' produces its gradient by finite differences, which is "
                             "always injected: use fused=True")
    if chunk_size is not None:
        if not (isinstance(chunk_size, int) and chunk_size >= 1):
            raise ValueError(f"chunk_size must be a positive int, got {chunk_size!r}")
        if bn_mode != "eval" or mode == "official-imagenet":
            raise ValueError("chunk_size needs per-sample independent penalty passes: "
                             "bn_mode='eval' and a mode other than 'official-imagenet'")
        if not fused:
            raise ValueError("chunk_size needs fused=True (each chunk's graph is freed at once)")
    return dict(h=float(h), lam=lam, mode=mode, bn_mode=bn_mode, fused=bool(fused),
                chunk_size=chunk_size, beta=beta, fd_eps=fd_eps, fd_scheme=fd_scheme)


def guard_loss(model: nn.Module, x: Tensor, y: Tensor, *, h: float = 3.0,
               lam: float | None = None, mode: str = "exact", bn_mode: str = "eval",
               fused: bool = True, chunk_size: int | None = None, beta: float | None = None,
               fd_eps: float | None = None, fd_scheme: str | None = None, check: bool = True,
               return_parts: bool = False):
    """CE + GUARD penalty as one differentiable scalar (see the module docstring).

    Args:
        model: classifier mapping x (N, ...) to logits (N, C). A DDP wrapper is fine.
        x: inputs (N, ...), floating point; channels_last is kept.
        y: class indices (N,).
        h: step along the normalized input gradient, in x's units (paper: 3).
        lam: penalty weight (paper: 100). Not used by "official-imagenet".
        mode: "exact" | "fd" | "official-cifar" | "official-imagenet".
        bn_mode: module mode of the penalty passes: "eval" (published) or "model" (the
            model's own; "train" is accepted as its older spelling).
        fused: compute the penalty's parameter gradients now and free its graph.
        chunk_size: penalty passes in chunks of this many samples (fused, bn_mode="eval";
            exact, official-cifar, fd). Same value and gradients, less memory.
        beta: weight of "official-imagenet" (public code: 1e-4); only for that mode.
        fd_eps: RMS per-element finite-difference step in x's units ("fd" only; default 1e-3).
        fd_scheme: "central" (default) or "forward" ("fd" only).
        check: validate labels and raise on a non-finite penalty (two host syncs per call).
        return_parts: return GuardOutput(loss, ce, penalty, grad_norm) instead of the loss.
    """
    o = _resolve(h=h, lam=lam, mode=mode, bn_mode=bn_mode, fused=fused, chunk_size=chunk_size,
                 beta=beta, fd_eps=fd_eps, fd_scheme=fd_scheme)
    lam, beta, bn_mode = o["lam"], o["beta"], o["bn_mode"]
    fd_eps, fd_scheme = o["fd_eps"], o["fd_scheme"]
    check_inputs(model, x, y)
    y = y.long()
    n = x.shape[0]
    if check:
        check_finite_input(x)

    net = unwrap(model)
    params = [p for p in net.parameters() if p.requires_grad]
    need = torch.is_grad_enabled() and len(params) > 0
    chunk = n if chunk_size is None else min(chunk_size, n)

    inject = need and fused
    # With fused=True every gradient of the loss is computed here and handed back by
    # backward(); the CE graph is freed before the penalty's graph is built, so peak memory
    # is the larger of the two, not their sum. x gets the CE term's gradient only.
    x_grad_wanted = inject and x.requires_grad
    ce, ce_grads = None, None
    if bn_mode == "eval" or mode in ("fd", "official-imagenet"):
        ce = F.cross_entropy(logits_of(model, x, y if check else None), y)
        if inject:
            ce_grads = torch.autograd.grad(ce, params + [x] * x_grad_wanted, allow_unused=True)
            ce = ce.detach()

    grads = None
    if bn_mode == "model" and mode in ("exact", "official-cifar"):
        # The CE term is the first penalty pass (same inputs, same batch statistics): one
        # forward fewer. That pass updates the running statistics, once, as a CE pass would.
        with torch.enable_grad():  # input gradients are needed even for the value
            pen, gn, ce = _exact_model_mode(net, x, y, h, lam, mode == "official-cifar", n, need,
                                          check)
        if inject:
            xa = torch.autograd.grad(ce, x, retain_graph=True) if x_grad_wanted else ()
            grads = torch.autograd.grad(ce + pen, params, allow_unused=True)
            ce_grads = (None,) * len(params) + tuple(xa)
            ce, pen = ce.detach(), pen.detach()
    else:
        with extra_passes(net, bn_mode, update_running_stats=False), torch.enable_grad():
            grads, pen, gn = _penalty(net, x, y, mode, h, lam, beta, n, chunk, need, fused,
                                      params, fd_eps, fd_scheme)
    gn = gn / n
    if not need:
        pen, ce = pen.detach(), ce.detach()
    if ce_grads is not None:  # fused: one node hands back every precomputed gradient
        allg = _owned(_add(_owned(ce_grads[:len(params)]), grads) + list(ce_grads[len(params):]))
        loss = _InjectGrads.apply(ce + pen, allg, *params, *[x] * x_grad_wanted)
    else:
        loss = ce + pen
    if check and not bool(torch.isfinite(pen.detach())):
        raise_nonfinite(ce.detach(), pen.detach(), gn, x, mode)
    if return_parts:
        return GuardOutput(loss, ce.detach(), pen.detach(), gn.detach())
    return loss


def _penalty(net, x, y, mode, h, lam, beta, n, chunk, need, fused, params, fd_eps, fd_scheme):
    """Penalty passes (model already in the penalty's mode). Returns (grads, pen, gn_sum);
    grads is None unless the parameter gradients were computed here (fused / fd)."""
    grads = None
    if mode == "official-imagenet":
        pen, gn, grads = _official_imagenet(net, x, y, h, beta, need and fused, params)
        return grads, (pen.detach() if grads is not None else pen), gn
    pen, gn = 0.0, 0.0
    for s in range(0, n, chunk):
        xc, yc = x[s:s + chunk], y[s:s + chunk]
        if mode == "fd":
            pc, gc, gs = _fd_chunk(net, xc, yc, h, lam, n, need, params, fd_eps, fd_scheme)
        else:
            pc, gc = _exact_chunk(net, xc, yc, h, lam, mode == "official-cifar", n, need)
            gs = None
            if need and fused:  # free this chunk's double-backprop graph right away
                gs = torch.autograd.grad(pc, params, allow_unused=True)
                pc = pc.detach()
        if gs is not None:
            grads = _owned(gs) if grads is None else _add(grads, gs)
        pen, gn = pen + pc, gn + gc
    return grads, pen, gn


def _add(a: Sequence[Tensor | None], b: Sequence[Tensor | None]) -> list[Tensor | None]:
    """a + b elementwise over gradient lists, accumulating in place into a's tensors, which
    must be owned (_owned): no third copy of the parameter gradients."""
    if torch.compiler.is_compiling():
        return [v if u is None else (u if v is None else u + v) for u, v in zip(a, b)]
    return [v if u is None else (u if v is None else u.add_(v)) for u, v in zip(a, b)]


def _exact_model_mode(net, x, y, h, lam, official_cifar, n, create_graph, check):
    """bn_mode='model': the first penalty pass is also the CE pass (it updates running
    statistics once); the pass at x + h z uses batch statistics without updating them."""
    xa = x if x.requires_grad else x.detach().requires_grad_(True)
    ce = _official_ce if official_cifar else _penalty_ce
    l0 = ce(logits_of(net, xa, y if check else None), y)
    (g0,) = torch.autograd.grad(l0, xa, create_graph=create_graph, retain_graph=True)
    xp, n0 = _step_point(x.detach(), g0.detach(), h, official_cifar, n)
    xp.requires_grad_(True)
    with extra_passes(net, "model", update_running_stats=False):
        l1 = ce(net(xp), y)
    (g1,) = torch.autograd.grad(l1, xp, create_graph=create_graph)
    per = _per_sample(ops.sqdiff_norm(g1, g0), official_cifar, n)
    return lam * per.sum() / n, n0.sum(), l0 / n


class GuardLoss(nn.Module):
    """GUARD's curvature-regularized CE (Eq. 11) as an nn.Module.

    >>> crit = GuardLoss(h=3.0, lam=100.0, mode="exact")
    >>> loss = crit(model, x, y)          # CE + penalty, one differentiable scalar
    >>> loss.backward()

    See :func:`guard_loss` for every argument.
    """

    def __init__(self, h: float = 3.0, lam: float | None = None, mode: str = "exact", *,
                 bn_mode: str = "eval", fused: bool = True, chunk_size: int | None = None,
                 beta: float | None = None, fd_eps: float | None = None,
                 fd_scheme: str | None = None, check: bool = True):
        super().__init__()
        self.kw = _resolve(h=h, lam=lam, mode=mode, bn_mode=bn_mode, fused=fused,
                           chunk_size=chunk_size, beta=beta, fd_eps=fd_eps, fd_scheme=fd_scheme)
        if self.kw["mode"] != "fd":
            self.kw["fd_eps"] = self.kw["fd_scheme"] = None
        self.kw["check"] = check

    def forward(self, model: nn.Module, x: Tensor, y: Tensor, return_parts: bool = False):
        return guard_loss(model, x, y, return_parts=return_parts, **self.kw)

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v!r}" for k, v in self.kw.items() if v is not None)


# ----------------------------------------------------------------------------- reference


def guard_penalty_reference(model: nn.Module, x: Tensor, y: Tensor, h: float = 3.0,
                            lam: float = 100.0) -> Tensor:
    """Eq. 11's penalty written the straightforward way the public code is structured:
    a pass for z, separate create_graph passes at x + h z and at x, plain torch ops.
    The model should already be in the mode the penalty uses. Tests and benches compare
    every fused mode against this."""
    xa = x.detach().requires_grad_(True)
    l = F.cross_entropy(model(xa), y, reduction="sum")
    (g,) = torch.autograd.grad(l, xa)
    z = g / g.flatten(1).norm(dim=1).clamp_min(_TINY).view((-1,) + (1,) * (x.dim() - 1))
    x1 = (x.detach() + h * z).requires_grad_(True)
    (g1,) = torch.autograd.grad(F.cross_entropy(model(x1), y, reduction="sum"), x1,
                                create_graph=True)
    x0 = x.detach().requires_grad_(True)
    (g0,) = torch.autograd.grad(F.cross_entropy(model(x0), y, reduction="sum"), x0,
                                create_graph=True)
    return lam * (g1 - g0).flatten(1).pow(2).sum(dim=1).mean()


# ----------------------------------------------------------------------------- torch.compile


def compile_guard_step(model: nn.Module, criterion: nn.Module, **compile_kwargs):
    """One compiled graph for a GUARD training step's loss and all of its backward passes.

    Returns ``step(x, y) -> loss`` (detached) that, like ``loss.backward()``, accumulates the
    loss's parameter gradients into ``.grad``. The loss (any GuardLoss / GradNormLoss mode),
    its input-gradient passes and the parameter backward are traced by dynamo with
    ``trace_autograd_ops=True`` and ``fullgraph=True``: double backprop compiles this way,
    while ``torch.compile(model)`` alone cannot be differentiated twice (aot_autograd has no
    double backward) and so only serves the first-order modes ("fd", "official-imagenet").
    The first call compiles (tens of seconds on a CPU for a ResNet-18); later calls replay.
    """
    params = [p for p in unwrap(model).parameters() if p.requires_grad]
    if not params:
        raise ValueError("model has no parameters that require grad")

    def _grads(x, y):
        loss = criterion(model, x, y)
        return loss.detach(), torch.autograd.grad(loss, params, allow_unused=True)

    kw = dict(fullgraph=True)
    kw.update(compile_kwargs)
    compiled = torch.compile(_grads, **kw)

    def step(x: Tensor, y: Tensor) -> Tensor:
        with torch._dynamo.config.patch(trace_autograd_ops=True):
            loss, grads = compiled(x, y)
        for p, g in zip(params, grads):
            if g is not None:
                p.grad = g if p.grad is None else p.grad + g
        return loss

    return step
