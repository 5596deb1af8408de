"""Relabel: deterministic views, bit-exact replay, top-k stores, online mode, resume, errors."""
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from guard_fast.data.softlabels import (MIXES, OnlineSoftLabels, SoftLabelStore, ViewSpec,
                                        dense_from_topk, make_views)
from guard_fast.distill.relabel import relabel
from guard_fast.models import build_model


pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture(scope="module")
def setup():
    """A random (deterministic) ConvNet teacher on [0, 1] pixels and a non-square 'distilled'
    set of 23 images (an odd count: the last batch is partial)."""
    torch.manual_seed(0)
    teacher = build_model("convnet", num_classes=10, in_channels=3, mean=(0.5,) * 3,
                          std=(0.25,) * 3, image_size=16, width=8, depth=2).eval()
    images = torch.rand(23, 3, 20, 24)
    labels = torch.arange(23) % 10
    return teacher, {"images": images, "labels": labels}


def _spec(**kw):
    base = dict(n=23, src_h=20, src_w=24, out_size=16, batch_size=8, seed=5)
    return ViewSpec(**dict(base, **kw))


def test_views_are_a_function_of_seed_and_epoch():
    for mix in MIXES:
        a, b = make_views(_spec(mix=mix), 3), make_views(_spec(mix=mix), 3)
        for k, v in a.to_dict().items():
            assert (torch.equal(v, b.to_dict()[k]) if isinstance(v, torch.Tensor)
                    else v == b.to_dict()[k]), (mix, k)
    base = make_views(_spec(), 3)
    assert not torch.equal(base.boxes, make_views(_spec(), 4).boxes)
    assert not torch.equal(base.boxes, make_views(_spec(seed=6), 3).boxes)
    # structure: order a permutation, partner a permutation inside each batch, per-batch
    # CutMix boxes inside the output, lam in (0, 1), compact dtypes
    assert sorted(base.order.tolist()) == list(range(23))
    for bi in range(base.num_batches):
        s, e = base.span(bi)
        assert sorted(base.partner[s:e].tolist()) == list(range(e - s))
    r1, c1, r2, c2 = base.bbox.long().unbind(1)
    assert ((0 <= r1) & (r1 <= r2) & (r2 <= 16) & (0 <= c1) & (c1 <= c2) & (c2 <= 16)).all()
    assert ((base.lam > 0) & (base.lam < 1)).all() and base.lam.shape == (3,)
    assert base.boxes.dtype == torch.int16 and base.flips.dtype == torch.bool
    assert base.order.dtype == torch.int32 and base.partner.dtype == torch.int16
    none = make_views(_spec(mix="none"), 0)
    assert none.lam is none.bbox is none.partner is None
    assert make_views(_spec(mix="mixup"), 0).bbox is None


def test_crop_boxes_follow_torchvision_random_resized_crop():
    """Same distribution as torchvision's get_params: in bounds, area fraction in the scale
    range, ratio in (3/4, 4/3) up to rounding; mean area matches torchvision's draws."""
    from torchvision.transforms import RandomResizedCrop

    H, W, n = 40, 48, 4000
    v = make_views(ViewSpec(n=n, src_h=H, src_w=W, out_size=32, batch_size=n, seed=0,
                            min_scale=0.08, mix="none"), 0)
    i, j, h, w = v.boxes.long().unbind(1)
    assert ((i >= 0) & (j >= 0) & (h >= 1) & (w >= 1) & (i + h <= H) & (j + w <= W)).all()
    frac = (h * w).double() / (H * W)
    assert frac.min() > 0.07 and frac.max() <= 1.0
    ratio = w.double() / h.double()
    assert ratio.min() > 0.75 * 0.85 and ratio.max() < 4 / 3 / 0.85
    torch.manual_seed(0)
    img = torch.zeros(3, H, W)
    tv = torch.tensor([RandomResizedCrop.get_params(img, (0.08, 1.0), (3 / 4, 4 / 3))
                       for _ in range(n)], dtype=torch.float64)
    tv_frac = tv[:, 2] * tv[:, 3] / (H * W)
    assert abs(frac.mean() - tv_frac.mean()) < 0.02, (float(frac.mean()), float(tv_frac.mean()))
    assert abs(v.flips.double().mean() - 0.5) < 0.04
    # a shape no try can fit (scale 1 of a 40x4 image): torchvision's central fallback crop
    f = make_views(ViewSpec(n=5, src_h=40, src_w=4, out_size=8, batch_size=5, min_scale=1.0,
                            mix="none"), 0)
    assert f.boxes.tolist() == [[(40 - 5) // 2, 0, 5, 4]] * 5


@pytest.mark.parametrize("mix", MIXES)
def test_inputs_equal_an_independent_torchvision_construction(mix, setup):
    """Each row: torchvision's resized_crop (bilinear, antialias) of its box, flipped, then
    the public code's CutMix (partner's unmixed pixels inside the batch box) or Mixup."""
    from torchvision.transforms import InterpolationMode
    from torchvision.transforms import functional as TF

    images = setup[1]["images"]
    v = make_views(_spec(mix=mix), 1)
    for b in range(v.num_batches):
        s, e = v.span(b)
        own = []
        for p in range(s, e):
            i, j, h, w = v.boxes[p].tolist()
            x = TF.resized_crop(images[int(v.order[p])], i, j, h, w, [16, 16],
                                InterpolationMode.BILINEAR, antialias=True)
            own.append(TF.hflip(x) if v.flips[p] else x)
        own = torch.stack(own)
        want = own.clone()
        if mix == "cutmix":
            r1, c1, r2, c2 = v.bbox[b].tolist()
            want[:, :, r1:r2, c1:c2] = own[v.partner[s:e].long(), :, r1:r2, c1:c2]
        elif mix == "mixup":
            lam = float(v.lam[b])
            want = lam * own + (1 - lam) * own[v.partner[s:e].long()]
        got = v.inputs(images, b)
        torch.testing.assert_close(got, want, rtol=0, atol=1e-6)
        assert got.min() >= 0 and got.max() <= 1
        # a rank's share of the rows is bit-identical to those rows of the full batch
        rows = torch.tensor([e - s - 1, 0])
        assert torch.equal(v.inputs(images, b, rows), got[rows])


def test_stored_views_replay_bit_exactly(setup, tmp_path):
    teacher, ds = setup
    s = relabel(teacher, ds, tmp_path / "rl", epochs=2, batch_size=8, seed=5, out_size=16)
    store = SoftLabelStore(tmp_path / "rl", images=ds["images"])
    assert store.epochs_available == 2 and store.num_batches == 3
    for e in range(2):
        want = make_views(store.spec, e)
        got = store.views(e)
        for k, val in want.to_dict().items():
            g = got.to_dict()[k]
            assert (torch.equal(val, g) and val.dtype == g.dtype) if isinstance(val, torch.Tensor) \
                else val == g, k
        for b in range(store.num_batches):
            x, t = store.batch(e, b)
            assert torch.equal(x, want.inputs(ds["images"], b))
            # the stored logits are exactly the teacher's on these inputs, in fp16
            with torch.no_grad():
                assert torch.equal(teacher(x).half().float(), t)
            assert t.dtype == torch.float32 and t.shape == (len(x), 10)
    assert s["epochs_written"] == [0, 1] and s["epochs_stored"] == 2
    raw = torch.load(tmp_path / "rl" / "epoch_0000.pt", weights_only=True)
    assert raw["logits"].dtype == torch.float16 and raw["logits"].shape == (23, 10)


def test_top_k_store_keeps_the_k_largest_and_gives_a_sound_target(setup, tmp_path):
    from guard_fast.distill.student import kd_loss

    teacher, ds = setup
    relabel(teacher, ds, tmp_path / "dense", epochs=1, batch_size=8, seed=5, out_size=16)
    sk = relabel(teacher, ds, tmp_path / "top3", epochs=1, batch_size=8, seed=5, out_size=16,
                 top_k=3)
    dense = SoftLabelStore(tmp_path / "dense", images=ds["images"])
    top = SoftLabelStore(tmp_path / "top3", images=ds["images"])
    raw = torch.load(tmp_path / "top3" / "epoch_0000.pt", weights_only=True)
    assert raw["topk_indices"].dtype == torch.int16 and "logits" not in raw
    for b in range(3):
        xd, td = dense.batch(0, b)
        xt, tt = top.batch(0, b)
        assert torch.equal(xd, xt)
        finite = torch.isfinite(tt)
        assert (finite.sum(1) == 3).all()
        v, i = td.topk(3, dim=1)
        assert torch.equal(tt.gather(1, i), v)  # the same values at the same classes
        assert torch.isneginf(tt[~finite]).all()
        for T in (1.0, 20.0):
            q = F.softmax(tt / T, 1)  # the teacher's top-3 distribution, renormalized
            qd = F.softmax(td / T, 1).gather(1, i)
            torch.testing.assert_close(q.gather(1, i), qd / qd.sum(1, keepdim=True))
            s = torch.randn(len(xt), 10, requires_grad=True)
            loss = kd_loss(s, tt, T)
            loss.backward()
            assert torch.isfinite(loss) and torch.isfinite(s.grad).all()
    assert sk["label_bytes_per_epoch"] == 23 * 3 * (2 + 2)  # fp16 values + int16 indices
    # dense_from_topk is exact for k = K
    lg = torch.randn(4, 6)
    v, i = lg.topk(6, dim=1)
    assert torch.equal(dense_from_topk(v, i, 6), lg)


@pytest.mark.parametrize("mix", ["cutmix", "mixup"])
def test_online_mode_gives_the_stored_targets(mix, setup, tmp_path):
    teacher, ds = setup
    relabel(teacher, ds, tmp_path / "rl", epochs=2, batch_size=8, seed=2, out_size=16, mix=mix)
    store = SoftLabelStore(tmp_path / "rl", images=ds["images"])
    online = OnlineSoftLabels(teacher, ds["images"], store.spec)
    for e in range(2):
        for b in range(store.num_batches):
            xs, ts = store.batch(e, b)
            xo, to = online.batch(e, b)
            assert torch.equal(xs, xo)
            assert to.dtype == torch.float32
            # the same logits up to fp16 rounding of the stored copy
            torch.testing.assert_close(to, ts, rtol=2 ** -10, atol=1e-6)
            assert torch.equal(to.half().float(), ts)


def test_resume_skips_complete_epochs_and_refuses_other_runs(setup, tmp_path):
    teacher, ds = setup
    out = tmp_path / "rl"
    relabel(teacher, ds, out, epochs=2, batch_size=8, seed=1, out_size=16)
    stamps = {p.name: p.stat().st_mtime_ns for p in out.glob("epoch_*.pt")}
    s = relabel(teacher, ds, out, epochs=3, batch_size=8, seed=1, out_size=16)
    assert s["epochs_skipped"] == [0, 1] and s["epochs_written"] == [2]
    assert {p.name: p.stat().st_mtime_ns for p in out.glob("epoch_000[01].pt")} == stamps
    assert json.loads((out / "config.json").read_text())["epochs"] == 3
    # an interrupted epoch leaves no file (atomic writes); stray temp files are ignored
    (out / ".epoch_0003.pt.abc.tmp").write_bytes(b"partial")
    assert SoftLabelStore(out, images=ds["images"]).epochs_available == 3
    before = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    for kw, needle in [(dict(seed=2), "seed"), (dict(top_k=3), "top_k"),
                       (dict(mix="none"), "mix")]:
        args = {**dict(epochs=4, batch_size=8, seed=1, out_size=16), **kw}
        with pytest.raises(ValueError, match="different relabel run") as ei:
            relabel(teacher, ds, out, **args)
        assert "nothing was overwritten" in str(ei.value) and needle in str(ei.value)
    other = build_model("convnet", num_classes=10, in_channels=3, mean=(0.5,) * 3,
                        std=(0.25,) * 3, image_size=16, width=8, depth=2)
    with pytest.raises(ValueError, match="teacher.fingerprint"):
        relabel(other, ds, out, epochs=4, batch_size=8, seed=1, out_size=16)
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == before


def test_storage_is_reported(setup, tmp_path, capsys):
    teacher, ds = setup
    res, labels_b = {}, {}
    for name, kw in [("fp16", {}), ("top3", dict(top_k=3)), ("fp32", dict(dtype="float32"))]:
        s = relabel(teacher, ds, tmp_path / name, epochs=2, batch_size=8, seed=0, out_size=16, **kw)
        files = sorted((tmp_path / name).glob("epoch_*.pt"))
        assert s["bytes_per_epoch"] == {i: f.stat().st_size for i, f in enumerate(files)}
        assert s["total_bytes"] == sum(f.stat().st_size for f in files)
        on_disk = json.loads((tmp_path / name / "summary.json").read_text())
        assert on_disk["total_bytes"] == s["total_bytes"]
        res[name] = s["mean_bytes_per_epoch"]
        labels_b[name] = s["label_bytes_per_epoch"]
        # views: order int32, boxes 4 x int16, flip bool, partner int16; per batch lam
        # float32 and bbox 4 x int16
        assert s["view_bytes_per_epoch"] == 23 * (4 + 8 + 1 + 2) + 3 * (4 + 8)
    with capsys.disabled():
        print(f"\nrelabel storage per epoch (23 views, 10 classes): file bytes {res}, "
              f"soft-label bytes {labels_b}")
    assert labels_b == {"fp16": 460, "top3": 276, "fp32": 920}
    assert res["fp16"] < res["fp32"]
    # fp32 adds exactly 2 bytes per logit (the rest of the file is the same views)
    assert abs((res["fp32"] - res["fp16"]) - 23 * 10 * 2) < 64


def test_bad_inputs_name_the_problem(setup, tmp_path):
    teacher, ds = setup
    with pytest.raises(FileNotFoundError, match="run the relabel stage first"):
        SoftLabelStore(tmp_path / "nowhere")
    with pytest.raises(ValueError, match="image/label count mismatch"):
        relabel(teacher, {"images": ds["images"], "labels": ds["labels"][:5]}, tmp_path / "a",
                epochs=1, batch_size=8)
    with pytest.raises(ValueError, match="class count mismatch"):
        relabel(teacher, {"images": ds["images"], "labels": ds["labels"] + 5}, tmp_path / "b",
                epochs=1, batch_size=8, out_size=16)
    with pytest.raises(ValueError, match="unknown mix"):
        relabel(teacher, ds, tmp_path / "c", epochs=1, batch_size=8, mix="mosaic", out_size=16)
    with pytest.raises(ValueError, match="min_scale"):
        relabel(teacher, ds, tmp_path / "d", epochs=1, batch_size=8, min_scale=0, out_size=16)
    assert not any((tmp_path / n).exists() for n in "abcd")
    relabel(teacher, ds, tmp_path / "ok", epochs=1, batch_size=8, out_size=16)
    with pytest.raises(ValueError, match="image count mismatch"):
        SoftLabelStore(tmp_path / "ok", images=ds["images"][:20])
    with pytest.raises(ValueError, match="fingerprint"):
        SoftLabelStore(tmp_path / "ok", images=ds["images"].flip(0))
    with pytest.raises(ValueError, match="stores 1 epochs"):
        SoftLabelStore(tmp_path / "ok", images=ds["images"]).batch(1, 0)
    with pytest.raises(ValueError, match="in-memory"):
        SoftLabelStore(tmp_path / "ok")


def test_relabel_reads_a_distilled_folder_and_teacher_file(setup, tmp_path):
    """The stage's file interface: images.pt folder in, teacher.pt in, the store finds the
    images again from config.json."""
    from guard_fast.data.distilled import save_distilled

    _, ds = setup
    save_distilled(tmp_path / "set", ds["images"], ds["labels"], torch.arange(23) // 10,
                   write_pngs=False)
    # load_teacher builds the registry's default ConvNet (width 128): use one of those
    big = build_model("convnet", num_classes=10, in_channels=3, mean=(0.5,) * 3,
                      std=(0.25,) * 3, image_size=16)
    torch.save({"model": big.state_dict(), "arch": {
        "model": "convnet", "num_classes": 10, "in_channels": 3, "image_size": 16,
        "mean": [0.5] * 3, "std": [0.25] * 3, "data": "test"}}, tmp_path / "teacher.pt")
    relabel(str(tmp_path / "teacher.pt"), tmp_path / "set", tmp_path / "rl", epochs=1,
            batch_size=12, out_size=16, mix="none")
    store = SoftLabelStore(tmp_path / "rl")
    cfg = json.loads((tmp_path / "rl" / "config.json").read_text())
    assert cfg["teacher"]["arch"]["data"] == "test" and cfg["distilled"]["n_images"] == 23
    x, t = store.batch(0, 1)
    with torch.no_grad():
        assert torch.equal(big.eval()(x).half().float(), t)


def test_teacher_chunks_and_caller_state(setup, tmp_path):
    """teacher_chunk splits the teacher's batch (memory) without changing the targets beyond
    fp16 rounding; relabel leaves the caller's module in its training mode."""
    teacher, ds = setup
    teacher.train()
    relabel(teacher, ds, tmp_path / "whole", epochs=1, batch_size=8, out_size=16)
    relabel(teacher, ds, tmp_path / "chunked", epochs=1, batch_size=8, out_size=16,
            teacher_chunk=3)
    assert teacher.training
    teacher.eval()
    a = SoftLabelStore(tmp_path / "whole", ds["images"])
    b = SoftLabelStore(tmp_path / "chunked", ds["images"])
    for i in range(a.num_batches):
        torch.testing.assert_close(a.targets(0, i), b.targets(0, i), rtol=2 ** -9, atol=1e-3)


def _free_port():
    with socket.socket() as sk:
        sk.bind(("127.0.0.1", 0))
        return sk.getsockname()[1]


def test_cli_and_torchrun_share_epochs_out(setup, tmp_path):
    """python -m guard_fast.train relabel; under torchrun (2 gloo processes) epoch e is made
    by rank e % 2 and the files equal a single process's."""
    from guard_fast.data.distilled import save_distilled
    from guard_fast.train import main

    _, ds = setup
    save_distilled(tmp_path / "set", ds["images"], ds["labels"], torch.arange(23) // 10,
                   write_pngs=False)
    torch.manual_seed(0)
    big = build_model("convnet", num_classes=10, in_channels=3, mean=(0.5,) * 3,
                      std=(0.25,) * 3, image_size=16)
    torch.save({"model": big.state_dict(), "arch": {
        "model": "convnet", "num_classes": 10, "in_channels": 3, "image_size": 16,
        "mean": [0.5] * 3, "std": [0.25] * 3, "data": "test"}}, tmp_path / "teacher.pt")
    args = ["relabel", "--teacher", str(tmp_path / "teacher.pt"), "--distilled",
            str(tmp_path / "set"), "--epochs", "3", "--batch-size", "8", "--out-size", "16",
            "--device", "cpu"]
    assert main([*args, "--out", str(tmp_path / "one")]) == 0
    assert main([*args, "--out", str(tmp_path / "one"), "--seed", "9"]) == 2  # other run
    root = Path(__file__).resolve().parents[1]
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                        "--master_port", str(_free_port()), "-m", "guard_fast.train",
                        *args, "--out", str(tmp_path / "two")], cwd=root,
                       env=dict(os.environ, OMP_NUM_THREADS="1"), capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    # one summary for the job (rank 0's): two ranks printing could interleave into one line
    summaries = [ln for ln in r.stdout.splitlines() if ln.startswith("{")]
    assert len(summaries) == 1, r.stdout
    assert json.loads(summaries[0])["epochs_written"] == [0, 1, 2]
    for e in range(3):
        a = torch.load(tmp_path / "one" / f"epoch_{e:04d}.pt", weights_only=True)
        b = torch.load(tmp_path / "two" / f"epoch_{e:04d}.pt", weights_only=True)
        assert torch.equal(a["logits"], b["logits"]) and torch.equal(a["views"]["boxes"],
                                                                    b["views"]["boxes"])


def test_relabel_takes_the_squeeze_folder_as_recover_does(tmp_path):
    """--teacher DIR (a squeeze run folder) is its teacher.pt, as for recover; a folder
    without one says to run squeeze."""
    from guard_fast.data.softlabels import resolve_teacher
    from guard_fast.models import build_model
    from guard_fast.runtime import classifier_arch, save_classifier
    from guard_fast.models import Normalized

    arch = classifier_arch("convnet", 10, 3, 16, (0.5,) * 3, (0.5,) * 3, options={"width": 4})
    net = build_model("convnet", 10, 3, image_size=16, width=4)
    save_classifier(tmp_path / "sq" / "teacher.pt", Normalized(net, arch["mean"], arch["std"]),
                    arch, {})
    _, a, path = resolve_teacher(str(tmp_path / "sq"))
    assert path.endswith("teacher.pt") and a["model"] == "convnet"
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="run the squeeze stage first"):
        resolve_teacher(str(tmp_path / "empty"))
