"""Numeric faults: one check for every training stage, without a host sync per step.

A NaN or Inf in an input batch, a NaN in a teacher's weights or a loss that diverges stops
the stage with :class:`NonFiniteError` (a FloatingPointError): the message names the stage,
the epoch / iteration and step, and the step's statistics (its loss parts, lr, the number
of non-finite input values); the command line prints it and exits with status 1. The
checks sit before every checkpoint write, so no checkpoint is overwritten by non-finite
weights: the last good one stays the resume point.

Use from a stage (squeeze, recover, student, dc; the experts / MTT stages the same way)::

    watch = StepWatch("student")
    for step, batch in enumerate(batches):
        ...
        watch.observe(step, x=inputs, loss=loss, lr=lr_tensor)   # on the device, no sync
    watch.check(f"epoch {epoch + 1}")          # one sync: raises on the first bad step
    check_finite_weights("student", model, f"after epoch {epoch + 1}")   # before saving

A loss function that raises on its own (GuardLoss's input and penalty checks) is turned
into the same error, with the same statistics, by :func:`as_nonfinite`.

A loss that diverges but stays finite is caught per epoch by :class:`DivergenceWatch`
(squeeze and student, ``--diverge-factor``): an epoch whose mean training loss is more than
that factor times the best epoch mean so far stops the stage with :class:`DivergedError`
(also a FloatingPointError, exit 1) before its checkpoint is written. A resumed run's watch
starts from the epochs logged in its metrics.jsonl.
"""
from __future__ import annotations

from typing import Any, Iterable

import torch
from torch import Tensor, nn

__all__ = ["NonFiniteError", "DivergedError", "StepWatch", "DivergenceWatch",
           "check_finite_weights", "check_finite_tensor", "as_nonfinite"]

_KEEP = "stopped; no checkpoint was written with these values (the last good one is the resume point)"


def _fmt(v: Any) -> str:
    return f"{v:.6g}" if isinstance(v, float) else str(v)


class NonFiniteError(FloatingPointError):
    """A non-finite value in a stage's training: where, and the step's statistics."""

    def __init__(self, stage: str, where: str, stats: dict | None = None, hint: str = ""):
        self.stage, self.where, self.stats = stage, where, dict(stats or {})
        parts = ", ".join(f"{k}={_fmt(v)}" for k, v in self.stats.items())
        super().__init__(f"{stage}: non-finite values at {where}" + (f" ({parts})" if parts else "")
                         + f"; {_KEEP}." + (f" {hint}" if hint else ""))


class DivergedError(NonFiniteError):
    """A finite training loss that grew far above its best: where, and the numbers."""

    def __init__(self, stage: str, where: str, stats: dict, hint: str = ""):
        FloatingPointError.__init__(
            self, f"{stage}: the training loss diverged at {where} (epoch mean "
            f"{_fmt(stats['epoch_loss'])} is more than {_fmt(stats['factor'])}x the best epoch "
            f"mean {_fmt(stats['best_loss'])}, epoch {stats['best_epoch']}); {_KEEP}."
            + (f" {hint}" if hint else "") + " --diverge-factor 0 turns this check off.")
        self.stage, self.where, self.stats = stage, where, dict(stats)


class DivergenceWatch:
    """Epoch-mean losses of one training run: check() raises DivergedError when one is more
    than ``factor`` times the lowest so far (factor 0: never). ``history``: (epoch, loss) of
    the epochs already done (a resumed run's metrics.jsonl rows). Non-finite means are left
    to StepWatch."""

    hint = "Lower the learning rate, or raise --diverge-factor if this loss is expected to grow."

    def __init__(self, stage: str, factor: float, history: Iterable[tuple[int, float]] = ()):
        self.stage, self.factor = stage, float(factor)
        self.best: tuple[int, float] | None = None
        for epoch, loss in history:
            self._keep(epoch, loss)

    def _keep(self, epoch: int, loss: float) -> None:
        if loss == loss and abs(loss) != float("inf") and (self.best is None
                                                           or loss < self.best[1]):
            self.best = (int(epoch), float(loss))

    def check(self, epoch: int, loss: float) -> None:
        """The epoch's (1-based) mean training loss; raises before it becomes the record."""
        if (self.factor > 0 and self.best is not None and loss == loss and self.best[1] > 0
                and loss > self.factor * self.best[1]):
            raise DivergedError(self.stage, f"epoch {epoch}",
                                {"epoch_loss": float(loss), "best_loss": self.best[1],
                                 "best_epoch": self.best[0], "factor": self.factor}, self.hint)
        self._keep(epoch, loss)


class StepWatch:
    """The first step of an epoch (or of any span between two check calls) whose scalars
    or input batch are not finite, recorded on the device: observe() adds a few tiny
    kernels and no host sync; check() syncs once and raises NonFiniteError for that step."""

    hint = "Lower the learning rate, use fp32, or check the input data."

    def __init__(self, stage: str):
        self.stage = stage
        self._first: Tensor | None = None
        self._vals: Tensor | None = None
        self._names: list[str] = []

    def observe(self, step: int, x: Tensor | None = None, **scalars: Any) -> None:
        """Record step's scalars (tensors or numbers) and, when given, the input batch x."""
        ref = next((v for v in scalars.values() if isinstance(v, Tensor)), x)
        dev = ref.device if ref is not None else torch.device("cpu")
        vals = [torch.as_tensor(v, dtype=torch.float64, device=dev).detach().reshape(())
                for v in scalars.values()]
        names = list(scalars)
        bad = ~torch.isfinite(torch.stack(vals)).all() if vals else torch.zeros((), dtype=torch.bool,
                                                                                  device=dev)
        if x is not None:
            n_bad = (~torch.isfinite(x.detach())).sum().to(torch.float64)
            vals.append(n_bad)
            names.append("nonfinite_inputs")
            bad = bad | (n_bad > 0)
        v = torch.stack(vals)
        if self._first is None or self._names != names:
            self._first = torch.full((), -1, dtype=torch.int64, device=dev)
            self._vals = torch.zeros_like(v)
            self._names = names
        new = bad & (self._first < 0)
        self._first = torch.where(new, torch.full_like(self._first, step), self._first)
        self._vals = torch.where(new, v, self._vals)

    def check(self, where: str) -> None:
        """Raise NonFiniteError naming the first bad step since the last check; reset."""
        if self._first is None:
            return
        first, vals, names = int(self._first), self._vals.tolist(), self._names
        self._first = None
        if first >= 0:
            stats = {k: (int(v) if k == "nonfinite_inputs" else v) for k, v in zip(names, vals)}
            raise NonFiniteError(self.stage, f"{where}, step {first}", stats, self.hint)


def _bad_tensors(named: Iterable[tuple[str, Tensor]]) -> list[str]:
    named = [(n, t) for n, t in named if t.is_floating_point() or t.is_complex()]
    if not named:
        return []
    ok = torch.stack([torch.isfinite(t.detach()).all() for _, t in named]).cpu()  # one sync
    return [n for (n, _), good in zip(named, ok.tolist()) if not good]


def check_finite_weights(stage: str, model: nn.Module, where: str, hint: str = "") -> None:
    """Raise NonFiniteError naming the parameters / buffers of model that hold NaN or Inf
    (call it before writing a checkpoint or after loading one)."""
    bad = _bad_tensors([*model.named_parameters(), *model.named_buffers()])
    if bad:
        shown = ", ".join(bad[:5]) + (f" and {len(bad) - 5} more" if len(bad) > 5 else "")
        raise NonFiniteError(stage, where, {"non-finite tensors": shown}, hint)


def check_finite_tensor(stage: str, name: str, t: Tensor, where: str, hint: str = "") -> None:
    """Raise NonFiniteError when t (e.g. the images being synthesized) holds NaN or Inf."""
    if _bad_tensors([(name, t)]):
        n = int((~torch.isfinite(t.detach())).sum())
        raise NonFiniteError(stage, where, {name: f"{n} non-finite of {t.numel()}"}, hint)


def as_nonfinite(stage: str, where: str, e: Exception, x: Tensor | None = None,
                 **stats: Any) -> Exception:
    """e as a NonFiniteError when it reports non-finite values (a FloatingPointError, or a
    loss's ValueError about a batch x that does hold NaN/Inf: one sync, on this error path
    only); else e itself. Raise the result."""
    if isinstance(e, NonFiniteError):
        return e
    n_bad = int((~torch.isfinite(x.detach())).sum()) if x is not None else 0
    if not isinstance(e, FloatingPointError) and n_bad == 0:
        return e
    stats = {k: float(v) if isinstance(v, (Tensor, float)) else v for k, v in stats.items()}
    if x is not None:
        stats["nonfinite_inputs"] = n_bad
    return NonFiniteError(stage, where, {**stats, "cause": str(e)}, StepWatch.hint)
