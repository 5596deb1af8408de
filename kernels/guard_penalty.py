"""Triton kernels for the elementwise/reduction work around GUARD's network passes.

Each kernel treats its inputs as a (N, D) matrix of per-sample rows: N samples, D = prod of
the non-batch dims. Any tensor whose samples each occupy one dense block of memory (contiguous
and channels_last NCHW tensors both do) is viewed that way without a copy; anything else is
made contiguous first. A plain-PyTorch ``*_ref`` sits beside every kernel; tests and benches
compare against it.

Math (per sample i, accumulation in fp32, or fp64 for fp64 inputs):
  perturb:              n_i = ||g_i||_2,  xp_i = x_i + h * g_i / max(n_i, tiny)
  sqdiff_norm:          s_i = ||a_i - b_i||_2^2
  sqdiff_norm_backward: da_i = 2 * (a_i - b_i) * go_i,  db_i = -da_i
"""
from __future__ import annotations

import functools

import torch

try:  # triton is optional: a CPU-only install may lack it.
    import triton
    import triton.language as tl

    HAS_TRITON = True
except ImportError:  # pragma: no cover - exercised only without triton
    triton = None
    tl = None
    HAS_TRITON = False

__all__ = [
    "HAS_TRITON",
    "acc_dtype",
    "rows",
    "perturb_ref",
    "sqdiff_norm_ref",
    "sqdiff_norm_backward_ref",
    "perturb_triton",
    "sqdiff_norm_triton",
    "sqdiff_norm_backward_triton",
]


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """Accumulation dtype: fp64 stays fp64, everything else reduces in fp32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _same_block_layout(*ts: torch.Tensor) -> str | None:
    """'contiguous' or 'channels_last' if every tensor has that layout, else None."""
    if all(t.is_contiguous() for t in ts):
        return "contiguous"
    if all(t.dim() == 4 and t.is_contiguous(memory_format=torch.channels_last) for t in ts):
        return "channels_last"
    return None


def rows(t: torch.Tensor, layout: str) -> torch.Tensor:
    """View a tensor of the given block layout as (N, D) over its memory, without copying."""
    if layout == "channels_last":
        return t.permute(0, 2, 3, 1).reshape(t.shape[0], -1)
    return t.view(t.shape[0], -1)


def _prepare(*ts: torch.Tensor) -> tuple[list[torch.Tensor], str]:
    layout = _same_block_layout(*ts)
    if layout is None:
        return [t.contiguous() for t in ts], "contiguous"
    return list(ts), layout


# ----------------------------------------------------------------------------- references


def scaled_norm64(g2: torch.Tensor) -> torch.Tensor:
    """Row norms of the (N, D) g2 in float64 with float64's whole range: the largest |g| of
    each row m first, then m * ||g / m|| (inf where an element is inf, NaN where one is)."""
    a = g2.to(torch.float64).abs()
    if a.shape[1] == 0:
        return a.new_zeros(a.shape[0])
    m = a.amax(dim=1)
    safe = torch.where(m > 0, m, torch.ones_like(m))   # m may be subnormal: no clamp to tiny
    n = m * (a / safe.unsqueeze(1)).norm(dim=1)
    return torch.where(torch.isinf(m) | (m == 0), m, n)


def perturb_ref(x: torch.Tensor, g: torch.Tensor, h: float, tiny: float = 1e-12):
    """x + h * g / max(||g||, tiny) per sample; returns (xp, norm) with norm in acc dtype.

    ||g|| is taken scaled in float64 (scaled_norm64) and rounded to the acc dtype: eager
    torch's norm is a plain sum of squares, which in float32 overflows above about 1.8e19 (a
    zero step) and underflows below about 1e-19, in float64 outside about 1e+-154; the
    kernels keep the scaled norm's range (see ops.perturb)."""
    acc = acc_dtype(x.dtype)
    g_acc = g.to(acc)
    g2 = g.flatten(1) if g.dim() > 1 else g.reshape(-1, 1)
    n = scaled_norm64(g2).to(acc)
    scale = h / n.clamp_min(tiny)
    shape = (-1,) + (1,) * (x.dim() - 1)
    xp = (x.to(acc) + g_acc * scale.view(shape)).to(x.dtype)
    return xp, n


def sqdiff_norm_ref(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per-sample squared L2 distance, accumulated in the acc dtype; shape (N,)."""
    acc = acc_dtype(a.dtype)
    return (a.to(acc) - b.to(acc)).reshape(a.shape[0], -1).pow(2).sum(dim=1)


def sqdiff_norm_backward_ref(go: torch.Tensor, a: torch.Tensor, b: torch.Tensor):
    acc = acc_dtype(a.dtype)
    shape = (-1,) + (1,) * (a.dim() - 1)
    da = (2.0 * (a.to(acc) - b.to(acc)) * go.to(acc).view(shape)).to(a.dtype)
    return da, -da


# ----------------------------------------------------------------------------- triton

# Work split: grid (N, S). Program (i, s) owns columns [s*chunk, (s+1)*chunk) of row i and
# walks them BLOCK at a time. Partial sums go to an (N, S) buffer that torch sums, so the
# reduction is deterministic (no atomics). S is picked so that N*S fills the machine while
# each program still streams a few BLOCKs.
_BLOCK = 1024


@functools.lru_cache(maxsize=None)
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def _split(n: int, d: int, device: torch.device, block: int = _BLOCK) -> tuple[int, int]:
    """(S, chunk): S programs per row, each owning chunk columns (a multiple of block)."""
    if device.type == "cuda":
        target = 4 * _sm_count(device.index if device.index is not None else torch.cuda.current_device())
    else:  # interpreter: every program instance costs ~1 ms, keep grids tiny
        target = 1
    s = max(1, min(triton.cdiv(d, block), triton.cdiv(target, n)))
    chunk = triton.cdiv(triton.cdiv(d, s), block) * block
    s = triton.cdiv(d, chunk)
    return s, chunk


if HAS_TRITON:

    @triton.jit
    def _row_partial_kernel(a_ptr, b_ptr, out_ptr, D, chunk, S, MODE: tl.constexpr,
                            F64: tl.constexpr, BLOCK: tl.constexpr):
        # out[i, s] = sum over this program's columns of row i of (a - b)^2 (MODE 0), a^2
        # (MODE 1, b unused) or |a| (MODE 2, b unused); see _MODES.
        i = tl.program_id(0)
        s = tl.program_id(1)
        row = i.to(tl.int64) * D
        start = s * chunk
        if F64:
            acc = tl.zeros([BLOCK], dtype=tl.float64)
        else:
            acc = tl.zeros([BLOCK], dtype=tl.float32)
        for off in range(0, chunk, BLOCK):
            cols = start + off + tl.arange(0, BLOCK)
            m = cols < D
            v = tl.load(a_ptr + row + cols, mask=m, other=0.0).to(acc.dtype)
            if MODE == 0:
                v = v - tl.load(b_ptr + row + cols, mask=m, other=0.0).to(acc.dtype)
            if MODE == 2:
                acc += tl.abs(v)
            else:
                acc += v * v
        tl.store(out_ptr + i * S + s, tl.sum(acc, axis=0))

    @triton.jit
    def _axpy_rows_kernel(x_ptr, g_ptr, scale_ptr, out_ptr, D, chunk, BLOCK: tl.constexpr):
        # out_i = x_i + scale_i * g_i, with scale_i = h / max(||g_i||, tiny) precomputed.
        i = tl.program_id(0)
        s = tl.program_id(1)
        row = i.to(tl.int64) * D
        sc = tl.load(scale_ptr + i)
        start = s * chunk
        for off in range(0, chunk, BLOCK):
            cols = start + off + tl.arange(0, BLOCK)
            m = cols < D
            x = tl.load(x_ptr + row + cols, mask=m, other=0.0)
            g = tl.load(g_ptr + row + cols, mask=m, other=0.0)
            y = x.to(sc.dtype) + sc * g.to(sc.dtype)
            tl.store(out_ptr + row + cols, y.to(out_ptr.dtype.element_ty), mask=m)

    @triton.jit
    def _sqdiff_bwd_kernel(go_ptr, a_ptr, b_ptr, da_ptr, db_ptr, D, chunk, BLOCK: tl.constexpr):
        # da_i = 2 (a_i - b_i) go_i and db_i = -da_i, both written in the same pass.
        i = tl.program_id(0)
        s = tl.program_id(1)
        row = i.to(tl.int64) * D
        go2 = 2.0 * tl.load(go_ptr + i)
        start = s * chunk
        for off in range(0, chunk, BLOCK):
            cols = start + off + tl.arange(0, BLOCK)
            m = cols < D
            a = tl.load(a_ptr + row + cols, mask=m, other=0.0).to(go2.dtype)
            b = tl.load(b_ptr + row + cols, mask=m, other=0.0).to(go2.dtype)
            d = go2 * (a - b)
            tl.store(da_ptr + row + cols, d.to(da_ptr.dtype.element_ty), mask=m)
            tl.store(db_ptr + row + cols, (-d).to(db_ptr.dtype.element_ty), mask=m)


# what _row_partial_kernel sums per row
_MODES = {"sqdiff": 0, "sq": 1, "abs": 2}


def row_partials(a2: torch.Tensor, b2: torch.Tensor | None, mode: str, acc: torch.dtype,
                 block: int = _BLOCK) -> torch.Tensor:
    """(N, S) partial sums over the rows of the (N, D) views a2 (and b2, for "sqdiff") of
    (a - b)^2, a^2 or |a| (mode "sqdiff", "sq", "abs"), in acc; their row sums are the
    per-sample reductions, summed by torch so that the result is deterministic."""
    n, d = a2.shape
    s, chunk = _split(n, d, a2.device, block)
    part = torch.empty((n, s), dtype=acc, device=a2.device)
    _row_partial_kernel[(n, s)](a2, b2 if b2 is not None else a2, part, d, chunk, s,
                                MODE=_MODES[mode], F64=acc == torch.float64, BLOCK=block)
    return part


def perturb_triton(x: torch.Tensor, g: torch.Tensor, h: float, tiny: float = 1e-12):
    (x, g), layout = _prepare(x, g)
    acc = acc_dtype(x.dtype)
    out = torch.empty_like(x)
    x2, g2, o2 = rows(x, layout), rows(g, layout), rows(out, layout)
    n, d = x2.shape
    # the sum of squares in float64: no float/half/bfloat16 square overflows or underflows
    # there, so the norm needs no scaling; float64 inputs: rows whose plain sum left its
    # range (about 1e+-154) take the scaled norm (one more pass, computed for every row so
    # that nothing syncs with the host)
    norm64 = row_partials(g2, None, "sq", torch.float64).sum(dim=1).sqrt_()
    if x.dtype == torch.float64:
        out_of_range = (norm64 < 1e-150) | torch.isinf(norm64)
        norm64 = torch.where(out_of_range, scaled_norm64(g2), norm64)
    norm = norm64.to(acc)
    scale = h / norm.clamp_min(tiny)
    s, chunk = _split(n, d, x.device)
    _axpy_rows_kernel[(n, s)](x2, g2, scale, o2, d, chunk, BLOCK=_BLOCK)
    return out, norm


def sqdiff_norm_triton(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    (a, b), layout = _prepare(a, b)
    return row_partials(rows(a, layout), rows(b, layout), "sqdiff", acc_dtype(a.dtype)).sum(dim=1)


def sqdiff_norm_backward_triton(go: torch.Tensor, a: torch.Tensor, b: torch.Tensor):
    (a, b), layout = _prepare(a, b)
    acc = acc_dtype(a.dtype)
    da, db = torch.empty_like(a), torch.empty_like(a)
    a2, b2 = rows(a, layout), rows(b, layout)
    n, d = a2.shape
    s, chunk = _split(n, d, a.device)
    _sqdiff_bwd_kernel[(n, s)](go.to(acc).contiguous(), a2, b2, rows(da, layout), rows(db, layout),
                               d, chunk, BLOCK=_BLOCK)
    return da, db
