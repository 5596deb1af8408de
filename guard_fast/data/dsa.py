"""Differentiable siamese augmentation (DSA; Zhao & Bilen, ICML 2021), as MTT and TESLA train
their experts, distill and evaluate with it.

MTT's default strategy is "color_crop_cutout_flip_scale_rotate" in DSA's single mode: each
call picks ONE of the groups (color, crop, cutout, flip, scale, rotate) uniformly and applies
its operations, with parameters drawn per image. The constants are DSA's ParamDiffAug:

    color   brightness x + (b - 0.5) * 1.0; saturation (x - mean_c) * (2.0 s) + mean_c;
            contrast (x - mean) * (c + 0.5) + mean          (b, s, c ~ U[0, 1) per image)
    crop    shift by an integer in [-r, r], r = round(0.125 * side), zero beyond one pixel
            of padding (the public code clamps indices into a 1-pixel zero border)
    cutout  zero a round(0.5 * side) square centred at a uniform position
    flip    mirror horizontally with probability 0.5
    scale   affine x / y scale in [1/1.2, 1.2] (bilinear, align_corners)
    rotate  rotation by an angle in [-15, 15] degrees (bilinear, align_corners)

Every operation is differentiable in the images (the point of DSA: the synthetic images are
learned through it). Randomness is split from application: :func:`draw` samples a
:class:`Draw` from a ``torch.Generator`` and :func:`apply` applies it, so the same augmentation
can be applied twice. TESLA's per-step recomputation relies on that (its second pass must
see exactly the augmented batch of the first), and so do the finite-difference tests.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["DSA_STRATEGY", "DSA_GROUPS", "Draw", "draw", "apply", "augment", "check_strategy"]

DSA_STRATEGY = "color_crop_cutout_flip_scale_rotate"  # MTT/TESLA's default (dsa_strategy)
DSA_GROUPS = ("color", "crop", "cutout", "flip", "scale", "rotate")
# DSA's ParamDiffAug constants
_FLIP_P, _SCALE, _ROTATE_DEG, _CROP_PAD, _CUTOUT = 0.5, 1.2, 15.0, 0.125, 0.5
_BRIGHTNESS, _SATURATION, _CONTRAST = 1.0, 2.0, 0.5


@dataclass
class Draw:
    """One sampled augmentation of a batch: the chosen group and its per-image parameters."""

    group: str
    values: dict = field(default_factory=dict)


def check_strategy(strategy: str) -> tuple[str, ...]:
    """The groups of a DSA strategy string ("none" or "" for no augmentation)."""
    if strategy in ("", "none", "None"):
        return ()
    groups = tuple(strategy.split("_"))
    bad = [g for g in groups if g not in DSA_GROUPS]
    if bad:
        raise ValueError(f"unknown DSA group(s) {bad} in {strategy!r}; known: "
                         f"{', '.join(DSA_GROUPS)} joined by '_', or 'none'")
    return groups


def _u(n: int, gen: torch.Generator) -> Tensor:
    return torch.rand(n, generator=gen, dtype=torch.float64)


def draw(strategy: str, n: int, side: int, gen: torch.Generator) -> Draw | None:
    """Sample the augmentation of a batch of n images of side x side (None: no augmentation)."""
    groups = check_strategy(strategy)
    if not groups:
        return None
    g = groups[int(torch.randint(len(groups), (1,), generator=gen))]
    if g == "color":
        return Draw(g, dict(b=_u(n, gen), s=_u(n, gen), c=_u(n, gen)))
    if g == "crop":
        r = int(side * _CROP_PAD + 0.5)
        return Draw(g, dict(tx=torch.randint(-r, r + 1, (n,), generator=gen),
                            ty=torch.randint(-r, r + 1, (n,), generator=gen)))
    if g == "cutout":
        k = int(side * _CUTOUT + 0.5)
        hi = side + (1 - k % 2)
        return Draw(g, dict(ox=torch.randint(0, hi, (n,), generator=gen),
                            oy=torch.randint(0, hi, (n,), generator=gen)))
    if g == "flip":
        return Draw(g, dict(flip=_u(n, gen) < _FLIP_P))
    if g == "scale":
        lo = 1.0 / _SCALE
        return Draw(g, dict(sx=_u(n, gen) * (_SCALE - lo) + lo, sy=_u(n, gen) * (_SCALE - lo) + lo))
    return Draw(g, dict(theta=(_u(n, gen) - 0.5) * 2 * _ROTATE_DEG / 180 * math.pi))


def _per_image(v: Tensor, x: Tensor) -> Tensor:
    return v.to(device=x.device, dtype=x.dtype).view(-1, 1, 1, 1)


def _color(x: Tensor, d: dict) -> Tensor:
    x = x + (_per_image(d["b"], x) - 0.5) * _BRIGHTNESS
    m = x.mean(dim=1, keepdim=True)
    x = (x - m) * (_per_image(d["s"], x) * _SATURATION) + m
    m = x.mean(dim=(1, 2, 3), keepdim=True)
    return (x - m) * (_per_image(d["c"], x) + _CONTRAST) + m


def _shift(x: Tensor, d: dict) -> Tensor:
    """Integer translation; indices clamped into a one-pixel zero border (DSA's rand_crop).
    Returned contiguous: the gather leaves channels_last strides (as the public code's does),
    on which the CPU convolutions, pooling and norms that follow ran ~13% slower (an MTT
    unroll of crop steps, ConvNet width 32, 2-core CPU)."""
    n, _, h, w = x.shape
    pad = F.pad(x, (1, 1, 1, 1))
    ii = torch.arange(h, device=x.device).view(1, h, 1) + d["tx"].to(x.device).view(n, 1, 1)
    jj = torch.arange(w, device=x.device).view(1, 1, w) + d["ty"].to(x.device).view(n, 1, 1)
    ii = (ii + 1).clamp(0, h + 1)
    jj = (jj + 1).clamp(0, w + 1)
    b = torch.arange(n, device=x.device).view(n, 1, 1)
    return pad.permute(0, 2, 3, 1)[b, ii, jj].permute(0, 3, 1, 2).contiguous()


def _cutout(x: Tensor, d: dict) -> Tensor:
    n, _, h, w = x.shape
    kh, kw = int(h * _CUTOUT + 0.5), int(w * _CUTOUT + 0.5)
    ii = torch.arange(h, device=x.device).view(1, h, 1)
    jj = torch.arange(w, device=x.device).view(1, 1, w)
    ox = d["ox"].to(x.device).view(n, 1, 1) - kh // 2
    oy = d["oy"].to(x.device).view(n, 1, 1) - kw // 2
    # the square [ox, ox + kh) x [oy, oy + kw), clipped to the image (DSA clamps its indices)
    inside = (ii >= ox.clamp(min=0)) & (ii <= (ox + kh - 1).clamp(max=h - 1)) \
        & (jj >= oy.clamp(min=0)) & (jj <= (oy + kw - 1).clamp(max=w - 1))
    return x * (~inside).to(x.dtype).unsqueeze(1)


def _affine(x: Tensor, theta: Tensor) -> Tensor:
    grid = F.affine_grid(theta.to(device=x.device, dtype=x.dtype), list(x.shape),
                         align_corners=True)
    return F.grid_sample(x, grid, align_corners=True)


def apply(x: Tensor, d: Draw | None) -> Tensor:
    """x (N, C, H, W) augmented by d (differentiable in x); d None returns x."""
    if d is None:
        return x
    v, n = d.values, x.shape[0]
    if d.group == "color":
        return _color(x, v)
    if d.group == "crop":
        return _shift(x, v)
    if d.group == "cutout":
        return _cutout(x, v)
    if d.group == "flip":
        return torch.where(v["flip"].to(x.device).view(-1, 1, 1, 1), x.flip(3), x)
    zeros = torch.zeros(n, dtype=torch.float64)
    if d.group == "scale":
        theta = torch.stack([torch.stack([v["sx"], zeros, zeros], 1),
                             torch.stack([zeros, v["sy"], zeros], 1)], 1)
        return _affine(x, theta)
    t = v["theta"]
    theta = torch.stack([torch.stack([t.cos(), -t.sin(), zeros], 1),
                         torch.stack([t.sin(), t.cos(), zeros], 1)], 1)
    return _affine(x, theta)


def augment(x: Tensor, strategy: str, gen: torch.Generator) -> Tensor:
    """draw + apply in one call (a fresh augmentation of x)."""
    return apply(x, draw(strategy, x.shape[0], x.shape[-1], gen))


def train_epoch(net, opt, x: Tensor, y: Tensor, batch: int, gen: torch.Generator,
                strategy: str | None, loss_fn=None) -> float:
    """One epoch of SGD over tensors (x, y) in a random order from gen, each batch augmented
    by DSA (strategy None or "none": not augmented), as MTT trains its experts and its
    evaluation networks. loss_fn(net, xb, yb) -> loss (default: cross-entropy; yb may be
    class indices or soft targets). Returns the mean loss over batches."""
    net.train()
    order = torch.randperm(x.shape[0], generator=gen).to(x.device)
    total, n = 0.0, 0
    for s in range(0, x.shape[0], batch):
        i = order[s:s + batch]
        xb = augment(x[i], strategy, gen) if strategy else x[i]
        loss = loss_fn(net, xb, y[i]) if loss_fn is not None else F.cross_entropy(net(xb), y[i])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        total += float(loss.detach())
        n += 1
    return total / max(n, 1)
