"""guard_fast: fast, faithful adversarially robust dataset distillation (GUARD).

The drop-in loss::

    from guard_fast import GuardLoss
    crit = GuardLoss(h=3.0, lam=100.0)      # Eq. 11 of Xue et al., AAAI 2025
    loss = crit(model, x, y)                 # CE + curvature penalty, one scalar
    loss.backward()
"""
from guard_fast import attacks, ops
from guard_fast.attacks import (APGD, APGDT, CW, FAB, MIM, PGD, PROTOCOLS, Attack, AutoAttack,
                                CWLinf, Square, get_attack, get_protocol)
from guard_fast.evaluate import format_table, robust_eval
from guard_fast.losses import (MODES, AdvOutput, FBFLoss, GradNormLoss, GuardLoss, GuardOutput,
                               PGDATLoss, TRADESLoss, compile_guard_step, grad_norm_loss,
                               guard_loss, guard_penalty_reference, stable_cross_entropy)

__version__ = "0.1.0"


def run_pipeline(*args, **kwargs):
    """The whole pipeline (guard_fast.pipeline.run_pipeline); imported on first use."""
    from guard_fast.pipeline import run_pipeline as _run

    return _run(*args, **kwargs)

__all__ = ["attacks", "Attack", "PGD", "MIM", "CW", "CWLinf", "Square", "APGD", "APGDT", "FAB",
           "AutoAttack", "get_attack", "get_protocol", "PROTOCOLS", "robust_eval", "format_table",
           "PGDATLoss", "TRADESLoss", "FBFLoss", "AdvOutput",
           "GuardLoss", "guard_loss", "GradNormLoss", "grad_norm_loss", "GuardOutput",
           "guard_penalty_reference", "compile_guard_step", "stable_cross_entropy", "MODES", "ops", "run_pipeline", "__version__"]
