"""The training losses, side by side, all with one call shape::

    loss = crit(model, x, y)                    # one differentiable scalar
    parts = crit(model, x, y, return_parts=True)

* guard.py: GUARD's curvature regularizer (Xue et al., AAAI 2025, Eq. 11) and the public
  code's variants of it (``GuardLoss``, ``guard_loss``, ``MODES``), the straightforward
  reference every mode is tested against, and one compiled graph for a training step.
* gradnorm.py: gradient-norm regularization, the paper's Table 3 ablation (``GradNormLoss``).
* adversarial.py: the adversarial-training baselines of Table 1 and the public code
  (``PGDATLoss``, ``TRADESLoss``, ``FBFLoss``), crafting with guard_fast.attacks' PGD step.
* step.py: one training step (every pass, the backward passes, the optimizer step) eager,
  captured whole in a CUDA graph and replayed, or compiled (``TrainStep``), each falling
  back to eager with a warning where it cannot run.
* _common.py: what they share: input checks, the DDP unwrap, the numerically stable CE, and
  ``BN_MODES``, the one vocabulary of the module mode of a loss's extra passes ("eval": every
  module in eval mode; "model": the model's own mode), applied by one context manager.
"""
from guard_fast.losses._common import BN_MODES, GuardOutput, stable_cross_entropy
from guard_fast.losses.adversarial import (AdvOutput, FBFLoss, PGDATLoss, TRADESLoss, fbf_examples,
                                           fbf_loss, pgd_at_loss, pgd_examples, trades_at_loss,
                                           trades_examples)
from guard_fast.losses.gradnorm import GradNormLoss, grad_norm_loss
from guard_fast.losses.guard import (MODES, GuardLoss, compile_guard_step, guard_loss,
                                     guard_penalty_reference)
from guard_fast.losses.step import STEP_MODES, TrainStep

__all__ = ["GuardLoss", "guard_loss", "GradNormLoss", "grad_norm_loss", "GuardOutput",
           "guard_penalty_reference", "compile_guard_step", "stable_cross_entropy", "MODES",
           "BN_MODES", "TrainStep", "STEP_MODES",
           "AdvOutput", "PGDATLoss", "TRADESLoss", "FBFLoss", "pgd_at_loss", "trades_at_loss",
           "fbf_loss", "pgd_examples", "trades_examples", "fbf_examples"]
