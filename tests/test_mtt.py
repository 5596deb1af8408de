"""Expert trajectories, MTT and TESLA: gradients against finite differences and against each
other in float64 on a tiny ConvNet, the matching loss, TESLA's constant memory, expert
resumption after a kill, the published presets, and the errors for unusable buffers.

Everything runs on tiny ConvNets (width 2-8, 8-28 px, a few images and steps)."""
import json
import os
import sys
from pathlib import Path

import pytest
import torch

from guard_fast.config.mtt import MTT_PRESETS, TESLA_PRESETS, resolve_mtt
from guard_fast.data import dsa
from guard_fast.data.trajectories import load_buffer
from guard_fast.distill import mtt as M
from guard_fast.models import build_model
from guard_fast.models.flat import FlatNet

ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.usefixtures("single_thread")


def _problem(steps: int, seed: int = 0, n: int = 4, strategy="color_scale_flip_crop_cutout"):
    """A float64 tiny ConvNet (1 channel, 8 px, width 3, 1 block, 2 classes), synthetic images,
    labels, a start and a target vector, and a plan of `steps` steps of batches of 2."""
    torch.manual_seed(seed)
    net = build_model("convnet", 2, 1, image_size=8, width=3, depth=1).double()
    flat = FlatNet(net)
    w0 = flat.flatten()
    wT = w0 + 0.05 * torch.randn_like(w0)
    images = torch.randn(n, 1, 8, 8, dtype=torch.float64)
    labels = torch.tensor([0, 1] * (n // 2))
    gen = torch.Generator().manual_seed(seed + 1)
    plan = M.make_plan(n, 2, steps, strategy, 8, gen)
    lr = torch.tensor(0.5, dtype=torch.float64)
    return flat, w0, wT, images, labels, lr, plan


def _mtt_grads(flat, w0, wT, images, labels, lr, plan):
    x = images.clone().requires_grad_(True)
    a = lr.clone().requires_grad_(True)
    loss = M.unroll_loss(flat, w0, wT, x, labels, a, plan)
    gx, ga = torch.autograd.grad(loss, (x, a))
    return loss.detach(), gx, ga


def test_dsa_draw_replays_and_is_differentiable():
    x = torch.rand(3, 2, 8, 8, dtype=torch.float64, requires_grad=True)
    for group in dsa.DSA_GROUPS:
        d = dsa.draw(group, 3, 8, torch.Generator().manual_seed(0))
        y1, y2 = dsa.apply(x, d), dsa.apply(x, d)
        assert y1.shape == x.shape and torch.equal(y1, y2), group
        (g,) = torch.autograd.grad(y1.sum(), x)
        assert torch.isfinite(g).all(), group
    assert dsa.apply(x, dsa.draw("none", 3, 8, torch.Generator())) is x
    with pytest.raises(ValueError, match="unknown DSA group"):
        dsa.check_strategy("color_blur")


def test_mtt_gradients_equal_central_differences():
    flat, w0, wT, images, labels, lr, plan = _problem(steps=3)
    loss, gx, ga = _mtt_grads(flat, w0, wT, images, labels, lr, plan)
    f = lambda x, a: float(M.unroll_loss(flat, w0, wT, x, labels, a, plan).detach())  # noqa: E731
    eps = 1e-6
    for pos in [(0, 0, 3, 4), (1, 0, 5, 2), (3, 0, 0, 7)]:
        xp, xm = images.clone(), images.clone()
        xp[pos] += eps
        xm[pos] -= eps
        fd = (f(xp, lr) - f(xm, lr)) / (2 * eps)
        assert abs(fd - float(gx[pos])) <= 1e-6 + 1e-5 * abs(fd), (pos, fd, float(gx[pos]))
    fd_lr = (f(images, lr + eps) - f(images, lr - eps)) / (2 * eps)
    assert abs(fd_lr - float(ga)) <= 1e-6 + 1e-5 * abs(fd_lr), (fd_lr, float(ga))


def test_tesla_exact_equals_full_unroll_and_tesla_drops_terms():
    flat, w0, wT, images, labels, lr, plan = _problem(steps=4)
    loss, gx, ga = _mtt_grads(flat, w0, wT, images, labels, lr, plan)
    le, ge, gae = M.tesla_grads(flat, w0, wT, images, labels, lr, plan, exact=True)
    assert torch.allclose(le, loss, rtol=1e-10, atol=1e-12)
    assert torch.allclose(ge, gx, rtol=1e-8, atol=1e-11)
    assert torch.allclose(gae, ga, rtol=1e-8, atol=1e-11)
    lt, gt, gat = M.tesla_grads(flat, w0, wT, images, labels, lr, plan, exact=False)
    assert torch.allclose(lt, loss, rtol=1e-10, atol=1e-12)  # the same loss value
    rel = float((gt - gx).norm() / gx.norm())
    print(f"TESLA vs exact image gradient, 4 steps: relative difference {rel:.3g}; "
          f"lr gradient {float(gat):.6g} vs {float(ga):.6g}")
    assert rel > 1e-6  # TESLA drops the later steps' Hessian terms: not the exact gradient
    # one step: nothing to drop, TESLA is exact
    flat, w0, wT, images, labels, lr, plan = _problem(steps=1)
    loss, gx, ga = _mtt_grads(flat, w0, wT, images, labels, lr, plan)
    lt, gt, gat = M.tesla_grads(flat, w0, wT, images, labels, lr, plan)
    assert torch.allclose(gt, gx, rtol=1e-9, atol=1e-12)
    assert torch.allclose(gat, ga, rtol=1e-9, atol=1e-12)


def test_tesla_soft_labels_gradients_match_with_exact():
    flat, w0, wT, images, _, lr, plan = _problem(steps=2, strategy=None)
    soft = M.expert_labels(flat, wT, images)
    assert torch.allclose(soft.sum(1), torch.ones(len(soft), dtype=soft.dtype))
    _, gx, ga = _mtt_grads(flat, w0, wT, images, soft, lr, plan)
    _, ge, gae = M.tesla_grads(flat, w0, wT, images, soft, lr, plan, exact=True)
    assert torch.allclose(ge, gx, rtol=1e-8, atol=1e-11) and torch.allclose(gae, ga, rtol=1e-8)


def test_matching_loss_is_zero_on_target():
    flat, w0, _, images, labels, lr, plan = _problem(steps=3)
    w_n, _, _ = M._forward(flat, w0, images, labels, lr, plan, keep=False)
    assert float(M.unroll_loss(flat, w0, w_n, images, labels, lr, plan).detach()) < 1e-24
    assert float(M.tesla_grads(flat, w0, w_n, images, labels, lr, plan)[0]) < 1e-24
    assert float(M.match_loss(w0 + 1, w0, w0 + 2)) == pytest.approx(0.25)


def test_tesla_peak_memory_does_not_grow_with_syn_steps():
    sys.path.insert(0, str(ROOT / "bench"))
    from harness import peak_tensor_mb

    peaks = {}
    for method in ("tesla", "mtt"):
        for steps in (2, 8):
            # one DSA group for every step, so that every step allocates the same
            flat, w0, wT, images, labels, lr, plan = _problem(steps=steps, n=8, strategy="scale")
            images = images.float().requires_grad_(True)
            flat.net.float()
            w0, wT, lr = w0.float(), wT.float(), lr.float().requires_grad_(True)
            if method == "tesla":
                fn = lambda: M.tesla_grads(flat, w0, wT, images, labels, lr, plan)  # noqa
            else:
                fn = lambda: torch.autograd.grad(  # noqa: E731
                    M.unroll_loss(flat, w0, wT, images, labels, lr, plan), (images, lr))
            peaks[method, steps] = peak_tensor_mb(fn)
    print(peaks)
    assert peaks["tesla", 8] <= peaks["tesla", 2] * 1.001 + 1e-4
    assert peaks["mtt", 8] > 2 * peaks["mtt", 2]


def test_published_presets_are_the_public_values():
    # (syn_steps, expert_epochs, max_start_epoch, batch_syn, zca, lr_img, lr_lr, lr_teacher)
    table = {
        "cifar10-ipc1": (50, 2, 2, None, True, 100, 1e-7, 0.01),
        "cifar10-ipc10": (30, 2, 20, None, True, 100, 1e-5, 0.001),
        "cifar10-ipc50": (30, 2, 40, None, False, 1000, 1e-5, 0.001),
        "cifar100-ipc1": (20, 3, 20, None, True, 1000, 1e-5, 0.01),
        "cifar100-ipc10": (20, 2, 20, None, False, 1000, 1e-5, 0.01),
        "cifar100-ipc50": (80, 2, 40, 125, True, 1000, 1e-5, 0.01),
        "tiny-imagenet-ipc1": (10, 2, 10, None, False, 10000, 1e-4, 0.01),
        "tiny-imagenet-ipc10": (20, 2, 40, 200, False, 10000, 1e-4, 0.01),
        "tiny-imagenet-ipc50": (20, 2, 40, 300, False, 10000, 1e-4, 0.01),
        "imagenette-ipc1": (20, 2, 10, None, False, 1000, 1e-6, 0.01),
        "imagenette-ipc10": (20, 2, 10, 20, False, 100000, 1e-6, 0.01),
        "tesla-cifar10-ipc1": (50, 2, 5, None, False, 1000, 1e-7, 0.01),
        "tesla-cifar100-ipc50": (80, 2, 40, 125, True, 1000, 1e-5, 0.01),
        "tesla-imagenet-1k-ipc1": (10, 3, 10, 100, False, 10000, 1e-4, 0.01),
    }
    keys = ("syn_steps", "expert_epochs", "max_start_epoch", "batch_syn", "zca", "lr_img",
            "lr_lr", "lr_teacher")
    for name, row in table.items():
        cfg = resolve_mtt({"preset": name})
        assert tuple(getattr(cfg, k) for k in keys) == row, name
    assert set(table) <= set(MTT_PRESETS) | set(TESLA_PRESETS)
    assert resolve_mtt({"preset": "tesla-imagenet-1k-ipc1"}).label_mode() == "expert"
    assert resolve_mtt({"preset": "cifar10-ipc10"}).label_mode() == "hard"


def test_pipeline_sizes_take_synthetic_minibatches_from_ipc_50():
    from guard_fast.config.mtt import TRAJECTORY_PIPELINE, trajectory_distill_sizes

    fm = TRAJECTORY_PIPELINE["fashion-mnist"]
    # IPC 10: the whole synthetic set per student step (the preset's batch_syn None)
    assert resolve_mtt({**trajectory_distill_sizes(fm, 10), "ipc": 10}).batch_syn is None
    # IPC 50 and above: minibatches of IPC 10's size, so an iteration costs the same
    for k in (50, 100):
        assert resolve_mtt({**trajectory_distill_sizes(fm, k), "ipc": k}).batch_syn == 100
    # the smoke sizes have no per-IPC entry
    assert trajectory_distill_sizes(TRAJECTORY_PIPELINE["smoke"], 50) == \
        TRAJECTORY_PIPELINE["smoke"]["distill"]


# ----------------------------------------------------------------------------- stages

TINY_EXPERTS = dict(num_experts=1, epochs=3, max_train=40, width=2, batch_train=16,
                    device="cpu", progress=False)


@pytest.fixture(scope="module")
def buffer(tmp_path_factory):
    from guard_fast.distill.experts import experts

    out = tmp_path_factory.mktemp("experts") / "buf"
    experts(dict(TINY_EXPERTS, out=str(out)))
    return out


def test_experts_resume_after_a_kill_mid_expert(tmp_path, monkeypatch, buffer):
    import guard_fast.distill.experts as E

    real_save, calls = E.save_expert, []

    def dying_save(*a, **k):
        real_save(*a, **k)
        calls.append(k["epochs_done"])
        if k["epochs_done"] == 2:
            raise KeyboardInterrupt("killed")

    monkeypatch.setattr(E, "save_expert", dying_save)
    out = tmp_path / "buf"
    with pytest.raises(KeyboardInterrupt):
        E.experts(dict(TINY_EXPERTS, out=str(out)))
    assert not (out / "buffer.json").exists()
    with pytest.raises(FileNotFoundError, match="--resume"):
        load_buffer(out)
    E.experts(dict(TINY_EXPERTS, out=str(out), resume=True))
    assert calls == [1, 2, 3]  # the resumed run trained epoch 3 only
    a, b = load_buffer(out), load_buffer(buffer)
    assert a.trajectories[0].shape == (4, a.meta["num_params"])
    assert torch.equal(a.trajectories[0], b.trajectories[0])


def _mtt_cfg(buffer, out, **kw):
    return dict(dict(buffer=str(buffer), out=str(out), width=2, ipc=1, syn_steps=2,
                     expert_epochs=1, max_start_epoch=2, iterations=2, lr_img=10.0,
                     device="cpu", progress=False), **kw)


@pytest.mark.parametrize("method", ["mtt", "tesla"])
def test_stage_writes_a_distilled_set(buffer, tmp_path, method):
    from guard_fast.data.distilled import load_distilled

    res = M.mtt(_mtt_cfg(buffer, tmp_path / "run", method=method, eval_models=1,
                         eval_epochs=1))
    s = load_distilled(tmp_path / "run")
    assert s["images"].shape == (10, 1, 28, 28) and 0 <= s["images"].min() <= s["images"].max() <= 1
    assert res["labels"] == ("expert" if method == "tesla" else "hard")
    assert 0 <= res["eval_acc_mean"] <= 1 and res["lr"] > 0
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in rows] == [1, 2]


def test_errors_name_the_fix_and_write_nothing(buffer, tmp_path):
    out = tmp_path / "run"
    with pytest.raises(FileNotFoundError, match="guard_fast.train experts"):
        M.mtt(_mtt_cfg(tmp_path / "nothing", out))
    with pytest.raises(ValueError, match="needs trajectories of 4 epochs.*has 3"):
        M.mtt(_mtt_cfg(buffer, out, max_start_epoch=3, expert_epochs=2))
    with pytest.raises(ValueError, match="width-2 convnet experts, not --width 4"):
        M.mtt(_mtt_cfg(buffer, out, width=4))
    with pytest.raises(ValueError, match="experts of 'mnist', not of --dataset 'cifar10'"):
        M.mtt(_mtt_cfg(buffer, out, data="cifar10"))
    with pytest.raises(ValueError, match="without ZCA"):
        M.mtt(_mtt_cfg(buffer, out, zca=True))
    assert not out.exists()


def test_zca_whitens_and_inverts():
    from guard_fast.data.zca import ZCA

    g = torch.Generator().manual_seed(0)
    x = torch.rand(200, 1, 4, 4, generator=g) @ torch.rand(4, 4, generator=g)  # correlated
    z = ZCA.fit(x, eps=1e-6)  # eigenvalues 2e-4 .. 0.35: S / (S + eps) within 0.5% of 1
    w = z(x).flatten(1).double()
    cov = (w - w.mean(0)).T @ (w - w.mean(0)) / (len(w) - 1)
    assert torch.allclose(cov, torch.eye(16, dtype=cov.dtype), atol=1e-2)
    assert torch.allclose(z.invert(z(x)), x, atol=1e-4)


def test_trajectory_methods_in_the_pipeline_settings():
    from guard_fast.config import PipelineConfig, method_spec, resolve_settings

    assert method_spec("tesla") == ("tesla", "TESLA", {"regularizer": "none", "method": "tesla"})
    assert method_spec("mtt-guard")[2] == {"regularizer": "guard", "method": "mtt"}
    resolve_settings(PipelineConfig(methods=("sre2l", "mtt", "tesla", "mtt-guard")))
    with pytest.raises(ValueError, match="mtt, tesla, mtt-guard"):
        method_spec("mtt2")


def test_cli_stages(tmp_path, capsys):
    from guard_fast.train import main

    assert main(["mtt", "--buffer", str(tmp_path / "none"), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "no expert buffer" in err and "guard_fast.train experts" in err
    assert not (tmp_path / "o").exists()
    assert main(["experts", "--regularizer", "pgd-at", "--out", str(tmp_path / "e")]) == 2
    assert "experts train with none, guard, gr" in capsys.readouterr().err
    assert not (tmp_path / "e").exists()


def test_experts_on_an_imagefolder_data_set(tmp_path, monkeypatch):
    """--dataset imagefolder: the images decoded into memory as MTT's loader reads them
    (squashed to image-size, no crop), experts trained on them; a set that would not fit in
    memory is refused before decoding, naming the size; ZCA on large images is refused."""
    import numpy as np
    from PIL import Image
    from torchvision.transforms import v2

    import guard_fast.data.real as R
    from guard_fast.data.synthetic import write_synthetic_imagefolder
    from guard_fast.train import main

    root = tmp_path / "data"
    write_synthetic_imagefolder(str(root), 3, 5, 24, fmt="PNG")
    cls = sorted(os.listdir(root / "train"))[0]
    Image.fromarray(np.full((12, 30, 3), 200, np.uint8)).save(root / "train" / cls / "wide.png")
    R._load_real_cached.cache_clear()
    real = R.load_real("imagefolder", str(root), 16)
    assert real.train_x.shape == (16, 3, 16, 16) and real.val_x.shape == (15, 3, 16, 16)
    assert real.num_classes == 3 and real.train_y.tolist().count(0) == 6
    names = sorted(os.listdir(root / "train" / cls))
    want = v2.Compose([v2.ToImage(), v2.Resize((16, 16), antialias=True),
                       v2.ToDtype(torch.float32, scale=True)])(
        Image.open(root / "train" / cls / "wide.png").convert("RGB"))
    assert torch.equal(real.train_x[names.index("wide.png")], want)  # squashed, not cropped
    out = tmp_path / "buf"
    args = ["experts", "--dataset", "imagefolder", "--data", str(root), "--image-size", "16",
            "--num-experts", "1", "--epochs", "2", "--width", "4", "--depth", "2",
            "--batch-train", "8", "--device", "cpu", "--no-progress"]
    assert main([*args, "--out", str(out)]) == 0
    meta = json.loads((out / "buffer.json").read_text())["meta"]
    assert meta["data"] == "imagefolder" and meta["arch"]["image_size"] == 16
    M.mtt(_mtt_cfg(out, tmp_path / "syn", width=4, data="imagefolder", data_root=str(root),
                   max_start_epoch=1, eval_models=1, eval_epochs=1))   # its MTT distillation
    from guard_fast.data.distilled import load_distilled
    assert load_distilled(tmp_path / "syn")["images"].shape == (3, 3, 16, 16)
    R._load_real_cached.cache_clear()
    monkeypatch.setattr(R, "available_memory", lambda: 10**5)
    assert main([*args, "--out", str(tmp_path / "big")]) == 2
    assert not (tmp_path / "big").exists()
    monkeypatch.undo()
    R._load_real_cached.cache_clear()
    from guard_fast.data.zca import ZCA
    with pytest.raises(ValueError, match="drop --zca"):
        ZCA.fit(torch.zeros(2, 3, 65, 64))


def test_nonfinite_values_stop_experts_and_mtt_keeping_their_files(tmp_path, buffer, capsys,
                                                                    monkeypatch):
    """A diverging expert or distillation: exit 1 with the step's statistics, and no expert
    file or checkpoint written with the non-finite values (an expert whose last step broke
    its weights while the epoch's mean loss stayed finite included)."""
    import guard_fast.data.dsa as D
    from guard_fast.train import main

    real = D.train_epoch

    def breaks_weights(net, *a, **k):
        loss = real(net, *a, **k)
        with torch.no_grad():
            next(net.parameters()).view(-1)[0] = float("nan")
        return loss

    monkeypatch.setattr(D, "train_epoch", breaks_weights)
    out = tmp_path / "e"
    assert main(["experts", "--num-experts", "1", "--epochs", "2", "--max-train", "40",
                 "--width", "2", "--batch-train", "16", "--device", "cpu",
                 "--no-progress", "--out", str(out)]) == 1
    err = capsys.readouterr().err
    assert "experts: non-finite values at expert 0, after epoch 1" in err
    assert "Traceback" not in err
    assert not (out / "expert_000.pt").exists()
    real_unroll = M.unroll_loss
    monkeypatch.setattr(M, "unroll_loss", lambda *a: real_unroll(*a) * float("nan"))
    run = tmp_path / "m"
    with pytest.raises(FloatingPointError, match="non-finite values at iteration 1 "
                                                 r"\(matching_loss=nan"):
        M.mtt(_mtt_cfg(buffer, run, checkpoint_every=1))
    assert not (run / "checkpoint.pt").exists()
