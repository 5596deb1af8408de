"""FLOPs and dispatched ops of one training step, through any number of autograd.grad calls.

Why not torch.utils.flop_counter.FlopCounterMode: it attributes FLOPs to modules with a
ModuleTracker, which puts a multi-grad hook on every module's input tensors. GUARD's penalty
passes differentiate with respect to a leaf input (``torch.autograd.grad(l0, xa)``, xa a
detached copy of x with requires_grad); when such a hook fires inside autograd.grad it asks
the engine whether the leaf's AccumulateGrad node will run
(``torch._C._will_engine_execute_node``), and the engine refuses for a leaf during
autograd.grad ("A leaf node was passed to _will_engine_execute_node but we are currently
running autograd.grad()"). Counting needs no module attribution, so this counter is a plain
TorchDispatchMode with PyTorch's own formulas (``flop_registry``: matmuls, convolutions and
their backward, attention), and it works on every loss.

What is counted:
  flops   the registry's FLOPs (2 per multiply-add) of every matmul / convolution op,
          forward and backward passes alike; elementwise ops and reductions count 0 (the
          convention of PyTorch's counter and of the usual "model FLOPs" figures)
  ops     aten (and custom) ops dispatched that run a kernel: every op except views and
          allocations (``is_view`` ops, detach, empty); the proxy for kernel launches of an
          eager step. A fused custom op (guard_fast::perturb) is one op, the kernels of a
          composite op are counted one by one, an op's internal kernels (cuDNN's several
          launches for one convolution) are not seen.
  syncs   host syncs (``aten._local_scalar_dense``: .item(), bool(tensor)); these block a
          CUDA graph capture.

The backward passes are seen too: the autograd engine carries the dispatch-mode stack into
its worker threads (on CUDA the backward runs on a device thread).
"""
from __future__ import annotations

from collections import Counter
from typing import Callable

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import flop_registry

_ALLOCATIONS = {torch.ops.aten.empty, torch.ops.aten.empty_strided, torch.ops.aten.empty_like,
                torch.ops.aten.new_empty, torch.ops.aten.new_empty_strided,
                torch.ops.aten.lift_fresh}
_SYNC = torch.ops.aten._local_scalar_dense


class OpCounter(TorchDispatchMode):
    """``with OpCounter() as c: step()`` -> c.flops, c.ops, c.syncs, and per-op tables
    c.flops_by_op / c.ops_by_op (keys: aten op names)."""

    def __init__(self):
        super().__init__()
        self.flops = 0
        self.ops = 0
        self.syncs = 0
        self.views = 0
        self.flops_by_op: Counter = Counter()
        self.ops_by_op: Counter = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        packet = func._overloadpacket
        name = str(packet).removeprefix("aten.")
        if getattr(func, "is_view", False) or packet in _ALLOCATIONS:
            self.views += 1
        else:
            self.ops += 1
            self.ops_by_op[name] += 1
            if packet is _SYNC:
                self.syncs += 1
        formula = flop_registry.get(packet)
        if formula is not None:
            n = int(formula(*args, **kwargs, out_val=out))
            self.flops += n
            self.flops_by_op[name] += n
        return out

    def summary(self, top: int = 6) -> dict:
        """flops, ops, syncs and the ops with the most launches / FLOPs (JSON-friendly)."""
        return {"flops": self.flops, "ops": self.ops, "syncs": self.syncs,
                "top_ops": dict(self.ops_by_op.most_common(top)),
                "flops_by_op": dict(self.flops_by_op.most_common(top))}


def count(fn: Callable[[], object], top: int = 6) -> dict:
    """OpCounter.summary() of one call of fn (its result is dropped)."""
    with OpCounter() as c:
        fn()
    return c.summary(top)


# Dense (no structured sparsity) peak TFLOP/s per math mode, from NVIDIA's datasheets (the
# A100 Tensor Core GPU datasheet, 2021; the H100 Tensor Core GPU datasheet, 2023; the H200
# Tensor Core GPU datasheet, 2024). The datasheets list tensor-core figures "with sparsity";
# the dense figure is half of that. fp32 is the non-tensor-core FP32 rate.
# Keys are matched, in order, as substrings of torch.cuda.get_device_name().
PEAK_TFLOPS = [
    ("H200 NVL", {"fp32": 60.0, "tf32": 417.5, "bf16": 835.5, "fp16": 835.5}),
    ("H200", {"fp32": 67.0, "tf32": 494.5, "bf16": 989.5, "fp16": 989.5}),      # SXM
    ("H100 PCIe", {"fp32": 51.0, "tf32": 378.0, "bf16": 756.0, "fp16": 756.0}),
    ("H100 NVL", {"fp32": 60.0, "tf32": 417.5, "bf16": 835.5, "fp16": 835.5}),
    ("H100", {"fp32": 67.0, "tf32": 494.5, "bf16": 989.5, "fp16": 989.5}),      # SXM
    ("A100", {"fp32": 19.5, "tf32": 156.0, "bf16": 312.0, "fp16": 312.0}),      # SXM and PCIe
]


def math_kind(dtype: str) -> str:
    """The peak that applies to a step run at `dtype` ("fp32" | "bf16" | "fp16") on CUDA:
    fp32 convolutions run on TF32 tensor cores while cuDNN's allow_tf32 is on (PyTorch's
    default), and convolutions are nearly all of a ResNet step's FLOPs."""
    if dtype == "fp32":
        return "tf32" if torch.backends.cudnn.allow_tf32 else "fp32"
    return dtype


def peak_tflops(device_name: str, kind: str) -> float | None:
    """Dense peak TFLOP/s of `device_name` for math `kind`, None for an unlisted device."""
    for key, peaks in PEAK_TFLOPS:
        if key in device_name:
            return peaks.get(kind)
    return None


def throughput(flops: int, median_ms: float, device_name: str, dtype: str) -> dict:
    """Achieved TFLOP/s of a step of `flops` taking median_ms, and its fraction of the
    device's peak for the math the dtype runs on (None where the device has no entry)."""
    tf = flops / (median_ms * 1e-3) / 1e12
    kind = math_kind(dtype)
    peak = peak_tflops(device_name, kind)
    return {"tflops": tf, "peak_kind": kind, "peak_tflops": peak,
            "peak_frac": None if peak is None else tf / peak}
