"""Fixed subsets of a dataset as tensors: the same images for every method of a run.

The pipeline evaluates every student on one draw of validation images, and the Table-4
bench times every regularizer on one draw of training images. The draw is class-stratified
(data sets are often stored sorted by class, so the first n would be one or two classes):
each class gets its share of n (largest remainders break ties, the lowest class first), its
images picked by a seeded permutation, and the subset is kept in dataset order.
"""
from __future__ import annotations

import numpy as np
import torch
from torch.utils.data import Dataset

__all__ = ["fixed_subset", "stratified_indices", "dataset_labels"]

# offset of the subset's seed from the run seed, so the draw is independent of the other
# streams seeded with the same run seed (training order, attacks)
_SUBSET_SEED_OFFSET = 12345


def dataset_labels(ds: Dataset) -> np.ndarray:
    """Every item's label, without decoding images where the dataset keeps its targets."""
    t = getattr(ds, "targets", None)
    if t is not None and len(t) == len(ds):
        return np.asarray(t, dtype=np.int64)
    return np.asarray([int(ds[i][1]) for i in range(len(ds))], dtype=np.int64)


def stratified_indices(labels: np.ndarray, n: int, seed: int) -> np.ndarray:
    """Sorted indices of n items, each class's share proportional to its size (largest
    remainders rounding, ties to the lower class), drawn in each class by `seed`."""
    labels = np.asarray(labels)
    if n >= len(labels):
        return np.arange(len(labels))
    classes, counts = np.unique(labels, return_counts=True)
    exact = counts * n / len(labels)
    take = np.floor(exact).astype(np.int64)
    order = np.lexsort((classes, -(exact - take)))   # largest remainder first, then class
    take[order[: n - int(take.sum())]] += 1
    rng = np.random.default_rng(seed)
    picked = [rng.permutation(np.flatnonzero(labels == c))[:k] for c, k in zip(classes, take)]
    return np.sort(np.concatenate(picked))


def fixed_subset(ds: Dataset, n: int | None, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(images, labels) of n items of ds, class-stratified, drawn once by `seed`, in dataset
    order; n None or >= len(ds): all of it. images stacked (N, C, H, W), labels int64 (N,)."""
    if n is not None and n < 1:
        raise ValueError(f"a subset needs n >= 1 images, got {n}")
    if n is None or n >= len(ds):
        idx = np.arange(len(ds))
    else:
        idx = stratified_indices(dataset_labels(ds), n, seed + _SUBSET_SEED_OFFSET)
    xs, ys = zip(*(ds[int(i)] for i in idx))
    return torch.stack(xs), torch.tensor(ys, dtype=torch.int64)
