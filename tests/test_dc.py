"""DC (gradient matching) and its GUARD variant: the matching distance, the GUARD real
gradient, learning on the bundled digits, DC vs random real images, kill-and-resume, errors.

Settings are reduced for CPU (16 px one-channel digits, ConvNet width 32, batch_real 32, IPC 1,
tens of outer iterations); each test runs torch on one thread (on the shared 2-core machine
one thread was about 10x faster than two oversubscribed ones)."""
import json

import pytest
import torch
import torch.nn.functional as F

import guard_fast.distill.dc as dcmod
from guard_fast.data.distilled import load_distilled
from guard_fast.config import DCConfig, get_loops
from guard_fast.distill.dc import (dc, evaluate_synset, layer_distance, load_real, match_distance,
                                   random_real_subset, real_gradients)
from guard_fast.models import build_model
from guard_fast.runtime import load_checkpoint

SMALL = dict(data="mnist", image_size=16, channels=1, ipc=1, width=32, batch_real=32,
             progress=False)


pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture(scope="module")
def real():
    return load_real("mnist", image_size=16, channels=1)


@pytest.fixture(scope="module")
def dc_run(tmp_path_factory, real):
    torch.set_num_threads(1)
    out = tmp_path_factory.mktemp("dc") / "run"
    res = dc(DCConfig(out=str(out), iterations=30, **SMALL))
    return out, res


# ----------------------------------------------------------------------------- distance


def _independent_distance(gr, gs):
    """DC's 'ours' distance written out node by node."""
    total = 0.0
    for a, b in zip(gr, gs):
        if a.dim() == 1:  # DC's code skips biases and norm parameters
            continue
        for i in range(a.shape[0]):  # one output node (conv filter, linear row, channel)
            u, v = a[i].reshape(-1).double(), b[i].reshape(-1).double()
            total += 1 - float(u @ v) / (float(u.norm()) * float(v.norm()) + 1e-6)
    return total


def test_match_distance_equals_independent_computation():
    g = torch.Generator().manual_seed(0)
    shapes = [(8, 3, 3, 3), (8,), (4, 5, 6), (10, 20), (10,), (7, 1, 5, 5)]
    gr = [torch.randn(s, generator=g) for s in shapes]
    gs = [torch.randn(s, generator=g) for s in shapes]
    d = match_distance(gr, gs)
    assert d.shape == ()
    assert float(d) == pytest.approx(_independent_distance(gr, gs), rel=1e-5)
    # cosine-based: invariant to positive scaling of either side, ~0 for identical gradients
    assert float(match_distance(gr, [3.0 * t for t in gs])) == pytest.approx(float(d), rel=1e-5)
    assert abs(float(match_distance(gr, gr))) < 1e-4
    # bias-like parameters add exactly nothing
    assert float(layer_distance(gr[1], gs[1])) == 0.0


def test_match_distance_on_a_convnet_and_gradient_flows():
    torch.manual_seed(0)
    net = build_model("convnet", 10, 1, (0.1,), (0.3,), image_size=16, width=8).model
    params = list(net.parameters())
    xr, yr = torch.randn(12, 1, 16, 16), torch.full((12,), 3)
    xs = torch.randn(2, 1, 16, 16, requires_grad=True)
    g_real = real_gradients(net, xr, yr, params)
    g_syn = torch.autograd.grad(F.cross_entropy(net(xs), yr[:2]), params, create_graph=True)
    d = match_distance(g_real, g_syn)
    ref = _independent_distance(g_real, [t.detach() for t in g_syn])
    assert float(d.detach()) == pytest.approx(ref, rel=1e-5)
    d.backward()
    assert xs.grad is not None and float(xs.grad.abs().sum()) > 0


# ----------------------------------------------------------------------------- GUARD gradient


def _guard_reference(net, x, y, h, lam):
    """CE + lam * mean_i ||grad_x l(x_i + h z_i) - grad_x l(x_i)||^2 by plain double backprop."""
    xa = x.clone().requires_grad_(True)
    (g0,) = torch.autograd.grad(F.cross_entropy(net(xa), y, reduction="sum"), xa,
                                create_graph=True)
    z = (g0 / g0.flatten(1).norm(dim=1).view(-1, 1, 1, 1)).detach()
    xp = (x + h * z).requires_grad_(True)
    (g1,) = torch.autograd.grad(F.cross_entropy(net(xp), y, reduction="sum"), xp,
                                create_graph=True)
    pen = lam * (g1 - g0).pow(2).flatten(1).sum(1).mean()
    return F.cross_entropy(net(x), y) + pen


@pytest.mark.parametrize("h_space", ["normalized", "pixel"])
def test_guard_real_gradient_equals_double_backprop(h_space):
    torch.manual_seed(1)
    mean, std = (0.1307,), (0.3081,)
    wrapped = build_model("convnet", 10, 1, mean, std, image_size=16, width=8).double()
    net = wrapped.model
    params = list(net.parameters())
    x = torch.randn(6, 1, 16, 16, dtype=torch.float64)
    y = torch.tensor([0, 1, 2, 3, 4, 5])
    h, lam = 0.5, 10.0
    kw = dict(pixel_net=wrapped, mean=mean, std=std) if h_space == "pixel" else {}
    got = real_gradients(net, x, y, params, regularizer="guard", h=h, lam=lam, **kw)
    if h_space == "pixel":
        xp = x * std[0] + mean[0]
        ref = torch.autograd.grad(_guard_reference(wrapped, xp, y, h, lam), params)
    else:
        ref = torch.autograd.grad(_guard_reference(net, x, y, h, lam), params)
    plain = real_gradients(net, x, y, params)
    for a, b, c in zip(got, ref, plain):
        torch.testing.assert_close(a, b, rtol=1e-7, atol=1e-10)
    # the penalty really changes the target (else the test would prove nothing)
    assert max(float((a - c).abs().max()) for a, c in zip(got, plain)) > 1e-6
    # lam = 0: GUARD's target is DC's
    zero = real_gradients(net, x, y, params, regularizer="guard", h=h, lam=0.0, **kw)
    for a, c in zip(zero, plain):
        torch.testing.assert_close(a, c, rtol=1e-9, atol=1e-12)


# ----------------------------------------------------------------------------- learning


def test_matching_loss_decreases(dc_run):
    out, res = dc_run
    rows = [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in rows] == list(range(1, 31))
    loss = [r["match_loss"] for r in rows]
    first, last = sum(loss[:6]) / 6, sum(loss[-6:]) / 6
    print(f"\nDC matching loss per class: first 6 iterations {first:.3f}, last 6 {last:.3f}; "
          f"{res['seconds_per_iteration']:.3f} s per outer iteration")
    assert last < 0.93 * first


def test_dc_beats_random_real_images(dc_run, real):
    out, res = dc_run
    d = load_distilled(out)
    assert d["images"].shape == (10, 1, 16, 16)
    assert d["labels"].tolist() == list(range(10)) and d["ipc_ids"].tolist() == [0] * 10
    assert 0 <= float(d["images"].min()) and float(d["images"].max()) <= 1
    assert (out / "run.json").exists() and json.loads((out / "run.json").read_text())[
        "status"] == "complete"
    kw = dict(mean=real.mean, std=real.std, epochs=150, width=32)
    acc_dc, acc_rand = [], []
    for s in range(2):
        acc_dc.append(evaluate_synset(d["images"], d["labels"], real, seed=s, **kw))
        xr, yr = random_real_subset(real, 1, seed=s)
        acc_rand.append(evaluate_synset(xr, yr, real, seed=s, **kw))
    m_dc, m_rand = sum(acc_dc) / 2, sum(acc_rand) / 2
    print(f"\nIPC 1, 30 iterations: DC {acc_dc} (mean {m_dc:.3f}) vs random real "
          f"{acc_rand} (mean {m_rand:.3f})")
    assert m_dc > m_rand + 0.1


def test_random_real_subset(real):
    x, y = random_real_subset(real, 3, seed=4)
    assert x.shape == (30, 1, 16, 16) and y.tolist() == [c for c in range(10) for _ in range(3)]
    x2, _ = random_real_subset((real.train_x, real.train_y), 3, seed=4)
    assert torch.equal(x, x2)
    assert not torch.equal(x, random_real_subset(real, 3, seed=5)[0])


# ----------------------------------------------------------------------------- GUARD run


def test_guard_variant_runs(tmp_path):
    out = tmp_path / "g"
    cfg = DCConfig(out=str(out), iterations=2, regularizer="guard", h=1.0, lam=10.0,
                   **dict(SMALL, batch_real=16, width=16))
    res = dc(cfg)
    d = load_distilled(out)
    assert d["meta"]["regularizer"] == "guard" and d["meta"]["lam"] == 10.0
    assert d["images"].shape == (10, 1, 16, 16)
    rows = [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 2 and all(r["match_loss"] > 0 for r in rows)
    # different target than plain DC with the same seed
    plain = dc(DCConfig(out=str(tmp_path / "p"), iterations=2,
                        **dict(SMALL, batch_real=16, width=16)))
    # h in pixel units, and the BatchNorm path (DC sets BN statistics from real images, then
    # freezes them for matching; outer/inner loops so that the network trains in between)
    dc(DCConfig(out=str(tmp_path / "px"), iterations=1, regularizer="guard", h_space="pixel",
                **dict(SMALL, batch_real=16, width=16)))
    bn = dc(DCConfig(out=str(tmp_path / "bn"), iterations=1, norm="batchnorm", outer_loop=2,
                     inner_loop=1, regularizer="guard", **dict(SMALL, batch_real=16, width=16)))
    assert bn["outer_loop"] == 2 and bn["metrics_last"]["match_loss"] > 0
    assert plain["metrics_last"]["match_loss"] != res["metrics_last"]["match_loss"]


# ----------------------------------------------------------------------------- resume


class _Killed(Exception):
    pass


def test_resume_after_kill_is_identical(tmp_path, monkeypatch):
    base = dict(SMALL, batch_real=16, width=16, iterations=5, checkpoint_every=2)
    ref = tmp_path / "ref"
    dc(DCConfig(out=str(ref), **base))

    run = tmp_path / "run"
    calls = {"n": 0}
    real_append = dcmod.append_jsonl

    def dying_append(path, row):  # the process dies while logging iteration 4
        calls["n"] += 1
        if calls["n"] == 4:
            raise _Killed
        real_append(path, row)

    monkeypatch.setattr(dcmod, "append_jsonl", dying_append)
    with pytest.raises(_Killed):
        dc(DCConfig(out=str(run), **base))
    monkeypatch.setattr(dcmod, "append_jsonl", real_append)
    assert not (run / "images.pt").exists()
    assert load_checkpoint(run / "checkpoint.pt")["iteration"] == 2

    with pytest.raises(FileExistsError, match="resume"):  # no silent overwrite
        dc(DCConfig(out=str(run), **base))
    dc(DCConfig(out=str(run), resume=True, **base))
    a, b = load_distilled(ref), load_distilled(run)
    assert torch.equal(a["images"], b["images"])
    assert torch.equal(load_checkpoint(ref / "checkpoint.pt")["image_syn"],
                       load_checkpoint(run / "checkpoint.pt")["image_syn"])
    ra = [json.loads(ln) for ln in (ref / "metrics.jsonl").read_text().splitlines()]
    rb = [json.loads(ln) for ln in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in rb] == [1, 2, 3, 4, 5]
    assert [r["match_loss"] for r in ra] == [r["match_loss"] for r in rb]

    # a resume with other settings is refused, naming them
    with pytest.raises(ValueError, match="lr_img"):
        dc(DCConfig(out=str(run), resume=True, **dict(base, lr_img=0.2)))


# ----------------------------------------------------------------------------- errors


def test_bad_inputs(tmp_path):
    o = str(tmp_path / "x")
    with pytest.raises(ValueError, match="ipc"):
        dc(DCConfig(out=o, **dict(SMALL, ipc=0)))
    with pytest.raises(ValueError, match="regularizer"):
        dc(DCConfig(out=o, regularizer="gr", **SMALL))
    with pytest.raises(ValueError, match="outer_loop"):
        dc(DCConfig(out=o, **dict(SMALL, ipc=7)))  # not in get_loops
    with pytest.raises(ValueError, match="exceeds the 400 real training images"):
        dc(DCConfig(out=o, outer_loop=1, inner_loop=1, **dict(SMALL, ipc=401)))
    with pytest.raises(ValueError, match="DC runs on"):
        dc(DCConfig(out=o, **dict(SMALL, data="imagenette")))
    with pytest.raises(FileNotFoundError, match="holds no run"):
        dc(DCConfig(out=o, resume=True, **SMALL))
    assert not (tmp_path / "x").exists()  # nothing was written by refused runs
    other = tmp_path / "other"
    other.mkdir()
    (other / "config.json").write_text(json.dumps({"stage": "squeeze"}))
    with pytest.raises(FileExistsError, match="another stage"):
        dc(DCConfig(out=str(other), resume=True, **SMALL))
    with pytest.raises(ValueError):
        random_real_subset(load_real("mnist", image_size=16, channels=1), 0)
    assert get_loops(10) == (10, 50) and get_loops(50) == (50, 10) and get_loops(1) == (1, 1)
