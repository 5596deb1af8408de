"""AutoAttack (Croce & Hein, "Reliable evaluation of adversarial robustness with an ensemble
of diverse parameter-free attacks", ICML 2020): an ensemble run in sequence, each attack
only on the points every earlier attack failed to break. Norm: L-inf.

Two versions, named plainly:

* ``version="standard"`` (fra31/auto-attack `version='standard'`, the reference protocol):
  points the model already misclassifies are excluded first; then APGD-CE (100
  iterations, 1 restart), APGD-T (100 iterations, 9 target classes), FAB-T (100
  iterations, 9 target classes) and Square (5000 queries, p_init 0.8, schedule not
  rescaled, as fra31 sets it), each on the points still robust.
* ``version="torchattacks"`` (torchattacks 3.5.1 `AutoAttack(model, eps)`, what GUARD's
  public evaluation ran): the same four attacks chained by torchattacks' MultiAttack with
  its defaults: APGD-CE, APGD-T and FAB-T with 10 iterations each, n_classes=10 (so 9
  targets), Square with 5000 queries and the rescaled schedule; its floating-point order.
  torchattacks seeds with time.time() unless a seed is given; here `seed` (default 0)
  seeds every stage, so runs are reproducible.

Every stage uses the active set of its own attack, on top of the ensemble's, and FAB-T
runs its target classes side by side (same result as one after the other; see fab.py).
APGD-T keeps the reference's one-target-after-the-other order, because its random starts
are drawn from one stream whose draws depend on how many points each target leaves.
`stage_robust` holds, after a call, the number of points still robust after each stage.
"""
from __future__ import annotations

import time
from typing import Dict, List, Optional

import torch

from .apgd import APGD, APGDT
from .base import Attack, check_eps, check_steps, register_attack
from .fab import FAB
from .square import Square

__all__ = ["AutoAttack", "AA_VERSIONS"]

AA_VERSIONS = ("standard", "torchattacks")


@register_attack("autoattack", "aa", "auto-attack")
class AutoAttack(Attack):
    """AutoAttack (Croce & Hein 2020), L-inf.

    Args:
        eps: L-inf radius.
        version: "standard" (fra31) or "torchattacks" (torchattacks 3.5.1 defaults).
        n_classes: torchattacks' n_classes argument (targets = n_classes - 1); ignored
            by "standard", which targets 9 classes.
        apgd_steps, fab_steps, square_queries, n_target_classes: override the version's
            budgets (for quick checks); None keeps the version's value.
        apgd_t_batch_targets: run APGD-T's target classes side by side in one batch
            (opt-in, off in both versions; see APGDT: same verdict rule, robust accuracy
            within noise of the reference order, several times faster on a GPU).
    Other keyword arguments (mean, std, device, dtype, batch_size, seed, active_set,
    cuda_graph, conv_backward) are passed to every stage. After a call, `stage_robust` holds the points
    still robust after each stage and `stage_seconds` each stage's wall time.
    """

    name = "AutoAttack"
    norm = "Linf"

    def __init__(self, model, eps: float = 8 / 255, version: str = "standard",
                 n_classes: int = 10, apgd_steps: Optional[int] = None,
                 fab_steps: Optional[int] = None, square_queries: Optional[int] = None,
                 n_target_classes: Optional[int] = None, apgd_t_batch_targets: bool = False,
                 **kwargs):
        super().__init__(model, eps=check_eps(eps), **kwargs)
        if version not in AA_VERSIONS:
            raise ValueError(f"version must be one of {AA_VERSIONS}, got {version!r}")
        self.version = version
        self.n_classes_arg = check_steps(n_classes, "n_classes")
        sub = dict(mean=None if self._mean is None else self._mean.flatten().tolist(),
                   std=None if self._std is None else self._std.flatten().tolist(),
                   device=self.device, dtype=self.dtype, seed=self.seed,
                   active_set=self.active_set, cuda_graph=self.cuda_graph,
                   conv_backward=self.conv_backward)
        if version == "standard":
            steps, fsteps, queries, targets = 100, 100, 5000, 9
            variant, rescale = "fra31", False
        else:
            steps, fsteps, queries, targets = 10, 10, 5000, self.n_classes_arg - 1
            variant, rescale = "torchattacks", True
        steps = steps if apgd_steps is None else apgd_steps
        fsteps = fsteps if fab_steps is None else fab_steps
        queries = queries if square_queries is None else square_queries
        targets = targets if n_target_classes is None else n_target_classes
        self.stages: List[Attack] = [
            APGD(model, eps=self.eps, steps=steps, n_restarts=1, loss="ce", variant=variant, **sub),
            APGDT(model, eps=self.eps, steps=steps, n_restarts=1, n_target_classes=targets,
                  variant=variant, batch_targets=apgd_t_batch_targets, **sub),
            FAB(model, eps=self.eps, steps=fsteps, n_target_classes=targets, n_restarts=1, **sub),
            Square(model, eps=self.eps, n_queries=queries, p_init=0.8, n_restarts=1,
                   loss="margin", rescale_schedule=rescale, **sub),
        ]
        self.stage_robust: Dict[str, int] = {}
        self.stage_seconds: Dict[str, float] = {}

    def __call__(self, images, labels):
        self.stage_robust = {}
        self.stage_seconds = {}
        return super().__call__(images, labels)

    def per_sample_bytes(self, x, y) -> int:
        """The most any stage needs per point (FAB-T and batched APGD-T hold a row per
        target class)."""
        return max(stage.per_sample_bytes(x, y) for stage in self.stages)

    forward = __call__

    def _count(self, key: str, robust: torch.Tensor) -> None:
        self.stage_robust[key] = self.stage_robust.get(key, 0) + int(robust.sum())

    def _attack(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        adv = x.clone()
        with torch.no_grad():
            robust = self.get_logits(x).argmax(1) == y
        self._count("clean", robust)
        for stage in self.stages:
            t0 = time.perf_counter()
            idx = robust.nonzero().squeeze(1)
            if idx.numel() > 0:
                adv_curr = stage._attack(x[idx], y[idx])
                with torch.no_grad():
                    fooled = self.get_logits(adv_curr).argmax(1) != y[idx]
                robust[idx[fooled]] = False
                adv[idx[fooled]] = adv_curr[fooled]
            self._count(stage.name, robust)   # a host sync: the stage has finished
            self.stage_seconds[stage.name] = (self.stage_seconds.get(stage.name, 0.0)
                                              + time.perf_counter() - t0)
        return adv
