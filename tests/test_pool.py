"""The fused 2x2 average pooling (guard_fast/models/pool.py, csrc/pool_cpu.cpp) against
PyTorch's avg_pool2d, to every order MTT needs."""
import pytest
import torch
import torch.nn.functional as F

from guard_fast.models import pool

pytestmark = pytest.mark.skipif(not pool.fused_available(),
                                reason="guard_fast._C without avg_pool2x2")


@pytest.mark.parametrize("shape", [(2, 3, 8, 8), (1, 2, 7, 9), (3, 1, 2, 2), (2, 4, 5, 4)])
@pytest.mark.parametrize("channels_last", [False, True])
def test_forward_equals_pytorch(shape, channels_last):
    x = torch.randn(shape)
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    assert torch.allclose(pool.avg_pool2x2(x), F.avg_pool2d(x, 2, 2), rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("shape", [(2, 3, 6, 6), (1, 2, 5, 7)])
def test_derivatives_to_third_order_equal_pytorch(shape):
    x0 = torch.randn(shape, dtype=torch.float64)

    def orders(fn):
        x = x0.clone().requires_grad_(True)
        y = fn(x)
        (g1,) = torch.autograd.grad((y ** 3).sum(), x, create_graph=True)
        (g2,) = torch.autograd.grad((g1 ** 3).sum(), x, create_graph=True)
        (g3,) = torch.autograd.grad((g2 ** 2).sum(), x)
        return y, g1, g2, g3

    for got, want in zip(orders(pool.avg_pool2x2), orders(lambda x: F.avg_pool2d(x, 2, 2))):
        assert torch.allclose(got, want, rtol=1e-12, atol=1e-12)
    x = x0.clone().requires_grad_(True)
    assert torch.autograd.gradcheck(pool.avg_pool2x2, (x,))
    assert torch.autograd.gradgradcheck(pool.avg_pool2x2, (x,))


def test_switch_and_fallbacks(monkeypatch):
    x = torch.randn(1, 2, 4, 4, requires_grad=True)
    assert "_Pool" in type(pool.avg_pool2x2(x).grad_fn).__name__
    assert "AvgPool2D" in type(pool.avg_pool2x2(x.half()).grad_fn).__name__
    monkeypatch.setenv("GUARD_FAST_POOL", "torch")
    assert "AvgPool2D" in type(pool.avg_pool2x2(x).grad_fn).__name__


def test_kernels_reject_bad_input():
    with pytest.raises(RuntimeError, match="expected \\(N, C, H, W\\)"):
        torch.ops.guard_fast_C.avg_pool2x2(torch.randn(3, 4, 4))
    with pytest.raises(RuntimeError, match="not the pooled size"):
        torch.ops.guard_fast_C.avg_pool2x2_backward(torch.randn(1, 1, 2, 2), 6, 4)
