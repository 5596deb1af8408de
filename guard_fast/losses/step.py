"""One training step (the loss's passes, every backward pass, the optimizer step) run three
ways with the same arithmetic:

  eager    zero_grad, loss = criterion(model, x, y), loss.backward(), optimizer.step()
  graph    the whole step captured once in a CUDA graph and replayed. GUARD's exact step is
           a few thousand short kernels (three forward passes, two input-gradient passes
           with create_graph, the double backward, the update); on a GPU their launch cost
           is paid on the host, in series, and a graph replay removes it without changing
           a kernel. The first `warmup` calls run eagerly on a side stream (real steps: the
           allocator and cuDNN's algorithm choice settle there, as capture requires), the
           next call is captured and replayed (guard_fast.attacks.graphs.StepLoop). Where
           capture is impossible (not a CUDA device, a host sync such as .item() in the
           model or loss, data-dependent shapes) the step warns once and runs eagerly.
  compile  the loss and all of its backward passes traced as one graph
           (guard_fast.compile_guard_step: dynamo with trace_autograd_ops, since aot_autograd
           has no double backward) and the optimizer step compiled on its own (torch's
           optimizers break the graph around step()). Compiled autograd, the other route to
           a compiled backward, cannot be used: it traces the double-backward nodes
           (ConvolutionBackwardBackward0) and fails. A step that does not compile warns
           once and runs eagerly.

In every mode a call is exactly one step: ``loss = step(x, y)`` returns the detached loss,
leaves this step's gradients in ``.grad`` and has updated the parameters. ``amp_dtype``
(bfloat16) runs the loss under autocast; ``channels_last`` converts the model once and each
batch as it arrives, so that cuDNN picks its NHWC kernels (where bf16 tensor cores pay).
"""
from __future__ import annotations

import warnings

import torch
from torch import Tensor, nn

from guard_fast.attacks.graphs import StepLoop

__all__ = ["TrainStep", "STEP_MODES"]

STEP_MODES = ("eager", "graph", "compile")
_HYPER = ("lr", "momentum", "weight_decay", "dampening", "betas", "eps")


def _loss_of(out) -> Tensor:
    """A criterion may return the loss or an object with .loss (GuardOutput, squeeze's parts)."""
    return out.loss if hasattr(out, "loss") else out


class TrainStep:
    """``step = TrainStep(model, criterion, optimizer, mode="graph")``; ``loss = step(x, y)``.

    Args:
        model: the network the criterion differentiates (its parameters are the optimizer's).
        criterion: ``criterion(model, x, y)`` -> loss, or an object with ``.loss``
            (GuardLoss, GradNormLoss, ``lambda m, x, y: F.cross_entropy(m(x), y)``).
        optimizer: a torch optimizer over the model's parameters. In graph mode its float
            hyperparameters are baked into the graph: when they change (a schedule) the next
            call captures again (once-per-change cost; a one-time warning says so).
        mode: "eager" | "graph" | "compile" (module docstring).
        amp_dtype: None (the model's dtype) or torch.bfloat16 (autocast). float16 needs a
            GradScaler, which a captured step cannot consult: not accepted.
        channels_last: convert the model and every batch to channels_last.
        warmup: graph mode: eager calls before the capture (at least 1).
    """

    def __init__(self, model: nn.Module, criterion, optimizer: torch.optim.Optimizer, *,
                 mode: str = "eager", amp_dtype: torch.dtype | None = None,
                 channels_last: bool = False, warmup: int = 2):
        if mode not in STEP_MODES:
            raise ValueError(f"mode must be one of {STEP_MODES}, got {mode!r}")
        if amp_dtype not in (None, torch.bfloat16):
            raise ValueError(f"amp_dtype must be None or torch.bfloat16, got {amp_dtype} "
                             "(float16 needs a GradScaler; use the eager training loop)")
        if not (isinstance(warmup, int) and warmup >= 1):
            raise ValueError(f"warmup must be an int >= 1, got {warmup!r}")
        self.model, self.criterion, self.opt = model, criterion, optimizer
        self.mode, self.amp_dtype, self.channels_last = mode, amp_dtype, bool(channels_last)
        if self.channels_last:
            model.to(memory_format=torch.channels_last)
        self.params = [p for g in optimizer.param_groups for p in g["params"]]
        self._warmup = warmup
        self._loop = None      # graph mode: StepLoop over the static batch
        self._static = None    # graph mode: (x, y, loss) buffers the graph reads and writes
        self._grads = None     # graph mode: the gradient tensors the graph writes
        self._hyper = None
        self._compiled = None  # compile mode: (loss-and-grads graph, optimizer step)
        self._warned = False

    # --------------------------------------------------------------------------- the step

    def _forward_backward(self, x: Tensor, y: Tensor) -> Tensor:
        dev = x.device.type
        # autocast's weight cache must be off in a captured region (its casts would outlive
        # the capture); eager and compiled steps keep it (one cast per weight per step)
        with torch.autocast(dev, dtype=self.amp_dtype or torch.bfloat16,
                            enabled=self.amp_dtype is not None,
                            cache_enabled=self.mode != "graph"):
            loss = _loss_of(self.criterion(self.model, x, y))
        loss.backward()
        return loss.detach()

    def _eager(self, x: Tensor, y: Tensor) -> Tensor:
        self.opt.zero_grad(set_to_none=True)
        loss = self._forward_backward(x, y)
        self.opt.step()
        return loss

    def __call__(self, x: Tensor, y: Tensor) -> Tensor:
        if self.channels_last and x.dim() == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        if self.mode == "graph":
            return self._graph_step(x, y)
        if self.mode == "compile":
            return self._compiled_step(x, y)
        return self._eager(x, y)

    def _fall_back(self, why: str) -> None:
        if not self._warned:
            warnings.warn(f"TrainStep(mode={self.mode!r}): {why}; running the step eagerly",
                          RuntimeWarning, stacklevel=3)
            self._warned = True
        self.mode = "eager"

    # --------------------------------------------------------------------------- graph mode

    def _hyperparameters(self) -> list:
        """The optimizer's hyperparameters as the graph saw them (a tensor by identity: its
        value is read from memory on replay)."""
        return [tuple(("tensor", id(v)) if isinstance(v, Tensor) else v
                      for v in (g.get(k) for k in _HYPER)) for g in self.opt.param_groups]

    def _graph_step(self, x: Tensor, y: Tensor) -> Tensor:
        if x.device.type != "cuda":
            self._fall_back(f"CUDA-graph capture needs a CUDA device, the batch is on {x.device}")
            return self._eager(x, y)
        if self._static is None:
            self._static = (torch.empty_like(x), torch.empty_like(y),
                            torch.zeros((), device=x.device, dtype=torch.float32))
            self._loop = StepLoop(self._static_step, graph=True, warmup=self._warmup,
                                  name="TrainStep(mode='graph')")
            self._hyper = self._hyperparameters()
        sx, sy, sloss = self._static
        if x.shape != sx.shape or y.shape != sy.shape or x.stride() != sx.stride():
            raise ValueError(f"TrainStep(mode='graph') replays a step captured for a batch of "
                             f"shape {tuple(sx.shape)}; got {tuple(x.shape)} (use a fixed "
                             "batch size, e.g. drop_last=True, or mode='eager')")
        hyper = self._hyperparameters()
        if hyper != self._hyper:  # a schedule changed lr & co.: the graph holds the old values
            if not self._warned:
                warnings.warn("TrainStep(mode='graph'): the optimizer's hyperparameters "
                              "changed, so the step is captured again (each change costs "
                              "warm-up and capture)", RuntimeWarning, stacklevel=2)
                self._warned = True
            self._loop.reset()
            self._hyper = hyper
        sx.copy_(x)
        sy.copy_(y)
        self._loop.run(1)
        if not self._loop.graph:
            self.mode = "eager"  # capture failed (StepLoop warned): later calls stay eager
        for p, g in zip(self.params, self._grads):
            p.grad = g  # a replay writes the captured gradient tensors
        return sloss.clone()

    def _static_step(self) -> None:
        sx, sy, sloss = self._static
        sloss.copy_(self._eager(sx, sy))
        self._grads = [p.grad for p in self.params]

    # --------------------------------------------------------------------------- compile mode

    def _compiled_step(self, x: Tensor, y: Tensor) -> Tensor:
        from guard_fast.losses.guard import compile_guard_step

        if self._compiled is None:
            crit = self.criterion

            def plain(m, xb, yb):  # compile_guard_step differentiates a loss tensor
                return _loss_of(crit(m, xb, yb))
            self._compiled = (compile_guard_step(self.model, plain), torch.compile(self.opt.step))
        grads_fn, opt_step = self._compiled
        self.opt.zero_grad(set_to_none=True)
        try:
            with torch.autocast(x.device.type, dtype=self.amp_dtype or torch.bfloat16,
                                enabled=self.amp_dtype is not None):
                loss = grads_fn(x, y)
        except Exception as e:  # compilation is an optimization: fall back, same result
            self._fall_back(f"the loss and its backward did not compile "
                            f"({type(e).__name__}: {str(e).splitlines()[0][:160]})")
            return self._eager(x, y)
        try:
            opt_step()
        except Exception as e:
            warnings.warn(f"TrainStep(mode='compile'): the optimizer step did not compile "
                          f"({type(e).__name__}); it runs eagerly", RuntimeWarning, stacklevel=2)
            self._compiled = (grads_fn, self.opt.step)
            self.opt.step()
        return loss
