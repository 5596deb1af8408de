"""guard_fast.convgrad: the per-shape choice of the CPU convolution backward kernel.

The choice must never change what is computed beyond float rounding: input, weight and
bias gradients and double backwards are compared with PyTorch's own kernel over a grid
of shapes; the decision rule is tested with injected timings; ineligible convolutions
are left alone; attacks get the same points."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from guard_fast import convgrad

CASES = [  # N, Cin, Cout, H, W, k, stride, padding
    (4, 1, 8, 28, 28, 5, 2, 0),
    (3, 3, 16, 17, 13, 3, 1, 1),
    (2, 3, 8, 32, 32, 7, 2, 3),
    (5, 8, 4, 12, 12, 5, 2, 0),
    (2, 2, 6, 9, 11, (3, 2), (2, 1), (1, 0)),
]


@pytest.fixture(autouse=True)
def _fresh():
    convgrad.clear_choices()
    yield
    convgrad.clear_choices()


def _grads(mode, x, w, b, stride, padding, create_graph=False, channels_last=False):
    x = x.clone().requires_grad_(True)
    w = w.clone().requires_grad_(True)
    b = b.clone().requires_grad_(True)
    with convgrad.conv_backward(mode):
        xin = x.contiguous(memory_format=torch.channels_last) if channels_last else x
        out = F.conv2d(xin, w, b, stride=stride, padding=padding)
        loss = (out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum()
        gx, gw, gb = torch.autograd.grad(loss, (x, w, b), create_graph=create_graph)
        if not create_graph:
            return gx, gw, gb
        # double backward, as GUARD's penalty takes it: d/dw of |grad_x|^2
        ggw, = torch.autograd.grad(gx.pow(2).sum(), w)
        return gx.detach(), gw.detach(), gb.detach(), ggw



@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("mode", ["auto", "im2col"])
def test_gradients_match_pytorch_kernel(case, dtype, mode):
    n, cin, cout, h, wd, k, s, p = case
    k = (k, k) if isinstance(k, int) else k
    g = torch.Generator().manual_seed(0)
    x = torch.rand(n, cin, h, wd, generator=g, dtype=dtype)
    w = torch.randn(cout, cin, *k, generator=g, dtype=dtype)
    b = torch.randn(cout, generator=g, dtype=dtype)
    tol = 1e-4 if dtype == torch.float32 else 1e-10
    for create in (False, True):
        for cl in (False, True):
            ref = _grads("pytorch", x, w, b, s, p, create, cl)
            got = _grads(mode, x, w, b, s, p, create, cl)
            for r, o in zip(ref, got):
                assert o.shape == r.shape and o.dtype == r.dtype
                scale = r.abs().max().item() + 1e-12
                assert (o - r).abs().max().item() <= tol * scale, (case, create, cl)
    if mode == "auto":   # every eligible shape was decided and recorded
        assert convgrad.choices(), "no decision recorded"
        for v in convgrad.choices().values():
            assert v["kernel"] in ("pytorch", "im2col") and v["pytorch_ms"] > 0


def test_forced_im2col_is_the_aten_kernel():
    g = torch.Generator().manual_seed(1)
    x = torch.rand(6, 3, 20, 20, generator=g).requires_grad_(True)
    w = torch.randn(12, 3, 3, 3, generator=g)
    with convgrad.conv_backward("im2col"):
        gx, = torch.autograd.grad(F.conv2d(x, w, padding=1).sum(), x)
    go = torch.ones(6, 12, 20, 20)
    ref = torch.ops.aten._slow_conv2d_backward.output_mask(go, x.detach(), w, [3, 3], [1, 1],
                                                           [1, 1], [True, False, False])[0]
    assert torch.equal(gx, ref)


def test_decision_rule_uses_margin(monkeypatch):
    """im2col is kept only when it is MARGIN times faster than PyTorch's kernel."""
    x = torch.rand(2, 1, 10, 10).requires_grad_(True)
    w = torch.randn(4, 1, 3, 3)
    times = {}

    def fake_best(fn, args):
        out = fn(args)
        return (times["im2col"] if fn is convgrad._im2col else times["pytorch"]), out

    monkeypatch.setattr(convgrad, "_best_of_two", fake_best)
    for t_pt, t_ic, want in [(1.0, 0.5, "im2col"), (1.0, 0.95, "pytorch"),
                             (1.0, 2.0, "pytorch")]:
        convgrad.clear_choices()
        times.update(pytorch=t_pt, im2col=t_ic)
        with convgrad.conv_backward("auto"):
            torch.autograd.grad(F.conv2d(x, w).sum(), x)
            torch.autograd.grad(F.conv2d(x, w).sum(), x)   # cached: timed once
        (entry,) = convgrad.choices().values()
        assert entry["kernel"] == want, (t_pt, t_ic)
        assert entry["pytorch_ms"] == pytest.approx(t_pt * 1e3)


def test_ineligible_convolutions_untouched():
    """Grouped, dilated, wide (> MAX_IN_CHANNELS), 1-D and transposed convolutions keep
    PyTorch's kernel and are not timed."""
    g = torch.Generator().manual_seed(2)
    wide = convgrad.MAX_IN_CHANNELS + 1
    calls = [
        lambda x: F.conv2d(x, torch.randn(4, 2, 3, 3, generator=g), groups=2),
        lambda x: F.conv2d(x, torch.randn(4, 4, 3, 3, generator=g), dilation=2),
        lambda x: F.conv_transpose2d(x, torch.randn(4, 3, 3, 3, generator=g)),
    ]
    x = torch.rand(2, 4, 12, 12, generator=g)
    xw = torch.rand(2, wide, 8, 8, generator=g)
    x1 = torch.rand(2, 2, 30, generator=g)
    for fn, inp in [(c, x) for c in calls] + [
            (lambda t: F.conv2d(t, torch.randn(3, wide, 3, 3, generator=g)), xw),
            (lambda t: F.conv1d(t, torch.randn(3, 2, 5, generator=g)), x1)]:
        inp = inp.clone().requires_grad_(True)
        torch.manual_seed(0)
        with convgrad.conv_backward("auto"):
            out = fn(inp)
            gx, = torch.autograd.grad(out.sum(), inp)
        assert gx.shape == inp.shape
    assert convgrad.choices() == {}


def test_batch_bucket():
    assert [convgrad.batch_bucket(n) for n in (0, 1, 2, 3, 4, 5, 15, 16, 17, 114)] == \
        [1, 1, 2, 4, 4, 8, 16, 16, 32, 128]


def test_modes_and_errors(monkeypatch):
    with pytest.raises(ValueError, match="'fastest'"):
        convgrad.conv_backward("fastest").__enter__()
    monkeypatch.setenv("GUARD_FAST_CONV_BACKWARD", "pytorch")
    assert convgrad.default_mode() == "pytorch"
    monkeypatch.setenv("GUARD_FAST_CONV_BACKWARD", "nope")
    with pytest.raises(ValueError, match="GUARD_FAST_CONV_BACKWARD.*'nope'"):
        convgrad.default_mode()
    monkeypatch.delenv("GUARD_FAST_CONV_BACKWARD")
    assert convgrad.default_mode() == "auto"
    from guard_fast.attacks import PGD
    with pytest.raises(ValueError, match="conv_backward.*'oneDNN'"):
        PGD(torch.nn.Linear(4, 2), eps=0.1, conv_backward="oneDNN")


def test_outermost_block_decides():
    x = torch.rand(2, 1, 10, 10).requires_grad_(True)
    w = torch.randn(4, 1, 3, 3)
    with convgrad.conv_backward("pytorch"):
        with convgrad.conv_backward("auto"):
            torch.autograd.grad(F.conv2d(x, w).sum(), x)
    assert convgrad.choices() == {}
    with convgrad.conv_backward("auto", device="cuda"):   # a CUDA block: nothing changes
        torch.autograd.grad(F.conv2d(x, w).sum(), x)
    assert convgrad.choices() == {}
    with convgrad.conv_backward("auto"):
        torch.autograd.grad(F.conv2d(x, w).sum(), x)
    assert len(convgrad.choices()) == 1


def test_pgd_points_same_with_either_kernel():
    """PGD's signed steps: the same adversarial examples with PyTorch's kernel and with
    the choice (a small CNN whose first layer has one input channel)."""
    from guard_fast.attacks import PGD
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(1, 8, 5, stride=2), torch.nn.ReLU(),
                                torch.nn.Conv2d(8, 8, 3), torch.nn.ReLU(), torch.nn.Flatten(),
                                torch.nn.Linear(8 * 10 * 10, 10))
    x = torch.rand(16, 1, 28, 28)
    y = torch.arange(16) % 10
    ref = PGD(model, eps=0.1, alpha=0.025, steps=10, conv_backward="pytorch")(x, y)
    got = PGD(model, eps=0.1, alpha=0.025, steps=10, conv_backward="im2col")(x, y)
    assert (got - ref).abs().max().item() <= 1e-6


def test_attack_uses_the_mode_only_where_it_pays(monkeypatch):
    """Attack.input_grad: forced im2col runs the kernel at every step; with "auto", a model
    without eligible convolutions drops the mode after one backward per input shape, and a
    model with them settles, after three backwards, on the mode or on plain autograd.
    The points agree with PyTorch's kernel throughout."""
    from guard_fast.attacks import PGD
    entered = []
    real = convgrad.conv_backward

    def counting(*a, **k):
        entered.append(1)
        return real(*a, **k)

    import guard_fast.attacks.base as base
    monkeypatch.setattr(base.convgrad, "conv_backward", counting)
    torch.manual_seed(0)
    conv = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3), torch.nn.Flatten(),
                               torch.nn.Linear(4 * 6 * 6, 3))
    x, y = torch.rand(5, 1, 8, 8), torch.tensor([0, 1, 2, 0, 1])
    before = convgrad.im2col_calls()
    PGD(conv, eps=0.1, alpha=0.02, steps=4, conv_backward="im2col")(x, y)
    assert convgrad.im2col_calls() - before == 4 and len(entered) == 4
    entered.clear()
    mlp = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 3))
    atk = PGD(mlp, eps=0.1, alpha=0.02, steps=4)
    atk(x, y)
    atk(x[:3], y[:3])          # another batch bucket: entered once more
    assert len(entered) == 2 and set(atk.conv_plan.values()) == {"plain"}
    atk = PGD(conv, eps=0.1, alpha=0.02, steps=6)
    ref = PGD(conv, eps=0.1, alpha=0.02, steps=6, conv_backward="pytorch")(x, y)
    assert (atk(x, y) - ref).abs().max().item() <= 1e-6
    (plan,) = atk.conv_plan.values()
    assert plan in ("mode", "plain"), plan
    entered.clear()
    with real("pytorch"):   # an outer block decides; nothing is learnt under it
        atk2 = PGD(conv, eps=0.1, alpha=0.02, steps=3)
        atk2(x, y)
    assert atk2.conv_plan == {}
