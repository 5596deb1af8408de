"""The fused instance-norm double backward (guard_fast/models/instance_norm.py,
csrc/instance_norm_cpu.cpp) against PyTorch's own GroupNorm and against finite differences."""
import copy

import pytest
import torch
import torch.nn.functional as F

from guard_fast.models import build_model
from guard_fast.models import instance_norm as inorm
from guard_fast.models.flat import FlatNet
from guard_fast.models.pool import AvgPool2x2

pytestmark = pytest.mark.skipif(not inorm.fused_available(),
                                reason="guard_fast._C without instance_norm_double_backward")


def _inputs(shape, scale=1.0, channels_last=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = scale * torch.randn(shape, generator=g, dtype=torch.float64)
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    c = shape[1]
    w = torch.randn(c, generator=g, dtype=torch.float64)
    b = torch.randn(c, generator=g, dtype=torch.float64)
    return [t.requires_grad_(True) for t in (x, w, b)]


def _second_order(fn, x, w, b, seed=1):
    """Gradient of a nonlinear function of the first-order gradients (all three)."""
    g = torch.Generator().manual_seed(seed)
    gy = torch.randn(x.shape, generator=g, dtype=x.dtype)
    y = fn(x, w, b)
    gx, gw, gb = torch.autograd.grad((y * gy).sum(), (x, w, b), create_graph=True)
    s = (gx ** 3).sum() + 0.3 * (gw ** 2).sum() + 0.7 * (gb * gw).sum()
    out = torch.autograd.grad(s, (x, w, b), allow_unused=True)  # b: unused (first-order
    return [torch.zeros_like(t) if o is None else o for o, t in zip(out, (x, w, b))]  # grads


@pytest.mark.parametrize("shape,scale,cl", [((3, 4, 5, 5), 1.0, False),
                                            ((2, 3, 4, 4), 3e-3, False),   # var ~ eps
                                            ((2, 6, 8, 8), 1.0, True),     # channels_last
                                            ((4, 5, 7), 1.0, False)])      # 1-D maps
def test_double_backward_equals_pytorch(shape, scale, cl):
    x, w, b = _inputs(shape, scale, cl)
    ref = _second_order(lambda x, w, b: F.group_norm(x, shape[1], w, b, 1e-5), x, w, b)
    got = _second_order(lambda x, w, b: inorm.instance_norm(x, w, b, 1e-5), x, w, b)
    for r, o in zip(ref, got):
        assert torch.allclose(o, r, rtol=1e-10, atol=1e-12)


def test_forward_and_first_backward_equal_pytorch_and_gradgradcheck():
    x, w, b = _inputs((2, 3, 4, 4))
    y = inorm.instance_norm(x, w, b)
    assert y.grad_fn is not None and "InstanceNorm" in type(y.grad_fn).__name__
    assert torch.equal(y, F.group_norm(x, 3, w, b))
    fn = lambda x, w, b: inorm.instance_norm(x, w, b, 1e-5)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (x, w, b))
    assert torch.autograd.gradgradcheck(fn, (x, w, b))


def test_no_grad_and_cuda_paths_are_pytorchs():
    x, w, b = _inputs((2, 3, 4, 4))
    with torch.no_grad():
        y = inorm.instance_norm(x, w, b)
    assert torch.equal(y, F.group_norm(x, 3, w, b))
    y = inorm.instance_norm(x.detach().float(), w.detach().float(), b.detach().float())
    assert y.grad_fn is None


def test_third_derivative_raises():
    x, w, b = _inputs((2, 3, 4, 4))
    y = inorm.instance_norm(x, w, b)
    (gx,) = torch.autograd.grad((y ** 3).sum(), x, create_graph=True)
    with pytest.raises(RuntimeError, match="GUARD_FAST_INSTANCE_NORM=torch"):
        torch.autograd.grad(gx.pow(2).sum(), x, create_graph=True)


def test_env_switch_falls_back_to_pytorch(monkeypatch):
    monkeypatch.setenv("GUARD_FAST_INSTANCE_NORM", "torch")
    x, w, b = _inputs((2, 3, 4, 4))
    y = inorm.instance_norm(x, w, b)
    assert "InstanceNorm" not in type(y.grad_fn).__name__


def test_kernel_rejects_bad_input():
    op = torch.ops.guard_fast_C.instance_norm_double_backward
    x = torch.randn(2, 3, 4, 4)
    mean, rstd, w = torch.zeros(2, 3), torch.ones(2, 3), torch.ones(3)
    with pytest.raises(RuntimeError, match="must have x's shape"):
        op(torch.randn(2, 3, 4), x, x, mean, rstd, w, w, w)
    with pytest.raises(RuntimeError, match="C = 3"):
        op(x, x, x, mean, rstd, torch.ones(4), w, w)
    with pytest.raises(RuntimeError, match="float32 or float64"):
        h = x.half()
        op(h, h, h, mean.half(), rstd.half(), w.half(), w.half(), w.half())


def test_mtt_unroll_gradients_equal_pytorch_groupnorm():
    """The whole point: MTT's image and step-size gradients through 8 steps (DSA on, crop
    among the steps) on guard_fast's ConvNet (fused norm and pooling) are those on
    PyTorch's layers, in float64."""
    from guard_fast.data import dsa
    from guard_fast.distill import mtt

    torch.manual_seed(0)
    net = build_model("convnet", 10, 3, image_size=16, width=8, depth=2).double()
    ref_net = copy.deepcopy(net)
    for i, m in enumerate(ref_net.features):  # PyTorch's own layers, as the public code's
        if isinstance(m, inorm.InstanceNorm):
            gn = torch.nn.GroupNorm(m.num_channels, m.num_channels).double()
            gn.load_state_dict(m.state_dict())
            ref_net.features[i] = gn
        elif isinstance(m, AvgPool2x2):
            ref_net.features[i] = torch.nn.AvgPool2d(2, 2)
    assert any(isinstance(m, AvgPool2x2) for m in net.features)
    flat, ref = FlatNet(net), FlatNet(ref_net)
    w0 = flat.flatten()
    wT = w0 + 0.01 * torch.randn_like(w0)
    images = torch.randn(10, 3, 16, 16, dtype=torch.float64)
    labels = torch.arange(10)
    plan = mtt.make_plan(10, 10, 8, dsa.DSA_STRATEGY, 16, torch.Generator().manual_seed(1))
    assert any(d.group == "crop" for _, d in plan)

    def grads(f):
        im = images.clone().requires_grad_(True)
        lr = torch.tensor(0.01, dtype=torch.float64, requires_grad=True)
        return torch.autograd.grad(mtt.unroll_loss(f, w0, wT, im, labels, lr, plan), (im, lr))

    got, want = grads(flat), grads(ref)
    for g, r in zip(got, want):
        assert torch.allclose(g, r, rtol=1e-9, atol=1e-12 * float(r.abs().max()))
