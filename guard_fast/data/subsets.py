"""Fixed subsets of a dataset as tensors: the same images for every method of a run.

The pipeline evaluates every student on one draw of validation images, and the Table-4
bench times every regularizer on one draw of training images; the draw is loader's
random_subset (a seeded permutation, not the first n: some datasets are stored sorted by
class), stacked into tensors.
"""
from __future__ import annotations

import torch
from torch.utils.data import Dataset

from guard_fast.data.loader import random_subset

__all__ = ["fixed_subset"]

# offset of the subset's seed from the run seed, so the draw is independent of the other
# streams seeded with the same run seed (training order, attacks)
_SUBSET_SEED_OFFSET = 12345


def fixed_subset(ds: Dataset, n: int | None, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(images, labels) of n items of ds drawn once by `seed`, in dataset order; n None or
    >= len(ds): all of it. images stacked (N, C, H, W), labels int64 (N,)."""
    sub = random_subset(ds, len(ds) if n is None else n, seed + _SUBSET_SEED_OFFSET)
    xs, ys = zip(*(sub[i] for i in range(len(sub))))
    return torch.stack(xs), torch.tensor(ys)
