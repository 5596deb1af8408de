"""MIM / MI-FGSM: momentum iterative FGSM (Dong et al., "Boosting Adversarial Attacks with
Momentum", CVPR 2018). Norm: L-inf.

Two gradient normalizations, named plainly:

* ``grad_norm="per_sample"`` (the standard algorithm; torchattacks 3.5.1 `MIFGSM`): each
  sample's gradient is divided by its own mean absolute value,
  ``g_i / mean(|g_i|)``, then ``m = g + decay * m``; step ``x + alpha * sign(m)``,
  projected as ``clamp(x0 + clamp(x - x0, -eps, eps), 0, 1)``.
* ``grad_norm="batch"`` (what GUARD's public evaluation code computed, `mim_attack` in
  yumozi/GUARD train/evaluate.py): the gradient of the batch-mean cross-entropy is divided
  by ONE L1 norm over the whole batch, ``m = decay * m + g / ||g||_1`` (sum over all
  samples and pixels), step ``x + alpha * sign(m)``, projected as
  ``clamp(clamp(x, x0 - eps, x0 + eps), 0, 1)``; no random start.

The two agree at the first step (a positive scalar does not change a sign) and differ
from the second step on whenever the samples' gradient magnitudes change by different
factors, since the batch norm then weights each sample's history differently. With
"batch" the step couples the samples, so the result depends on the batch composition
(GUARD's code ran batches of 256).

A zero gradient (a fully saturated softmax) is divided by the smallest normal float
instead of by 0, so it adds nothing to the momentum; torchattacks and the GUARD code
produce NaN images there. Everywhere else the arithmetic is theirs, bit for bit, with one
caveat for the fused step (guard_fast::mim_step, used unless the backend is "torch"): it
sums |g| in another order than torch, so the momentum may differ in its last bits, and a
step can differ only where the momentum is within that rounding of 0.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .. import ops as _ops
from ..kernels.attack_steps import mim_step_ref
from .base import Attack, check_eps, check_positive, check_steps, register_attack
from .graphs import run_steps, want_cuda_graph
from .pgd import fused_steps

__all__ = ["MIM", "GRAD_NORMS"]

GRAD_NORMS = ("per_sample", "batch")


@register_attack("mim", "mifgsm", "mi-fgsm")
class MIM(Attack):
    """MI-FGSM (Dong et al. 2018), L-inf.

    Each step is guard_fast.ops.mim_step, or its plain-PyTorch reference mim_step_ref
    (guard_fast.kernels.attack_steps) where the registry chose the "torch" backend.

    Args:
        eps: L-inf radius.
        alpha: step size.
        steps: iterations.
        decay: momentum factor mu.
        grad_norm: "per_sample" (standard, torchattacks) or "batch" (GUARD public code).
    """

    name = "MIM"
    norm = "Linf"

    def __init__(self, model, eps: float = 8 / 255, alpha: float = 2 / 255, steps: int = 10,
                 decay: float = 1.0, grad_norm: str = "per_sample", **kwargs):
        super().__init__(model, eps=check_eps(eps), **kwargs)
        self.alpha = check_eps(alpha, "alpha")
        self.steps = check_steps(steps)
        self.decay = check_positive(decay, "decay", allow_zero=True)
        if grad_norm not in GRAD_NORMS:
            raise ValueError(f"grad_norm must be one of {GRAD_NORMS}, got {grad_norm!r}")
        self.grad_norm = grad_norm

    def _attack(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        momentum = torch.zeros_like(x)
        x_adv = x.clone()
        update = _ops.direct.mim_step if fused_steps(x.device) else mim_step_ref
        per_sample = self.grad_norm == "per_sample"
        graph = want_cuda_graph(self.cuda_graph, x.device, self.steps)

        def step():
            nonlocal x_adv, momentum
            xa = x_adv.detach().requires_grad_(True)
            loss = F.cross_entropy(self.get_logits(xa), y)   # batch mean in both codes
            grad = self.input_grad(loss, xa)
            new_x, new_m = update(x_adv, x, grad, momentum, self.alpha, self.eps, self.decay,
                                  per_sample)
            if graph:   # a replayed graph reads and writes fixed buffers
                momentum.copy_(new_m)
                x_adv.copy_(new_x)
            else:
                x_adv, momentum = new_x, new_m

        run_steps(step, self.steps, graph, name=self.name)
        return x_adv
