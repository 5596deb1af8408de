"""bench/flops.py: the step counter's FLOPs equal hand-computed ones, and it counts every
loss variant bench_loss times (the stock FlopCounterMode refuses the fused GUARD loss)."""
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import bench_loss  # noqa: E402
import flops  # noqa: E402

from _models import make  # noqa: E402


def _net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 8 * 8, 5))


@pytest.mark.parametrize("input_grad", [False, True])
def test_conv_linear_flops_by_hand(input_grad):
    n, cin, cout, k, hw, feat, classes = 2, 3, 4, 3, 8, 4 * 8 * 8, 5
    conv = 2 * n * cout * hw * hw * cin * k * k   # one multiply-add per weight per output
    lin = 2 * n * feat * classes
    m = _net()
    x = torch.rand(n, cin, hw, hw, requires_grad=input_grad)
    with flops.OpCounter() as c:
        out = m(x)
    assert c.flops == conv + lin
    with flops.OpCounter() as c:
        F.cross_entropy(out, torch.tensor([0, 3])).backward()
    # backward: the linear layer's input and weight gradients, the conv's weight gradient,
    # and its input gradient only if x requires grad
    assert c.flops == 2 * lin + conv * (2 if input_grad else 1)
    assert c.syncs == 0 and c.ops_by_op["convolution_backward"] == 1


def test_host_syncs_and_views_are_told_apart():
    x = torch.rand(3, 4)
    with flops.OpCounter() as c:
        y = x.t().sum()
        float(y)
    assert c.syncs == 1 and c.ops_by_op["sum"] == 1 and "t" not in c.ops_by_op and c.views >= 1


def test_stock_counter_refuses_the_fused_loss_and_ours_counts_it():
    from torch.utils.flop_counter import FlopCounterMode

    from guard_fast import GuardLoss
    m = make(dtype=torch.float32, act="relu")
    x, y = torch.rand(3, 3, 8, 8), torch.tensor([0, 1, 2])
    with pytest.raises(RuntimeError, match="_will_engine_execute_node"):
        with FlopCounterMode(display=False):
            GuardLoss(check=False)(m, x, y).backward()
    got = flops.count(lambda: GuardLoss(check=False)(m, x, y).backward())
    assert got["flops"] > 0 and got["ops"] > 0


def test_every_bench_variant_is_counted():
    """Each variant bench_loss times (compiled ones through their eager counterpart) is
    counted; the exact step's FLOPs do not depend on chunking, and GUARD's exceed CE's."""
    torch.manual_seed(0)
    x, y = torch.rand(4, 3, 8, 8), torch.tensor([0, 1, 2, 3])
    got = {}
    for v in bench_loss.VARIANTS:
        counted = bench_loss.COUNTED_AS.get(v, v)
        if counted in got:
            continue
        m = make(dtype=torch.float32, act="relu")
        opt = torch.optim.SGD(m.parameters(), lr=1e-3, momentum=0.9)
        step, _ = bench_loss._step_fn(counted, m, x, y, opt, None, torch.device("cpu"))
        step()
        got[counted] = flops.count(step)
    assert set(bench_loss.COUNTED_AS.values()) <= set(got)
    assert all(r["flops"] > 0 and r["ops"] > 0 and r["syncs"] == 0 for r in got.values()), got
    assert got["exact-chunked"]["flops"] == got["exact"]["flops"]
    assert got["exact-chunked"]["ops"] > got["exact"]["ops"]  # four chunks, four sets of passes
    for v in ("straightforward", "exact", "exact-unfused", "exact-bntrain", "fd"):
        assert got[v]["flops"] > 2 * got["ce"]["flops"], v


def test_peak_table():
    assert flops.peak_tflops("NVIDIA H200", "bf16") == 989.5
    assert flops.peak_tflops("NVIDIA H100 PCIe", "tf32") == 378.0
    assert flops.peak_tflops("NVIDIA A100-SXM4-80GB", "fp32") == 19.5
    assert flops.peak_tflops("AMD EPYC (2 cores)", "fp32") is None
    r = flops.throughput(10**12, 100.0, "NVIDIA A100-SXM4-40GB", "bf16")
    assert r["tflops"] == pytest.approx(10.0) and r["peak_frac"] == pytest.approx(10 / 312)
