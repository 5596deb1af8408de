"""guard_fast.losses.step.TrainStep: every mode is the eager step (loss, gradients, update),
and a step that cannot be captured or compiled warns and runs eagerly."""
import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from _models import make
from conftest import gpu
from guard_fast import GuardLoss
from guard_fast.losses.step import TrainStep


def _data(n=4, hw=8, dtype=torch.float32, device="cpu", seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, 3, hw, hw, generator=g, dtype=dtype)
    return x.to(device), torch.randint(0, 5, (n,), generator=g).to(device)


def _run(mode, model, steps=3, device="cpu", crit=None, **kw):
    """Losses of `steps` steps on one batch, the last step's gradients, the final weights."""
    crit = crit or GuardLoss(check=False)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    step = TrainStep(model, crit, opt, mode=mode, **kw)
    x, y = _data(dtype=next(model.parameters()).dtype, device=device)
    losses = [step(x, y) for _ in range(steps)]
    return (torch.stack(losses), [p.grad.clone() for p in model.parameters()],
            [p.detach().clone() for p in model.parameters()], step)


def _assert_same(a, b, rtol, atol):
    torch.testing.assert_close(a[0], b[0], rtol=rtol, atol=atol)
    for name, i in (("grads", 1), ("weights", 2)):
        for u, v in zip(a[i], b[i]):
            torch.testing.assert_close(u, v, rtol=rtol, atol=atol, msg=lambda m: f"{name}: {m}")


def test_eager_step_is_the_hand_written_step():
    m = make(dtype=torch.float64)
    ref = copy.deepcopy(m)
    got = _run("eager", m)
    opt = torch.optim.SGD(ref.parameters(), lr=0.05, momentum=0.9)
    x, y = _data(dtype=torch.float64)
    losses = []
    for _ in range(3):
        opt.zero_grad(set_to_none=True)
        loss = GuardLoss(check=False)(ref, x, y)
        loss.backward()
        opt.step()
        losses.append(loss.detach())
    want = (torch.stack(losses), [p.grad for p in ref.parameters()], list(ref.parameters()))
    _assert_same(got, want, rtol=1e-12, atol=1e-12)
    for (k, a), b in zip(m.state_dict().items(), ref.state_dict().values()):  # BN statistics
        torch.testing.assert_close(a, b, msg=k)


def test_channels_last_step_equals_contiguous():
    m = make(dtype=torch.float64, act="relu")
    a = _run("eager", copy.deepcopy(m), channels_last=True)
    b = _run("eager", m)
    assert next(a[3].model.parameters()).is_contiguous(memory_format=torch.channels_last)
    _assert_same(a, b, rtol=1e-9, atol=1e-11)


def test_graph_mode_off_cuda_warns_and_runs_eagerly():
    m = make(dtype=torch.float64)
    with pytest.warns(RuntimeWarning, match="needs a CUDA device.*eagerly"):
        got = _run("graph", copy.deepcopy(m))
    assert got[3].mode == "eager"
    _assert_same(got, _run("eager", m), rtol=0, atol=0)


def test_options_are_checked_first():
    m = make()
    opt = torch.optim.SGD(m.parameters(), lr=0.1)
    crit = GuardLoss()
    with pytest.raises(ValueError, match="mode must be one of"):
        TrainStep(m, crit, opt, mode="cudagraph")
    with pytest.raises(ValueError, match="amp_dtype must be None or torch.bfloat16.*GradScaler"):
        TrainStep(m, crit, opt, amp_dtype=torch.float16)
    with pytest.raises(ValueError, match="warmup must be an int >= 1"):
        TrainStep(m, crit, opt, mode="graph", warmup=0)


def test_compile_mode_that_cannot_trace_warns_and_runs_eagerly():
    """A criterion with a host sync cannot be traced as one graph: eager, same numbers."""
    def syncing(model, x, y):
        loss = F.cross_entropy(model(x), y)
        if float(loss.detach()) < 0:  # a host sync (data-dependent Python branch)
            raise AssertionError
        return loss

    m = make(dtype=torch.float32, act="relu")
    with pytest.warns(RuntimeWarning, match="mode='compile'.*did not compile.*eagerly"):
        got = _run("compile", copy.deepcopy(m), steps=2, crit=syncing)
    assert got[3].mode == "eager"
    _assert_same(got, _run("eager", m, steps=2, crit=syncing), rtol=0, atol=0)


class _HostSync(nn.Module):
    """A classifier that reads a value back to the host in forward (capture cannot)."""

    def __init__(self):
        super().__init__()
        self.net = make(dtype=torch.float32, act="relu")

    def forward(self, x):
        out = self.net(x)
        if out.abs().max().item() > 1e6:
            raise AssertionError
        return out


@gpu
def test_graph_step_equals_eager_on_cuda():
    m = make(dtype=torch.float32, act="relu").cuda()
    got = _run("graph", copy.deepcopy(m), steps=5, device="cuda", warmup=2)
    assert got[3].mode == "graph" and got[3]._loop.replayed == 3
    _assert_same(got, _run("eager", m, steps=5, device="cuda"), rtol=1e-4, atol=1e-5)


@gpu
def test_graph_step_with_host_sync_falls_back_on_cuda():
    m = _HostSync().cuda()
    with pytest.warns(RuntimeWarning, match="capture of the step failed"):
        got = _run("graph", copy.deepcopy(m), steps=4, device="cuda", warmup=1)
    assert got[3].mode == "eager" and got[3]._loop.replayed == 0
    _assert_same(got, _run("eager", m, steps=4, device="cuda"), rtol=1e-4, atol=1e-5)
