"""One training criterion per teacher regularizer, shared by the stages that train on real
data with a selectable penalty (squeeze's teachers, MTT's experts).

Regularizers: guard (GuardLoss, any mode), none (plain cross-entropy), gr (GradNormLoss), and
the adversarial-training baselines pgd-at, trades, fbf (guard_fast.losses.adversarial).
"""
from __future__ import annotations

import torch.nn.functional as F

from guard_fast.losses import adversarial as at
from guard_fast.losses.gradnorm import GradNormLoss
from guard_fast.losses.guard import GuardLoss

__all__ = ["build_criterion", "Parts"]


class Parts:
    """A criterion's result: loss (differentiable), ce and penalty (detached; penalty None
    where the regularizer has none)."""

    def __init__(self, loss, ce, penalty):
        self.loss, self.ce, self.penalty = loss, ce, penalty


def build_criterion(cfg):
    """The training loss for cfg.regularizer: a callable crit(model, x, y) -> GuardOutput-like
    with .loss and .ce (and .penalty where there is one, else None).

    cfg: any settings object with SqueezeConfig's regularizer fields (regularizer, guard_mode,
    h, lam, beta, bn_mode, chunk_size, gr_lam, gr_mode, adv_eps, adv_steps, trades_beta):
    squeeze's teachers and the MTT experts train with the same losses."""
    r = cfg.regularizer
    if r == "guard":
        kw = dict(h=cfg.h, mode=cfg.guard_mode, bn_mode=cfg.bn_mode, chunk_size=cfg.chunk_size)
        if cfg.guard_mode == "official-imagenet":
            kw["beta"] = cfg.beta
        else:
            kw["lam"] = cfg.lam
        crit = GuardLoss(**kw)
        return lambda m, x, y: crit(m, x, y, return_parts=True)
    if r == "gr":
        crit = GradNormLoss(lam=cfg.gr_lam, mode=cfg.gr_mode, bn_mode=cfg.bn_mode)
        return lambda m, x, y: crit(m, x, y, return_parts=True)
    if r == "none":
        def ce(m, x, y):
            loss = F.cross_entropy(m(x), y)
            return Parts(loss, loss.detach(), None)
        return ce
    if r == "pgd-at":  # Table 1's "SRe2L + Adv": PGD-AT at eps (paper: 1/255), pixel units
        crit = at.PGDATLoss(eps=cfg.adv_eps, steps=cfg.adv_steps)
    elif r == "trades":  # the public code's TRADES variant, its constants (see losses.adversarial)
        crit = at.TRADESLoss(beta=cfg.trades_beta)
    else:  # the public code's "fast is better than free": its epsilon is args.h
        crit = at.FBFLoss(eps=cfg.h)

    def adv(m, x, y):
        o = crit(m, x, y, return_parts=True)
        return Parts(o.loss, o.ce_adv.detach(), o.robust.detach())
    return adv
