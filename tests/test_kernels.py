"""Fused ops: every backend against the float64 formula over a shape/layout/dtype grid,
autograd of the custom ops, torch.library.opcheck, and the backend registry."""
import os
import subprocess
import sys

import pytest
import torch

from guard_fast import ops
from guard_fast.kernels import guard_penalty as gp

SHAPES = [(1, 3, 7, 5), (5, 3, 17, 9), (3, 1000), (6,), (2, 1, 1, 1), (4, 3, 33, 31)]
DTYPES = [torch.float32, torch.float64, torch.bfloat16]


def _layouts(shape):
    yield "contiguous"
    yield "noncontiguous"
    if len(shape) == 4:
        yield "channels_last"


def _make(shape, dtype, layout, seed):
    g = torch.Generator().manual_seed(seed)
    if layout == "noncontiguous":  # every other element of a wider tensor
        t = torch.randn(*shape[:-1], 2 * shape[-1], generator=g)[..., ::2]
    else:
        t = torch.randn(*shape, generator=g)
    t = t.to(dtype)
    if layout == "channels_last":
        t = t.to(memory_format=torch.channels_last)
    return t


def _formula(name, *args):
    """float64 truth."""
    if name == "perturb":
        x, g, h = args
        x64, g64 = x.double(), g.double()
        n = g64.reshape(len(g64), -1).norm(dim=1)
        return (x64 + h * g64 / n.clamp_min(1e-12).view((-1,) + (1,) * (x.dim() - 1)), n)
    if name == "sqdiff_norm":
        a, b = args
        return ((a.double() - b.double()) ** 2).reshape(len(a), -1).sum(1)
    go, a, b = args
    d = 2 * (a.double() - b.double()) * go.double().view((-1,) + (1,) * (a.dim() - 1))
    return (d, -d)


def _eager(name, *args):
    """The same computation written in eager PyTorch at the inputs' precision."""
    if name == "perturb":
        x, g, h = args
        n = g.reshape(len(g), -1).norm(dim=1)
        return (x + h * g / n.clamp_min(1e-12).view((-1,) + (1,) * (x.dim() - 1)), n)
    if name == "sqdiff_norm":
        a, b = args
        return ((a - b) ** 2).reshape(len(a), -1).sum(1)
    go, a, b = args
    d = 2 * (a - b) * go.to(a.dtype).view((-1,) + (1,) * (a.dim() - 1))
    return (d, -d)


def _tuple(v):
    return v if isinstance(v, tuple) else (v,)


def _assert_close_to_truth(name, got, args, dtype):
    truth = _tuple(_formula(name, *args))
    eager = _tuple(_eager(name, *args))
    for k, (o, t, e) in enumerate(zip(_tuple(got), truth, eager)):
        assert o.shape == t.shape, (name, k, o.shape, t.shape)
        assert torch.isfinite(o.double()).all()
        err = (o.double() - t).abs()
        if dtype == torch.float64:
            bound = 1e-12 * (1 + t.abs())
        elif dtype == torch.float32:
            bound = 2e-6 * (1 + t.abs())
        else:  # low precision: at most ~2x eager's error at the same precision, plus a floor
            eager_err = (e.double() - t).abs()
            bound = 2 * eager_err.max() + 1e-2 * (1 + t.abs())
        bad = err > bound
        assert not bad.any(), (f"{name} out {k}: max diff {err.max():.3g}, mean diff "
                               f"{err.mean():.3g}, worst bound {bound.min():.3g}")


IMPLS = {
    "torch": (gp.perturb_ref, gp.sqdiff_norm_ref, gp.sqdiff_norm_backward_ref),
    "triton": (gp.perturb_triton, gp.sqdiff_norm_triton, gp.sqdiff_norm_backward_triton),
    "op": (ops.perturb, ops.sqdiff_norm, ops.sqdiff_norm_backward),
}


def _backends():
    out = ["torch", "op"]
    if gp.HAS_TRITON and (torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1"):
        out.append("triton")
    return out


@pytest.mark.parametrize("backend", _backends())
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_ops_against_formula(backend, dtype, shape):
    if backend == "triton" and shape == (4, 3, 33, 31) and dtype != torch.float32:
        pytest.skip("interpreter is slow; the big shape runs once, in fp32")
    perturb, sq, sqb = IMPLS[backend]
    for layout in _layouts(shape):
        x, g = _make(shape, dtype, layout, 0), _make(shape, dtype, layout, 1)
        go = torch.randn(shape[0]) * 3  # grad_output != 1
        out = perturb(x, g, 3.0)
        _assert_close_to_truth("perturb", out, (x, g, 3.0), dtype)
        if layout == "channels_last":
            assert out[0].is_contiguous(memory_format=torch.channels_last)
        _assert_close_to_truth("sqdiff_norm", sq(x, g), (x, g), dtype)
        da, db = sqb(go, x, g)
        _assert_close_to_truth("sqdiff_norm_backward", (da, db), (go, x, g), dtype)
        assert da.dtype == dtype and db.dtype == dtype


@pytest.mark.parametrize("backend", _backends())
def test_zero_gradient_gives_no_nan(backend):
    perturb, sq, sqb = IMPLS[backend]
    x = torch.randn(3, 2, 5, 5)
    g = torch.zeros_like(x)
    xp, n = perturb(x, g, 3.0)
    assert torch.equal(xp, x) and torch.equal(n, torch.zeros(3))
    assert torch.equal(sq(x, x), torch.zeros(3))
    da, db = sqb(torch.ones(3), x, x)
    assert torch.equal(da, torch.zeros_like(x)) and torch.equal(db, torch.zeros_like(x))


def test_custom_op_autograd_matches_reference():
    """Backward of the custom ops (grad_output != 1) against autograd of the float64 formula,
    and gradcheck including the double backward of sqdiff_norm."""
    a = torch.randn(4, 3, 5, 7, dtype=torch.float64, requires_grad=True)
    b = torch.randn(4, 3, 5, 7, dtype=torch.float64, requires_grad=True)
    go = torch.randn(4, dtype=torch.float64)
    ga, gb = torch.autograd.grad(ops.sqdiff_norm(a, b), (a, b), go)
    ra, rb = torch.autograd.grad(((a - b) ** 2).flatten(1).sum(1), (a, b), go)
    torch.testing.assert_close(ga, ra)
    torch.testing.assert_close(gb, rb)
    small = [torch.randn(3, 2, 3, dtype=torch.float64, requires_grad=True) for _ in range(2)]
    assert torch.autograd.gradcheck(ops.sqdiff_norm, small)
    assert torch.autograd.gradgradcheck(ops.sqdiff_norm, small)
    gsmall = torch.randn(3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(ops.sqdiff_norm_backward, [gsmall] + small)
    assert torch.autograd.gradcheck(lambda x, g: ops.perturb(x, g, 3.0), small)


def _opcheck_args():
    x = torch.randn(3, 2, 5, 4)
    g = torch.randn(3, 2, 5, 4)
    return [
        (ops.perturb, (x, g, 3.0, 1e-12)),
        (ops.perturb, (x.to(memory_format=torch.channels_last),
                       g.to(memory_format=torch.channels_last), 0.5, 1e-12)),
        (ops.sqdiff_norm, (x, g)),
        (ops.sqdiff_norm, (x.requires_grad_(), g)),
        (ops.sqdiff_norm_backward, (torch.randn(3), x.detach(), g)),
        # mixed layouts: outputs must have the strides the fake promises, on every backend
        (ops.perturb, (x.detach().to(memory_format=torch.channels_last), g, 1.0, 1e-12)),
        (ops.sqdiff_norm_backward, (torch.randn(3), x.detach(),
                                    g.to(memory_format=torch.channels_last))),
    ]


@pytest.mark.parametrize("i", range(7))
def test_opcheck(i):
    op, args = _opcheck_args()[i]
    torch.library.opcheck(op, args)


def test_registry_picks_a_working_backend_and_reports():
    info = ops.backend_info()
    assert ops.backend_for("cpu") in ops.BACKENDS
    assert info["chosen"]["cpu"] == ops.backend_for("cpu")
    if info["extension"] and info["requested"] == "auto":
        assert ops.backend_for("cpu") == "cpp"


def test_auto_backend_failure_warns_and_falls_back(monkeypatch):
    if ops._requested != "auto" or ops.backend_for("cpu") == "torch":
        pytest.skip("needs the auto registry with a non-torch CPU backend")

    def broken(*a):
        raise RuntimeError("simulated kernel failure")

    monkeypatch.setitem(ops._tables, "cpu", dict(ops._tables["cpu"], sqdiff_norm=broken))
    monkeypatch.setitem(ops._chosen, "cpu", ops._chosen["cpu"])
    a, b = torch.randn(2, 3), torch.randn(2, 3)
    with pytest.warns(RuntimeWarning, match="simulated kernel failure"):
        out = ops.sqdiff_norm(a, b)
    torch.testing.assert_close(out, ((a - b) ** 2).sum(1))
    assert ops._chosen["cpu"] == "torch"


def _start_with_backend(value, code, extra_env=None):
    env = dict(os.environ, GUARD_FAST_BACKEND=value)
    env.pop("TRITON_INTERPRET", None)
    env.update(extra_env or {})
    return subprocess.Popen([sys.executable, "-c", code], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def test_explicit_backend_requests():
    code = ("import torch, guard_fast as g; a=torch.randn(2,3); "
            "print(g.ops.sqdiff_norm(a, a*0).sum().item() > 0, g.ops.backend_for('cpu'))")
    # each request needs a fresh process (the variable is read at import): start them all,
    # then read them (the start-ups overlap)
    cases = {"torch": ("torch", None), "bogus": ("bogus", None)}
    if not torch.cuda.is_available():
        # explicit triton on a CPU tensor without the interpreter: a clear error, no fallback
        cases["triton"] = ("triton", None)
        cases["triton-interpret"] = ("triton", {"TRITON_INTERPRET": "1"})
    procs = {k: _start_with_backend(v, code, env) for k, (v, env) in cases.items()}
    out = {}
    for k, p in procs.items():
        stdout, stderr = p.communicate(timeout=120)
        out[k] = (p.returncode, stdout, stderr)
    rc, stdout, stderr = out["torch"]
    assert rc == 0 and stdout.split() == ["True", "torch"], stderr
    rc, stdout, stderr = out["bogus"]
    assert rc != 0 and "GUARD_FAST_BACKEND='bogus'" in stderr
    if "triton" in out:
        rc, stdout, stderr = out["triton"]
        assert rc != 0 and "TRITON_INTERPRET" in stderr, stderr
        rc, stdout, stderr = out["triton-interpret"]
        assert rc == 0 and stdout.split() == ["True", "triton"], stderr


def test_bad_op_inputs():
    a = torch.randn(2, 3)
    with pytest.raises(ValueError, match="shape"):
        ops.sqdiff_norm(a, torch.randn(3, 2))
    with pytest.raises(TypeError, match="float64"):
        ops.sqdiff_norm(a, a.double())
    with pytest.raises(TypeError, match="floating"):
        ops.perturb(a.long(), a.long(), 1.0)
    with pytest.raises(ValueError, match="go must have shape"):
        ops.sqdiff_norm_backward(torch.ones(3), a, a)


# ----------------------------------------------------------------------------- GPU

from conftest import gpu  # noqa: E402


def _cuda_impls():
    out = {"op": IMPLS["op"], "torch": IMPLS["torch"]}
    if gp.HAS_TRITON:
        out["triton"] = IMPLS["triton"]
    if ops.extension is not None and ops.extension.cuda_compiled():
        c = torch.ops.guard_fast_C
        out["cuda-ext"] = (c.perturb, c.sqdiff_norm, c.sqdiff_norm_backward)
    return out


@gpu
@pytest.mark.parametrize("dtype", DTYPES + [torch.float16], ids=str)
@pytest.mark.parametrize("shape", SHAPES + [(1, 3, 224, 224), (128, 3, 32, 32)], ids=str)
def test_ops_on_cuda_against_formula(dtype, shape):
    for name, (perturb, sq, sqb) in _cuda_impls().items():
        for layout in _layouts(shape):
            x = _make(shape, dtype, layout, 0).cuda()
            g = _make(shape, dtype, layout, 1).cuda()
            if layout == "channels_last":
                x, g = (t.to(memory_format=torch.channels_last) for t in (x, g))
            go = (torch.randn(shape[0]) * 3).cuda()
            args = lambda *a: tuple(t.cpu() if isinstance(t, torch.Tensor) else t for t in a)  # noqa: E731
            out = tuple(t.cpu() for t in perturb(x, g, 3.0, 1e-12))
            _assert_close_to_truth("perturb", out, args(x, g, 3.0), dtype)
            _assert_close_to_truth("sqdiff_norm", sq(x, g).cpu(), args(x, g), dtype)
            da, db = sqb(go, x, g)
            _assert_close_to_truth("sqdiff_norm_backward", (da.cpu(), db.cpu()), args(go, x, g), dtype)
            if layout == "channels_last":
                assert out[0].is_contiguous(memory_format=torch.channels_last), name


@gpu
def test_opcheck_cuda():
    x = torch.randn(3, 2, 5, 4, device="cuda")
    g = torch.randn(3, 2, 5, 4, device="cuda")
    torch.library.opcheck(ops.perturb, (x, g, 3.0, 1e-12))
    torch.library.opcheck(ops.sqdiff_norm, (x.requires_grad_(), g))
    torch.library.opcheck(ops.sqdiff_norm_backward, (torch.randn(3, device="cuda"), x.detach(), g))
