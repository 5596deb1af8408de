"""Property-based tests (hypothesis) of every custom op against its plain-PyTorch reference,
on every backend this machine has: the registered op (guard_fast.ops, through the backend
registry), the C++ kernels called directly (torch.ops.guard_fast_C), Triton (under
TRITON_INTERPRET=1 on a CPU: few examples, the interpreter is slow), and FAB's projection
(guard_fast_C::fab_project against attacks.fab.project_linf_box).

Inputs: random shapes (batch 1 and more, odd sizes, inner sizes of 1), layouts (contiguous,
sliced, channels_last, expanded with a zero stride, each input its own), dtypes, and values
mixed with exact zeros, negative zeros, subnormals, 1e30 and its negative; scalars include
eps 0. Bad arguments must raise the op's own ValueError / TypeError naming the argument.

Profiles (environment variable GUARD_FAST_FUZZ): "ci" (default: a bounded, derandomized
number of examples, within the CI budget) or "long" (thousands of examples; the figures go
in the README's Reliability section).
"""
from __future__ import annotations

import atexit
import math
import os

import pytest
import torch

pytest.importorskip("hypothesis", reason="pip install -e '.[test]' (hypothesis)")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from guard_fast import ops  # noqa: E402
from guard_fast.attacks.fab import project_linf_box  # noqa: E402
from guard_fast.kernels import attack_steps as ks  # noqa: E402
from guard_fast.kernels import guard_penalty as gp  # noqa: E402

PROFILE = os.environ.get("GUARD_FAST_FUZZ", "ci")
if PROFILE not in ("ci", "long"):
    raise ValueError(f"GUARD_FAST_FUZZ={PROFILE!r}: use ci or long")
EXAMPLES = {"ci": {"cpu": 30, "triton": 3}, "long": {"cpu": 3000, "triton": 150}}[PROFILE]


def _settings(kind: str):
    return settings(max_examples=EXAMPLES[kind], deadline=None, derandomize=PROFILE == "ci",
                    database=None, print_blob=True,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


_C = torch.ops.guard_fast_C if ops.extension is not None else None
_TRITON = gp.HAS_TRITON and (torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1")
_NAMES = ("perturb", "sqdiff_norm", "sqdiff_norm_backward", "pgd_step", "mim_step", "apgd_step",
          "square_window")


def _impl(backend: str, name: str):
    if backend == "op":
        return getattr(ops, name)
    if backend == "cpp":
        return getattr(_C, name)
    return getattr(gp if hasattr(gp, name + "_triton") else ks, name + "_triton")


REF = {"perturb": gp.perturb_ref, "sqdiff_norm": gp.sqdiff_norm_ref,
       "sqdiff_norm_backward": gp.sqdiff_norm_backward_ref, "pgd_step": ks.pgd_step_ref,
       "mim_step": ks.mim_step_ref, "apgd_step": ks.apgd_step_ref,
       "square_window": ks.square_window_ref}
CPU_BACKENDS = ["op"] + (["cpp"] if _C is not None else [])
COUNTS: dict[str, int] = {}  # examples run per (op, backend): printed by the long profile

# ----------------------------------------------------------------------------- inputs

DTYPES = [torch.float32, torch.float64, torch.bfloat16]
SPECIAL = {"zero": 0.0, "negzero": -0.0, "subnormal": None, "big": 1e30, "negbig": -1e30}


def _special(dtype, kind):
    if kind == "subnormal":
        return torch.finfo(dtype).tiny / 4  # below the smallest normal number
    return SPECIAL[kind]


@st.composite
def shapes(draw, four_d=False):
    n = draw(st.integers(1, 4))
    if four_d:
        return (n, draw(st.integers(1, 4)), draw(st.integers(1, 7)), draw(st.integers(1, 7)))
    inner = draw(st.lists(st.sampled_from([1, 1, 2, 3, 5, 7, 9, 16]), min_size=0, max_size=3))
    return (n, *inner)


@st.composite
def tensors(draw, shape, dtype, unit=False, specials=True):
    """One input of `shape`: normal values (uniform in [0, 1] if unit), some replaced by
    special values, in a random layout."""
    seed = draw(st.integers(0, 2**31 - 1))
    g = torch.Generator().manual_seed(seed)
    layouts = ["contiguous", "sliced", "expanded"] + (["channels_last"] if len(shape) == 4 else [])
    layout = draw(st.sampled_from(layouts))
    wide = shape[:-1] + (2 * shape[-1],) if layout == "sliced" and len(shape) > 1 else shape
    if layout == "expanded":
        wide = (1,) + shape[1:]
    t = torch.rand(wide, generator=g, dtype=torch.float64) if unit else \
        torch.randn(wide, generator=g, dtype=torch.float64)
    if specials:
        for kind in draw(st.lists(st.sampled_from(sorted(SPECIAL)), max_size=3)):
            flat = t.view(-1)
            flat[int(torch.randint(flat.numel(), (1,), generator=g))] = _special(dtype, kind)
    t = t.to(dtype)
    if layout == "sliced" and len(shape) > 1:
        t = t[..., ::2]
    elif layout == "expanded":
        t = t.expand(shape)
    elif layout == "channels_last":
        t = t.contiguous(memory_format=torch.channels_last)
    return t


# ----------------------------------------------------------------------------- comparisons


def _ulp(dtype) -> float:
    return torch.finfo(dtype).eps


def _same_nonfinite(what, got, ref):
    g, r = got.double(), ref.double()
    assert torch.equal(torch.isnan(g), torch.isnan(r)), f"{what}: NaN where the reference has none (or the reverse)"
    inf = torch.isinf(r)
    assert torch.equal(torch.isinf(g), inf) and torch.equal(g[inf], r[inf]), f"{what}: inf differs"


def _close(what, got, ref, bound):
    """|got - ref| <= bound elementwise on the finite entries; non-finite ones identical."""
    assert got.shape == ref.shape and got.dtype == ref.dtype, (what, got.shape, ref.shape,
                                                                got.dtype, ref.dtype)
    _same_nonfinite(what, got, ref)
    fin = torch.isfinite(ref.double())
    err = (got.double() - ref.double()).abs()[fin]
    b = bound[fin] if isinstance(bound, torch.Tensor) else bound
    bad = err > b
    assert not bool(bad.any()), (f"{what}: max diff {err.max().item():.3g}, mean diff "
                                 f"{err.mean().item():.3g}, {int(bad.sum())} of {err.numel()} "
                                 "out of bound")


def _close_to_truth(what, got, ref, truth, floor):
    """Habit 5: |got - truth| <= 2 |ref - truth| + floor, truth the reference in float64
    (a reduction summed in another order differs from the reference by rounding only)."""
    _same_nonfinite(what, got, ref)
    bound = 2 * (ref.double() - truth.double()).abs() + floor
    _close(what, got, ref, (bound + (ref.double() - truth.double()).abs()).nan_to_num(posinf=0.0))


def _reduction_rtol(dtype) -> float:
    # different summation orders: a few ulps of the accumulation dtype per element summed
    return 64 * _ulp(gp.acc_dtype(dtype))


def _out_rtol(dtype) -> float:
    # one rounding of the result to dtype after an accumulation-precision computation
    return 2 * _ulp(dtype) + _reduction_rtol(dtype)


def _count(key):
    COUNTS[key] = COUNTS.get(key, 0) + 1


# ----------------------------------------------------------------------------- the fused ops


def _interp_safe(backend, dtype, *ts):
    """Triton's CPU interpreter widens bfloat16 subnormals wrongly (2.76e-40 -> 2^-127, in
    any kernel; a GPU converts them in hardware): under it, bfloat16 inputs have them
    flushed to zero, so that the test checks the kernels and not the interpreter."""
    if not (backend == "triton" and dtype == torch.bfloat16
            and os.environ.get("TRITON_INTERPRET") == "1"):
        return ts
    tiny = torch.finfo(dtype).tiny
    return tuple(torch.where(t.abs() < tiny, torch.zeros_like(t), t) for t in ts)


def _interp_floor(backend, dtype) -> float:
    """The same interpreter defect on outputs: a bfloat16 result below the smallest normal
    number may be rounded wrongly there, so such results get that much absolute slack."""
    if (backend == "triton" and dtype == torch.bfloat16
            and os.environ.get("TRITON_INTERPRET") == "1"):
        return torch.finfo(dtype).tiny
    return 0.0


def _check_penalty_ops(backend, shape, dtype, data):
    x = data.draw(tensors(shape, dtype))
    g = data.draw(tensors(shape, dtype))
    x, g = _interp_safe(backend, dtype, x, g)
    h = data.draw(st.sampled_from([0.0, 1e-3, 3.0, -2.0]))
    tiny = data.draw(st.sampled_from([1e-12, 1.0, torch.finfo(torch.float32).tiny]))
    xp, n = _impl(backend, "perturb")(x, g, h, tiny)
    rxp, rn = gp.perturb_ref(x, g, h, tiny)
    txp, tn = gp.perturb_ref(x.double(), g.double(), h, tiny)
    # no range assumption: the kernels' norm has the float64 range (ops.perturb), as the
    # reference's; this test found it when their float32 sums overflowed and underflowed
    _close_to_truth(f"perturb norm [{backend}]", n, rn, tn, _reduction_rtol(dtype) * tn.abs())
    mag = x.double().abs() + (txp - x.double()).abs()
    _close_to_truth(f"perturb xp [{backend}]", xp, rxp, txp,
                    _out_rtol(dtype) * mag + 2 * torch.finfo(dtype).tiny)
    s = _impl(backend, "sqdiff_norm")(x, g)
    rs = gp.sqdiff_norm_ref(x, g)
    ts = gp.sqdiff_norm_ref(x.double(), g.double())
    _close_to_truth(f"sqdiff_norm [{backend}]", s, rs, ts, _reduction_rtol(dtype) * ts.abs())
    go = data.draw(tensors((shape[0],), gp.acc_dtype(dtype)))
    da, db = _impl(backend, "sqdiff_norm_backward")(go.contiguous(), x, g)
    ra, rb = gp.sqdiff_norm_backward_ref(go, x, g)
    fl = _interp_floor(backend, dtype)
    _close(f"sqdiff_norm_backward da [{backend}]", da, ra, 2 * _ulp(dtype) * ra.double().abs() + fl)
    _close(f"sqdiff_norm_backward db [{backend}]", db, rb, 2 * _ulp(dtype) * rb.double().abs() + fl)
    _count(f"perturb/sqdiff_norm/sqdiff_norm_backward [{backend}]")


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@_settings("cpu")
@given(shape=shapes(), dtype=st.sampled_from(DTYPES), data=st.data())
def test_penalty_ops_against_reference(backend, shape, dtype, data):
    _check_penalty_ops(backend, shape, dtype, data)


@pytest.mark.parametrize("backend", CPU_BACKENDS + (["triton"] if _TRITON else []))
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("mag", [1e25, 1e-25, 1e-40, 1e200, 1e-200])
def test_perturb_norm_has_the_reference_range(backend, dtype, mag):
    """Gradients whose squares overflow (1e25: 1e50) or underflow (1e-25, and a subnormal
    1e-40 in float32) in float32: the norm is still the true norm (float64's range, as the
    reference's), and (where h / norm is a float) the step is a step of length h; a row of zeros
    stays exactly x."""
    if mag < torch.finfo(dtype).tiny * 2 ** -10 or mag > torch.finfo(dtype).max / 64:
        pytest.skip(f"{mag:g} is outside {dtype}")
    if (backend == "triton" and dtype == torch.bfloat16 and mag < torch.finfo(dtype).tiny
            and os.environ.get("TRITON_INTERPRET") == "1"):
        pytest.skip("Triton's interpreter widens bfloat16 subnormals wrongly (2.76e-40 -> "
                    "2^-127), in any kernel; a GPU converts them in hardware")
    g = torch.tensor([[3.0, -4.0, 0.0, 0.0, 0.0], [1.0] * 5, [0.0] * 5], dtype=torch.float64)
    g[:2] *= mag
    g = g.to(dtype)
    x = torch.full_like(g, 0.5)
    xp, n = _impl(backend, "perturb")(x, g, 3.0, 1e-30)
    true = g.double().abs().max(1).values * (g.double() / g.double().abs().max(1, keepdim=True)
                                             .values.clamp_min(1e-300)).norm(dim=1)
    acc = gp.acc_dtype(dtype)   # a norm below the smallest normal is stored subnormal
    atol = 2 * torch.finfo(acc).smallest_normal * torch.finfo(acc).eps
    assert torch.allclose(n.double(), true, rtol=4 * _ulp(dtype), atol=atol), (backend, n, true)
    assert torch.equal(xp[2], x[2])
    if mag < 1e-30:
        return  # below tiny: the step is h * g / tiny, as documented
    step = (xp.double() - x.double())[:2].norm(dim=1)
    assert torch.allclose(step, torch.full_like(step, 3.0), rtol=8 * _ulp(dtype) + 0.01 * (
        dtype == torch.bfloat16), atol=0), (backend, step)


@pytest.mark.parametrize("backend", CPU_BACKENDS + (["triton"] if _TRITON else []))
def test_mim_per_sample_scale_of_a_batch_of_scalars(backend):
    """A (N,) batch is N samples of one value each: each is divided by its own |g| (the
    reference once divided by the batch's mean |g|: found by the long fuzz profile)."""
    x = torch.tensor([0.9701, 0.7078])
    g = torch.tensor([1.5410, -0.2934])
    _, m = _impl(backend, "mim_step")(x, x, g, g, 0.0, 0.0, 0.0, True)
    assert torch.equal(m, torch.tensor([1.0, -1.0]))
    assert torch.equal(ks.mim_step_ref(x, x, g, g, 0.0, 0.0, 0.0, True)[1], m)


@pytest.mark.skipif(not _TRITON, reason="needs triton (CUDA, or TRITON_INTERPRET=1)")
@_settings("triton")
@given(shape=shapes(), dtype=st.sampled_from(DTYPES), data=st.data())
def test_penalty_ops_triton_against_reference(shape, dtype, data):
    _check_penalty_ops("triton", shape, dtype, data)


# ----------------------------------------------------------------------------- attack steps

STEP_DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]
EPSES = [0.0, 1 / 255, 8 / 255, 0.5, 1.0]


def _step_bound(dtype, ref):
    """fp32/fp64: bit for bit; bf16/fp16 compute in fp32 and round once where eager rounds
    after every operation: a couple of ulps of the result's magnitude."""
    if dtype in (torch.float32, torch.float64):
        return 0.0
    return 4 * _ulp(dtype) * (1 + ref.double().abs())


def _check_steps(backend, shape, dtype, data):
    x = data.draw(tensors(shape, dtype, unit=True, specials=False))
    xa = data.draw(tensors(shape, dtype, unit=True))
    xo = data.draw(tensors(shape, dtype, unit=True))
    gr = data.draw(tensors(shape, dtype))
    mo = data.draw(tensors(shape, dtype))
    x, xa, xo, gr, mo = _interp_safe(backend, dtype, x, xa, xo, gr, mo)
    alpha = data.draw(st.sampled_from([0.0, 1 / 255, 2 / 255, 0.1]))
    eps = data.draw(st.sampled_from(EPSES))
    out = _impl(backend, "pgd_step")(xa, x, gr, alpha, eps)
    ref = ks.pgd_step_ref(xa, x, gr, alpha, eps)
    _close(f"pgd_step [{backend}] eps={eps}", out, ref, _step_bound(dtype, ref))
    decay = data.draw(st.sampled_from([0.0, 0.9, 1.0]))
    per_sample = data.draw(st.booleans())
    xm, m = _impl(backend, "mim_step")(xa, x, gr, mo, alpha, eps, decay, per_sample)
    rxm, rm = ks.mim_step_ref(xa, x, gr, mo, alpha, eps, decay, per_sample)
    # the MI-FGSM scale is a reduction (another summation order): the momentum within a few
    # ulps, and the step equal wherever the momentum's sign agrees
    mb = (_reduction_rtol(dtype) + 4 * _ulp(dtype)) * (rm.double().abs() + mo.double().abs() * decay)
    _close(f"mim_step momentum [{backend}]", m, rm, mb + torch.finfo(dtype).tiny)
    same = torch.sign(m.double()) == torch.sign(rm.double())
    _close(f"mim_step x_adv [{backend}]", xm[same], rxm[same], _step_bound(dtype, rxm[same]))
    step = data.draw(tensors((shape[0],), dtype, unit=True, specials=False)) * 2 * max(eps, 1e-3)
    a = data.draw(st.sampled_from([1.0, 0.75, 0.0]))
    out = _impl(backend, "apgd_step")(xa, xo, gr, step, x, eps, a)
    ref = ks.apgd_step_ref(xa, xo, gr, step, x, eps, a)
    _close(f"apgd_step [{backend}]", out, ref, _step_bound(dtype, ref))
    _count(f"pgd_step/mim_step/apgd_step [{backend}]")


def _check_square(backend, shape, dtype, data):
    n, c, h, w = shape
    x = data.draw(tensors(shape, dtype, unit=True, specials=False))
    eps = data.draw(st.sampled_from(EPSES))
    lo, hi = (x - eps).clamp(min=0), (x + eps).clamp(max=1)
    xb = data.draw(tensors(shape, dtype, unit=True))
    s = data.draw(st.integers(1, min(h, w)))
    vh, vw = data.draw(st.integers(0, h - s)), data.draw(st.integers(0, w - s))
    signs = (torch.randint(0, 2, (c,), generator=torch.Generator().manual_seed(n * h + w))
             * 2 - 1).to(dtype)
    step = data.draw(st.sampled_from([0.0, 2 * eps, -eps, 1.0]))
    out = _impl(backend, "square_window")(xb, lo, hi, signs, vh, vw, s, step)
    ref = ks.square_window_ref(xb, lo, hi, signs, vh, vw, s, step)
    _close(f"square_window [{backend}]", out, ref, _step_bound(dtype, ref))
    assert out.is_contiguous()
    _count(f"square_window [{backend}]")


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@_settings("cpu")
@given(shape=shapes(), dtype=st.sampled_from(STEP_DTYPES), data=st.data())
def test_attack_steps_against_reference(backend, shape, dtype, data):
    _check_steps(backend, shape, dtype, data)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@_settings("cpu")
@given(shape=shapes(four_d=True), dtype=st.sampled_from(STEP_DTYPES), data=st.data())
def test_square_window_against_reference(backend, shape, dtype, data):
    _check_square(backend, shape, dtype, data)


@pytest.mark.skipif(not _TRITON, reason="needs triton (CUDA, or TRITON_INTERPRET=1)")
@_settings("triton")
@given(shape=shapes(four_d=True), dtype=st.sampled_from(STEP_DTYPES), data=st.data())
def test_attack_steps_triton_against_reference(shape, dtype, data):
    _check_steps("triton", shape, dtype, data)
    _check_square("triton", shape, dtype, data)


# ----------------------------------------------------------------------------- FAB projection


@pytest.mark.skipif(_C is None or not hasattr(_C, "fab_project"), reason="no guard_fast_C::fab_project")
@_settings("cpu")
@given(m=st.integers(1, 6), d=st.sampled_from([1, 2, 3, 7, 16, 33]),
       dtype=st.sampled_from([torch.float32, torch.float64]), data=st.data())
def test_fab_project_against_reference(m, d, dtype, data):
    t = data.draw(tensors((m, d), dtype, unit=True, specials=False))
    w = data.draw(tensors((m, d), dtype, specials=False))
    w = torch.where(torch.rand(m, d, generator=torch.Generator().manual_seed(m * d)) < 0.2, 0.0, w)
    scale = data.draw(st.sampled_from([0.0, 1e-4, 1.0, 3.0, 1e6]))
    b = (w * t).sum(1) - scale * w.abs().sum(1) * data.draw(st.sampled_from([-1.0, 0.5, 1.0]))
    got = _C.fab_project(t, w, b)
    ref = project_linf_box(t, w, b)
    tol = {torch.float32: 2e-5, torch.float64: 1e-11}[dtype]
    _close("fab_project", got, ref, tol * (1 + ref.double().abs()) * (1 + scale))
    assert bool(((w == 0) & (got != 0)).logical_not().all()), "fab_project moved a w = 0 coordinate"
    _count("fab_project [cpp]")


# ----------------------------------------------------------------------------- bad arguments


def _bad_cases(shape):
    a = torch.rand(shape)
    wrong = torch.rand(shape[0] + 1, *shape[1:])
    return [
        ("perturb", (a, wrong, 1.0), ValueError, "shape"),
        ("perturb", (a, a.double(), 1.0), TypeError, "float64"),
        ("perturb", (a.long(), a.long(), 1.0), TypeError, "floating"),
        ("perturb", (a, a, 1.0, 0.0), ValueError, "tiny must be"),
        ("perturb", (a, a, math.nan), ValueError, "h must be"),
        ("sqdiff_norm", (a[:0], a[:0]), ValueError, "batch"),
        ("sqdiff_norm", (torch.tensor(1.0), torch.tensor(1.0)), ValueError, "batch"),
        ("sqdiff_norm_backward", (torch.ones(shape[0] + 1), a, a), ValueError, "go must have"),
        ("pgd_step", (a, a, wrong, 0.1, 0.1), ValueError, "grad"),
        ("pgd_step", (a, a, a, 0.1, -0.1), ValueError, "eps must be"),
        ("pgd_step", (a, a, a, math.inf, 0.1), ValueError, "alpha must be"),
        ("mim_step", (a, a, a, a.double(), 0.1, 0.1, 1.0), TypeError, "momentum"),
        ("mim_step", (a, a, a, a, 0.1, 0.1, math.nan), ValueError, "decay must be"),
        ("apgd_step", (a, a, a, torch.ones(shape[0] + 2), a, 0.1, 0.75), ValueError, "step_size"),
        ("apgd_step", (a, a, a, torch.ones(shape[0]), a, 0.1, math.nan), ValueError, " a must be"),
    ]


@_settings("cpu")
@given(shape=shapes())
def test_bad_arguments_give_the_ops_own_error(shape):
    for name, args, exc, needle in _bad_cases(shape):
        with pytest.raises(exc, match=needle):
            getattr(ops, name)(*args)
    x = torch.rand(2, 3, 5, 5)
    for args, needle in [((x[0], x[0], x[0], torch.ones(3), 0, 0, 1, 0.1), "N, C, H, W"),
                         ((x, x, x, torch.ones(2), 0, 0, 1, 0.1), "signs"),
                         ((x, x, x, torch.ones(3), 4, 0, 2, 0.1), "does not fit"),
                         ((x, x, x, torch.ones(3), 0, 0, 0, 0.1), "does not fit"),
                         ((x, x, x, torch.ones(3), 0, 0, 1, math.nan), "step must be")]:
        with pytest.raises(ValueError, match=needle):
            ops.square_window(*args)


def _print_counts():
    for k, v in sorted(COUNTS.items()):
        print(f"hypothesis examples {k}: {v}")


if PROFILE == "long":  # the figures of a long run, printed when the session ends
    atexit.register(_print_counts)
