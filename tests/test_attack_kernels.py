"""Attack-step ops (pgd_step, mim_step, apgd_step) on every CPU backend against their
references (kernels/attack_steps.py: the eager steps of guard_fast.attacks).

Grid: batch 1, odd and non-power-of-two shapes, contiguous / sliced (non-contiguous) /
channels_last / mixed layouts, fp32, fp64 and bf16, eps = 0, zero gradients.
fp32/fp64: the elementwise results must equal the references bit for bit; mim_step's
momentum may differ in the last bits (its |g| sums run in another order), and its step must
then agree in sign wherever the reference momentum is not within that error of 0.
bf16: the kernels round once, eager after every operation, so both are compared with a
float64 run of the reference on the same inputs: a kernel may err at most twice as much as
eager bf16 plus one bf16 ulp (TOL below). Plus opcheck, the registry and the attacks.
"""
import os

import pytest
import torch

from guard_fast import ops
from guard_fast.kernels import attack_steps as ks
from guard_fast.kernels import guard_penalty as gp

SHAPES = [(1, 3, 7, 5), (5, 3, 17, 9), (3, 1000), (2, 1, 1, 1), (4, 3, 33, 31)]
DTYPES = [torch.float32, torch.float64, torch.bfloat16]
# (atol, rtol against max |truth|) added to 2x eager's error for low precision; for fp32 and
# fp64 the rtol bounds mim_step's momentum against the reference at the same precision
TOL = {torch.float64: (0.0, 1e-13), torch.float32: (0.0, 4e-6), torch.bfloat16: (2.0**-9, 2.0**-8),
       torch.float16: (2.0**-12, 2.0**-11)}
LOW = (torch.bfloat16, torch.float16)
EPS, ALPHA, DECAY = 0.1, 0.025, 0.9


def _backends():
    out = {"torch": (ks.pgd_step_ref, ks.mim_step_ref, ks.apgd_step_ref),
           "op": (ops.pgd_step, ops.mim_step, ops.apgd_step)}
    c = torch.ops.guard_fast_C if ops.extension is not None else None
    if c is not None and hasattr(c, "pgd_step"):
        out["cpp"] = (c.pgd_step, c.mim_step, c.apgd_step)
    if gp.HAS_TRITON and (torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1"):
        out["triton"] = (ks.pgd_step_triton, ks.mim_step_triton, ks.apgd_step_triton)
    return out


BACKENDS = _backends()


def _layouts(shape):
    yield "contiguous"
    yield "sliced"
    if len(shape) == 4:
        yield "channels_last"
        yield "mixed"


def _inputs(shape, dtype, layout, seed=0, zero_grad=False):
    """x in [0, 1]; x_adv, x_adv_old within 1.5 eps of x (so every clamp has work), clipped to
    [0, 1]; gradients with some exact zeros; momentum; per-sample step sizes."""
    g = torch.Generator().manual_seed(seed)

    def rnd(kind):
        wide = shape[:-1] + (2 * shape[-1],) if layout == "sliced" else shape
        t = torch.rand(wide, generator=g, dtype=torch.float64) if kind == "u" else \
            torch.randn(wide, generator=g, dtype=torch.float64)
        return t

    x = rnd("u")
    xa = (x + 1.5 * EPS * (2 * rnd("u") - 1)).clamp(0, 1)
    xo = (x + 1.5 * EPS * (2 * rnd("u") - 1)).clamp(0, 1)
    gr = rnd("n") * (rnd("u") > 0.1)          # ~10% exact zeros
    if zero_grad:
        gr.zero_()
    mo = 0.5 * rnd("n")
    ts = [t.to(dtype) for t in (x, xa, xo, gr, mo)]
    if layout == "sliced":
        ts = [t[..., ::2] for t in ts]
    elif layout == "channels_last":
        ts = [t.contiguous(memory_format=torch.channels_last) for t in ts]
    elif layout == "mixed":      # one channels_last input among contiguous ones
        ts[1] = ts[1].contiguous(memory_format=torch.channels_last)
    step = (2 * EPS * torch.rand(shape[0], generator=g, dtype=torch.float64)).to(dtype)
    return (*ts, step)


def _f64(*ts):
    return tuple(t.double() if isinstance(t, torch.Tensor) else t for t in ts)


def _report(what, got, ref):
    d = (got.double() - ref.double()).abs()
    return f"{what}: max diff {d.max().item():.3g}, mean diff {d.mean().item():.3g}"


def _assert_low_precision(what, got, eager, truth, dtype, mask=None):
    """|got - truth| <= 2 |eager - truth| + atol + rtol * max|truth| (on `mask` if given)."""
    atol, rtol = TOL[dtype]
    err = (got.double() - truth).abs()
    err_eager = (eager.double() - truth).abs()
    if mask is not None:
        err, err_eager = err[mask], err_eager[mask]
    bound = 2 * err_eager.max().item() + atol + rtol * truth.abs().max().item()
    assert torch.isfinite(got).all(), f"{what}: non-finite values"
    assert err.numel() == 0 or err.max().item() <= bound, (
        f"{what} ({dtype}): max diff {err.max().item():.3g}, mean diff {err.mean().item():.3g}, "
        f"bound {bound:.3g} (eager max {err_eager.max().item():.3g})")


def _check_same(what, got, ref, dtype, eager64=None):
    """fp32/fp64: bit-identical; bf16/fp16: against the float64 truth (eager64)."""
    assert got.shape == ref.shape and got.dtype == ref.dtype, (what, got.dtype, ref.dtype)
    if dtype in LOW:
        _assert_low_precision(what, got, ref, eager64, dtype)
    else:
        assert torch.equal(got, ref), _report(what, got, ref)


def _check_mim(what, got, ref, truth, dtype):
    """got, ref, truth: (x_adv, momentum) from the kernel, eager at dtype, eager in fp64.
    Momentum within TOL; the step agrees wherever sign(m) agrees; sign flips only where the
    reference momentum is within the momentum error bound of 0."""
    (xk, mk), (xr, mr), (xt, mt) = got, ref, truth
    assert torch.isfinite(mk).all() and torch.isfinite(xk).all(), what
    atol, rtol = TOL[dtype]
    base = mt if dtype in LOW else mr.double()
    err_m = (mk.double() - base).abs()
    bound_m = atol + rtol * base.abs().max().item()
    if dtype in LOW:
        bound_m += 2 * (mr.double() - mt).abs().max().item()
    assert err_m.max().item() <= bound_m, (_report(f"{what} momentum", mk, base)
                                           + f", bound {bound_m:.3g}")
    flip = torch.sign(mk.double()) != torch.sign(base)
    assert (base.abs()[flip] <= bound_m).all(), f"{what}: step sign flipped where |m| is large"
    same = ~flip
    if dtype in LOW:
        _assert_low_precision(f"{what} x_adv", xk, xr, xt, dtype, mask=same)
    else:
        assert torch.equal(xk[same], xr[same]), _report(f"{what} x_adv", xk[same], xr[same])


@pytest.mark.parametrize("backend", list(BACKENDS))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_steps_against_reference(backend, dtype, shape):
    if backend == "triton" and shape == (4, 3, 33, 31) and dtype != torch.float32:
        pytest.skip("interpreter is slow; the big shape runs once, in fp32")
    pgd, mim, apgd = BACKENDS[backend]
    for layout in _layouts(shape):
        x, xa, xo, g, mo, step = _inputs(shape, dtype, layout, seed=len(shape))
        tag = f"{backend} {layout}"
        ref = ks.pgd_step_ref(xa, x, g, ALPHA, EPS)
        out = pgd(xa, x, g, ALPHA, EPS)
        _check_same(f"pgd {tag}", out, ref, dtype, ks.pgd_step_ref(*_f64(xa, x, g), ALPHA, EPS))
        if layout == "channels_last":
            assert out.is_contiguous(memory_format=torch.channels_last), tag
        for per_sample in (True, False):
            got = mim(xa, x, g, mo, ALPHA, EPS, DECAY, per_sample)
            ref = ks.mim_step_ref(xa, x, g, mo, ALPHA, EPS, DECAY, per_sample)
            truth = ks.mim_step_ref(*_f64(xa, x, g, mo), ALPHA, EPS, DECAY, per_sample)
            _check_mim(f"mim per_sample={per_sample} {tag}", got, ref, truth, dtype)
        for a in (1.0, 0.75):
            ref = ks.apgd_step_ref(xa, xo, g, step, x, EPS, a)
            out = apgd(xa, xo, g, step, x, EPS, a)
            _check_same(f"apgd a={a} {tag}", out, ref, dtype,
                        ks.apgd_step_ref(*_f64(xa, xo, g, step, x), EPS, a))


@pytest.mark.parametrize("backend", list(BACKENDS))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_eps_zero_returns_x(backend, dtype):
    """eps = 0: the eps-ball is the point x (in [0, 1]), whatever the gradient."""
    pgd, mim, apgd = BACKENDS[backend]
    x, xa, xo, g, mo, step = _inputs((3, 2, 5, 7), dtype, "contiguous", seed=11)
    assert torch.equal(pgd(xa, x, g, ALPHA, 0.0), x)
    for per_sample in (True, False):
        assert torch.equal(mim(xa, x, g, mo, ALPHA, 0.0, DECAY, per_sample)[0], x)
    for a in (1.0, 0.75):
        assert torch.equal(apgd(xa, xo, g, step, x, 0.0, a), x)


@pytest.mark.parametrize("backend", list(BACKENDS))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_zero_gradient(backend, dtype):
    """A zero gradient moves nothing and makes no NaN (MI-FGSM divides by tiny, not 0)."""
    pgd, mim, apgd = BACKENDS[backend]
    x, xa, xo, g, mo, step = _inputs((4, 3, 6, 5), dtype, "contiguous", seed=12, zero_grad=True)
    xa = x + (xa - x).clamp(-EPS / 2, EPS / 2)           # inside the ball: projection is a no-op
    xa = xa.clamp(0, 1)
    assert torch.equal(pgd(xa, x, g, ALPHA, EPS), ks.pgd_step_ref(xa, x, g, ALPHA, EPS))
    for per_sample in (True, False):
        out, m = mim(xa, x, g, torch.zeros_like(x), ALPHA, EPS, DECAY, per_sample)
        assert torch.equal(m, torch.zeros_like(x)), (backend, per_sample)
        assert torch.equal(out, xa) or dtype == torch.bfloat16 and torch.allclose(out, xa)
        out, m = mim(xa, x, g, mo, ALPHA, EPS, DECAY, per_sample)   # momentum alone steps
        assert torch.isfinite(m).all() and torch.isfinite(out).all()
    out = apgd(xa, xo, g, step, x, EPS, 1.0)        # a = 1: no momentum term, no step
    assert torch.equal(out, xa) or dtype == torch.bfloat16 and torch.allclose(out, xa)
    _check_same("apgd zero grad", apgd(xa, xo, g, step, x, EPS, 0.75),
                ks.apgd_step_ref(xa, xo, g, step, x, EPS, 0.75), dtype,
                ks.apgd_step_ref(*_f64(xa, xo, g, step, x), EPS, 0.75))


def test_step_size_forms_and_mim_scale_modes():
    """apgd_step takes step sizes as (N,) or (N, 1, 1, 1); batch vs per-sample MI-FGSM scale
    differ as documented (one L1 norm over the batch vs each sample's mean |g|)."""
    x, xa, xo, g, mo, step = _inputs((3, 2, 4, 4), torch.float32, "contiguous", seed=13)
    a = ops.apgd_step(xa, xo, g, step, x, EPS, 0.75)
    b = ops.apgd_step(xa, xo, g, step.view(3, 1, 1, 1), x, EPS, 0.75)
    assert torch.equal(a, b)
    zero = torch.zeros_like(x)
    _, m_ps = ops.mim_step(xa, x, g, zero, ALPHA, EPS, 1.0, True)
    _, m_b = ops.mim_step(xa, x, g, zero, ALPHA, EPS, 1.0, False)
    torch.testing.assert_close(m_ps, g / g.abs().mean(dim=(1, 2, 3), keepdim=True))
    torch.testing.assert_close(m_b, g / g.abs().sum())


# ----------------------------------------------------------------------------- opcheck


def _opcheck_cases():
    x, xa, xo, g, mo, step = _inputs((3, 2, 5, 4), torch.float32, "contiguous", seed=14)
    cl = [t.contiguous(memory_format=torch.channels_last) for t in (x, xa, xo, g, mo)]
    d = [t.double() for t in (x, xa, xo, g, mo, step)]
    return [
        (ops.pgd_step, (xa, x, g, ALPHA, EPS)),
        (ops.pgd_step, (cl[1], cl[0], cl[3], ALPHA, EPS)),
        (ops.pgd_step, (cl[1], x, g, ALPHA, EPS)),                    # mixed layouts
        (ops.mim_step, (xa, x, g, mo, ALPHA, EPS, DECAY, True)),
        (ops.mim_step, (cl[1], cl[0], cl[3], cl[4], ALPHA, EPS, 1.0, False)),
        (ops.mim_step, (d[1], d[0], d[3], d[4], ALPHA, EPS, DECAY, True)),
        (ops.apgd_step, (xa, xo, g, step, x, EPS, 0.75)),
        (ops.apgd_step, (cl[1], cl[2], cl[3], step.view(3, 1, 1, 1), cl[0], EPS, 1.0)),
        (ops.apgd_step, (d[1], d[2], d[3], d[5], d[0], EPS, 0.75)),
    ]


@pytest.mark.parametrize("i", range(9))
def test_opcheck(i):
    op, args = _opcheck_cases()[i]
    torch.library.opcheck(op, args)


@pytest.mark.skipif("cpp" not in BACKENDS, reason="guard_fast._C without the attack-step ops")
def test_opcheck_cpp_ops():
    """The C++ ops themselves (schema, Meta kernels as fakes, dynamic shapes)."""
    utils = ("test_schema", "test_faketensor", "test_aot_dispatch_dynamic")
    c = torch.ops.guard_fast_C
    for op, args in _opcheck_cases():
        name = op._name.split("::")[-1]   # "pgd_step" or "guard_fast::pgd_step"
        if name == "apgd_step":
            args = args[:3] + (args[3].reshape(-1),) + args[4:]
        torch.library.opcheck(getattr(c, name).default, args, test_utils=utils)


def test_meta_matches_cpp_layouts():
    if "cpp" not in BACKENDS:
        pytest.skip("guard_fast._C without the attack-step ops")
    c = torch.ops.guard_fast_C
    for layout in ("contiguous", "sliced", "channels_last", "mixed"):
        x, xa, xo, g, mo, step = _inputs((2, 3, 5, 4), torch.float32, layout, seed=15)
        mx, mxa, mxo, mg, mmo, mst = (torch.empty_strided(t.shape, t.stride(), device="meta")
                                      for t in (x, xa, xo, g, mo, step))
        for real, fake in [(c.pgd_step(xa, x, g, ALPHA, EPS), c.pgd_step(mxa, mx, mg, ALPHA, EPS)),
                           (c.mim_step(xa, x, g, mo, ALPHA, EPS, DECAY, True)[1],
                            c.mim_step(mxa, mx, mg, mmo, ALPHA, EPS, DECAY, True)[1]),
                           (c.apgd_step(xa, xo, g, step, x, EPS, 0.75),
                            c.apgd_step(mxa, mxo, mg, mst, mx, EPS, 0.75))]:
            assert (real.shape, real.stride()) == (fake.shape, fake.stride()), layout


# ----------------------------------------------------------------------------- errors, registry


def test_bad_inputs_and_no_autograd():
    x, xa, xo, g, mo, step = _inputs((2, 3, 4), torch.float32, "contiguous", seed=16)
    with pytest.raises(ValueError, match="shape"):
        ops.pgd_step(xa, x[:1], g, ALPHA, EPS)
    with pytest.raises(TypeError, match="float64"):
        ops.mim_step(xa, x, g, mo.double(), ALPHA, EPS, DECAY, True)
    with pytest.raises(ValueError, match="step_size"):
        ops.apgd_step(xa, xo, g, step[:1], x, EPS, 0.75)
    with pytest.raises(RuntimeError, match="not differentiable"):
        ops.pgd_step(xa.clone().requires_grad_(), x, g, ALPHA, EPS)
    with pytest.raises(RuntimeError, match="not differentiable"):
        ops.apgd_step(xa, xo, g.clone().requires_grad_(), step, x, EPS, 0.75)
    with torch.no_grad():   # outside autograd it is fine
        ops.mim_step(xa.clone().requires_grad_(), x, g, mo, ALPHA, EPS, DECAY, True)
    if "cpp" in BACKENDS:
        c = torch.ops.guard_fast_C
        with pytest.raises(RuntimeError, match=r"apgd_step: step_size must have shape \(N,\)"):
            c.apgd_step(xa, xo, g, step.view(2, 1), x, EPS, 0.75)
        with pytest.raises(RuntimeError, match=r"mim_step: dtype mismatch, x_adv is Float but mom"):
            c.mim_step(xa, x, g, mo.double(), ALPHA, EPS, DECAY, True)


def test_stale_extension_falls_back(monkeypatch):
    """A guard_fast._C built before these ops: the auto backend warns and falls back to the
    reference, whose result is the eager step."""
    if ops._requested != "auto" or ops.backend_for("cpu") == "torch":
        pytest.skip("needs the auto registry with a non-torch CPU backend")
    monkeypatch.setitem(ops._tables, "cpu", dict(ops._tables["cpu"],
                                                 pgd_step=ops._missing_op("pgd_step")))
    monkeypatch.setitem(ops._chosen, "cpu", ops._chosen["cpu"])
    x, xa, xo, g, mo, step = _inputs((2, 3, 4), torch.float32, "contiguous", seed=17)
    with pytest.warns(RuntimeWarning, match="rebuild"):
        out = ops.pgd_step(xa, x, g, ALPHA, EPS)
    assert torch.equal(out, ks.pgd_step_ref(xa, x, g, ALPHA, EPS))
    assert ops._chosen["cpu"] == "torch"


@pytest.mark.parametrize("backend", ["registry", "triton"])
def test_attacks_fused_equal_eager(monkeypatch, backend):
    """PGD, both MI-FGSM normalizations, APGD, CW-Linf and Square give the same points with
    the fused steps
    (the registry's CPU backend, or Triton put in its place) as with the eager ones (fp32,
    a small random model)."""
    import guard_fast.attacks as A
    from guard_fast.attacks import apgd as apgd_mod, cw as cw_mod, mim as mim_mod, pgd as pgd_mod
    from guard_fast.attacks import square as square_mod

    if backend == "triton":
        if "triton" not in BACKENDS:
            pytest.skip("triton does not run here")
        ops.backend_for("cpu")
        monkeypatch.setitem(ops._tables, "cpu", dict(ops._tables["cpu"], **dict(
            zip(("pgd_step", "mim_step", "apgd_step"), BACKENDS["triton"])),
            square_window=ks.square_window_triton))
        monkeypatch.setitem(ops._chosen, "cpu", "triton")
    elif not pgd_mod.fused_steps(torch.device("cpu")):
        pytest.skip("the CPU backend is torch: nothing fused to compare")
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(48, 32), torch.nn.ReLU(),
                                torch.nn.Linear(32, 5)).eval()
    x = torch.rand(6, 3, 4, 4)
    with torch.no_grad():
        y = model(x).argmax(1)
    attacks = [lambda: A.PGD(model, eps=EPS, alpha=EPS / 4, steps=5, random_start=True, seed=1),
               lambda: A.MIM(model, eps=EPS, alpha=EPS / 4, steps=5, grad_norm="per_sample"),
               lambda: A.MIM(model, eps=EPS, alpha=EPS / 4, steps=5, grad_norm="batch"),
               lambda: A.APGD(model, eps=EPS, steps=8, seed=0),
               lambda: A.CWLinf(model, eps=EPS, steps=6, compact_every=2, seed=2),
               lambda: A.Square(model, eps=EPS, n_queries=40, seed=3)]
    fused = [make()(x, y) for make in attacks]
    for mod in (pgd_mod, mim_mod, apgd_mod, cw_mod, square_mod):
        monkeypatch.setattr(mod, "fused_steps", lambda device: False)
    eager = [make()(x, y) for make in attacks]
    for k, (f, e) in enumerate(zip(fused, eager)):
        assert torch.equal(f, e), _report(f"attack {k}", f, e)


# ----------------------------------------------------------------------------- GPU

from conftest import gpu  # noqa: E402


@gpu
@pytest.mark.parametrize("dtype", DTYPES + [torch.float16], ids=str)
@pytest.mark.parametrize("shape", [(5, 3, 17, 9), (64, 3, 32, 32), (1, 3, 224, 224), (7, 1000)],
                         ids=str)
def test_steps_on_cuda(shape, dtype):
    """The CUDA kernels of guard_fast._C, Triton and the registry op on CUDA tensors against
    the eager reference on CUDA (packed and, via a one-element offset, unpacked loads)."""
    impls = {"op": BACKENDS["op"]}
    if gp.HAS_TRITON:
        impls["triton"] = (ks.pgd_step_triton, ks.mim_step_triton, ks.apgd_step_triton)
    if ops.extension is not None and ops.extension.cuda_compiled():
        c = torch.ops.guard_fast_C
        impls["cuda-ext"] = (c.pgd_step, c.mim_step, c.apgd_step)
    for layout in ("contiguous", "channels_last", "offset"):
        if layout == "channels_last" and len(shape) != 4:
            continue
        x, xa, xo, g, mo, step = _inputs(shape, torch.float64, "contiguous", seed=21)
        ts = [t.to("cuda", dtype) for t in (x, xa, xo, g, mo)]
        if layout == "offset":   # data pointers one element past a 16-byte boundary
            ts = [torch.cat([t.new_zeros(1), t.flatten()])[1:].view(shape) for t in ts]
        if layout == "channels_last":
            ts = [t.contiguous(memory_format=torch.channels_last) for t in ts]
        x, xa, xo, g, mo = ts
        step = step.to("cuda", dtype)
        for name, (pgd, mim, apgd) in impls.items():
            tag = f"cuda {name} {layout}"
            _check_same(f"pgd {tag}", pgd(xa, x, g, ALPHA, EPS),
                        ks.pgd_step_ref(xa, x, g, ALPHA, EPS), dtype,
                        ks.pgd_step_ref(*_f64(xa, x, g), ALPHA, EPS))
            for per_sample in (True, False):
                _check_mim(f"mim {tag}", mim(xa, x, g, mo, ALPHA, EPS, DECAY, per_sample),
                           ks.mim_step_ref(xa, x, g, mo, ALPHA, EPS, DECAY, per_sample),
                           ks.mim_step_ref(*_f64(xa, x, g, mo), ALPHA, EPS, DECAY, per_sample),
                           dtype)
            for a in (1.0, 0.75):
                _check_same(f"apgd {tag}", apgd(xa, xo, g, step, x, EPS, a),
                            ks.apgd_step_ref(xa, xo, g, step, x, EPS, a), dtype,
                            ks.apgd_step_ref(*_f64(xa, xo, g, step, x), EPS, a))


@gpu
def test_opcheck_cuda():
    for op, args in _opcheck_cases():
        torch.library.opcheck(op, tuple(a.cuda() if isinstance(a, torch.Tensor) else a
                                        for a in args))


# ----------------------------------------------------------------------------- CUDA graphs

def test_cuda_graph_option_checks_and_cpu_loop():
    """cuda_graph: True off CUDA is a clear error; bad values are named; "auto" and False
    give the same points on the CPU (no capture there), and run_steps runs every step."""
    import guard_fast.attacks as A
    from guard_fast.attacks import graphs

    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(12, 4)).eval()
    x = torch.rand(5, 3, 2, 2)
    y = torch.tensor([0, 1, 2, 3, 0])
    with pytest.raises(ValueError, match="cuda_graph=True needs a CUDA device"):
        A.PGD(model, eps=EPS, steps=10, cuda_graph=True)(x, y)
    with pytest.raises(ValueError, match="cuda_graph must be True, False or 'auto', got 'yes'"):
        A.MIM(model, eps=EPS, cuda_graph="yes")
    for cls in (A.PGD, A.MIM):
        a = cls(model, eps=EPS, alpha=EPS / 4, steps=12, cuda_graph="auto")(x, y)
        b = cls(model, eps=EPS, alpha=EPS / 4, steps=12, cuda_graph=False)(x, y)
        assert torch.equal(a, b)
    calls = []
    assert graphs.run_steps(lambda: calls.append(1), 7, graph=False) == 0
    assert len(calls) == 7
    assert not graphs.want_cuda_graph("auto", torch.device("cpu"), 100)
    assert not graphs.want_cuda_graph("auto", torch.device("cuda"), graphs.MIN_STEPS_AUTO - 1)
    assert graphs.want_cuda_graph("auto", torch.device("cuda"), graphs.MIN_STEPS_AUTO)


class _HostSync(torch.nn.Module):
    """A model that reads a value on the host inside forward: cannot be captured."""

    def __init__(self, net):
        super().__init__()
        self.net = net

    def forward(self, x):
        if float(x.detach().amax()) > 2.0:   # never true for pixels; a host sync
            raise AssertionError
        return self.net(x)


@gpu
@pytest.mark.parametrize("attack", ["pgd", "pgd-rs", "mim", "mim-batch"])
def test_cuda_graph_same_points_as_eager(attack):
    """A captured and replayed step loop gives exactly the eager loop's points (same
    kernels, same order) for PGD (with and without random start) and both MIM forms; a
    model that syncs with the host cannot be captured: a warning, and still the same
    points."""
    import guard_fast.attacks as A
    from guard_fast.attacks import graphs

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.BatchNorm2d(8),
                              torch.nn.ReLU(), torch.nn.Flatten(),
                              torch.nn.Linear(8 * 8 * 8, 10)).cuda().eval()
    x = torch.rand(33, 3, 8, 8, device="cuda")
    y = torch.randint(0, 10, (33,), device="cuda")
    kw = dict(eps=4 / 255, alpha=1 / 255, steps=20)
    make = {"pgd": lambda m, g: A.PGD(m, random_start=False, cuda_graph=g, **kw),
            "pgd-rs": lambda m, g: A.PGD(m, random_start=True, seed=3, cuda_graph=g, **kw),
            "mim": lambda m, g: A.MIM(m, grad_norm="per_sample", cuda_graph=g, **kw),
            "mim-batch": lambda m, g: A.MIM(m, grad_norm="batch", cuda_graph=g, **kw)}[attack]
    eager = make(net, False)(x, y)
    graphed = make(net, True)(x, y)
    assert torch.equal(graphed, eager), _report(attack, graphed, eager)
    graphs._WARNED.clear()
    with pytest.warns(RuntimeWarning, match="CUDA-graph capture of the step failed"):
        fallback = make(_HostSync(net), True)(x, y)
    assert torch.equal(fallback, eager), _report(attack + " fallback", fallback, eager)
    # the failed capture left the device's random generator usable and unchanged
    state = torch.cuda.get_rng_state()
    a = torch.rand(4, device="cuda")
    torch.cuda.set_rng_state(state)
    assert torch.equal(torch.rand(4, device="cuda"), a)


@gpu
@pytest.mark.parametrize("attack", ["apgd-ce", "apgd-t", "apgd-t-batched", "fab-t"])
def test_cuda_graph_apgd_fab_same_points_as_eager(attack):
    """APGD's plain steps between checkpoints, and FAB's iterations between compactions,
    replayed from a CUDA graph: without the active set exactly the eager points; with it
    (compaction waits for a quarter of the points there) the same robust verdicts; the
    graph really ran; a model that cannot be captured falls back to the same points."""
    import guard_fast.attacks as A
    from guard_fast.attacks import graphs

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.BatchNorm2d(8),
                              torch.nn.ReLU(), torch.nn.Flatten(),
                              torch.nn.Linear(8 * 8 * 8, 10)).cuda().eval()
    x = torch.rand(40, 3, 8, 8, device="cuda")
    y = net(x).argmax(1).detach()           # all clean-correct: every point is attacked
    kw = dict(eps=8 / 255, steps=30, seed=1)
    make = {"apgd-ce": lambda m, **k: A.APGD(m, **kw, **k),
            "apgd-t": lambda m, **k: A.APGDT(m, n_target_classes=3, **kw, **k),
            "apgd-t-batched": lambda m, **k: A.APGDT(m, n_target_classes=3,
                                                     batch_targets=True, **kw, **k),
            "fab-t": lambda m, **k: A.FAB(m, n_target_classes=3, **kw, **k)}[attack]
    eager = make(net, cuda_graph=False, active_set=False)(x, y)
    atk = make(net, cuda_graph=True, active_set=False)
    graphed = atk(x, y)
    assert atk.replayed_steps > 0
    assert torch.equal(graphed, eager), _report(attack, graphed, eager)
    on = make(net, cuda_graph=True, active_set=True)(x, y)
    with torch.no_grad():
        assert torch.equal(net(on).argmax(1) == y, net(eager).argmax(1) == y)
    graphs._WARNED.clear()
    with pytest.warns(RuntimeWarning, match="CUDA-graph capture of the step failed"):
        fallback = make(_HostSync(net), cuda_graph=True, active_set=False)(x, y)
    assert torch.equal(fallback, eager), _report(attack + " fallback", fallback, eager)


@gpu
@pytest.mark.parametrize("active_set", [True, False])
def test_cuda_graph_square_same_points_as_eager(active_set):
    """Square's queries replayed from a CUDA graph (draws in device tables) give exactly the
    eager loop's points, and the graph really ran."""
    import guard_fast.attacks as A

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.BatchNorm2d(8),
                              torch.nn.ReLU(), torch.nn.Flatten(),
                              torch.nn.Linear(8 * 8 * 8, 10)).cuda().eval()
    x = torch.rand(40, 3, 8, 8, device="cuda")
    y = net(x).argmax(1).detach()
    kw = dict(eps=8 / 255, n_queries=300, seed=2, active_set=active_set)
    eager = A.Square(net, cuda_graph=False, **kw)(x, y)
    atk = A.Square(net, cuda_graph=True, **kw)
    graphed = atk(x, y)
    assert atk.replayed_steps > 0
    assert torch.equal(graphed, eager), _report("square", graphed, eager)


@pytest.mark.skipif(not gp.HAS_TRITON, reason="triton is not installed")
def test_triton_scalar_arguments_are_fp64():
    """The step kernels' float scalars are declared fp64, and Triton must see that
    declaration: a module-level `from __future__ import annotations` turns the annotation
    "fp64" into the string "'fp64'", which Triton does not recognize and then passes every
    Python float as fp32 (eps = 0.1 became 0.10000000149 on a GPU: fp64 steps off by 1.5e-9).
    The interpreter passes scalars in a tensor instead, so only this check sees it on a CPU."""
    checked = 0
    for name in dir(ks):
        kern = getattr(ks, name)
        if not name.endswith("_kernel"):
            continue
        if not hasattr(kern, "params"):   # the interpreter's wrapper: what @jit would see
            from triton.runtime.jit import JITFunction
            kern = JITFunction(kern.fn)
        params = kern.params
        floats = [p for p in params if p.name in ("alpha", "eps", "decay", "a")]
        for p in floats:
            assert p.annotation_type == "fp64", (name, p.name, p.annotation)
        checked += bool(floats)
    assert checked == 3   # pgd, mim, apgd step kernels


# ----------------------------------------------------------------------------- Square window

def _square_impls(device="cpu"):
    out = {"torch": ks.square_window_ref, "op": ops.square_window}
    c = torch.ops.guard_fast_C if ops.extension is not None else None
    if c is not None and hasattr(c, "square_window") and (device == "cpu" or
                                                           ops.extension.cuda_compiled()):
        out["cpp" if device == "cpu" else "cuda-ext"] = c.square_window
    if gp.HAS_TRITON and (device == "cuda" or os.environ.get("TRITON_INTERPRET") == "1"):
        out["triton"] = ks.square_window_triton
    return out


def _square_inputs(shape, dtype, seed=0, device="cpu", layout="contiguous"):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(shape, generator=g, dtype=torch.float64)
    xb = (x + EPS * torch.sign(torch.rand(shape, generator=g, dtype=torch.float64) - 0.5)).clamp(0, 1)
    lo, hi = (x - EPS).clamp(min=0), (x + EPS).clamp(max=1)
    signs = torch.sign(torch.rand(shape[1], generator=g, dtype=torch.float64) - 0.5)
    signs[0] = 0.0                                  # torch.sign of an exact 0 draw
    ts = [t.to(device, dtype) for t in (xb, lo, hi, signs)]
    if layout == "channels_last":
        ts[:3] = [t.contiguous(memory_format=torch.channels_last) for t in ts[:3]]
    return ts


_WINDOWS = [(0, 0, 1), (2, 1, 3), (0, 0, 6), (4, 3, 2)]   # (vh, vw, s) on 6 x 5 images


@pytest.mark.parametrize("dtype", DTYPES + [torch.float16], ids=str)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_square_window_against_reference(dtype, layout):
    """Every backend's square_window equals the eager candidate bit for bit in fp32/fp64
    (fp16/bf16: within the rounding of one final cast, against float64), for windows at
    the corners, of side 1 and of the whole height, in both layouts; the output is
    contiguous and only the window differs from x_best."""
    for vh, vw, s in _WINDOWS:
        s = min(s, 5 - vw)
        xb, lo, hi, signs = _square_inputs((3, 4, 6, 5), dtype, seed=vh + 7 * s, layout=layout)
        step = 2 * EPS
        ref = ks.square_window_ref(xb, lo, hi, signs, vh, vw, s, step)
        truth = ks.square_window_ref(*_f64(xb, lo, hi, signs), vh, vw, s, step)
        for name, fn in _square_impls().items():
            got = fn(xb, lo, hi, signs, vh, vw, s, step)
            assert got.is_contiguous() and got.shape == xb.shape and got.dtype == dtype, name
            outside = torch.ones_like(got, dtype=torch.bool)
            outside[:, :, vh:vh + s, vw:vw + s] = False
            assert torch.equal(got[outside], xb.contiguous()[outside]), name
            _check_same(f"square_window {name} {(vh, vw, s)}", got, ref, dtype, truth)


def test_square_window_bad_inputs_and_opcheck():
    xb, lo, hi, signs = _square_inputs((2, 3, 6, 5), torch.float32)
    with pytest.raises(ValueError, match=r"window \[4, 7\) x \[0, 3\) does not fit images of 6 x 5"):
        ops.square_window(xb, lo, hi, signs, 4, 0, 3, 0.1)
    with pytest.raises(ValueError, match="signs must hold 3 values"):
        ops.square_window(xb, lo, hi, signs[:2], 0, 0, 2, 0.1)
    with pytest.raises(ValueError, match=r"needs \(N, C, H, W\) images"):
        ops.square_window(xb[0], lo[0], hi[0], signs, 0, 0, 2, 0.1)
    with pytest.raises(ValueError, match="has shape"):
        ops.square_window(xb, lo[:1], hi, signs, 0, 0, 2, 0.1)
    torch.library.opcheck(ops.square_window, (xb, lo, hi, signs, 1, 2, 3, 0.2))
    if "cpp" in _square_impls():
        c = torch.ops.guard_fast_C
        torch.library.opcheck(c.square_window.default, (xb, lo, hi, signs, 1, 2, 3, 0.2),
                              test_utils=("test_schema", "test_faketensor"))
        with pytest.raises(RuntimeError, match="does not fit images of 6 x 5"):
            c.square_window(xb, lo, hi, signs, 0, 4, 2, 0.1)


@gpu
@pytest.mark.parametrize("dtype", DTYPES + [torch.float16], ids=str)
def test_square_window_on_cuda(dtype):
    """square_window's CUDA kernel, Triton and the registry op on CUDA tensors against the
    eager candidate on CUDA."""
    for vh, vw, s in _WINDOWS:
        s = min(s, 5 - vw)
        xb, lo, hi, signs = _square_inputs((9, 3, 6, 5), dtype, seed=s, device="cuda")
        ref = ks.square_window_ref(xb, lo, hi, signs, vh, vw, s, 2 * EPS)
        truth = ks.square_window_ref(*_f64(xb, lo, hi, signs), vh, vw, s, 2 * EPS)
        for name, fn in _square_impls("cuda").items():
            _check_same(f"square_window cuda {name}", fn(xb, lo, hi, signs, vh, vw, s, 2 * EPS),
                        ref, dtype, truth)
