"""Triton kernels for the per-step tensor work of the L-inf attacks (PGD, MI-FGSM, APGD,
Square), each beside its plain-PyTorch reference.

Each step reads a few (N, ...) tensors once and writes the new iterate (and, for MI-FGSM, the
new momentum) once; eager PyTorch makes 5-10 passes for the same work. The ``*_ref``
functions are the one Python statement of each step's math: the "torch" backend of
guard_fast.ops runs them, the attacks call them directly when that backend is chosen, and
tests and benches compare every kernel against them. They follow torchattacks' and fra31's
operation order, so they are bit-identical with those codes at every dtype, and they never
write into their inputs.

Math, per element j of sample i (s = sign, clamp(v, lo, hi) = min(max(v, lo), hi)):
  pgd_step:   v = x_adv + alpha * s(g);  out = clamp(x + clamp(v - x, -eps, eps), 0, 1)
  mim_step:   c_i = max(mean_j |g_ij|, tiny) per sample, or c = max(sum |g|, tiny) over the
              batch; m = g / c + decay * momentum;  v = x_adv + alpha * s(m);
              per-sample mode projects like PGD, batch mode as clamp(clamp(v, x - eps,
              x + eps), 0, 1) (the two codes it reproduces differ there); returns (out, m).
              tiny = finfo(dtype).tiny.
  apgd_step:  lo = max(x - eps, 0), hi = min(x + eps, 1);
              z = clamp(x_adv + step_i * s(g), lo, hi);
              out = clamp((z - x_adv) * a + x_adv + (x_adv - x_adv_old) * (1 - a), lo, hi)
              (with exactly that grouping: fra31's order).
fp32/fp64 inputs compute in their own precision with one rounding per operation, in the
eager order, so the elementwise results are bit-identical to the references (the MI-FGSM
reduction is summed in another order than torch's, so its scale may differ in the last
bits). bf16/fp16 inputs compute in fp32 and round once at the end; eager rounds after every
operation, so those differ from the references by a rounding or two.

No autograd: attack steps run on detached tensors (guard_fast.ops raises if an input
requires grad). Inputs are viewed as (N, D) rows of per-sample blocks as in guard_penalty.
"""

import torch

from .guard_penalty import HAS_TRITON, _prepare, acc_dtype, row_partials, rows

if HAS_TRITON:
    import triton
    import triton.language as tl

__all__ = [
    "pgd_step_ref",
    "mim_step_ref",
    "apgd_step_ref",
    "square_window_ref",
    "pgd_step_triton",
    "mim_step_triton",
    "apgd_step_triton",
    "square_window_triton",
]


# ----------------------------------------------------------------------------- references


def pgd_step_ref(x_adv: torch.Tensor, x: torch.Tensor, grad: torch.Tensor, alpha: float,
                 eps: float, *, lo: float = 0.0, hi: float = 1.0) -> torch.Tensor:
    """One L-inf PGD step: clamp(x + clamp(x_adv + alpha * sign(grad) - x, -eps, eps), lo, hi),
    in torchattacks 3.5.1's operation order (so the points agree bit for bit).

    x_adv, x, grad: (N, ...) tensors of one shape; returns the new iterate. [lo, hi] is the
    valid box: [0, 1] pixels for the attacks and the fused op; the adversarial-training losses
    (guard_fast.losses.adversarial) also craft in a normalized box."""
    out = torch.sign(grad).mul_(alpha).add_(x_adv)
    return out.sub_(x).clamp_(-eps, eps).add_(x).clamp_(lo, hi)


def mim_step_ref(x_adv: torch.Tensor, x: torch.Tensor, grad: torch.Tensor,
                 momentum: torch.Tensor, alpha: float, eps: float, decay: float,
                 per_sample: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """One MI-FGSM step: (new x_adv, new momentum), in the operation order of
    torchattacks 3.5.1's MIFGSM (per_sample=True: each sample's gradient divided by its mean
    |g|) or of GUARD's public mim_attack (False: the batch's by one L1 norm).

    x_adv, x, grad, momentum: (N, ...) tensors of one shape; grad is the gradient of the
    batch-mean cross-entropy. A zero gradient is divided by finfo.tiny instead of 0, so it
    adds nothing to the momentum (both reference codes produce NaN there)."""
    tiny = torch.finfo(grad.dtype).tiny
    if per_sample:
        # each sample's mean |g| (a (N,) batch of scalars is N samples of one value: mean
        # over dim=() would reduce the whole batch; the long fuzz profile found it)
        a = grad.abs()
        a = a.flatten(1) if a.dim() > 1 else a.unsqueeze(1)
        scale = a.mean(dim=1).clamp_min_(tiny).view((-1,) + (1,) * (grad.dim() - 1))
        m = grad / scale
    else:
        m = grad / torch.linalg.vector_norm(grad, ord=1).clamp_min(tiny)
    m.add_(momentum if decay == 1.0 else momentum * decay)
    x_new = torch.sign(m).mul_(alpha).add_(x_adv)
    if per_sample:
        x_new = x_new.sub_(x).clamp_(-eps, eps).add_(x).clamp_(0.0, 1.0)
    else:
        x_new = torch.clamp(x_new, x - eps, x + eps).clamp_(0.0, 1.0)
    return x_new, m


def apgd_step_ref(x_adv: torch.Tensor, x_adv_old: torch.Tensor, grad: torch.Tensor,
                  step_size: torch.Tensor, x: torch.Tensor, eps: float, a: float) -> torch.Tensor:
    """One APGD L-inf momentum step: z = P(x_adv + step_size * sign(grad)), then
    P(x_adv + a * (z - x_adv) + (1 - a) * (x_adv - x_adv_old)), P = clamp to [lo, hi],
    lo = max(x - eps, 0), hi = min(x + eps, 1) (the values of fra31's clamp to the eps-ball
    then to [0, 1]), with fra31's grouping, so results agree bit for bit.

    step_size holds N values (shape (N,) or (N, 1, ..., 1)); a is 1.0 at the first step and
    0.75 after."""
    view = (-1,) + (1,) * (x.dim() - 1)
    lo = (x - eps).clamp_(min=0.0)
    hi = (x + eps).clamp_(max=1.0)
    z = torch.sign(grad).mul_(step_size.reshape(view)).add_(x_adv)
    z = torch.clamp(z, lo, hi)
    z.sub_(x_adv).mul_(a).add_(x_adv)
    z.add_((x_adv - x_adv_old).mul_(1.0 - a))
    return torch.clamp(z, lo, hi)


def square_window_ref(x_best: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor,
                      signs: torch.Tensor, vh: int, vw: int, s: int, step: float) -> torch.Tensor:
    """Square attack's candidate: a contiguous copy of x_best (N, C, H, W) whose window
    [vh, vh + s) x [vw, vw + s) becomes clamp(x_best + step * signs[c], lo, hi) (the
    per-pixel box); signs has C values. Outside the window x_best already lies in the box."""
    out = x_best.contiguous().clone()
    win = (slice(None), slice(None), slice(vh, vh + s), slice(vw, vw + s))
    out[win] = torch.clamp(out[win] + step * signs.reshape(1, -1, 1, 1), lo[win], hi[win])
    return out


# ----------------------------------------------------------------------------- triton

# Flat grids: program p owns elements [p*BLOCK, (p+1)*BLOCK) of the N*D memory order, and
# finds its per-sample scalars (step size, MI-FGSM scale) by gather at row = offset // D.
# The interpreter pays ~1 ms per program instance, so CPU runs use a few big blocks.
_BLOCK_GPU = 1024
_BLOCK_CPU = 1 << 16


def _block(device: torch.device) -> int:
    return _BLOCK_GPU if device.type == "cuda" else _BLOCK_CPU


# Scalars are fp64 kernel arguments (a plain Python float would be passed as fp32) and are
# rounded to the compute dtype inside, as ATen rounds a Python scalar to a tensor's opmath
# type. The interpreter turns every Python float into fp32 whatever the annotation, so on
# CPU the scalars travel in a small fp64 tensor instead (SCALARS_PTR); on CUDA that tensor
# would cost a blocking host-to-device copy per step, hence the two ways. Launches pass
# enable_fp_fusion=False: contracting (z - x_adv) * a + x_adv into an FMA would change the
# rounding; fp32 divisions use div_rn (Triton's fp32 `/` is not IEEE-rounded).

if HAS_TRITON:

    @triton.jit
    def _flat_block(total, BLOCK: tl.constexpr):
        # this program's elements of the flat grid and their mask
        offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        return offs, offs < total

    @triton.jit
    def _sign(v):
        return (v > 0).to(v.dtype) - (v < 0).to(v.dtype)

    @triton.jit
    def _scalar(v, p_ptr, k: tl.constexpr, ct: tl.constexpr, SCALARS_PTR: tl.constexpr):
        if SCALARS_PTR:
            return tl.load(p_ptr + k).to(ct)
        else:
            return v.to(ct)

    @triton.jit
    def _load(ptr, offs, msk, ct: tl.constexpr):
        return tl.load(ptr + offs, mask=msk, other=0.0).to(ct)

    @triton.jit
    def _clamp(v, lo, hi):
        # min(max(v, lo), hi) with NaN passing through, as torch.clamp
        v = tl.where(v < lo, lo, v)
        return tl.where(v > hi, hi, v)

    @triton.jit
    def _pgd_step_kernel(xa_ptr, x_ptr, g_ptr, out_ptr, total, alpha: "fp64", eps: "fp64", p_ptr,
                         SCALARS_PTR: tl.constexpr, F64: tl.constexpr, BLOCK: tl.constexpr):
        offs, msk = _flat_block(total, BLOCK)
        ct = tl.float64 if F64 else tl.float32
        al = _scalar(alpha, p_ptr, 0, ct, SCALARS_PTR)
        ep = _scalar(eps, p_ptr, 1, ct, SCALARS_PTR)
        xa = _load(xa_ptr, offs, msk, ct)
        x = _load(x_ptr, offs, msk, ct)
        g = _load(g_ptr, offs, msk, ct)
        v = _sign(g) * al + xa
        v = _clamp(v - x, -ep, ep) + x
        v = _clamp(v, 0.0, 1.0)
        tl.store(out_ptr + offs, v.to(out_ptr.dtype.element_ty), mask=msk)

    @triton.jit
    def _mim_step_kernel(xa_ptr, x_ptr, g_ptr, mom_ptr, scale_ptr, out_ptr, m_ptr, total, D,
                         alpha: "fp64", eps: "fp64", decay: "fp64", p_ptr,
                         SCALARS_PTR: tl.constexpr, PER_SAMPLE: tl.constexpr, F64: tl.constexpr,
                         BLOCK: tl.constexpr):
        offs, msk = _flat_block(total, BLOCK)
        ct = tl.float64 if F64 else tl.float32
        al = _scalar(alpha, p_ptr, 0, ct, SCALARS_PTR)
        ep = _scalar(eps, p_ptr, 1, ct, SCALARS_PTR)
        de = _scalar(decay, p_ptr, 2, ct, SCALARS_PTR)
        if PER_SAMPLE:
            c = tl.load(scale_ptr + offs // D, mask=msk, other=1.0)
        else:
            c = tl.load(scale_ptr)
        g = _load(g_ptr, offs, msk, ct)
        mo = _load(mom_ptr, offs, msk, ct)
        if F64:
            q = g / c                   # fp64 division is IEEE-rounded
        else:
            q = tl.math.div_rn(g, c)
        m = q + mo * de
        m_out = m.to(m_ptr.dtype.element_ty)
        tl.store(m_ptr + offs, m_out, mask=msk)
        xa = _load(xa_ptr, offs, msk, ct)
        x = _load(x_ptr, offs, msk, ct)
        v = _sign(m_out.to(ct)) * al + xa      # the sign of the stored momentum
        if PER_SAMPLE:
            v = _clamp(v - x, -ep, ep) + x
        else:
            v = _clamp(v, x - ep, x + ep)
        v = _clamp(v, 0.0, 1.0)
        tl.store(out_ptr + offs, v.to(out_ptr.dtype.element_ty), mask=msk)

    @triton.jit
    def _apgd_step_kernel(xa_ptr, xo_ptr, g_ptr, step_ptr, x_ptr, out_ptr, total, D,
                          eps: "fp64", a: "fp64", b: "fp64", p_ptr, SCALARS_PTR: tl.constexpr,
                          F64: tl.constexpr, BLOCK: tl.constexpr):
        offs, msk = _flat_block(total, BLOCK)
        ct = tl.float64 if F64 else tl.float32
        ep = _scalar(eps, p_ptr, 0, ct, SCALARS_PTR)
        aa = _scalar(a, p_ptr, 1, ct, SCALARS_PTR)
        bb = _scalar(b, p_ptr, 2, ct, SCALARS_PTR)
        step = tl.load(step_ptr + offs // D, mask=msk, other=0.0).to(ct)
        xa = _load(xa_ptr, offs, msk, ct)
        xo = _load(xo_ptr, offs, msk, ct)
        g = _load(g_ptr, offs, msk, ct)
        x = _load(x_ptr, offs, msk, ct)
        lo = x - ep
        lo = tl.where(lo < 0.0, 0.0, lo)
        hi = x + ep
        hi = tl.where(hi > 1.0, 1.0, hi)
        z = _clamp(_sign(g) * step + xa, lo, hi)
        z = (z - xa) * aa + xa
        z = z + (xa - xo) * bb
        z = _clamp(z, lo, hi)
        tl.store(out_ptr + offs, z.to(out_ptr.dtype.element_ty), mask=msk)

    @triton.jit(do_not_specialize=["vh", "vw", "s"])
    def _square_window_kernel(xb_ptr, lo_ptr, hi_ptr, sg_ptr, out_ptr, total, C, H, W, vh, vw, s,
                              step: "fp64", p_ptr, SCALARS_PTR: tl.constexpr,
                              F64: tl.constexpr, BLOCK: tl.constexpr):
        # contiguous (N, C, H, W): element -> (c, h, w); only window elements read lo/hi
        offs, msk = _flat_block(total, BLOCK)
        ct = tl.float64 if F64 else tl.float32
        st = _scalar(step, p_ptr, 0, ct, SCALARS_PTR)
        w = offs % W
        t = offs // W
        h = t % H
        c = (t // H) % C
        inw = msk & (h >= vh) & (h < vh + s) & (w >= vw) & (w < vw + s)
        xb = _load(xb_ptr, offs, msk, ct)
        lo = tl.load(lo_ptr + offs, mask=inw, other=0.0).to(ct)
        hi = tl.load(hi_ptr + offs, mask=inw, other=0.0).to(ct)
        sg = tl.load(sg_ptr + c, mask=inw, other=0.0).to(ct)
        v = _clamp(sg * st + xb, lo, hi)
        tl.store(out_ptr + offs, tl.where(inw, v, xb).to(out_ptr.dtype.element_ty), mask=msk)


def _launch_flat(kernel, args: tuple, total: int, scalars: tuple, like: torch.Tensor,
                 **constexprs) -> None:
    """kernel[grid](*args, *scalars, p_ptr, SCALARS_PTR=., F64=., BLOCK=., **constexprs) on
    the flat grid over `total` elements of `like` (device and dtype): the scalars as fp64
    arguments, or in an fp64 CPU tensor under the interpreter (see above); no FMA
    contraction."""
    block = _block(like.device)
    on_cpu = like.device.type != "cuda"
    vals = tuple(float(v) for v in scalars)
    p = torch.tensor(vals, dtype=torch.float64) if on_cpu else None
    kernel[(max(1, triton.cdiv(total, block)),)](
        *args, *vals, p, SCALARS_PTR=on_cpu, F64=like.dtype == torch.float64, BLOCK=block,
        enable_fp_fusion=False, **constexprs)


def pgd_step_triton(x_adv, x, grad, alpha: float, eps: float) -> torch.Tensor:
    (x_adv, x, grad), layout = _prepare(x_adv, x, grad)
    out = torch.empty_like(x_adv)
    total = x_adv.numel()
    if total > 0:
        _launch_flat(_pgd_step_kernel, (*(rows(t, layout) for t in (x_adv, x, grad, out)), total),
                     total, (alpha, eps), x_adv)
    return out


def mim_step_triton(x_adv, x, grad, momentum, alpha: float, eps: float, decay: float,
                    per_sample: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    (x_adv, x, grad, momentum), layout = _prepare(x_adv, x, grad, momentum)
    out, m = torch.empty_like(x_adv), torch.empty_like(x_adv)
    total = x_adv.numel()
    if total == 0:
        return out, m
    g2 = rows(grad, layout)
    d = g2.shape[1]
    rblock = 1024 if grad.device.type == "cuda" else 1 << 14    # few interpreter iterations
    part = row_partials(g2, None, "abs", acc_dtype(x_adv.dtype), block=rblock)
    # mean |g_i| = sum / D (torch's mean is a sum then a division), or one L1 norm
    scale = (part.sum(1) / d) if per_sample else part.sum().reshape(1)
    scale = scale.clamp_min_(torch.finfo(grad.dtype).tiny)
    _launch_flat(_mim_step_kernel, (rows(x_adv, layout), rows(x, layout), g2,
                                    rows(momentum, layout), scale, rows(out, layout),
                                    rows(m, layout), total, d),
                 total, (alpha, eps, decay), x_adv, PER_SAMPLE=bool(per_sample))
    return out, m


def apgd_step_triton(x_adv, x_adv_old, grad, step_size, x, eps: float, a: float) -> torch.Tensor:
    (x_adv, x_adv_old, grad, x), layout = _prepare(x_adv, x_adv_old, grad, x)
    out = torch.empty_like(x_adv)
    total = x_adv.numel()
    if total > 0:
        n = x_adv.shape[0]
        xa, xo, g, xs, o = (rows(t, layout) for t in (x_adv, x_adv_old, grad, x, out))
        _launch_flat(_apgd_step_kernel, (xa, xo, g, step_size.reshape(n).contiguous(), xs, o,
                                         total, total // n),
                     total, (eps, a, 1.0 - float(a)), x_adv)
    return out


def square_window_triton(x_best, lo, hi, signs, vh: int, vw: int, s: int,
                         step: float) -> torch.Tensor:
    x_best, lo, hi, signs = (t.contiguous() for t in (x_best, lo, hi, signs))
    out = torch.empty_like(x_best)
    total = x_best.numel()
    if total > 0:
        _, c, h, w = x_best.shape
        _launch_flat(_square_window_kernel, (x_best, lo, hi, signs, out, total, c, h, w,
                                             int(vh), int(vw), int(s)),
                     total, (step,), x_best)
    return out
