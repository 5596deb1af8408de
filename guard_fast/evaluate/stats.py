"""Uncertainty of accuracies: over evaluation images (one run) and over seeds (several).

- One run: an accuracy p on n images has the binomial standard error sqrt(p (1 - p) / n).
- Several seeds: mean and sample standard deviation (ddof 1) over seeds.
- A method against the reference method: the seeds are paired (seed s of both methods shares
  the seed of every stream and the same evaluation images), so the per-seed differences
  d_s = acc_method(s) - acc_reference(s) carry the comparison; their mean with a two-sided
  paired t interval, mean(d) +- t_{0.975, n-1} * sd(d) / sqrt(n). With n = 1 no interval
  exists (None). A difference is called significant only when its interval excludes zero.

The t interval treats the seeds as a sample of the training randomness; the images' own
sampling error is inside each seed's accuracy (every seed is evaluated on the same images,
so it is shared by both methods and partly cancels in the difference).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

__all__ = ["binomial_se", "mean_std", "PairedDiff", "paired_diff", "INTERVAL_METHOD"]

INTERVAL_METHOD = ("paired t interval over seeds (95%, two-sided, n - 1 degrees of freedom); "
                   "* marks a difference whose interval excludes 0")


def binomial_se(acc_pct: float, n: int) -> float:
    """Standard error (percentage points) of an accuracy acc_pct (%) measured on n images."""
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    p = min(max(acc_pct / 100.0, 0.0), 1.0)
    return 100.0 * math.sqrt(p * (1.0 - p) / n)


def mean_std(values: Sequence[float]) -> tuple[float, float | None]:
    """(mean, sample std with ddof 1); std None for a single value."""
    v = [float(x) for x in values]
    if not v:
        raise ValueError("mean_std of no values")
    m = sum(v) / len(v)
    if len(v) == 1:
        return m, None
    return m, math.sqrt(sum((x - m) ** 2 for x in v) / (len(v) - 1))


@dataclass(frozen=True)
class PairedDiff:
    """mean of the paired differences and its 95% interval (None with one pair)."""

    mean: float
    lo: float | None
    hi: float | None
    n: int

    @property
    def significant(self) -> bool:
        return self.lo is not None and (self.lo > 0 or self.hi < 0)

    def format(self, digits: int = 1) -> str:
        if self.lo is None:
            return f"{self.mean:+.{digits}f}"
        mark = "*" if self.significant else ""
        return f"{self.mean:+.{digits}f} [{self.lo:+.{digits}f}, {self.hi:+.{digits}f}]{mark}"


def _t_quantile(q: float, df: int) -> float:
    from scipy import stats

    return float(stats.t.ppf(q, df))


def paired_diff(method: Sequence[float], reference: Sequence[float],
                level: float = 0.95) -> PairedDiff:
    """Paired difference method - reference over seeds (same order), with its t interval."""
    if len(method) != len(reference):
        raise ValueError(f"paired values need the same seeds: {len(method)} vs {len(reference)}")
    d = [float(a) - float(b) for a, b in zip(method, reference)]
    m, sd = mean_std(d)
    if sd is None:
        return PairedDiff(m, None, None, 1)
    half = _t_quantile(0.5 + level / 2, len(d) - 1) * sd / math.sqrt(len(d))
    return PairedDiff(m, m - half, m + half, len(d))
