"""Recover (SRe2L / CDA synthesis): the BN-statistics loss, one iteration against an
independent hooks-based implementation, grouped == separate, CDA schedule, a run on a
bundled-data teacher, resume after kill, sharding, bad input."""
import json
import math
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from guard_fast.config import RecoverConfig
from guard_fast.data.distilled import load_distilled
from guard_fast.distill.recover import (Synthesizer, apply_augment, bn_stat_loss_ref,
                                        cda_min_crop, cosine_lr, draw_augment, recover,
                                        rrc_params)
from guard_fast.runtime import atomic_torch_save

from _models import make

IMAGE_SIZE = 16


# A BatchNorm ConvNet (width 16, depth 3) keeps the recover tests' forward/backward cheap:
# the tests check recover's mechanics (grouping, resume, sharding), which do not depend on
# the depth of the teacher; ResNet-18 teachers are exercised in test_squeeze and the smokes.
TEACHER_OPTIONS = {"width": 16, "norm": "batchnorm"}


def _train_teacher(path: Path, model: str = "convnet", steps: int = 150) -> Path:
    """A small teacher on the bundled digits at 16 px, saved as squeeze saves teacher.pt."""
    from guard_fast.data import get_data
    from guard_fast.models import build_model
    from guard_fast.runtime import classifier_arch

    d = get_data("mnist", image_size=IMAGE_SIZE)
    torch.manual_seed(0)
    m = build_model(model, 10, 3, d.mean, d.std, image_size=IMAGE_SIZE, **TEACHER_OPTIONS)
    xs = torch.stack([d.train[i][0] for i in range(0, 4000, 4)])
    ys = torch.tensor([d.train[i][1] for i in range(0, 4000, 4)])
    opt = torch.optim.SGD(m.parameters(), lr=0.05, momentum=0.9)
    m.train()
    g = torch.Generator().manual_seed(0)
    for _ in range(steps):
        idx = torch.randint(0, len(xs), (64,), generator=g)
        opt.zero_grad()
        F.cross_entropy(m(xs[idx]), ys[idx]).backward()
        opt.step()
    m.eval()
    atomic_torch_save(path, {"model": m.state_dict(), "arch": classifier_arch(
        model, 10, 3, IMAGE_SIZE, d.mean, d.std, data="mnist", options=TEACHER_OPTIONS),
        "metrics": {}})
    return path


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    return _train_teacher(tmp_path_factory.mktemp("teacher") / "teacher.pt")


def _cfg(teacher, out, **kw):
    base = dict(teacher=str(teacher), ipc=2, iterations=12, save_every=4, out=str(out),
                progress=False, crop=True, flip=True, jitter=3)
    base.update(kw)
    return RecoverConfig(**base)


# ----------------------------------------------------------------------------- loss pieces
def test_grouped_bn_statistics_equal_separate_groups():
    net = make(torch.float64, act="relu")
    net.eval()
    x = torch.randn(12, 3, 8, 8, dtype=torch.float64) * 1.5
    y = torch.arange(12) % 5
    syn = Synthesizer(net, r_bn=0.3, first_bn_multiplier=10.0, groups=3)
    loss, ce, bn = syn(x, y)
    bns = [m for m in net.modules() if isinstance(m, nn.BatchNorm2d)]
    for g in range(3):
        xg, yg = x[4 * g:4 * g + 4], y[4 * g:4 * g + 4]
        # independent: hooks on the original BatchNorm layers, the public code's formula
        feats = []
        hooks = [b.register_forward_hook(lambda mod, inp, out: feats.append(
            bn_stat_loss_ref(inp[0], mod))) for b in bns]
        out = net(xg)
        for h in hooks:
            h.remove()
        ref_bn = 10.0 * feats[0] + sum(feats[1:])
        ref_ce = F.cross_entropy(out, yg)
        torch.testing.assert_close(bn[g], ref_bn.to(bn.dtype), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(ce[g], ref_ce.float(), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(loss[g], (ref_ce + 0.3 * ref_bn).float(), rtol=1e-5, atol=1e-5)


def test_grouped_step_gradient_equals_separate_steps_float64():
    net = make(torch.float64, act="relu")
    net.eval()
    x = (torch.randn(12, 3, 8, 8, dtype=torch.float64) * 1.5).requires_grad_(True)
    y = torch.arange(12) % 5
    syn = Synthesizer(net, r_bn=0.3, groups=3)
    syn(x, y)[0].sum().backward()
    for g in range(3):
        xg = x.detach()[4 * g:4 * g + 4].clone().requires_grad_(True)
        syn.set_groups(1)
        syn(xg, y[4 * g:4 * g + 4])[0].sum().backward()
        torch.testing.assert_close(x.grad[4 * g:4 * g + 4], xg.grad, rtol=1e-10, atol=1e-12)
        syn.set_groups(3)


def test_synthesizer_leaves_the_teacher_unchanged():
    net = make(torch.float32, act="relu")
    net.eval()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    x = torch.randn(4, 3, 8, 8)
    ref = net(x)
    syn = Synthesizer(net, r_bn=0.01)
    syn(x, torch.zeros(4, dtype=torch.long))
    assert type(net.body[1]) is nn.BatchNorm2d and type(net.body[4]) is nn.BatchNorm2d
    torch.testing.assert_close(net(x), ref)
    for k, v in net.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_one_iteration_equals_a_straightforward_implementation():
    """Same seed and augmentation draw: the hooks-based public-code step (torchvision's
    resized_crop, flip, roll, permute-variance hooks, Adam with its betas and the cosine lr,
    per-channel clip) gives the same images after one and after three iterations."""
    from torchvision.transforms import functional as TF

    torch.manual_seed(0)
    net = make(torch.float32, act="relu", classes=5)
    net.eval()
    for p in net.parameters():
        p.requires_grad_(False)
    mean = torch.tensor([0.3, 0.4, 0.5]).view(1, 3, 1, 1)
    std = torch.tensor([0.2, 0.25, 0.3]).view(1, 3, 1, 1)
    lo, hi = -mean / std, (1 - mean) / std
    x0 = torch.randn(5, 3, 12, 12)
    y = torch.arange(5)
    iters, lr, r_bn = 3, 0.25, 0.05
    draws = [draw_augment(random.Random(i), 12, True, True, 4, "positive", 0.08, 1.0)
             for i in range(iters)]
    assert any(d.flip for d in draws) or any(d.shift != (0, 0) for d in draws)

    # guard_fast
    syn = Synthesizer(net, r_bn=r_bn, first_bn_multiplier=10.0)
    xa = x0.clone().requires_grad_(True)
    opt = torch.optim.Adam([xa], lr=lr, betas=(0.5, 0.9), eps=1e-8)
    losses_a = []
    for it, d in enumerate(draws):
        for pg in opt.param_groups:
            pg["lr"] = cosine_lr(lr, it, iters)
        loss, _, _ = syn(apply_augment(xa, d, 12), y)
        opt.zero_grad()
        loss.sum().backward()
        opt.step()
        with torch.no_grad():
            xa.copy_(torch.max(torch.min(xa, hi), lo))
        losses_a.append(float(loss.detach()))

    # straightforward, as the public code writes it
    feats = {}
    bns = [m for m in net.modules() if isinstance(m, nn.BatchNorm2d)]

    def hook(mod, inp, out):
        c = inp[0].shape[1]
        m_ = inp[0].mean([0, 2, 3])
        v_ = inp[0].permute(1, 0, 2, 3).contiguous().reshape([c, -1]).var(1, unbiased=False)
        feats[mod] = torch.norm(mod.running_var.data - v_, 2) + torch.norm(mod.running_mean.data - m_, 2)
    hooks = [b.register_forward_hook(hook) for b in bns]
    xb = x0.clone().requires_grad_(True)
    opt = torch.optim.Adam([xb], lr=lr, betas=[0.5, 0.9], eps=1e-8)
    losses_b = []
    for it, d in enumerate(draws):
        for pg in opt.param_groups:
            pg["lr"] = 0.5 * (1 + math.cos(math.pi * it / iters)) * lr
        t, left, h, w = d.crop
        xj = TF.resized_crop(xb, t, left, h, w, [12, 12], antialias=True)
        if d.flip:
            xj = TF.hflip(xj)
        xj = torch.roll(xj, shifts=d.shift, dims=(2, 3))
        out = net(xj)
        rescale = [10.0] + [1.0] * (len(bns) - 1)
        loss = F.cross_entropy(out, y) + r_bn * sum(feats[b] * s for b, s in zip(bns, rescale))
        opt.zero_grad()
        loss.backward()
        opt.step()
        with torch.no_grad():
            for c in range(3):
                xb[:, c] = torch.clamp(xb[:, c], float(lo[0, c]), float(hi[0, c]))
        losses_b.append(float(loss))
    for h in hooks:
        h.remove()
    assert losses_a == pytest.approx(losses_b, rel=1e-5)
    torch.testing.assert_close(xa.detach(), xb.detach(), rtol=1e-4, atol=1e-5)


def test_cda_schedule_values():
    assert cda_min_crop(0, 1000, "cosine", 1.0) == pytest.approx(1.0)
    assert cda_min_crop(500, 1000, "cosine", 1.0) == pytest.approx(0.08 + 0.92 * 0.5)
    assert cda_min_crop(250, 1000, "cosine", 1.0) == pytest.approx(
        0.08 + 0.92 * (1 + math.cos(math.pi / 4)) / 2)
    assert cda_min_crop(250, 1000, "linear", 0.5) == pytest.approx(0.08 + 0.92 * 0.5)
    assert cda_min_crop(499, 1000, "step", 0.5) == 1.0
    assert cda_min_crop(500, 1000, "step", 0.5) == pytest.approx(0.08)
    assert cda_min_crop(900, 1000, "cosine", 0.8) == pytest.approx(0.08)
    assert cda_min_crop(10, 1000, "cosine", 0.0) == pytest.approx(0.08)  # milestone 0: plain
    with pytest.raises(ValueError, match="cda mode"):
        cda_min_crop(0, 10, "exp")


def test_cda_turns_the_crop_on():
    """CDA's curriculum is a RandomResizedCrop schedule: on presets without crops (CIFAR-
    style, the bundled digits) method cda turns the crop on instead of silently matching
    SRe2L; an explicit crop=False with cda is refused."""
    from guard_fast.distill.recover import resolve_recover

    for data in ("mnist", "cifar10"):
        assert resolve_recover(RecoverConfig(teacher="t", method="sre2l"), data).crop is False
        assert resolve_recover(RecoverConfig(teacher="t", method="cda"), data).crop is True
    with pytest.raises(ValueError, match="crop=False leaves it nothing to schedule"):
        resolve_recover(RecoverConfig(teacher="t", method="cda", crop=False), "mnist")


def test_crop_draws_follow_random_resized_crop():
    rng = random.Random(0)
    for scale in [(0.08, 1.0), (0.5, 1.0), (1.0, 1.0)]:
        for _ in range(200):
            t, left, h, w = rrc_params(rng, 32, 32, scale)
            assert 0 <= t and t + h <= 32 and 0 <= left and left + w <= 32 and h > 0 and w > 0
            frac = h * w / 1024
            assert frac >= scale[0] * 0.75 - 0.05  # rounding of h, w
    # the full-scale crop is (nearly) the whole image at aspect 3/4..4/3
    boxes = [rrc_params(rng, 32, 32, (1.0, 1.0)) for _ in range(50)]
    assert all(b[2] * b[3] >= 0.74 * 1024 for b in boxes)


# ----------------------------------------------------------------------------- runs
def test_recover_run_grouped_equals_separate_and_teacher_recognizes_images(teacher, tmp_path):
    t0 = time.perf_counter()
    sep = recover(_cfg(teacher, tmp_path / "sep", group_size=1, iterations=40, save_every=20))
    t_sep = time.perf_counter() - t0
    grp = recover(_cfg(teacher, tmp_path / "grp", group_size=2, iterations=40, save_every=20))
    a, b = load_distilled(tmp_path / "sep"), load_distilled(tmp_path / "grp")
    assert torch.equal(a["labels"], b["labels"]) and torch.equal(a["ipc_ids"], b["ipc_ids"])
    # One batch of 20 instead of two of 10 changes the convolutions' float32 rounding, and
    # Adam's normalized steps amplify it on pixels whose gradient is near zero: a few pixels
    # drift, the rest agree (the float64 gradient-level test shows the mathematics is equal).
    diff = (a["images"] - b["images"]).abs()
    assert float(diff.mean()) < 2e-4 and float(diff.max()) < 0.05, (diff.mean(), diff.max())
    # losses of each group match those of the separate run
    rows_a = [json.loads(l) for l in (tmp_path / "sep" / "metrics.jsonl").read_text().splitlines()]
    rows_b = [json.loads(l) for l in (tmp_path / "grp" / "metrics.jsonl").read_text().splitlines()]
    sep_final = [r["loss"][0] for r in rows_a if r["iteration"] == 40]
    assert sep_final == pytest.approx(rows_b[-1]["loss"], rel=1e-3)
    # outputs: PNG ImageFolder, grid, tensor file; images in [0, 1]
    imgs = a["images"]
    assert imgs.shape == (20, 3, IMAGE_SIZE, IMAGE_SIZE) and 0 <= imgs.min() and imgs.max() <= 1
    pngs = sorted((tmp_path / "sep" / "images").rglob("*.png"))
    assert len(pngs) == 20 and (tmp_path / "sep" / "grid.png").stat().st_size > 0
    run = json.loads((tmp_path / "sep" / "run.json").read_text())
    assert run["status"] == "complete"
    print(f"\nseparate run {t_sep:.1f} s; grouped {grp['seconds']:.1f} s")


def test_teacher_classifies_recovered_images_as_their_class(teacher, tmp_path):
    # the mnist preset (no crop or flip; a 0..2 pixel roll), 200 iterations
    s = recover(RecoverConfig(teacher=str(teacher), ipc=2, iterations=200, out=str(tmp_path / "r"),
                              progress=False, group_size=2))
    print(f"\nteacher accuracy on its recovered images: {s['teacher_acc_on_recovered']:.2f} "
          f"(final CE {s['mean_final_ce']:.3f})")
    assert s["teacher_acc_on_recovered"] >= 0.8  # chance: 0.1


def test_cda_run_and_method_recorded(teacher, tmp_path):
    s = recover(_cfg(teacher, tmp_path / "cda", method="cda", ipc=1, iterations=8, milestone=0.5))
    d = load_distilled(tmp_path / "cda")
    assert d["meta"]["method"] == "cda" and s["images"] == 10


_KILL_SCRIPT = r"""
import sys
from guard_fast.config import RecoverConfig
from guard_fast.distill.recover import recover
recover(RecoverConfig(teacher=sys.argv[1], out=sys.argv[2], ipc=2, iterations=30, save_every=5,
                      progress=False, crop=True, flip=True, jitter=3, group_size=1,
                      resume=len(sys.argv) > 3))
"""


def test_kill_then_resume_gives_the_same_images(teacher, tmp_path):
    # the uninterrupted reference, in a subprocess like the killed run (same threads), starts
    # with it: the two are independent
    ref = tmp_path / "ref"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    full = subprocess.Popen([sys.executable, "-c", _KILL_SCRIPT, str(teacher), str(ref)], env=env)
    out = tmp_path / "killed"
    p = subprocess.Popen([sys.executable, "-c", _KILL_SCRIPT, str(teacher), str(out)], env=env)
    deadline = time.time() + 300
    # kill once the second task's state file exists (the first task is then complete)
    while time.time() < deadline and p.poll() is None:
        parts = list((out / "parts").glob("*.pt")) if (out / "parts").exists() else []
        if parts and (out / "state_rank0.pt").exists():
            break
        time.sleep(0.05)
    assert p.poll() is None, "run finished before it could be killed; make it longer"
    os.kill(p.pid, signal.SIGKILL)
    p.wait()
    assert full.wait(timeout=300) == 0
    assert not (out / "images.pt").exists()
    with pytest.raises(FileExistsError, match="--resume"):
        recover(_cfg(teacher, out, iterations=30, save_every=5, group_size=1))
    r = subprocess.run([sys.executable, "-c", _KILL_SCRIPT, str(teacher), str(out), "resume"],
                       env=env, timeout=300)
    assert r.returncode == 0
    a, b = load_distilled(ref), load_distilled(out)
    assert torch.equal(a["images"], b["images"])


def test_two_processes_shard_by_ipc_id(teacher, tmp_path):
    """torchrun-style sharding (2 gloo processes) gives the single-process images."""
    single = tmp_path / "single"
    recover(_cfg(teacher, single, iterations=6))
    out = tmp_path / "ddp"
    script = tmp_path / "run.py"
    script.write_text(
        "import sys\nfrom guard_fast.config import RecoverConfig\n"
        "from guard_fast.distill.recover import recover\n"
        f"recover(RecoverConfig(teacher={str(teacher)!r}, out={str(out)!r}, ipc=2, iterations=6,"
        " save_every=4, progress=False, crop=True, flip=True, jitter=3, device='cpu'))\n")
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
                        f"--master_port={port}", str(script)], capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    a, b = load_distilled(single), load_distilled(out)
    torch.testing.assert_close(a["images"], b["images"], rtol=0, atol=1e-6)
    assert (out / "metrics_rank1.jsonl").exists()


# ----------------------------------------------------------------------------- bad input
def test_teacher_without_batchnorm_is_refused(tmp_path):
    from guard_fast.data import get_data
    from guard_fast.models import build_model

    d = get_data("mnist", image_size=32)
    m = build_model("convnet", 10, 3, d.mean, d.std, image_size=32)
    p = tmp_path / "convnet.pt"
    atomic_torch_save(p, {"model": m.state_dict(), "arch": {
        "model": "convnet", "num_classes": 10, "in_channels": 3, "image_size": 32,
        "mean": list(d.mean), "std": list(d.std), "data": "mnist"}})
    with pytest.raises(ValueError, match="BatchNorm"):
        recover(_cfg(p, tmp_path / "out"))
    assert not (tmp_path / "out" / "images.pt").exists()


@pytest.mark.parametrize("kw,needle", [
    (dict(ipc=0), "ipc must be >= 1"),
    (dict(group_size=3), "group_size must be between 1 and ipc"),
    (dict(class_batch=0), "class_batch"),
    (dict(method="dc"), "unknown recover method"),
    (dict(iterations=0), "iterations"),
    (dict(min_crop=0.0), "min_crop"),
    (dict(cda_mode="exp"), "cda_mode"),
])
def test_bad_options_name_the_value(teacher, tmp_path, kw, needle):
    with pytest.raises(ValueError, match=needle):
        recover(_cfg(teacher, tmp_path / "o", **kw))


def test_missing_teacher_and_foreign_folder(teacher, tmp_path):
    with pytest.raises(FileNotFoundError, match="squeeze"):
        recover(_cfg(tmp_path / "nope", tmp_path / "o"))
    with pytest.raises(FileNotFoundError, match="squeeze"):
        recover(_cfg(tmp_path, tmp_path / "o"))  # a folder without teacher.pt
    other = tmp_path / "other"
    other.mkdir()
    (other / "config.json").write_text(json.dumps({"stage": "squeeze"}))
    with pytest.raises(FileExistsError, match="squeeze run"):
        recover(_cfg(teacher, other))
    done = tmp_path / "done"
    recover(_cfg(teacher, done, ipc=1, iterations=2))
    before = (done / "images.pt").read_bytes()
    with pytest.raises(FileExistsError, match="already holds"):
        recover(_cfg(teacher, done, ipc=1, iterations=2))
    with pytest.raises(ValueError, match="different settings"):
        recover(_cfg(teacher, done, ipc=1, iterations=3, resume=True))
    assert (done / "images.pt").read_bytes() == before
