"""APGD-CE and APGD-T (Croce & Hein, "Reliable evaluation of adversarial robustness with an
ensemble of diverse parameter-free attacks", ICML 2020). Norm: L-inf.

Auto-PGD as fra31/auto-attack implements it (torchattacks 3.5.1 carries an older copy
with the same algorithm):

* random start x + eps * t / max|t|, t ~ U(-1, 1) per pixel, clipped to [0, 1];
* step size 2 * eps per point; the iterate moves with momentum 0.75 (the first step
  has none): z = P(x_k + eta * sign(g)), x_{k+1} = P(x_k + 0.75 (z - x_k) + 0.25 (x_k - x_{k-1}));
* checkpoints after p_1 = max(int(0.22 N), 1) iterations, then intervals shrinking by
  max(int(0.03 N), 1) down to max(int(0.06 N), 1); at a checkpoint a point halves its
  step size and restarts from its best point if the loss increased in at most
  rho = 0.75 of the steps since the last checkpoint, or if the step was not halved at the
  last checkpoint and the best loss has not improved since (the paper's condition 2);
* losses: cross-entropy (APGD-CE), DLR, and targeted DLR
  -(Z_y - Z_t) / (Z_pi1 - (Z_pi3 + Z_pi4) / 2) for APGD-T, run once per target class
  t = the 2nd..(n_target_classes + 1)th most likely class, on the points still robust.

Each point's trajectory depends only on its own loss and state, so points that are
already fooled leave the batch at checkpoints (active set). Whether a point is fooled is
unchanged by this; only which fooling iterate is returned can differ (the reference
returns the last fooling iterate, the active set the last one before the point left).

``variant="torchattacks"`` reproduces torchattacks' floating-point order where it differs
from fra31's (random start eps * t / max|t| vs eps * (t / (max|t| + 1e-12)), targeted-DLR
denominator Z1 - Z3/2 - Z4/2 vs Z1 - (Z3 + Z4)/2).
"""
from __future__ import annotations


import torch
import torch.nn.functional as F

from .. import ops as _ops
from .base import Attack, check_eps, check_positive, check_steps, register_attack
from .pgd import fused_steps

__all__ = ["APGD", "APGDT", "apgd_update", "dlr_loss", "dlr_loss_targeted"]

VARIANTS = ("fra31", "torchattacks")


def apgd_update(x_adv: torch.Tensor, x_adv_old: torch.Tensor, grad: torch.Tensor,
                step_size: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor,
                a: float) -> torch.Tensor:
    """One APGD L-inf momentum step.

    z = P(x_adv + step_size * sign(grad)); returns
    P(x_adv + a * (z - x_adv) + (1 - a) * (x_adv - x_adv_old)), P = clamp to [lo, hi],
    lo = max(x - eps, 0), hi = min(x + eps, 1) (the same values as fra31's clamp to the
    eps-ball then to [0, 1]). step_size: (N, 1, ...) per point; a: 1.0 at the first step,
    0.75 after. Operation order is fra31's, so results agree bit for bit. This is the
    eager step; APGD runs guard_fast.ops.apgd_step (the same arithmetic in one pass, with
    lo and hi computed from x and eps on the fly) instead unless the backend is "torch".
    """
    z = torch.sign(grad).mul_(step_size).add_(x_adv)
    z = torch.clamp(z, lo, hi)
    z.sub_(x_adv).mul_(a).add_(x_adv)
    z.add_((x_adv - x_adv_old).mul_(1.0 - a))
    return torch.clamp(z, lo, hi)


def dlr_loss(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Untargeted DLR: -(Z_y - max_{i!=y} Z_i) / (Z_pi1 - Z_pi3 + 1e-12)."""
    z_sorted, ind_sorted = logits.sort(dim=1)
    top_is_y = (ind_sorted[:, -1] == y).to(logits.dtype)
    z_y = logits.gather(1, y[:, None]).squeeze(1)
    return -(z_y - z_sorted[:, -2] * top_is_y - z_sorted[:, -1] * (1.0 - top_is_y)) / (
        z_sorted[:, -1] - z_sorted[:, -3] + 1e-12)


def dlr_loss_targeted(logits: torch.Tensor, y: torch.Tensor, y_target: torch.Tensor,
                      variant: str = "fra31") -> torch.Tensor:
    """Targeted DLR: -(Z_y - Z_t) / (Z_pi1 - (Z_pi3 + Z_pi4) / 2 + 1e-12)."""
    z_sorted = logits.sort(dim=1)[0]
    z_y = logits.gather(1, y[:, None]).squeeze(1)
    z_t = logits.gather(1, y_target[:, None]).squeeze(1)
    if variant == "torchattacks":
        den = z_sorted[:, -1] - 0.5 * z_sorted[:, -3] - 0.5 * z_sorted[:, -4] + 1e-12
    else:
        den = z_sorted[:, -1] - 0.5 * (z_sorted[:, -3] + z_sorted[:, -4]) + 1e-12
    return -(z_y - z_t) / den


@register_attack("apgd-ce", "apgd", "apgdce")
class APGD(Attack):
    """APGD (Croce & Hein 2020), L-inf, cross-entropy (or DLR) loss.

    Args:
        eps: L-inf radius.
        steps: iterations per restart (100 in AutoAttack standard, 10 in torchattacks).
        n_restarts: restarts, each on the points still robust.
        loss: "ce" or "dlr".
        rho: the oscillation threshold of the step-size rule (0.75).
        variant: "fra31" or "torchattacks" floating-point order (see module docstring).
    """

    name = "APGD-CE"
    norm = "Linf"

    def __init__(self, model, eps: float = 8 / 255, steps: int = 100, n_restarts: int = 1,
                 loss: str = "ce", rho: float = 0.75, variant: str = "fra31", **kwargs):
        super().__init__(model, eps=check_eps(eps), **kwargs)
        self.steps = check_steps(steps)
        self.n_restarts = check_steps(n_restarts, "n_restarts")
        if loss not in ("ce", "dlr"):
            raise ValueError(f"loss must be 'ce' or 'dlr', got {loss!r}")
        self.loss = loss
        self.rho = check_positive(rho, "rho")
        if variant not in VARIANTS:
            raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}")
        self.variant = variant

    # ------------------------------------------------------------------ pieces
    def _loss_indiv(self, logits, y, y_target):
        if y_target is not None:
            return dlr_loss_targeted(logits, y, y_target, self.variant)
        if self.loss == "ce":
            return F.cross_entropy(logits, y, reduction="none")
        return dlr_loss(logits, y)

    def _grad(self, x_adv, y, y_target):
        x_adv.requires_grad_(True)
        logits = self.get_logits(x_adv)
        loss = self._loss_indiv(logits, y, y_target)
        grad, = torch.autograd.grad(loss.sum(), x_adv)   # sum: per-point gradients
        x_adv.requires_grad_(False)
        return grad, logits.detach(), loss.detach()

    def _random_start(self, x, g):
        n = x.shape[0]
        view = (-1,) + (1,) * (x.dim() - 1)
        t = (2 * torch.rand(x.shape, generator=g) - 1).to(x.device, x.dtype)
        t_max = t.reshape(n, -1).abs().max(dim=1)[0].view(view)
        if self.variant == "torchattacks":
            ones = torch.ones((n,) + (1,) * (x.dim() - 1), device=x.device, dtype=x.dtype)
            x_adv = x + self.eps * ones * t / t_max
        else:
            x_adv = x + self.eps * torch.ones_like(x) * (t / (t_max + 1e-12))
        return x_adv.clamp(0.0, 1.0)

    # ------------------------------------------------------------------ one run
    def _single_run(self, x, y, y_target, g):
        """APGD on points x (all robust at the start). Returns (robust flags, adversarial
        iterates); a point's iterate is meaningful where its flag is False."""
        n_iter = self.steps
        n_iter_2 = max(int(0.22 * n_iter), 1)
        n_iter_min = max(int(0.06 * n_iter), 1)
        size_decr = max(int(0.03 * n_iter), 1)
        n = x.shape[0]
        view = (-1,) + (1,) * (x.dim() - 1)
        eps = self.eps
        fused = fused_steps(x.device)   # the fused step derives lo, hi from x and eps itself
        lo = (x - eps).clamp_(min=0.0)
        hi = (x + eps).clamp_(max=1.0)

        out_adv = torch.empty_like(x)
        out_acc = torch.empty(n, dtype=torch.bool, device=x.device)
        idx = torch.arange(n, device=x.device)

        x_adv = self._random_start(x, g)
        x_best_adv = x_adv.clone()
        loss_steps = torch.zeros(n_iter, n, device=x.device, dtype=x.dtype)
        grad, logits, loss_indiv = self._grad(x_adv, y, y_target)
        grad_best = grad.clone()
        x_best = x_adv.clone()
        acc = logits.argmax(1) == y
        loss_best = loss_indiv.clone()
        step_size = torch.full((n,) + (1,) * (x.dim() - 1), 2.0 * eps, device=x.device,
                               dtype=x.dtype)
        x_adv_old = x_adv.clone()
        k = n_iter_2
        counter3 = 0
        loss_best_last_check = loss_best.clone()
        reduced_last_check = torch.ones(n, dtype=torch.bool, device=x.device)

        for i in range(n_iter):
            a = 0.75 if i > 0 else 1.0
            if fused:
                x_new = _ops.apgd_step(x_adv, x_adv_old, grad, step_size, x, eps, a)
            else:
                x_new = apgd_update(x_adv, x_adv_old, grad, step_size, lo, hi, a)
            x_adv_old, x_adv = x_adv, x_new

            grad, logits, loss_indiv = self._grad(x_adv, y, y_target)
            pred = logits.argmax(1) == y
            acc = acc & pred
            x_best_adv = torch.where(pred.view(view), x_best_adv, x_adv)

            loss_steps[i] = loss_indiv
            improved = loss_indiv > loss_best
            x_best = torch.where(improved.view(view), x_adv, x_best)
            grad_best = torch.where(improved.view(view), grad, grad_best)
            loss_best = torch.where(improved, loss_indiv, loss_best)

            counter3 += 1
            if counter3 != k:
                continue
            # ---- checkpoint: step-size rule (conditions 1 and 2 of the paper)
            # count of increases over the last k steps; index i - j - 1 may be -1, which
            # reads the (still zero) last row, as in the reference code
            rows = torch.arange(i - k + 1, i + 1, device=x.device)
            incr = (loss_steps[rows] > loss_steps[(rows - 1) % n_iter]).sum(0)
            fl_osc = incr.to(x.dtype) <= k * self.rho
            fl_no_impr = ~reduced_last_check & (loss_best_last_check >= loss_best)
            fl = fl_osc | fl_no_impr
            reduced_last_check = fl
            loss_best_last_check = loss_best.clone()
            step_size = torch.where(fl.view(view), step_size / 2.0, step_size)
            x_adv = torch.where(fl.view(view), x_best, x_adv)
            grad = torch.where(fl.view(view), grad_best, grad)
            counter3 = 0
            k = max(k - size_decr, n_iter_min)

            if self.active_set:   # fooled points leave (one host sync per checkpoint)
                n_keep = int(acc.sum())
                if n_keep < acc.shape[0]:
                    done = (~acc).nonzero().squeeze(1)
                    out_adv.index_copy_(0, idx[done], x_best_adv[done])
                    out_acc[idx[done]] = False
                    if n_keep == 0:
                        return out_acc, out_adv
                    kp = acc.nonzero().squeeze(1)
                    (x, y, lo, hi, x_adv, x_adv_old, x_best, x_best_adv, grad, grad_best,
                     loss_best, loss_best_last_check, reduced_last_check, step_size, acc,
                     idx) = (t[kp] for t in (x, y, lo, hi, x_adv, x_adv_old, x_best,
                                             x_best_adv, grad, grad_best, loss_best,
                                             loss_best_last_check, reduced_last_check,
                                             step_size, acc, idx))
                    if y_target is not None:
                        y_target = y_target[kp]
                    loss_steps = loss_steps[:, kp]

        out_adv.index_copy_(0, idx, x_best_adv)
        out_acc[idx] = acc
        return out_acc, out_adv

    # ------------------------------------------------------------------ perturb
    def _targets(self, n_classes):
        return [None]

    def _attack(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        adv = x.clone()
        with torch.no_grad():
            logits = self.get_logits(x)
        robust = logits.argmax(1) == y
        g = self.cpu_generator()
        for target_class in self._targets(logits.shape[1]):
            for _ in range(self.n_restarts):
                idx = robust.nonzero().squeeze(1)
                if idx.numel() == 0:
                    return adv
                x_f, y_f = x[idx], y[idx]
                y_target = None
                if target_class is not None:
                    with torch.no_grad():
                        y_target = self.get_logits(x_f).sort(dim=1)[1][:, -target_class]
                acc_curr, adv_curr = self._single_run(x_f, y_f, y_target, g)
                fooled = ~acc_curr
                robust[idx[fooled]] = False
                adv[idx[fooled]] = adv_curr[fooled]
        return adv


@register_attack("apgd-t", "apgdt", "apgd-dlr-t")
class APGDT(APGD):
    """APGD-T (Croce & Hein 2020), L-inf, targeted DLR loss over the top
    `n_target_classes` non-true classes (9 in AutoAttack standard; torchattacks uses
    n_classes - 1). Needs at least 4 classes; with fewer than n_target_classes + 1
    classes, every other class is targeted once."""

    name = "APGD-T"

    def __init__(self, model, eps: float = 8 / 255, steps: int = 100, n_restarts: int = 1,
                 n_target_classes: int = 9, rho: float = 0.75, variant: str = "fra31",
                 **kwargs):
        super().__init__(model, eps=eps, steps=steps, n_restarts=n_restarts, loss="dlr",
                         rho=rho, variant=variant, **kwargs)
        self.n_target_classes = check_steps(n_target_classes, "n_target_classes")

    def _targets(self, n_classes):
        if n_classes < 4:
            raise ValueError(f"APGD-T's targeted DLR loss needs >= 4 classes; the model has "
                             f"{n_classes}")
        last = min(self.n_target_classes, n_classes - 1)
        return list(range(2, last + 2))
