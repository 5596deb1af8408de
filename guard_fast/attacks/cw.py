"""Carlini-Wagner attacks (Carlini & Wagner, "Towards Evaluating the Robustness of Neural
Networks", IEEE S&P 2017).

* `CW`: the L2 attack as torchattacks 3.5.1 implements it (the "CW" GUARD's public code
  ran, with c=1e-4): optimize w in tanh space, x' = (tanh(w) + 1) / 2, minimizing
  ||x' - x||_2^2 + c * f(x') with Adam, f(x') = max(Z_y - max_{i!=y} Z_i, -kappa); keep for
  each point the fooling iterate of smallest L2 distance (the clean image if none fools);
  stop the whole batch early when the total cost rose since the last of 10 checkpoints.
  No binary search over c, and the perturbation is NOT bounded by eps. Norm: L2.

  torchattacks computes max_{i!=y} Z_i as max((1 - onehot) * Z) and Z_y as
  max(onehot * Z), which compares against 0 instead of the excluded logits (so a negative
  logit counts as 0). ``margin="torchattacks"`` (default, and the "paper-code" protocol)
  keeps that; ``margin="exact"`` uses the true logits.

* `CWLinf`: PGD on the CW margin loss inside the L-inf eps-ball (the "CW-inf" of the
  robustness literature, e.g. Zhang et al. 2019, Rice et al. 2020): maximize
  min(max_{i!=y} Z_i - Z_y, kappa) by signed-gradient steps with projection. Each point
  keeps the first iterate that fools the model (else the last iterate), so points that are
  already fooled may leave the batch (active set) without changing any result. Norm: L-inf.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .base import Attack, check_eps, check_positive, check_steps, register_attack
from .. import ops as _ops
from ..kernels.attack_steps import pgd_step_ref
from .pgd import fused_steps, random_start_linf

__all__ = ["CW", "CWLinf", "cw_margin", "MARGINS"]

MARGINS = ("torchattacks", "exact")


def cw_margin(logits: torch.Tensor, labels: torch.Tensor, kappa: float,
              margin: str = "exact") -> torch.Tensor:
    """f = max(Z_y - max_{i!=y} Z_i, -kappa) per sample (N,)."""
    if margin == "torchattacks":
        one_hot = torch.eye(logits.shape[1], device=logits.device, dtype=logits.dtype)[labels]
        other = torch.max((1 - one_hot) * logits, dim=1)[0]
        real = torch.max(one_hot * logits, dim=1)[0]
    elif margin == "exact":
        real = logits.gather(1, labels[:, None]).squeeze(1)
        mask = torch.zeros_like(logits, dtype=torch.bool).scatter_(1, labels[:, None], True)
        other = logits.masked_fill(mask, float("-inf")).max(dim=1)[0]
    else:
        raise ValueError(f"margin must be one of {MARGINS}, got {margin!r}")
    return torch.clamp(real - other, min=-kappa)


@register_attack("cw", "cwl2", "cw-l2", "carlini-wagner")
class CW(Attack):
    """CW L2 (Carlini & Wagner 2017), torchattacks 3.5.1 semantics; unbounded (no eps).

    Args:
        c: weight of the classification term.
        kappa: confidence margin.
        steps: Adam steps.
        lr: Adam learning rate.
        margin: "torchattacks" (its zero-masked max, default) or "exact".
    The early stop reads the batch cost on the host every max(steps // 10, 1) steps (the
    semantics need it); the batch is one unit, so there is no active set.
    """

    name = "CW"
    norm = "L2"
    eps_bounded = False

    def __init__(self, model, c: float = 1.0, kappa: float = 0.0, steps: int = 50,
                 lr: float = 0.01, margin: str = "torchattacks", **kwargs):
        if "eps" in kwargs:
            raise TypeError("CW (L2) is not bounded by eps and takes no eps; use CWLinf for "
                            "the eps-bounded CW attack")
        super().__init__(model, eps=None, **kwargs)
        self.c = check_positive(c, "c", allow_zero=True)
        self.kappa = check_positive(kappa, "kappa", allow_zero=True)
        self.steps = check_steps(steps)
        self.lr = check_positive(lr, "lr")
        if margin not in MARGINS:
            raise ValueError(f"margin must be one of {MARGINS}, got {margin!r}")
        self.margin = margin

    def _attack(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        # w = atanh(2x - 1) written as torchattacks writes it (pixels at 0 or 1 give +-inf,
        # whose tanh gradient is 0, so they stay put).
        u = torch.clamp(x * 2 - 1, min=-1, max=1)
        w = (0.5 * torch.log((1 + u) / (1 - u))).detach().requires_grad_(True)
        best_adv = x.clone()
        best_l2 = torch.full((x.shape[0],), 1e10, device=x.device, dtype=x.dtype)
        prev_cost = 1e10
        optimizer = torch.optim.Adam([w], lr=self.lr)
        check_every = max(self.steps // 10, 1)
        for step in range(self.steps):
            adv = 0.5 * (torch.tanh(w) + 1)
            cur_l2 = F.mse_loss(adv.flatten(1), x.flatten(1), reduction="none").sum(dim=1)
            logits = self.get_logits(adv)
            f = cw_margin(logits, y, self.kappa, self.margin)
            cost = cur_l2.sum() + self.c * f.sum()
            optimizer.zero_grad()
            with self.conv_backward_block(w.device):
                cost.backward()
            optimizer.step()
            with torch.no_grad():
                better = (logits.argmax(1) != y) & (best_l2 > cur_l2)
                best_l2 = torch.where(better, cur_l2, best_l2)
                best_adv = torch.where(better.view(-1, *[1] * (x.dim() - 1)), adv, best_adv)
            if step % check_every == 0:
                cost_now = float(cost.detach())         # the early-stop rule needs the value
                if cost_now > prev_cost:
                    return best_adv
                prev_cost = cost_now
        return best_adv


@register_attack("cwlinf", "cw-linf", "cwinf", "cw-inf")
class CWLinf(Attack):
    """PGD on the CW margin loss in the L-inf eps-ball (CW-inf), with early stopping per
    point and an active set.

    Args:
        eps: L-inf radius.
        alpha: step size (default eps / 4).
        steps: gradient steps.
        kappa: the loss min(max_{i!=y} Z_i - Z_y, kappa) saturates at kappa.
        random_start: uniform start in the eps-ball (generator seeded with `seed`).
        compact_every: with the active set on, fooled points leave the batch every this
            many steps (each compaction is one host sync).
    """

    name = "CWLinf"
    norm = "Linf"

    def __init__(self, model, eps: float = 8 / 255, alpha=None, steps: int = 100,
                 kappa: float = 0.0, random_start: bool = True, compact_every: int = 10,
                 **kwargs):
        super().__init__(model, eps=check_eps(eps), **kwargs)
        self.alpha = self.eps / 4 if alpha is None else check_eps(alpha, "alpha")
        self.steps = check_steps(steps)
        self.kappa = check_positive(kappa, "kappa", allow_zero=True)
        self.random_start = bool(random_start)
        self.compact_every = check_steps(compact_every, "compact_every")

    def _attack(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        eps, alpha = self.eps, self.alpha
        if self.random_start:
            g = torch.Generator(device=self.device)
            g.manual_seed(self.seed) if self.seed is not None else g.seed()
            x_adv = random_start_linf(x, eps, g)
        else:
            x_adv = x.clone()
        out = torch.empty_like(x)
        idx = torch.arange(x.shape[0], device=x.device)   # original row of each active row
        best = x_adv.clone()                              # first fooling iterate (active rows)
        found = torch.zeros(x.shape[0], dtype=torch.bool, device=x.device)
        view = (-1,) + (1,) * (x.dim() - 1)
        update = _ops.direct.pgd_step if fused_steps(x.device) else pgd_step_ref
        for step in range(self.steps + 1):
            last = step == self.steps
            x_adv.requires_grad_(not last)
            with torch.set_grad_enabled(not last):
                logits = self.get_logits(x_adv)
                fooled = logits.detach().argmax(1) != y
                new = fooled & ~found
                best = torch.where(new.view(view), x_adv.detach(), best)
                found = found | fooled
                if last:
                    break
                # min(max_{i!=y} Z_i - Z_y, kappa), summed: per-point gradients
                loss = torch.clamp(-cw_margin(logits, y, float("inf"), "exact"), max=self.kappa)
                grad = self.input_grad(loss.sum(), x_adv)
            x_adv = update(x_adv.detach(), x, grad, alpha, eps)   # the PGD step, fused
            if self.active_set and (step + 1) % self.compact_every == 0:
                keep = ~found
                n_keep = int(keep.sum())
                if n_keep < keep.shape[0]:
                    done = found.nonzero().squeeze(1)
                    out.index_copy_(0, idx[done], best[done])
                    k = keep.nonzero().squeeze(1)
                    x, y, x_adv, best, found, idx = (x[k], y[k], x_adv[k], best[k],
                                                     found[k], idx[k])
                    if n_keep == 0:
                        return out
        final = torch.where(found.view(view), best, x_adv.detach())
        out.index_copy_(0, idx, final)
        return out
