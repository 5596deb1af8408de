"""Fixed subsets of a dataset as tensors: the same images for every method of a run.

The pipeline evaluates every student on one draw of validation images, and the Table-4
bench times every regularizer on one draw of training images; drawing by a seeded
permutation (not the first n) matters because some datasets are stored sorted by class.
"""
from __future__ import annotations

import torch
from torch.utils.data import Dataset

__all__ = ["fixed_subset"]

# offset of the subset's generator from the run seed, so the draw is independent of the
# other streams seeded with the same run seed (training order, attacks)
_SUBSET_SEED_OFFSET = 12345


def fixed_subset(ds: Dataset, n: int | None, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(images, labels) of n items of ds drawn once by `seed`, in dataset order; n None or
    >= len(ds): all of it. images stacked (N, C, H, W), labels int64 (N,)."""
    idx = torch.arange(len(ds))
    if n is not None and n < len(ds):
        g = torch.Generator().manual_seed(seed + _SUBSET_SEED_OFFSET)
        idx = torch.randperm(len(ds), generator=g)[:n].sort().values
    xs, ys = zip(*(ds[int(i)] for i in idx))
    return torch.stack(xs), torch.tensor(ys)
