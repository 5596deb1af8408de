"""GuardLoss / GradNormLoss against independent straightforward formulas (float64)."""
import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import guard_fast
from guard_fast import GradNormLoss, GuardLoss, guard_loss
from _models import make

torch.set_num_threads(2)


def _data(n=5, c=3, hw=8, classes=5, seed=1, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, c, hw, hw, generator=g, dtype=dtype), torch.randint(0, classes, (n,), generator=g)


def _grads(m):
    return [p.grad.detach().clone() for p in m.parameters()]


def _flat(gs):
    return torch.cat([g.flatten() for g in gs])


def _create_graph_reference(m, x, y, h=3.0, lam=100.0):
    """Eq. 11 written independently: CE in the model's (train) mode, penalty in eval mode,
    z from a separate pass, the two gradients by create_graph autograd, backward once."""
    m.zero_grad()
    ce = F.cross_entropy(m(x), y)
    m.eval()
    xz = x.clone().requires_grad_(True)
    g = torch.autograd.grad(F.cross_entropy(m(xz), y, reduction="sum"), xz)[0]
    z = g / g.flatten(1).norm(dim=1).view(-1, 1, 1, 1)
    a = (x + h * z).requires_grad_(True)
    ga = torch.autograd.grad(F.cross_entropy(m(a), y, reduction="sum"), a, create_graph=True)[0]
    b = x.clone().requires_grad_(True)
    gb = torch.autograd.grad(F.cross_entropy(m(b), y, reduction="sum"), b, create_graph=True)[0]
    pen = lam * ((ga - gb) ** 2).flatten(1).sum(1).mean()
    m.train()
    (ce + pen).backward()
    return (ce + pen).detach(), _grads(m)


@pytest.mark.parametrize("kw", [dict(), dict(fused=False), dict(chunk_size=2),
                                dict(chunk_size=1), dict(channels_last=True)])
@pytest.mark.parametrize("act", ["tanh", "relu"])
def test_exact_matches_create_graph_reference(kw, act):
    kw = dict(kw)
    cl = kw.pop("channels_last", False)
    m = make(act=act)
    x, y = _data()
    ref_m = copy.deepcopy(m)
    v_ref, g_ref = _create_graph_reference(ref_m, x, y)
    if cl:
        x = x.to(memory_format=torch.channels_last)
    m.zero_grad()
    loss = GuardLoss(h=3.0, lam=100.0, mode="exact", **kw)(m, x, y)
    loss.backward()
    torch.testing.assert_close(loss.detach(), v_ref, rtol=1e-10, atol=1e-12)
    for a, b in zip(_grads(m), g_ref):
        torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-10)
    # BatchNorm running statistics saw exactly one (CE) batch, like the reference
    for (k, a), b in zip(m.state_dict().items(), ref_m.state_dict().values()):
        torch.testing.assert_close(a, b, msg=k)


def test_grad_output_scaling_and_parts():
    m = make()
    x, y = _data()
    m2 = copy.deepcopy(m)
    out = guard_loss(m, x, y, return_parts=True)
    (2.5 * out.loss).backward()
    loss2 = guard_loss(m2, x, y, fused=False)
    (2.5 * loss2).backward()
    for a, b in zip(_grads(m), _grads(m2)):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(out.loss.detach(), out.ce + out.penalty)
    assert out.penalty > 0 and out.grad_norm > 0
    # autograd.grad w.r.t. parameters works too (DC gradient matching uses this form)
    m3 = copy.deepcopy(make())
    gs = torch.autograd.grad(guard_loss(m3, x, y), list(m3.parameters()))
    torch.testing.assert_close(_flat(gs), _flat(_create_graph_reference(make(), x, y)[1]),
                               rtol=1e-8, atol=1e-10)


def test_no_grad_gives_the_value():
    m = make()
    x, y = _data()
    with torch.no_grad():
        v = guard_loss(m, x, y)
    v_ref, _ = _create_graph_reference(make(), x, y)
    assert not v.requires_grad
    torch.testing.assert_close(v, v_ref)


def test_bn_train_mode_equals_independent_formula():
    m = make()
    x, y = _data(n=6)
    # independent: CE pass in train mode on one copy (updates running stats once); penalty
    # with batch statistics on a copy whose BatchNorm momentum is 0 (stats never move).
    a, b = copy.deepcopy(m), copy.deepcopy(m)
    for mod in b.modules():
        if isinstance(mod, nn.BatchNorm2d):
            mod.momentum = 0.0
    ce = F.cross_entropy(a(x), y)
    pen = guard_fast.guard_penalty_reference(b, x, y)
    (ce + pen).backward()
    g_ref = [p.grad + q.grad for p, q in zip(a.parameters(), b.parameters())]
    for fused in (True, False):
        m2 = copy.deepcopy(m)
        loss = guard_loss(m2, x, y, bn_mode="train", fused=fused)
        loss.backward()
        torch.testing.assert_close(loss.detach(), (ce + pen).detach())
        for u, v in zip(_grads(m2), g_ref):
            torch.testing.assert_close(u, v, rtol=1e-8, atol=1e-10)
        for k, v in a.state_dict().items():
            torch.testing.assert_close(m2.state_dict()[k], v, msg=k)
        assert m2.training and all(mod.track_running_stats for mod in m2.modules()
                                   if isinstance(mod, nn.BatchNorm2d))


@pytest.mark.parametrize("scheme,tol", [("central", 1e-9), ("forward", 1e-6)])
def test_fd_gradient_close_to_exact_in_float64(scheme, tol):
    """Documented tolerance: in float64 with fd_eps=1e-6 the fd gradient's cosine to exact is
    within 1e-9 (central) / 1e-6 (forward) of 1; the value is exact."""
    for act in ("tanh", "relu"):
        m, m2 = make(act=act), make(act=act)
        x, y = _data()
        loss = guard_loss(m, x, y, mode="fd", fd_eps=1e-6, fd_scheme=scheme)
        loss.backward()
        v_ref, g_ref = _create_graph_reference(m2, x, y)
        torch.testing.assert_close(loss.detach(), v_ref)
        cos = F.cosine_similarity(_flat(_grads(m)), _flat(g_ref), dim=0)
        assert 1 - cos < tol, (act, float(cos))
        rel = (_flat(_grads(m)) - _flat(g_ref)).norm() / _flat(g_ref).norm()
        assert rel < 10 * tol ** 0.5, float(rel)


def _public_cifar(net, inputs, targets, h=3.0, lamda=100.0):
    """The public CIFAR script's step, restated (its structure, not its text)."""
    outputs = net(inputs)
    loss = F.cross_entropy(outputs, targets)
    inputs = inputs.clone().requires_grad_()
    net.eval()
    F.cross_entropy(net(inputs), targets).backward()
    z = inputs.grad.detach()
    z = h * (z + 1e-7) / (z.reshape(z.size(0), -1).norm(dim=1)[:, None, None, None] + 1e-7)
    inputs.grad = None
    net.zero_grad()
    loss_pos = F.cross_entropy(net(inputs + z), targets)
    loss_orig = F.cross_entropy(net(inputs), targets)
    gd = torch.autograd.grad(loss_pos - loss_orig, inputs, create_graph=True)[0]
    reg = gd.reshape(gd.size(0), -1).norm(dim=1)
    net.zero_grad()
    loss = loss + torch.mean(lamda * reg)
    net.train()
    loss.backward()
    return loss.detach(), _grads(net)


def _public_imagenet(model, image, target, h=3.0, beta=1e-4):
    """The public ImageNet script's CURE step, restated."""
    loss = F.cross_entropy(model(image), target)
    image = image.clone().requires_grad_()
    model.eval()
    F.cross_entropy(model(image), target).backward()
    z = image.grad.detach()
    z = h * (z + 1e-7) / (z.reshape(z.size(0), -1).norm(dim=1)[:, None, None, None] + 1e-7)
    image.grad = None
    model.zero_grad()
    lp = F.cross_entropy(model(image + z), target)
    lo = F.cross_entropy(model(image), target)
    loss = loss + beta * torch.norm(lp - lo)
    model.train()
    model.zero_grad()
    loss.backward()
    return loss.detach(), _grads(model)


@pytest.mark.parametrize("mode,public,kw", [
    ("official-cifar", _public_cifar, dict(lam=100.0)),
    ("official-cifar", _public_cifar, dict(lam=100.0, chunk_size=2)),
    ("official-imagenet", _public_imagenet, dict()),
    ("official-imagenet", _public_imagenet, dict(fused=False)),
])
def test_official_modes_equal_public_code(mode, public, kw):
    m = make()
    x, y = _data()
    v_ref, g_ref = public(copy.deepcopy(m), x, y)
    loss = guard_loss(m, x, y, mode=mode, **kw)
    loss.backward()
    torch.testing.assert_close(loss.detach(), v_ref, rtol=1e-10, atol=1e-12)
    for a, b in zip(_grads(m), g_ref):
        torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-12)


def test_grad_norm_loss_exact_and_official():
    m = make()
    x, y = _data()
    ref = copy.deepcopy(m)
    ce = F.cross_entropy(ref(x), y)
    ref.eval()
    xa = x.clone().requires_grad_(True)
    g = torch.autograd.grad(F.cross_entropy(ref(xa), y, reduction="sum"), xa, create_graph=True)[0]
    ref.train()
    v = ce + 0.3 * g.flatten(1).norm(dim=1).mean()
    v.backward()
    loss = GradNormLoss(lam=0.3)(m, x, y)
    loss.backward()
    torch.testing.assert_close(loss.detach(), v.detach())
    for a, b in zip(_grads(m), _grads(ref)):
        torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-12)
    # official: gradient of the batch-mean CE, detached -> same gradient as plain CE
    m2, m3 = make(), make()
    out = GradNormLoss(lam=0.3, mode="official")(m2, x, y, return_parts=True)
    out.loss.backward()
    F.cross_entropy(m3(x), y).backward()
    for a, b in zip(_grads(m2), _grads(m3)):
        torch.testing.assert_close(a, b)
    torch.testing.assert_close(out.penalty, 0.3 * g.detach().flatten(1).norm(dim=1).mean() / len(y))


def test_autocast_bf16_runs_close_to_fp32():
    m = make(dtype=torch.float32)
    x, y = _data(dtype=torch.float32)
    v32 = guard_loss(copy.deepcopy(m), x, y, return_parts=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        vbf = guard_loss(m, x, y, return_parts=True)
    vbf.loss.backward()
    assert torch.isfinite(vbf.loss)
    assert abs(float(vbf.ce) - float(v32.ce)) < 0.05 * float(v32.ce) + 1e-2
    assert abs(float(vbf.penalty) - float(v32.penalty)) < 0.25 * float(v32.penalty) + 1e-2


class _Bad3D(nn.Module):
    def __init__(self):
        super().__init__()
        self.l = nn.Linear(3, 3)

    def forward(self, x):
        return self.l(x.mean((2, 3)))[:, None, :]


class _Overflow(nn.Module):
    def __init__(self):
        super().__init__()
        self.l = nn.Linear(3, 5)

    def forward(self, x):
        return self.l(x.mean((2, 3))) * 1e38 * 1e3


@pytest.mark.parametrize("call,exc,match", [
    (lambda m, x, y: guard_loss("not a model", x, y), TypeError, "model"),
    (lambda m, x, y: guard_loss(m, x.long(), y), TypeError, "x must be"),
    (lambda m, x, y: guard_loss(m, x[:, 0, 0, 0], y), ValueError, "x must have shape"),
    (lambda m, x, y: guard_loss(m, x, y.float()), TypeError, "y must be"),
    (lambda m, x, y: guard_loss(m, x, y[:2]), ValueError, "y must have shape"),
    (lambda m, x, y: guard_loss(m, x, y + 10), ValueError, "labels y must lie"),
    (lambda m, x, y: guard_loss(m, x, y - 10), ValueError, "labels y must lie"),
    (lambda m, x, y: guard_loss(m, x * float("nan"), y), ValueError, "NaN"),
    (lambda m, x, y: guard_loss(_Bad3D().double(), x, y), ValueError, "classifier"),
    (lambda m, x, y: guard_loss(m, x, y, mode="nope"), ValueError, "mode"),
    (lambda m, x, y: guard_loss(m, x, y, bn_mode="nope"), ValueError, "bn_mode"),
    (lambda m, x, y: guard_loss(m, x, y, lam=-1.0), ValueError, "lam"),
    (lambda m, x, y: guard_loss(m, x, y, h=float("inf")), ValueError, "h must"),
    (lambda m, x, y: guard_loss(m, x, y, mode="official-imagenet", lam=100.0), ValueError, "lam"),
    (lambda m, x, y: guard_loss(m, x, y, beta=1e-4), ValueError, "beta"),
    (lambda m, x, y: guard_loss(m, x, y, fd_eps=1e-3), ValueError, "fd_eps"),
    (lambda m, x, y: guard_loss(m, x, y, chunk_size=0), ValueError, "chunk_size"),
    (lambda m, x, y: guard_loss(m, x, y, chunk_size=2, bn_mode="train"), ValueError, "chunk_size"),
    (lambda m, x, y: GuardLoss(mode="fd", fused=False), ValueError, "fused"),
    (lambda m, x, y: GradNormLoss(mode="paper"), ValueError, "mode"),
])
def test_bad_input_names_the_problem(call, exc, match):
    m = make()
    x, y = _data()
    with pytest.raises(exc, match=match):
        call(m, x, y)


def test_nonfinite_penalty_raises_with_statistics():
    x, y = _data(dtype=torch.float32)
    with pytest.raises(FloatingPointError, match="penalty is not finite.*ce="):
        guard_loss(_Overflow(), x, y)


def test_compiled_step_equals_eager():
    """The whole loss + backward compiled as one graph gives the eager gradients."""
    m = make(dtype=torch.float32, act="relu")
    m2 = copy.deepcopy(m)
    x, y = _data(dtype=torch.float32)
    step = guard_fast.compile_guard_step(m, GuardLoss(check=False))
    loss = step(x, y)
    ref = guard_loss(m2, x, y)
    ref.backward()
    torch.testing.assert_close(loss, ref.detach(), rtol=1e-5, atol=1e-6)
    for a, b in zip(_grads(m), _grads(m2)):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    for (k, a), b in zip(m.state_dict().items(), m2.state_dict().values()):
        torch.testing.assert_close(a, b, msg=k)



from conftest import gpu  # noqa: E402


@gpu
@pytest.mark.parametrize("mode", ["exact", "official-cifar", "official-imagenet", "fd"])
def test_modes_on_cuda_match_cpu(mode):
    m = make(act="relu")
    x, y = _data()
    kw = dict(fd_eps=1e-6) if mode == "fd" else {}
    ref = copy.deepcopy(m)
    lr = guard_loss(ref, x, y, mode=mode, **kw)
    lr.backward()
    mc = copy.deepcopy(m).cuda()
    lc = guard_loss(mc, x.cuda(), y.cuda(), mode=mode, **kw)
    lc.backward()
    torch.testing.assert_close(lc.detach().cpu(), lr.detach(), rtol=1e-9, atol=1e-12)
    cos = F.cosine_similarity(_flat(_grads(mc)).cpu(), _flat(_grads(ref)), dim=0)
    assert 1 - cos < 1e-9, float(cos)


def test_stable_cross_entropy_value_and_confident_gradients():
    g = torch.Generator().manual_seed(0)
    z = torch.randn(64, 10, generator=g, dtype=torch.float64) * 8
    y = torch.randint(0, 10, (64,), generator=g)
    z[:16] = 0.0
    z[torch.arange(16), y[:16]] = 25.0  # very confident and right: p_y - 1 ~ -1e-10
    torch.testing.assert_close(guard_fast.stable_cross_entropy(z, y),
                               F.cross_entropy(z, y, reduction="none"), rtol=1e-12, atol=1e-14)
    z64 = z.clone().requires_grad_(True)
    (truth,) = torch.autograd.grad(F.cross_entropy(z64, y, reduction="sum"), z64)
    z32 = z.float().requires_grad_(True)
    (ours,) = torch.autograd.grad(guard_fast.stable_cross_entropy(z32, y).sum(), z32)
    (plain,) = torch.autograd.grad(F.cross_entropy(z32, y, reduction="sum"), z32)
    rel = lambda a: ((a.double() - truth).abs() / truth.abs().clamp_min(1e-300)).max()  # noqa: E731
    assert rel(ours) < 1e-5, float(rel(ours))
    assert rel(plain) > 0.5  # float32 p_y - 1 rounds to 0: the reason this function exists
    small = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)
    yy = torch.tensor([0, 3, 1])
    assert torch.autograd.gradgradcheck(lambda t: guard_fast.stable_cross_entropy(t, yy), (small,))


@pytest.mark.parametrize("kw", [dict(), dict(bn_mode="train"), dict(mode="fd"),
                                dict(mode="official-imagenet")])
def test_x_receives_the_ce_gradient_only(kw):
    m = make()
    x, y = _data()
    xr = x.clone().requires_grad_(True)
    F.cross_entropy(copy.deepcopy(m)(xr), y).backward()
    xg = x.clone().requires_grad_(True)
    guard_loss(m, xg, y, **kw).backward()
    torch.testing.assert_close(xg.grad, xr.grad)


def test_fused_loss_backward_twice_says_what_to_do():
    m = make()
    x, y = _data()
    loss = guard_loss(m, x, y)
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="fused=False"):
        loss.backward()
    loss2 = guard_loss(m, x, y, fused=False)  # the unfused graph supports retain_graph
    loss2.backward(retain_graph=True)
    loss2.backward()
