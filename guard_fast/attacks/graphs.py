"""CUDA-graph capture of an attack's step loop.

An iterative attack on a small or medium model is launch-bound on a GPU: one PGD step of a
small CNN is a few dozen short kernels (forward, backward, the fused step) whose launch
cost exceeds their run time. Capturing one step in a CUDA graph and replaying it removes
that cost without changing a single arithmetic operation, so the adversarial examples are
the same as the eager loop's (same kernels, same order).

How a loop is run (`run_steps`): the step is a closure that reads and writes a fixed set of
state tensors in place. The first `warmup` steps run eagerly on a side stream (they are
real steps of the attack, not thrown away: the caching allocator, cuBLAS/cuDNN workspaces
and Triton's JIT settle there, as capture requires); the next step is captured (capture
records, it does not execute) and the graph is replayed for every remaining step. If the
capture fails (a model that syncs with the host, data-dependent shapes, ...), the loop
goes on eagerly from the same state with a one-time warning, so the result never depends
on whether capture worked.
"""
from __future__ import annotations

import warnings
from typing import Callable, Union

import torch

__all__ = ["CudaGraphMode", "check_cuda_graph", "want_cuda_graph", "run_steps", "StepLoop",
           "MIN_STEPS_AUTO"]

CudaGraphMode = Union[bool, str]
#: "auto" captures only loops at least this long (warm-up and capture cost a few steps)
MIN_STEPS_AUTO = 8
_WARNED = set()


def check_cuda_graph(mode) -> CudaGraphMode:
    if mode is True or mode is False or mode == "auto":
        return mode
    raise ValueError(f"cuda_graph must be True, False or 'auto', got {mode!r}")


def want_cuda_graph(mode: CudaGraphMode, device: torch.device, steps: int) -> bool:
    """Whether a loop of `steps` steps on `device` is captured. True on a non-CUDA device is
    an error (the caller asked for something that cannot happen); "auto" captures CUDA
    loops of at least MIN_STEPS_AUTO steps."""
    device = torch.device(device)
    if mode is True:
        if device.type != "cuda":
            raise ValueError(f"cuda_graph=True needs a CUDA device; the attack runs on {device} "
                             "(use cuda_graph='auto' or False)")
        return True
    if mode == "auto":
        return device.type == "cuda" and steps >= MIN_STEPS_AUTO
    return False


def _reset_rng_capture_state() -> None:
    """A capture that fails part-way never reaches the CUDA generators' capture epilogue,
    and the default generator stays marked as capturing: every later random draw on the
    device then raises ("Offset increment outside graph capture encountered unexpectedly").
    An empty capture runs the prologue and epilogue and puts the generator back into
    eager mode (its seed and offset are untouched)."""
    g = torch.cuda.CUDAGraph()
    scratch = torch.zeros(1, device="cuda")
    with torch.cuda.graph(g):
        scratch.add_(1)   # one node: an empty graph draws a warning
    del g


class StepLoop:
    """A step loop run in pieces: ``loop.run(n)`` runs `step()` n more times. For attacks
    whose loop is interrupted by host-side work between runs of plain steps (APGD's
    step-size checkpoints, FAB's and APGD's active-set compaction): the same captured step
    is replayed across pieces, and `reset()` drops it when the state tensors are rebound
    (a compaction), so the next piece captures again.

    `step` must update its state tensors in place. With graph=True the first `warmup` steps
    (counted across pieces, and again after each reset) run eagerly on a side stream, the
    next one is captured and replayed; a failed capture warns once per (name, error) and
    the loop goes on eagerly, from the same state. `replayed` counts the steps run from a
    graph, `captures` the graphs captured."""

    def __init__(self, step: Callable[[], None], graph: bool, warmup: int = 2,
                 name: str = "attack"):
        self.step = step
        self.graph = bool(graph)
        self.warmup = int(warmup)
        self.name = name
        self.replayed = 0
        self.captures = 0
        self._g = None
        self._eager_done = 0

    def reset(self) -> None:
        """Forget the captured step (its state tensors were replaced)."""
        self._g = None
        self._eager_done = 0

    def _capture(self) -> bool:
        g = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(g):
                self.step()
        except Exception as e:  # capture is an optimization: fall back, never change results
            key = (self.name, type(e).__name__)
            if key not in _WARNED:
                _WARNED.add(key)
                warnings.warn(f"{self.name}: CUDA-graph capture of the step failed "
                              f"({type(e).__name__}: {str(e)[:160]}); running the loop eagerly",
                              RuntimeWarning, stacklevel=4)
            del g
            _reset_rng_capture_state()
            torch.cuda.synchronize()
            self.graph = False
            return False
        self._g = g
        self.captures += 1
        return True

    def run(self, n: int) -> None:
        n = int(n)
        while n > 0:
            if not self.graph:
                self.step()
                n -= 1
            elif self._g is not None:
                self._g.replay()
                self.replayed += 1
                n -= 1
            elif self._eager_done < self.warmup:
                side = torch.cuda.Stream()
                side.wait_stream(torch.cuda.current_stream())
                with torch.cuda.stream(side):
                    while n > 0 and self._eager_done < self.warmup:
                        self.step()
                        self._eager_done += 1
                        n -= 1
                torch.cuda.current_stream().wait_stream(side)
            else:
                self._capture()   # records without running; the loop then replays it
                                  # (or, after a failed capture, runs the step eagerly)


def run_steps(step: Callable[[], None], steps: int, graph: bool, warmup: int = 2,
              name: str = "attack") -> int:
    """Run `step()` `steps` times. `step` must update its state tensors in place (no
    rebinding of Python names) for the captured replay to be the same computation.

    With graph=True: `warmup` eager steps on a side stream, then one captured step replayed
    for the rest. Returns how many steps ran from the graph (0 when not captured)."""
    if not graph or steps <= warmup:
        for _ in range(steps):
            step()
        return 0
    loop = StepLoop(step, graph=True, warmup=warmup, name=name)
    loop.run(steps)
    return loop.replayed
