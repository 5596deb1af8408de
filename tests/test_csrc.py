"""The C++ CPU kernels of guard_fast._C (torch.ops.guard_fast_C.*) against float64 references.

Each op is checked over a grid of shapes (batch 1, odd sizes, a 224x224 image batch),
layouts (contiguous, channels_last, permuted inner dims, batch-innermost, sliced, mixed)
and dtypes, on CPU and (where there is a GPU and the CUDA kernels were built) on CUDA.
Low-precision outputs may err at most about twice as much as the same
computation done eagerly in that dtype, plus one unit in the last place; outputs kept in
the accumulation dtype (norms, sums of squares) must match to fp32 (fp64) precision.
"""
import pytest
import torch

import guard_fast._C as _C  # noqa: F401  (a missing extension must fail, not skip)
from guard_fast.kernels import guard_penalty as gp

OPS = torch.ops.guard_fast_C
gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
DEVICES = ["cpu", pytest.param("cuda", marks=gpu)]
DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]
# floor added to 2x the eager error: (atol, rtol against max|ref|); about one ulp of each dtype
FLOOR = {torch.float64: (1e-12, 1e-12), torch.float32: (1e-6, 2e-6),
         torch.bfloat16: (1e-3, 2.0**-8), torch.float16: (1e-4, 2.0**-11)}
ACC_TOL = {torch.float64: 1e-11, torch.float32: 2e-5}  # rtol for outputs in the acc dtype
H, TINY = 3.0, 1e-12

SHAPES = [(1, 3, 7, 5), (5, 3, 17, 9), (3, 1000), (7,), (1, 3, 224, 224)]
BIG = (1, 3, 224, 224)  # batch 1, 150k elements: rows are split across threads
LAYOUTS = ["contiguous", "channels_last", "permuted", "batch_inner", "sliced", "mixed"]


def acc_of(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def make(shape, dtype, layout, gen, scale=1.0, device="cpu"):
    """A tensor of `shape` with the memory layout named by `layout` (see module doc)."""
    def rnd(s):
        return (torch.randn(s, generator=gen, dtype=torch.float64) * scale).to(device, dtype)

    if layout in ("contiguous", "mixed"):
        return rnd(shape)
    if layout == "channels_last":
        return rnd(shape).contiguous(memory_format=torch.channels_last)
    if layout == "permuted":  # batch outermost, inner dims reversed in memory
        inner = list(range(len(shape) - 1, 0, -1))
        base = rnd((shape[0],) + tuple(shape[d] for d in inner))
        back = [0] + [inner.index(d) + 1 for d in range(1, len(shape))]
        return base.permute(back)
    if layout == "batch_inner":  # batch dim has stride 1: samples are not blocks
        return rnd(tuple(reversed(shape))).permute(*range(len(shape) - 1, -1, -1))
    if layout == "sliced":  # not dense
        return rnd(tuple(shape[:-1]) + (2 * shape[-1],))[..., ::2]
    raise ValueError(layout)


def pair(shape, dtype, layout, seed=0, scale_b=1.0, device="cpu"):
    gen = torch.Generator().manual_seed(seed)
    a = make(shape, dtype, layout, gen, device=device)
    b = make(shape, dtype, "contiguous" if layout == "mixed" else layout, gen, scale_b, device)
    if layout == "mixed":  # both dense, but with different strides
        a = a.contiguous(memory_format=torch.channels_last) if a.dim() == 4 else a.t().contiguous().t()
    assert a.shape == b.shape
    return a, b


def cases():
    out = []
    for shape in SHAPES:
        for layout in LAYOUTS:
            if layout == "channels_last" and len(shape) != 4:
                continue
            if layout == "mixed" and len(shape) not in (2, 4):
                continue
            if shape == BIG and layout not in ("contiguous", "channels_last"):
                continue
            for dtype in DTYPES:
                if shape == BIG and dtype not in (torch.float32, torch.bfloat16):
                    continue
                out.append(pytest.param(shape, layout, dtype,
                                        id=f"{'x'.join(map(str, shape))}-{layout}-{str(dtype)[6:]}"))
    return out


def view_shape(t):
    return (-1,) + (1,) * (t.dim() - 1)


def check_layout(out, inp, layout):
    """Raw-memory path keeps the input's strides; the fallback returns contiguous tensors."""
    raw = layout in ("contiguous", "channels_last", "permuted") or (
        layout == "batch_inner" and inp.shape[0] == 1)  # one sample: any dense order is a block
    if raw:
        assert out.stride() == inp.stride(), (out.stride(), inp.stride())
        if layout == "channels_last":
            assert out.is_contiguous(memory_format=torch.channels_last)
    else:
        assert out.is_contiguous(), out.stride()


def assert_close_eager(out, ref, eager, dtype, what):
    """|out - ref| <= 2 |eager - ref| + floor, all against the float64 reference."""
    err = (out.double() - ref).abs()
    err_eager = (eager.double() - ref).abs().max().item()
    atol, rtol = FLOOR[dtype]
    bound = 2 * err_eager + atol + rtol * ref.abs().max().item()
    assert torch.isfinite(out).all(), f"{what}: non-finite values"
    assert err.max().item() <= bound, (
        f"{what} ({dtype}): max |diff| {err.max().item():.3e}, mean {err.mean().item():.3e}, "
        f"bound {bound:.3e} (eager max {err_eager:.3e})")


def assert_close_acc(out, ref, dtype, what):
    assert out.dtype == acc_of(dtype), (what, out.dtype)
    err = (out.double() - ref).abs()
    bound = ACC_TOL[acc_of(dtype)] * ref.abs().max().item() + 1e-30
    assert err.max().item() <= bound, (
        f"{what} ({dtype}): max |diff| {err.max().item():.3e}, mean {err.mean().item():.3e}, "
        f"bound {bound:.3e}")


# ----------------------------------------------------------------------------- references


def _in_f64(ref):
    """An op's reference (guard_fast.kernels.guard_penalty) run on float64 copies."""
    return lambda *args: ref(*(a.double() if isinstance(a, torch.Tensor) else a for a in args))


perturb_ref = _in_f64(gp.perturb_ref)
sqdiff_ref = _in_f64(gp.sqdiff_norm_ref)
sqdiff_backward_ref = _in_f64(gp.sqdiff_norm_backward_ref)


def perturb_eager(x, g, h, tiny):  # the same math in x.dtype, as eager torch does it
    n = torch.linalg.vector_norm(g.reshape(len(g), -1), dim=1)
    return x + h * g / n.clamp_min(tiny).view(view_shape(g))


# ----------------------------------------------------------------------------- forward grid


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape,layout,dtype", cases())
def test_perturb(shape, layout, dtype, device):
    x, g = pair(shape, dtype, layout, seed=1, device=device)
    xp, norm = OPS.perturb(x, g, H, TINY)
    assert xp.shape == x.shape and xp.dtype == dtype and xp.device == x.device
    assert norm.shape == (shape[0],) and norm.device == x.device
    check_layout(xp, x, layout)
    ref_xp, ref_n = perturb_ref(x, g, H, TINY)
    assert_close_acc(norm, ref_n, dtype, "perturb norm")
    assert_close_eager(xp, ref_xp, perturb_eager(x, g, H, TINY), dtype, "perturb xp")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape,layout,dtype", cases())
def test_sqdiff_norm(shape, layout, dtype, device):
    a, b = pair(shape, dtype, layout, seed=2, device=device)
    s = OPS.sqdiff_norm(a, b)
    assert s.shape == (shape[0],) and s.device == a.device
    assert_close_acc(s, sqdiff_ref(a, b), dtype, "sqdiff_norm")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape,layout,dtype", cases())
def test_sqdiff_norm_backward(shape, layout, dtype, device):
    a, b = pair(shape, dtype, layout, seed=3, device=device)
    gen = torch.Generator().manual_seed(4)
    go = (torch.randn(shape[0], generator=gen) * 1.7 - 0.3).to(device)  # != 1, mixed signs
    ga, gb = OPS.sqdiff_norm_backward(go, a, b)
    assert ga.dtype == dtype and gb.dtype == dtype and ga.shape == a.shape
    check_layout(ga, a, layout)
    check_layout(gb, a, layout)
    ref_a, ref_b = sqdiff_backward_ref(go, a, b)
    eager = 2 * (a - b) * go.to(dtype).view(view_shape(a))
    assert_close_eager(ga, ref_a, eager, dtype, "grad_a")
    assert torch.equal(gb, -ga)  # written from the same value in one pass


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_imagenet_batch(dtype, device):
    """(2, 3, 224, 224): the size the ImageNet recipes use, contiguous and channels_last."""
    for layout in ("contiguous", "channels_last"):
        x, g = pair((2, 3, 224, 224), dtype, layout, seed=5, device=device)
        xp, norm = OPS.perturb(x, g, H, TINY)
        ref_xp, ref_n = perturb_ref(x, g, H, TINY)
        assert_close_acc(norm, ref_n, dtype, "perturb norm")
        assert_close_eager(xp, ref_xp, perturb_eager(x, g, H, TINY), dtype, "perturb xp")
        check_layout(xp, x, layout)
        assert_close_acc(OPS.sqdiff_norm(x, g), sqdiff_ref(x, g), dtype, "sqdiff_norm")
        go = torch.tensor([0.25, -2.0], device=device)
        ga, gb = OPS.sqdiff_norm_backward(go, x, g)
        ref_a, _ = sqdiff_backward_ref(go, x, g)
        assert_close_eager(ga, ref_a, 2 * (x - g) * go.to(dtype).view(-1, 1, 1, 1), dtype, "grad_a")
        assert torch.equal(gb, -ga)


# ----------------------------------------------------------------------------- edge cases


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("tiny", [TINY, 0.0])
def test_perturb_zero_gradient(dtype, tiny, device):
    """A zero g_i leaves x_i bit-identical with norm 0 (never NaN), even for tiny = 0."""
    gen = torch.Generator().manual_seed(6)
    x = torch.randn(4, 3, 5, 7, generator=gen).to(device, dtype)
    g = torch.randn(4, 3, 5, 7, generator=gen).to(device, dtype)
    g[1] = 0
    g[3] = 0
    xp, norm = OPS.perturb(x, g, H, tiny)
    assert torch.isfinite(xp).all() and torch.isfinite(norm).all()
    assert torch.equal(xp[1], x[1]) and torch.equal(xp[3], x[3])
    assert norm[1] == 0 and norm[3] == 0
    assert not torch.equal(xp[0], x[0])
    xp0, norm0 = OPS.perturb(x, torch.zeros_like(x), H, tiny)
    assert torch.equal(xp0, x) and torch.equal(norm0, torch.zeros_like(norm0))


@pytest.mark.parametrize("device", DEVICES)
def test_perturb_tiny_clamps_small_norms(device):
    """max(norm, tiny): a gradient shorter than tiny moves x by h * g / tiny, not by h."""
    x = torch.zeros(2, 3, dtype=torch.float64, device=device)
    g = torch.tensor([[1e-9, 0.0, 0.0], [3.0, 4.0, 0.0]], dtype=torch.float64, device=device)
    xp, norm = OPS.perturb(x, g, 2.0, 1e-6)
    torch.testing.assert_close(norm.cpu(), torch.tensor([1e-9, 5.0], dtype=torch.float64))
    torch.testing.assert_close(xp.cpu(), torch.tensor([[2e-3, 0, 0], [1.2, 1.6, 0]], dtype=torch.float64))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_zero_difference(dtype, device):
    a = torch.randn(3, 2, 9, 9).to(device, dtype)
    s = OPS.sqdiff_norm(a, a.clone())
    assert torch.equal(s.cpu(), torch.zeros(3, dtype=acc_of(dtype)))
    ga, gb = OPS.sqdiff_norm_backward(torch.full((3,), 5.0, device=device), a, a.clone())
    assert torch.isfinite(ga).all() and (ga == 0).all() and (gb == 0).all()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("go", [
    torch.tensor(0.5).expand(4),                               # stride 0, as from .sum().backward()
    torch.tensor([1.0, -2.0, 0.5, 3.0], dtype=torch.float64),  # another dtype than a's
    torch.arange(8.0)[::2],                                    # strided
    torch.tensor([1.0, -2.0, 0.5, 3.0], dtype=torch.bfloat16),
], ids=["expanded", "float64", "strided", "bfloat16"])
def test_backward_grad_out_forms(go, device):
    a, b = pair((4, 3, 6, 5), torch.float32, "contiguous", seed=7, device=device)
    go = go.to(device)
    ga, gb = OPS.sqdiff_norm_backward(go, a, b)
    ref_a, ref_b = sqdiff_backward_ref(go, a, b)
    torch.testing.assert_close(ga.double(), ref_a, rtol=2e-6, atol=1e-6)
    torch.testing.assert_close(gb.double(), ref_b, rtol=2e-6, atol=1e-6)


@pytest.mark.parametrize("device", DEVICES)
def test_storage_offset_and_empty_samples(device):
    base = torch.randn(5, 3, 4, 4, device=device)
    x, g = base[1:4], torch.randn(5, 3, 4, 4, device=device)[2:5]  # dense views mid-storage
    xp, n = OPS.perturb(x, g, H, TINY)
    ref_xp, ref_n = perturb_ref(x, g, H, TINY)
    torch.testing.assert_close(xp.double(), ref_xp, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(n.double(), ref_n)
    # samples with no elements: norms and sums are 0, outputs are empty
    e = torch.empty(3, 0, device=device)
    xp, n = OPS.perturb(e, e, H, TINY)
    assert xp.shape == (3, 0) and torch.equal(n.cpu(), torch.zeros(3))
    assert torch.equal(OPS.sqdiff_norm(e, e).cpu(), torch.zeros(3))
    ga, gb = OPS.sqdiff_norm_backward(torch.ones(3, device=device), e, e)
    assert ga.shape == (3, 0) and gb.shape == (3, 0)


def test_thread_splitting_matches_serial():
    """Fewer samples than threads: rows are cut into chunks; the result must not change
    beyond rounding whether 1 or 8 threads run it."""
    old = torch.get_num_threads()
    shapes = [(1, 150_528), (3, 3, 64, 64), (2, 40_000)]
    try:
        results = {}
        for threads in (1, 8):
            torch.set_num_threads(threads)
            results[threads] = [(OPS.perturb(*pair(s, torch.float32, "contiguous", 8), H, TINY),
                                 OPS.sqdiff_norm(*pair(s, torch.float32, "contiguous", 9)))
                                for s in shapes]
    finally:
        torch.set_num_threads(old)
    for s, ((xp1, n1), s1), ((xp8, n8), s8) in zip(shapes, results[1], results[8]):
        torch.testing.assert_close(n8, n1, rtol=1e-5, atol=0, msg=f"norm {s}")
        torch.testing.assert_close(s8, s1, rtol=1e-5, atol=0, msg=f"sqdiff {s}")
        torch.testing.assert_close(xp8, xp1, rtol=1e-5, atol=1e-6, msg=f"xp {s}")
        x, g = pair(s, torch.float32, "contiguous", 8)
        assert_close_acc(n8, perturb_ref(x, g, H, TINY)[1], torch.float32, f"norm {s}")


@gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1000, 37), (2, 3, 224, 224), (3, 8 * 1001), (64, 3, 32, 32)])
def test_cuda_paths_match_cpu(shape, dtype):
    """CUDA vs the CPU kernels: many short rows (one block per sample), few long rows
    (split rows, atomics), 16-byte packs, and a misaligned start (scalar loads)."""
    assert _C.cuda_compiled(), "a GPU is present but guard_fast._C was built without CUDA"
    gen = torch.Generator().manual_seed(12)
    n = 1
    for d in shape:
        n *= d
    flat_x = torch.randn(n + 1, generator=gen).to(dtype)
    flat_g = torch.randn(n + 1, generator=gen).to(dtype)
    for off in (0, 1):  # off=1 shifts the data pointer by one element: no packed loads
        x = flat_x[off:off + n].view(shape)
        g = flat_g[off:off + n].view(shape)
        xc = flat_x.cuda()[off:off + n].view(shape)
        gc = flat_g.cuda()[off:off + n].view(shape)
        xp, nrm = OPS.perturb(xc, gc, H, TINY)
        xp_cpu, nrm_cpu = OPS.perturb(x, g, H, TINY)
        ref_xp, ref_n = perturb_ref(x, g, H, TINY)
        assert_close_acc(nrm.cpu(), ref_n, dtype, "cuda norm")
        assert_close_eager(xp.cpu(), ref_xp, xp_cpu, dtype, "cuda xp vs cpu kernel")
        assert_close_acc(OPS.sqdiff_norm(xc, gc).cpu(), sqdiff_ref(x, g), dtype, "cuda sqdiff")
        go = torch.linspace(-2, 3, shape[0])
        ga, gb = OPS.sqdiff_norm_backward(go.cuda(), xc, gc)
        ga_cpu, _ = OPS.sqdiff_norm_backward(go, x, g)
        assert_close_eager(ga.cpu(), sqdiff_backward_ref(go, x, g)[0], ga_cpu, dtype, "cuda grad_a")
        assert torch.equal(gb, -ga)


@gpu
def test_cuda_side_stream_and_device_mismatch():
    x, g = pair((4, 3, 16, 16), torch.float32, "contiguous", seed=13, device="cuda")
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):  # kernels must run on the current (side) stream
        xp, n = OPS.perturb(x, g, H, TINY)
        sq = OPS.sqdiff_norm(x, g)
    torch.cuda.current_stream().wait_stream(s)
    ref_xp, ref_n = perturb_ref(x, g, H, TINY)
    assert_close_acc(n, ref_n, torch.float32, "side-stream norm")
    assert_close_acc(sq, sqdiff_ref(x, g), torch.float32, "side-stream sqdiff")
    with pytest.raises(RuntimeError, match=r"perturb: device mismatch, x is on cuda:0 but g is on cpu"):
        OPS.perturb(x, g.cpu(), H, TINY)
    with pytest.raises(RuntimeError, match=r"sqdiff_norm_backward: device mismatch, grad_out"):
        OPS.sqdiff_norm_backward(torch.ones(4), x, g)


# ----------------------------------------------------------------------------- validation


def test_validation_messages():
    x = torch.randn(2, 3)
    with pytest.raises(RuntimeError, match=r"perturb: shape mismatch, x has shape .* but g"):
        OPS.perturb(x, torch.randn(2, 4), H, TINY)
    with pytest.raises(RuntimeError, match=r"perturb: dtype mismatch, x is Float but g is Double"):
        OPS.perturb(x, x.double(), H, TINY)
    with pytest.raises(RuntimeError, match=r"perturb: x must be a floating-point tensor"):
        OPS.perturb(x.int(), x.int(), H, TINY)
    with pytest.raises(RuntimeError, match=r"perturb: x must have at least 1 dimension"):
        OPS.perturb(torch.tensor(1.0), torch.tensor(1.0), H, TINY)
    with pytest.raises(RuntimeError, match=r"perturb: device mismatch, x is on cpu but g is on meta"):
        OPS.perturb(x, torch.empty(2, 3, device="meta"), H, TINY)
    with pytest.raises(RuntimeError, match=r"sqdiff_norm: shape mismatch, a has shape"):
        OPS.sqdiff_norm(x, torch.randn(3, 3))
    with pytest.raises(RuntimeError, match=r"sqdiff_norm: a must be a floating-point tensor"):
        OPS.sqdiff_norm(x.long(), x.long())
    with pytest.raises(RuntimeError, match=r"sqdiff_norm_backward: grad_out must have shape \(N,\)"):
        OPS.sqdiff_norm_backward(torch.ones(3), x, x)
    with pytest.raises(RuntimeError, match=r"sqdiff_norm_backward: grad_out must have shape \(N,\)"):
        OPS.sqdiff_norm_backward(torch.ones(2, 1), x, x)
    with pytest.raises(RuntimeError, match=r"sqdiff_norm_backward: grad_out must be a floating"):
        OPS.sqdiff_norm_backward(torch.ones(2, dtype=torch.int64), x, x)
    with pytest.raises(RuntimeError, match=r"sqdiff_norm_backward: dtype mismatch, a is Float but b"):
        OPS.sqdiff_norm_backward(torch.ones(2), x, x.half())


# ----------------------------------------------------------------------------- opcheck

# The C++ ops have no autograd formula (the Python layer, guard_fast.ops, adds it), so
# test_autograd_registration does not apply; their Meta kernels serve as fake impls.
OPCHECK_UTILS = ("test_schema", "test_faketensor", "test_aot_dispatch_dynamic")


def opcheck_samples(device):
    gen = torch.Generator().manual_seed(10)

    def rnd(*shape, dtype=torch.float32):
        return torch.randn(*shape, generator=gen).to(device, dtype)

    cl = rnd(2, 3, 5, 4).contiguous(memory_format=torch.channels_last)
    cl2 = rnd(2, 3, 5, 4).contiguous(memory_format=torch.channels_last)
    return [(cl, cl2),                                              # raw path, channels_last
            (rnd(3, 10)[:, ::2], rnd(3, 5)),                        # contiguous fallback
            (rnd(1, 7, 3, dtype=torch.float64), rnd(1, 7, 3, dtype=torch.float64)),
            (rnd(4, 6, dtype=torch.bfloat16), rnd(4, 6, dtype=torch.bfloat16))]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("i", range(4))
def test_opcheck(i, device):
    a, b = opcheck_samples(device)[i]
    torch.library.opcheck(OPS.perturb.default, (a, b, H, TINY), test_utils=OPCHECK_UTILS)
    torch.library.opcheck(OPS.sqdiff_norm.default, (a, b), test_utils=OPCHECK_UTILS)
    go = torch.linspace(-1.0, 2.0, a.shape[0], device=device)
    torch.library.opcheck(OPS.sqdiff_norm_backward.default, (go, a, b), test_utils=OPCHECK_UTILS)


def test_meta_matches_cpu_layouts():
    """The Meta kernels (fake impls) pick the same output strides as the CPU kernels."""
    for layout in ("contiguous", "channels_last", "permuted", "batch_inner", "sliced", "mixed"):
        a, b = pair((2, 3, 5, 4), torch.float32, layout, seed=11)
        am = torch.empty_strided(a.shape, a.stride(), device="meta")
        bm = torch.empty_strided(b.shape, b.stride(), device="meta")
        for name, args, margs in [
            ("perturb", (a, b, H, TINY), (am, bm, H, TINY)),
            ("sqdiff_norm", (a, b), (am, bm)),
            ("sqdiff_norm_backward", (torch.ones(2), a, b), (torch.ones(2, device="meta"), am, bm)),
        ]:
            real, fake = getattr(OPS, name)(*args), getattr(OPS, name)(*margs)
            real = real if isinstance(real, tuple) else (real,)
            fake = fake if isinstance(fake, tuple) else (fake,)
            for r, f in zip(real, fake):
                assert (r.shape, r.stride(), r.dtype) == (f.shape, f.stride(), f.dtype), (name, layout)


def test_cuda_compiled_flag():
    assert isinstance(_C.cuda_compiled(), bool)
