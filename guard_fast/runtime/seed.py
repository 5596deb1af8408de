"""Seeding: one rule for every stage's random state."""
from __future__ import annotations

import random

import numpy as np
import torch

__all__ = ["seed_all", "epoch_seed"]


def epoch_seed(seed: int, epoch: int) -> int:
    """The seed of one epoch of a run: a function of (seed, epoch) only, so a resumed run
    draws what an uninterrupted one would."""
    return (seed * 1_000_003 + epoch) % (2**31)


def seed_all(seed: int) -> None:
    """Seed Python's, numpy's and torch's global generators."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
