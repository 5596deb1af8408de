"""PGD: projected gradient descent on the cross-entropy (Madry et al., "Towards Deep
Learning Models Resistant to Adversarial Attacks", ICLR 2018). Norm: L-inf.

Semantics are torchattacks 3.5.1's `PGD` (the attack GUARD's public evaluation ran as
"PGD - 100"): optional uniform random start in the eps-ball, then `steps` signed-gradient
steps on the batch-mean cross-entropy, each followed by projection onto the eps-ball and
the [0, 1] box; the last iterate is returned. Every point runs every step (that is the
semantics), so the active set does not apply; the step itself is made cheap instead: one
fused kernel per step (guard_fast::pgd_step, through the backend registry; with the
"torch" backend the loop calls the op's plain-PyTorch reference, pgd_step_ref in
guard_fast.kernels.attack_steps), no host syncs in the loop, and on a GPU the step
captured once in a CUDA graph and replayed (graphs.py; `cuda_graph=`), which gives the
same points.
"""
from __future__ import annotations


import torch
import torch.nn.functional as F

from .. import ops as _ops
from ..kernels.attack_steps import pgd_step_ref
from .base import Attack, check_eps, check_steps, register_attack
from .graphs import run_steps, want_cuda_graph

__all__ = ["PGD", "fused_steps"]


def fused_steps(device: torch.device) -> bool:
    """Whether the attacks' per-step tensor work goes to the fused guard_fast ops on this
    device: yes unless the registry chose (or was told) the plain-PyTorch backend, in which
    case the attacks call the ops' references (guard_fast.kernels.attack_steps, *_step_ref
    and square_window_ref: eager torch in torchattacks' and fra31's operation order)
    directly, without the ops' argument checks. Decided once per attack call, not per step."""
    return _ops.backend_for(torch.device(device).type) != "torch"


def random_start_linf(x: torch.Tensor, eps: float, generator: torch.Generator | None, *,
                      lo: float = 0.0, hi: float = 1.0) -> torch.Tensor:
    """x + U(-eps, eps), clamped to [lo, hi]; drawn on x's device like torchattacks' PGD
    (generator None: the global RNG, as adversarial training draws its starts)."""
    noise = torch.empty_like(x).uniform_(-eps, eps, generator=generator)
    return torch.clamp(x + noise, min=lo, max=hi)


@register_attack("pgd", "pgd100", "linfpgd")
class PGD(Attack):
    """PGD (Madry et al. 2018), L-inf, cross-entropy, torchattacks 3.5.1 semantics.

    Args:
        eps: L-inf radius (pixels in [0, 1]).
        alpha: step size.
        steps: number of gradient steps (any integer >= 1).
        random_start: start from a uniform point of the eps-ball. The draw uses a
            generator on the attack's device seeded with `seed`; on the CPU it equals
            torchattacks' draw after torch.manual_seed(seed).
    """

    name = "PGD"
    norm = "Linf"

    def __init__(self, model, eps: float = 8 / 255, alpha: float = 2 / 255, steps: int = 10,
                 random_start: bool = True, **kwargs):
        super().__init__(model, eps=check_eps(eps), **kwargs)
        self.alpha = check_eps(alpha, "alpha")
        self.steps = check_steps(steps)
        self.random_start = bool(random_start)

    def _generator(self) -> torch.Generator:
        g = torch.Generator(device=self.device)
        if self.seed is None:
            g.seed()
        else:
            g.manual_seed(self.seed)
        return g

    def _attack(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        eps, alpha = self.eps, self.alpha
        x_adv = random_start_linf(x, eps, self._generator()) if self.random_start else x.clone()
        update = _ops.direct.pgd_step if fused_steps(x.device) else pgd_step_ref
        graph = want_cuda_graph(self.cuda_graph, x.device, self.steps)

        def step():
            nonlocal x_adv
            xa = x_adv.detach().requires_grad_(True)
            loss = F.cross_entropy(self.get_logits(xa), y)   # batch mean, as torchattacks
            grad = self.input_grad(loss, xa)
            new = update(x_adv, x, grad, alpha, eps)
            if graph:   # a replayed graph reads and writes fixed buffers
                x_adv.copy_(new)
            else:
                x_adv = new

        run_steps(step, self.steps, graph, name=self.name)
        return x_adv
