"""Fused ops of guard_fast as torch.library custom ops, and the backend registry.

Backends, chosen once at import (``GUARD_FAST_BACKEND=triton|cuda|cpp|torch`` overrides):
  triton  kernels/guard_penalty.py (CUDA tensors; CPU tensors only under TRITON_INTERPRET=1)
  cuda    the CUDA kernels compiled into guard_fast._C (CPU tensors use its C++ kernels)
  cpp     the C++ CPU kernels of guard_fast._C (CUDA tensors use its CUDA kernels if built)
  torch   the plain-PyTorch references (always works)

Auto choice: CUDA tensors -> cuda, else triton, else torch (the extension's kernels measured
faster on an H200, see _AUTO_ORDER); CPU tensors -> cpp, else torch.
An auto-chosen backend that fails (import or first call) warns once and falls back; an
explicitly requested backend that cannot work raises.

Ops (shapes: x, g, a, b are (N, ...); per-sample results are (N,) in the accumulation dtype,
fp32 for fp32/bf16/fp16 inputs and fp64 for fp64):
  guard_fast::perturb(x, g, h, tiny) -> (x + h*g/max(||g||, tiny), ||g||)
  guard_fast::sqdiff_norm(a, b) -> ||a - b||^2          (differentiable, twice)
  guard_fast::sqdiff_norm_backward(go, a, b) -> (2(a-b)go, -2(a-b)go)

Attack steps (kernels/attack_steps.py has the math and the *_ref references that the
attacks run with the "torch" backend; all tensors (N, ...) of one shape and dtype; fp32/fp64
results equal the references bit for bit, except mim_step's reduction, which may sum in
another order). They are not differentiable: attack
steps run on detached tensors, and calling one with an input that requires grad (with grad
mode on) raises.
  guard_fast::pgd_step(x_adv, x, grad, alpha, eps) -> new x_adv              (PGD, torchattacks)
  guard_fast::mim_step(x_adv, x, grad, momentum, alpha, eps, decay, per_sample)
      -> (new x_adv, new momentum)             (MI-FGSM: torchattacks, or GUARD's batch-L1 code)
  guard_fast::apgd_step(x_adv, x_adv_old, grad, step_size (N,), x, eps, a) -> new x_adv  (fra31)
  guard_fast::square_window(x_best, lo, hi, signs (C,), vh, vw, s, step) -> candidate
      (Square: x_best with one s x s window set to clamp(x_best + step * sign_c, lo, hi))
"""
from __future__ import annotations

import math
import os
import warnings
from typing import Callable

import torch
from torch import Tensor

from guard_fast.kernels import attack_steps as _as
from guard_fast.kernels import guard_penalty as _gp

__all__ = [
    "BACKENDS",
    "backend_for",
    "backend_info",
    "perturb",
    "sqdiff_norm",
    "sqdiff_norm_backward",
    "pgd_step",
    "mim_step",
    "apgd_step",
    "square_window",
    "extension",
]

BACKENDS = ("triton", "cuda", "cpp", "torch")
_OPS = ("perturb", "sqdiff_norm", "sqdiff_norm_backward", "pgd_step", "mim_step", "apgd_step",
        "square_window")

# ----------------------------------------------------------------------------- extension

extension = None
_ext_error: str | None = None
try:
    from guard_fast import _C as extension  # noqa: F401  (registers torch.ops.guard_fast_C)
except ImportError as e:  # pure-PyTorch path still works
    _ext_error = f"{type(e).__name__}: {e}"


def _ext_cuda() -> bool:
    return extension is not None and bool(extension.cuda_compiled())


def _triton_on_cpu() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def cpu_layer_op(op: str, switch: str) -> bool:
    """Whether the CPU-only layer kernel guard_fast_C::<op> (fused instance norm / pooling,
    guard_fast/models/) may run: the extension has it, and neither GUARD_FAST_BACKEND nor
    the layer's own switch (environment variable `switch`) is "torch"."""
    if os.environ.get(switch, "auto") == "torch" or os.environ.get("GUARD_FAST_BACKEND",
                                                                    "auto") == "torch":
        return False
    return extension is not None and hasattr(torch.ops.guard_fast_C, op)


# ----------------------------------------------------------------------------- registry


def _missing_op(name: str) -> Callable:
    def fail(*args):
        raise RuntimeError(f"guard_fast._C has no op {name!r}: it was built from older sources; "
                           "rebuild it (pip install --no-build-isolation -e .)")
    return fail


def _impls(backend: str) -> dict[str, Callable]:
    if backend == "torch":
        return {"perturb": _gp.perturb_ref, "sqdiff_norm": _gp.sqdiff_norm_ref,
                "sqdiff_norm_backward": _gp.sqdiff_norm_backward_ref,
                "pgd_step": _as.pgd_step_ref, "mim_step": _as.mim_step_ref,
                "apgd_step": _as.apgd_step_ref, "square_window": _as.square_window_ref}
    if backend == "triton":
        return {"perturb": _gp.perturb_triton, "sqdiff_norm": _gp.sqdiff_norm_triton,
                "sqdiff_norm_backward": _gp.sqdiff_norm_backward_triton,
                "pgd_step": _as.pgd_step_triton, "mim_step": _as.mim_step_triton,
                "apgd_step": _as.apgd_step_triton, "square_window": _as.square_window_triton}
    ops = torch.ops.guard_fast_C
    # a stale build may lack the newer ops: they then fail at call time (an auto-chosen
    # backend warns and falls back; an explicit one raises) instead of breaking the others
    return {name: getattr(ops, name) if hasattr(ops, name) else _missing_op(name)
            for name in _OPS}


def _usable(backend: str, device_type: str) -> str | None:
    """None if `backend` can run on `device_type` tensors, else the reason it cannot."""
    if backend == "torch":
        return None
    if backend == "triton":
        if not _gp.HAS_TRITON:
            return "triton is not installed"
        if device_type == "cpu" and not _triton_on_cpu():
            return "triton runs CPU tensors only with TRITON_INTERPRET=1"
        return None
    if extension is None:
        return f"guard_fast._C failed to import ({_ext_error}); reinstall to build it"
    if backend == "cuda" and not _ext_cuda():
        return "guard_fast._C was built without CUDA kernels (GUARD_FAST_SKIP_CUDA_BUILD or no nvcc)"
    if device_type == "cuda" and not _ext_cuda():
        return "guard_fast._C was built without CUDA kernels"
    return None


# CUDA tensors: the extension's kernels first. Measured on an H200 (bench/bench_ops.py and
# bench_attacks.py --only steps, bench/results/{ops,attacks}.jsonl): faster than Triton's in
# all 12 core-op cases (perturb, sqdiff_norm and its backward; 32 px and 224 px; fp32, bf16:
# 1.7-9.5x) and all 10 attack-step cases (1.4-2.9x).
_AUTO_ORDER = {"cuda": ("cuda", "triton", "torch"), "cpu": ("cpp", "torch")}


def _parse_request() -> str:
    req = os.environ.get("GUARD_FAST_BACKEND", "auto").strip().lower() or "auto"
    if req != "auto" and req not in BACKENDS:
        raise ValueError(f"GUARD_FAST_BACKEND={req!r} is not one of auto, {', '.join(BACKENDS)}")
    return req


_requested = _parse_request()
if _requested != "auto":
    # Explicit request: it must be able to run at least on the device type it is made for.
    _why = _usable(_requested, "cuda" if _requested == "cuda" else "cpu")
    if _why is not None and not (_requested == "triton" and torch.cuda.is_available()):
        raise RuntimeError(f"GUARD_FAST_BACKEND={_requested} cannot be used: {_why}")
elif extension is None:
    warnings.warn(f"guard_fast._C is not available ({_ext_error}); "
                  "falling back to the plain-PyTorch kernels", RuntimeWarning, stacklevel=2)

_chosen: dict[str, str] = {}  # device type -> backend
_tables: dict[str, dict[str, Callable]] = {}


def backend_for(device_type: str) -> str:
    """The backend that ops on tensors of this device type ('cpu', 'cuda') use."""
    if device_type not in _chosen:
        if _requested != "auto":
            why = _usable(_requested, device_type)
            if why is not None:
                raise RuntimeError(
                    f"GUARD_FAST_BACKEND={_requested} cannot run {device_type} tensors: {why}")
            _chosen[device_type] = _requested
        else:
            order = _AUTO_ORDER.get(device_type, ("torch",))
            _chosen[device_type] = next(b for b in order if _usable(b, device_type) is None)
        _tables[device_type] = _impls(_chosen[device_type])
    return _chosen[device_type]


def backend_info() -> dict:
    """What is available and what was chosen (for bench rows and bug reports)."""
    return {"requested": _requested, "chosen": dict(_chosen),
            "extension": extension is not None, "extension_error": _ext_error,
            "extension_cuda": _ext_cuda(), "triton": _gp.HAS_TRITON}


def _call(name: str, device: torch.device, *args):
    dt = device.type
    backend = backend_for(dt)
    fn = _tables[dt][name]
    if _requested != "auto" or backend == "torch":
        return fn(*args)
    try:
        return fn(*args)
    except Exception as e:  # auto-chosen backend broke at run time: warn once, fall back
        order = _AUTO_ORDER.get(dt, ("torch",))
        nxt = next(b for b in order[order.index(backend) + 1:] if _usable(b, dt) is None)
        warnings.warn(f"guard_fast: backend {backend!r} failed on {dt} ({type(e).__name__}: {e}); "
                      f"falling back to {nxt!r}", RuntimeWarning, stacklevel=3)
        _chosen[dt] = nxt
        _tables[dt] = _impls(nxt)
        return _tables[dt][name](*args)


# ----------------------------------------------------------------------------- validation


def _check_pair(name_a: str, a: Tensor, name_b: str, b: Tensor) -> None:
    if not (a.is_floating_point() and b.is_floating_point()):
        raise TypeError(f"{name_a} and {name_b} must be floating tensors, got {a.dtype} and {b.dtype}")
    if a.shape != b.shape:
        raise ValueError(f"{name_a} has shape {tuple(a.shape)} but {name_b} has {tuple(b.shape)}")
    if a.dtype != b.dtype:
        raise TypeError(f"{name_a} is {a.dtype} but {name_b} is {b.dtype}")
    if a.device != b.device:
        raise ValueError(f"{name_a} is on {a.device} but {name_b} is on {b.device}")
    if a.dim() < 1 or a.shape[0] < 1:
        raise ValueError(f"{name_a} must have a batch dimension of size >= 1, got {tuple(a.shape)}")


def _check_scalar(op: str, name: str, v: float, lo: float | None = None,
                  lo_inclusive: bool = True) -> None:
    """A scalar argument is a finite number (>= lo or > lo where given): a NaN or negative
    eps would otherwise flow through every clamp of the step and come out as silent
    garbage. Host-side floats: no device sync."""
    v = float(v)
    if not math.isfinite(v) or (lo is not None and (v < lo if lo_inclusive else v <= lo)):
        rng = "" if lo is None else f" {'>=' if lo_inclusive else '>'} {lo:g}"
        raise ValueError(f"guard_fast::{op}: {name} must be a finite number{rng}, got {v!r}")


def _acc(dtype: torch.dtype) -> torch.dtype:
    return _gp.acc_dtype(dtype)


def _common_layout(*ts: Tensor) -> tuple[Tensor, ...]:
    """Every backend gets all inputs contiguous or all channels_last, so outputs (which
    follow the first input's layout) have the same strides whichever backend runs."""
    if _gp._same_block_layout(*ts) is None:
        return tuple(t.contiguous() for t in ts)
    return ts


def _like(a: Tensor, *others: Tensor) -> Tensor:
    """An empty tensor shaped like `a` with the strides the op's output will have."""
    if _gp._same_block_layout(a, *others) is None:
        return torch.empty(a.shape, dtype=a.dtype, device=a.device)
    return torch.empty_like(a)


# ----------------------------------------------------------------------------- custom ops


@torch.library.custom_op("guard_fast::perturb", mutates_args=())
def perturb(x: Tensor, g: Tensor, h: float, tiny: float = 1e-12) -> tuple[Tensor, Tensor]:
    """(x + h * g / max(||g||, tiny), ||g||) per sample, one pass over g after its norm.

    ||g|| has the range of a norm taken in float64 for float32/bf16/fp16 inputs (eager
    torch's float32 norm does not: it is a plain float32 sum of squares, as these kernels'
    was; the reference kernels.guard_penalty.perturb_ref takes it in float64): the CUDA and
    Triton kernels sum the squares in float64 (where no such square overflows or
    underflows); the C++ kernel sums them in float32 and recomputes, scaled by the largest
    magnitude, the rare samples whose sum overflowed or fell below float32's normal range
    (before this, norms above about 1.8e19 became inf and a step of 0). float64 inputs:
    every backend gives the scaled norm's range too (CUDA and Triton replace the rows whose
    plain float64 sum left about 1e+-154 by the scaled norm; C++ rescales as for float32). The norm is
    returned in the accumulation dtype (float32 below float64), so one below float32's
    smallest normal is stored subnormal. A norm below tiny makes the step h * g / tiny: a
    sample whose gradient is that small (saturated, confidently right) is barely moved."""
    _check_pair("x", x, "g", g)
    _check_scalar("perturb", "h", h)
    _check_scalar("perturb", "tiny", tiny, 0.0, lo_inclusive=False)
    x, g = _common_layout(x, g)
    return _call("perturb", x.device, x, g, float(h), float(tiny))


@perturb.register_fake
def _perturb_fake(x, g, h, tiny=1e-12):
    return _like(x, g), x.new_empty((x.shape[0],), dtype=_acc(x.dtype))


def _perturb_setup(ctx, inputs, output):
    _, g, h, tiny = inputs
    ctx.save_for_backward(g, output[1])
    ctx.h, ctx.tiny = h, tiny


def _perturb_backward(ctx, gxp, gnorm):
    # d xp / d x = I. For g (rarely needed: GUARD detaches z), with n = ||g||, s = h/max(n, tiny):
    #   d xp = s dg - (h/n^3) g (g . dg) [n > tiny];  d n = g . dg / n.
    g, n = ctx.saved_tensors
    acc = n.dtype
    shape = (-1,) + (1,) * (g.dim() - 1)
    gx = gxp if ctx.needs_input_grad[0] else None
    gg = None
    if ctx.needs_input_grad[1]:
        ga = g.to(acc)
        big = n > ctx.tiny
        nsafe = torch.where(big, n, torch.ones_like(n))
        s = ctx.h / n.clamp_min(ctx.tiny)
        total = torch.zeros_like(ga)
        if gxp is not None:
            go = gxp.to(acc)
            dot = (ga * go).reshape(len(ga), -1).sum(1)
            total = total + s.view(shape) * go - (big * ctx.h * dot / nsafe**3).view(shape) * ga
        if gnorm is not None:
            total = total + (big * gnorm.to(acc) / nsafe).view(shape) * ga
        gg = total.to(g.dtype)
    return gx, gg, None, None


perturb.register_autograd(_perturb_backward, setup_context=_perturb_setup)


@torch.library.custom_op("guard_fast::sqdiff_norm_backward", mutates_args=())
def sqdiff_norm_backward(go: Tensor, a: Tensor, b: Tensor) -> tuple[Tensor, Tensor]:
    """(2 (a - b) go_i, -2 (a - b) go_i) per sample, both written in one pass."""
    _check_pair("a", a, "b", b)
    if go.shape != (a.shape[0],):
        raise ValueError(f"go must have shape ({a.shape[0]},), got {tuple(go.shape)}")
    a, b = _common_layout(a, b)
    return _call("sqdiff_norm_backward", a.device, go, a, b)


@sqdiff_norm_backward.register_fake
def _sqdiff_norm_backward_fake(go, a, b):
    return _like(a, b), _like(a, b)


def _sqb_setup(ctx, inputs, output):
    go, a, b = inputs
    ctx.save_for_backward(go, a, b)


def _sqb_backward(ctx, gda, gdb):
    # da = 2 go (a - b), db = -da. With e = gda - gdb (what the pair sends back per element):
    #   d go_i = 2 sum_j (a - b)_ij e_ij,  d a = 2 go e,  d b = -d a.
    go, a, b = ctx.saved_tensors
    acc = _acc(a.dtype)
    e = torch.zeros_like(a, dtype=acc)
    if gda is not None:
        e = e + gda.to(acc)
    if gdb is not None:
        e = e - gdb.to(acc)
    shape = (-1,) + (1,) * (a.dim() - 1)
    dgo = (2.0 * (a.to(acc) - b.to(acc)) * e).reshape(len(a), -1).sum(1).to(go.dtype)
    da = (2.0 * go.to(acc).view(shape) * e).to(a.dtype)
    return dgo, da, -da


sqdiff_norm_backward.register_autograd(_sqb_backward, setup_context=_sqb_setup)


@torch.library.custom_op("guard_fast::sqdiff_norm", mutates_args=())
def sqdiff_norm(a: Tensor, b: Tensor) -> Tensor:
    """||a_i - b_i||_2^2 per sample, accumulated in fp32 (fp64 for fp64); shape (N,)."""
    _check_pair("a", a, "b", b)
    a, b = _common_layout(a, b)
    return _call("sqdiff_norm", a.device, a, b)


@sqdiff_norm.register_fake
def _sqdiff_norm_fake(a, b):
    return a.new_empty((a.shape[0],), dtype=_acc(a.dtype))


def _sq_setup(ctx, inputs, output):
    a, b = inputs
    ctx.save_for_backward(a, b)


def _sq_backward(ctx, go):
    a, b = ctx.saved_tensors
    da, db = sqdiff_norm_backward(go.contiguous(), a, b)
    return (da if ctx.needs_input_grad[0] else None), (db if ctx.needs_input_grad[1] else None)


sqdiff_norm.register_autograd(_sq_backward, setup_context=_sq_setup)


# ----------------------------------------------------------------------------- attack steps


def _not_differentiable(name: str):
    """setup_context for the attack steps: it only runs when grad mode is on and an input
    requires grad, and then refuses (a silent zero or missing gradient would be worse)."""
    def setup(ctx, inputs, output):
        raise RuntimeError(f"guard_fast::{name} is not differentiable: attack steps run outside "
                           "autograd; pass detached tensors or call it under torch.no_grad()")
    return setup


def _no_backward(ctx, *grads):  # never reached: setup_context raises first
    raise RuntimeError("unreachable")


def _pgd_step_impl(x_adv: Tensor, x: Tensor, grad: Tensor, alpha: float, eps: float) -> Tensor:
    _check_pair("x_adv", x_adv, "x", x)
    _check_pair("x_adv", x_adv, "grad", grad)
    _check_scalar("pgd_step", "alpha", alpha)
    _check_scalar("pgd_step", "eps", eps, 0.0)
    x_adv, x, grad = _common_layout(x_adv, x, grad)
    return _call("pgd_step", x_adv.device, x_adv, x, grad, float(alpha), float(eps))


@torch.library.custom_op("guard_fast::pgd_step", mutates_args=())
def pgd_step(x_adv: Tensor, x: Tensor, grad: Tensor, alpha: float, eps: float) -> Tensor:
    """clamp(x + clamp(x_adv + alpha * sign(grad) - x, -eps, eps), 0, 1) in one pass
    (torchattacks' PGD step, bit for bit in fp32/fp64)."""
    return _pgd_step_impl(x_adv, x, grad, alpha, eps)


@pgd_step.register_fake
def _pgd_step_fake(x_adv, x, grad, alpha, eps):
    return _like(x_adv, x, grad)


pgd_step.register_autograd(_no_backward, setup_context=_not_differentiable("pgd_step"))


def _mim_step_impl(x_adv: Tensor, x: Tensor, grad: Tensor, momentum: Tensor, alpha: float,
                   eps: float, decay: float, per_sample: bool = True) -> tuple[Tensor, Tensor]:
    _check_pair("x_adv", x_adv, "x", x)
    _check_pair("x_adv", x_adv, "grad", grad)
    _check_pair("x_adv", x_adv, "momentum", momentum)
    _check_scalar("mim_step", "alpha", alpha)
    _check_scalar("mim_step", "eps", eps, 0.0)
    _check_scalar("mim_step", "decay", decay, 0.0)
    x_adv, x, grad, momentum = _common_layout(x_adv, x, grad, momentum)
    return _call("mim_step", x_adv.device, x_adv, x, grad, momentum, float(alpha), float(eps),
                 float(decay), bool(per_sample))


@torch.library.custom_op("guard_fast::mim_step", mutates_args=())
def mim_step(x_adv: Tensor, x: Tensor, grad: Tensor, momentum: Tensor, alpha: float,
             eps: float, decay: float, per_sample: bool = True) -> tuple[Tensor, Tensor]:
    """One MI-FGSM step: (new x_adv, new momentum). per_sample=True divides each sample's
    gradient by its mean |g| (torchattacks), False the batch's by one L1 norm (GUARD code)."""
    return _mim_step_impl(x_adv, x, grad, momentum, alpha, eps, decay, per_sample)


@mim_step.register_fake
def _mim_step_fake(x_adv, x, grad, momentum, alpha, eps, decay, per_sample=True):
    return _like(x_adv, x, grad, momentum), _like(x_adv, x, grad, momentum)


mim_step.register_autograd(_no_backward, setup_context=_not_differentiable("mim_step"))


def _apgd_step_impl(x_adv: Tensor, x_adv_old: Tensor, grad: Tensor, step_size: Tensor,
                    x: Tensor, eps: float, a: float) -> Tensor:
    _check_pair("x_adv", x_adv, "x_adv_old", x_adv_old)
    _check_pair("x_adv", x_adv, "grad", grad)
    _check_pair("x_adv", x_adv, "x", x)
    if not step_size.is_floating_point() or step_size.numel() != x_adv.shape[0]:
        raise ValueError(f"step_size must be a floating tensor of {x_adv.shape[0]} values, got "
                         f"{step_size.dtype} of shape {tuple(step_size.shape)}")
    if step_size.device != x_adv.device:
        raise ValueError(f"step_size is on {step_size.device} but x_adv is on {x_adv.device}")
    _check_scalar("apgd_step", "eps", eps, 0.0)
    _check_scalar("apgd_step", "a", a)
    x_adv, x_adv_old, grad, x = _common_layout(x_adv, x_adv_old, grad, x)
    return _call("apgd_step", x_adv.device, x_adv, x_adv_old, grad,
                 step_size.reshape(x_adv.shape[0]), x, float(eps), float(a))


@torch.library.custom_op("guard_fast::apgd_step", mutates_args=())
def apgd_step(x_adv: Tensor, x_adv_old: Tensor, grad: Tensor, step_size: Tensor, x: Tensor,
              eps: float, a: float) -> Tensor:
    """One APGD L-inf momentum step (fra31's order), with the projection box
    [max(x - eps, 0), min(x + eps, 1)] computed on the fly; step_size holds N values
    (shape (N,) or (N, 1, ..., 1))."""
    return _apgd_step_impl(x_adv, x_adv_old, grad, step_size, x, eps, a)


@apgd_step.register_fake
def _apgd_step_fake(x_adv, x_adv_old, grad, step_size, x, eps, a):
    return _like(x_adv, x_adv_old, grad, x)


apgd_step.register_autograd(_no_backward, setup_context=_not_differentiable("apgd_step"))


def _square_window_impl(x_best: Tensor, lo: Tensor, hi: Tensor, signs: Tensor, vh: int,
                        vw: int, s: int, step: float) -> Tensor:
    _check_pair("x_best", x_best, "lo", lo)
    _check_pair("x_best", x_best, "hi", hi)
    _check_square_window(x_best, signs, vh, vw, s)
    _check_scalar("square_window", "step", step)
    return _call("square_window", x_best.device, x_best, lo, hi, signs, int(vh), int(vw), int(s),
                 float(step))


@torch.library.custom_op("guard_fast::square_window", mutates_args=())
def square_window(x_best: Tensor, lo: Tensor, hi: Tensor, signs: Tensor, vh: int, vw: int,
                  s: int, step: float) -> Tensor:
    """Square attack's candidate in one pass: a contiguous copy of x_best (N, C, H, W) with
    the window [vh, vh + s) x [vw, vw + s) set to clamp(x_best + step * signs[c], lo, hi)
    (lo, hi: the per-pixel box; signs: C values). Bit for bit the eager candidate in
    fp32/fp64."""
    return _square_window_impl(x_best, lo, hi, signs, vh, vw, s, step)


def _check_square_window(x_best: Tensor, signs: Tensor, vh: int, vw: int, s: int) -> None:
    if x_best.dim() != 4:
        raise ValueError(f"square_window needs (N, C, H, W) images, got shape {tuple(x_best.shape)}")
    _, c, h, w = x_best.shape
    if signs.numel() != c or signs.dtype != x_best.dtype or signs.device != x_best.device:
        raise ValueError(f"signs must hold {c} values of x_best's dtype and device, got "
                         f"{signs.numel()} {signs.dtype} values on {signs.device}")
    if not (s >= 1 and 0 <= vh and vh + s <= h and 0 <= vw and vw + s <= w):
        raise ValueError(f"the window [{vh}, {vh + s}) x [{vw}, {vw + s}) does not fit images of "
                         f"{h} x {w} (need s >= 1 and the window inside)")


@square_window.register_fake
def _square_window_fake(x_best, lo, hi, signs, vh, vw, s, step):
    return torch.empty(x_best.shape, dtype=x_best.dtype, device=x_best.device)


square_window.register_autograd(_no_backward, setup_context=_not_differentiable("square_window"))


# ----------------------------------------------------------------------------- direct calls

class _Direct:
    """The attack steps without torch's operator dispatch.

    `ops.direct.pgd_step(...)` etc. run exactly what the registered ops run (the same
    checks, the same backend kernel, the same fallback), minus the custom-op machinery, which
    costs about 0.1 ms of host time per call on a GPU machine (bench/bench_ops.py: the "op"
    rows against the backend's own). For eager loops on detached tensors, such as the
    attacks' step loops; use the registered ops (torch.ops.guard_fast.*) where torch.compile,
    opcheck or autograd's refusal of gradients matter."""

    pgd_step = staticmethod(_pgd_step_impl)
    mim_step = staticmethod(_mim_step_impl)
    apgd_step = staticmethod(_apgd_step_impl)
    square_window = staticmethod(_square_window_impl)


direct = _Direct()
