"""CPU convolution backward: the faster of PyTorch's kernel and ATen's im2col kernel, per shape.

Everything adversarial in this package needs gradients with respect to the *input image*:
every attack step, GUARD's curvature penalty (twice, and then its double backward), the
recover step's image updates, adversarial training. On the CPU, PyTorch sends the backward
of a 2-D convolution to oneDNN (mkldnn), whose input-gradient kernel is slow for the
convolutions that have few input channels, which is every network's first layer (1 or 3
channels). ATen's own im2col + GEMM kernel (`aten::_slow_conv2d_backward`) computes the
same quantity 1.5-8x faster there (2-core AMD EPYC, fp32, one call's best time):

    first layer (N, Cin, Cout, H, k, stride)   oneDNN     im2col
    MNIST CNN   (256, 1,   8,  28, 5, 2)       9.2 ms     1.2 ms
    CIFAR conv  (128, 3,  64,  32, 3, 1)      45.5 ms    11.3 ms
    ImageNet    ( 32, 3,  64, 224, 7, 2)       469 ms     269 ms

and oneDNN stays ahead on the wide layers further in (64 -> 64 channels: 176 vs 230 ms).
So the choice is made per convolution shape: `conv_backward("auto")` is a dispatch mode
that, on the first backward of each eligible shape (CPU, 2-D, groups 1, dilation 1, not
transposed, float32/float64, <= MAX_IN_CHANNELS input channels), times both kernels on that
very call (best of two runs each) and keeps im2col only when it is at least `MARGIN` times
faster; the decision is cached per process, thread count and batch size rounded up to a
power of two (attacks' active sets shrink the batch as points fall; `choices()` lists the
decisions).

The two kernels sum in different orders, so gradients differ in the last bits (about 1e-5
relative); sign-based steps (PGD, MIM) almost never notice. `conv_backward("pytorch")`
keeps PyTorch's own choice everywhere, bit-identical to what torchattacks computes;
`"im2col"` forces the ATen kernel for every eligible shape. The environment variable
GUARD_FAST_CONV_BACKWARD sets the default mode ("auto" when unset). CUDA tensors, and
anything under torch.compile, pass through untouched.
"""
from __future__ import annotations

import contextlib
import os
import threading
import time
from typing import Dict, Iterator, Optional, Tuple

import torch
from torch.utils._python_dispatch import TorchDispatchMode

__all__ = ["conv_backward", "choices", "im2col_calls", "block_active", "batch_bucket", "default_mode", "check_mode", "MODES",
           "MAX_IN_CHANNELS", "MARGIN"]

MODES = ("auto", "pytorch", "im2col")
#: convolutions with more input channels (per group) keep PyTorch's kernel untimed: oneDNN
#: won every such case measured, and timing costs a few extra calls per shape
MAX_IN_CHANNELS = 16
#: im2col must be this many times faster than PyTorch's kernel to be chosen
MARGIN = 1.1

_ENV = "GUARD_FAST_CONV_BACKWARD"
_aten = torch.ops.aten
_CONV_BW = _aten.convolution_backward.default
_IM2COL = _aten._slow_conv2d_backward.output_mask
_FLOATS = (torch.float32, torch.float64)

_lock = threading.Lock()
_choices: Dict[tuple, dict] = {}
_active = threading.local()
_im2col_calls = [0]   # backwards the im2col kernel ran (see im2col_calls)


def check_mode(mode) -> str:
    if mode not in MODES:
        raise ValueError(f"conv_backward must be one of {', '.join(map(repr, MODES))}; "
                         f"got {mode!r}")
    return mode


def default_mode() -> str:
    """The mode used when none is given: $GUARD_FAST_CONV_BACKWARD, else "auto"."""
    mode = os.environ.get(_ENV, "auto").strip().lower() or "auto"
    if mode not in MODES:
        raise ValueError(f"{_ENV} must be one of {', '.join(MODES)}; got {mode!r}")
    return mode


def choices() -> Dict[str, dict]:
    """The decisions made so far: a readable shape key -> {"kernel", "pytorch_ms", "im2col_ms"}."""
    with _lock:
        return {_describe(k): dict(v) for k, v in _choices.items()}


def im2col_calls() -> int:
    """How many convolution backwards the im2col kernel has run in this process: callers
    compare it before and after a backward to learn whether the mode did anything there
    (and skip it next time if not; see Attack.input_grad)."""
    return _im2col_calls[0]


def block_active() -> bool:
    """Whether this thread is inside a `conv_backward` block (the outermost decides)."""
    return bool(getattr(_active, "on", False))


def clear_choices() -> None:
    """Forget the cached decisions (the next backward of each shape times again)."""
    with _lock:
        _choices.clear()


def _describe(key: tuple) -> str:
    inp, wt, stride, padding, mask, dtype, threads = key
    return (f"input [<={inp[0]}, {', '.join(map(str, inp[1:]))}] weight {list(wt)} stride {list(stride)} padding {list(padding)} "
            f"grads {''.join('1' if m else '0' for m in mask)} {str(dtype).replace('torch.', '')} "
            f"threads {threads}")


def batch_bucket(n: int) -> int:
    """Batch sizes share decisions by bucket, the next power of two: attacks' active sets
    shrink the batch step by step, and timing every size anew would cost more than it saves."""
    return 1 << max(int(n) - 1, 0).bit_length()


def _eligible(args) -> bool:
    if len(args) != 11:
        return False
    grad_out, inp, weight, _bias, _stride, padding, dilation, transposed, _op, groups, _m = args
    return (isinstance(inp, torch.Tensor) and inp.device.type == "cpu" and inp.dim() == 4
            and inp.layout == torch.strided and inp.dtype in _FLOATS
            and weight.dtype == inp.dtype and grad_out.dtype == inp.dtype
            and not transposed and groups == 1 and all(d == 1 for d in dilation)
            and len(padding) == 2 and weight.dim() == 4
            and weight.shape[1] <= MAX_IN_CHANNELS)


def _im2col(args):
    _im2col_calls[0] += 1
    grad_out, inp, weight, bias_sizes, stride, padding, _d, _t, _op, _g, mask = args
    mask = list(mask)
    # the ATen kernel wants a contiguous weight (double backwards pass strided ones) and
    # allocates the weight gradient like the input (a channels_last input would fail)
    gi, gw, gb = _IM2COL(grad_out, inp.contiguous(), weight.contiguous(), list(weight.shape[2:]),
                         list(stride), list(padding), mask)
    if not mask[2] or bias_sizes is None:
        gb = None
    return gi, gw, gb


def _best_of_two(fn, args) -> Tuple[float, object]:
    best, out = float("inf"), None
    for _ in range(2):
        t0 = time.perf_counter()
        out = fn(args)
        best = min(best, time.perf_counter() - t0)
    return best, out


def _decide(args):
    """Time both kernels on this call's tensors; return (kernel, that kernel's result)."""
    grad_out, inp, weight, _b, stride, padding, _d, _t, _op, _g, mask = args
    key = ((batch_bucket(inp.shape[0]),) + tuple(inp.shape[1:]), tuple(weight.shape), tuple(stride), tuple(padding),
           tuple(bool(m) for m in mask), inp.dtype, torch.get_num_threads())
    with _lock:
        hit = _choices.get(key)
    if hit is not None:
        return hit["kernel"], None
    try:
        t_im2col, r_im2col = _best_of_two(_im2col, args)
    except RuntimeError:          # a shape the ATen kernel refuses: keep PyTorch's
        kernel, r_im2col, t_im2col = "pytorch", None, float("nan")
    else:
        kernel = None
    t_pt, r_pt = _best_of_two(lambda a: _CONV_BW(*a), args)
    if kernel is None:
        kernel = "im2col" if t_im2col * MARGIN < t_pt else "pytorch"
    with _lock:
        _choices.setdefault(key, {"kernel": kernel, "pytorch_ms": round(t_pt * 1e3, 3),
                                  "im2col_ms": round(t_im2col * 1e3, 3)})
    return kernel, (r_im2col if kernel == "im2col" else r_pt)


class _ConvBackwardMode(TorchDispatchMode):
    def __init__(self, mode: str):
        super().__init__()
        self.mode = mode

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is _CONV_BW and not kwargs and _eligible(args) \
                and not torch.compiler.is_compiling():
            if self.mode == "im2col":
                return _im2col(args)
            kernel, result = _decide(args)
            if result is not None:
                return result
            if kernel == "im2col":
                return _im2col(args)
        return func(*args, **(kwargs or {}))


@contextlib.contextmanager
def conv_backward(mode: Optional[str] = None, device=None) -> Iterator[None]:
    """Within the block, CPU convolution backwards use the kernel `mode` picks ("auto":
    the faster per shape; "pytorch": PyTorch's own; "im2col": ATen's im2col kernel where
    eligible). None means `default_mode()`. `device`: when given and not a CPU device, the
    block changes nothing (and costs nothing). Nested blocks: the outermost one decides."""
    mode = default_mode() if mode is None else check_mode(mode)
    if getattr(_active, "on", False) or (device is not None
                                         and torch.device(device).type != "cpu"):
        yield
        return
    _active.on = True
    try:
        if mode == "pytorch" or not torch.backends.mkldnn.is_available():
            yield
        else:
            with _ConvBackwardMode(mode):
                yield
    finally:
        _active.on = False
