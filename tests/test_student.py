"""Student training (train_FKD): the KD loss, optimizer groups, schedule, learning from a
relabel folder, online mode, resume, student.pt, errors, and DDP over the same views."""
import json
import math
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from guard_fast.config import STUDENT_PRESETS, StudentConfig, resolve_student
from guard_fast.distill.relabel import relabel
from guard_fast.distill.student import kd_loss, lr_factor, param_groups, train_student
from guard_fast.models import build_model
from guard_fast.runtime import load_checkpoint

ROOT = Path(__file__).resolve().parents[1]
# a CPU-sized student; lr 0.01 (the public 0.001 needs far more than this test's 24 steps)
STUDENT = dict(model="convnet", model_options={"width": 16}, lr=0.01, progress=False)


pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture(scope="module")
def mnist_setup(tmp_path_factory):
    """10 real bundled digits per class as a stand-in distilled set, a small ConvNet teacher
    trained for 48 steps on 1024 other digits, and 300 validation digits."""
    from guard_fast.data import get_data
    from guard_fast.data import random_subset as _subset

    d = get_data("mnist", image_size=32)
    ys = d.train.targets if hasattr(d.train, "targets") else None
    ys = torch.as_tensor([int(d.train[i][1]) for i in range(len(d.train))]) if ys is None \
        else torch.as_tensor(ys).long()
    idx = torch.cat([torch.nonzero(ys == c)[:10, 0] for c in range(10)])
    images = torch.stack([d.train[int(i)][0] for i in idx])
    labels = ys[idx]
    g = torch.Generator().manual_seed(0)
    rest = torch.randperm(len(d.train), generator=g)[:1024]
    X = torch.stack([d.train[int(i)][0] for i in rest])
    Y = ys[rest]
    torch.manual_seed(0)
    teacher = build_model("convnet", 10, 3, d.mean, d.std, image_size=32, width=16)
    opt = torch.optim.SGD(teacher.parameters(), lr=0.05, momentum=0.9)
    for _ in range(3):
        for k in range(0, 1024, 64):
            opt.zero_grad()
            F.cross_entropy(teacher(X[k:k + 64]), Y[k:k + 64]).backward()
            opt.step()
    teacher.eval()
    val = _subset(d.val, 300, 1)  # a random draw: the bundled split is stored class by class
    Xv = torch.stack([val[i][0] for i in range(300)])
    Yv = torch.tensor([int(val[i][1]) for i in range(300)])
    with torch.no_grad():
        t_acc = float((teacher(Xv).argmax(1) == Yv).float().mean())
    ds = {"images": images, "labels": labels, "ipc_ids": torch.arange(100) % 10, "meta": {}}
    root = tmp_path_factory.mktemp("student")
    relabel(teacher, ds, root / "rl", epochs=12, batch_size=50, seed=0, min_scale=0.25)
    return dict(teacher=teacher, ds=ds, val=val, t_acc=t_acc, rl=root / "rl", mean=d.mean,
                std=d.std)


def test_kd_loss_equals_an_independent_computation():
    torch.manual_seed(0)
    s = torch.randn(7, 5, dtype=torch.float64)
    t = torch.randn(7, 5, dtype=torch.float64) * 3
    for T in (1.0, 3.0, 20.0):
        # KL(q || p) = sum_c q_c (log q_c - log p_c), averaged over the batch ("batchmean")
        zq = t / T - (t / T).max(1, keepdim=True).values
        q = zq.exp() / zq.exp().sum(1, keepdim=True)
        zp = s / T - (s / T).max(1, keepdim=True).values
        logp = zp - zp.exp().sum(1, keepdim=True).log()
        want = float((q * (q.log() - logp)).sum() / 7)
        assert math.isclose(float(kd_loss(s, t, T)), want, rel_tol=1e-5)
        assert math.isclose(float(kd_loss(s, t, T, loss_scale="T2")), want * T * T, rel_tol=1e-5)
        # and it is the public code's expression
        ref = torch.nn.KLDivLoss(reduction="batchmean")(F.log_softmax(s.float() / T, 1),
                                                        F.softmax(t.float() / T, 1))
        assert math.isclose(float(kd_loss(s, t, T)), float(ref), rel_tol=1e-5)
    # -inf teacher logits (top-k stores): zero target mass, finite loss and gradient
    t2 = t.float().clone()
    t2[:, :2] = float("-inf")
    s2 = s.float().requires_grad_()
    loss = kd_loss(s2, t2, 4.0)
    loss.backward()
    q2 = F.softmax(t2[:, 2:] / 4.0, 1)
    logp2 = F.log_softmax(s.float() / 4.0, 1)[:, 2:]
    want2 = float((q2 * (q2.log() - logp2)).sum() / 7)
    assert math.isclose(float(loss.detach()), want2, rel_tol=1e-5)
    assert torch.isfinite(s2.grad).all()
    with pytest.raises(ValueError, match="loss_scale"):
        kd_loss(s, t, 1.0, loss_scale="T3")


def test_optimizer_groups_schedule_and_presets():
    m = build_model("resnet18", 10, 3, (0.5,) * 3, (0.25,) * 3)
    g = param_groups(m, 0.01, decay_1d=False)
    assert g[0]["weight_decay"] == 0.01 and g[1]["weight_decay"] == 0.0
    assert all(p.dim() > 1 for p in g[0]["params"]) and all(p.dim() == 1 for p in g[1]["params"])
    assert len(g[0]["params"]) + len(g[1]["params"]) == len(list(m.parameters()))
    assert len(param_groups(m, 0.01, decay_1d=True)) == 1
    # public --cos: 0.5 * (1 + cos(pi * e / epochs)), stepped per epoch
    f = lr_factor(StudentConfig(epochs=300))
    for e in (0, 1, 150, 299):
        assert math.isclose(f(e), 0.5 * (1 + math.cos(math.pi * e / 300)), abs_tol=1e-12)
    w = lr_factor(resolve_student({"preset": "tiny-imagenet"}))
    assert math.isclose(w(0), 0.01) and math.isclose(w(5), 1.0) and w(100) < 1e-12
    p = STUDENT_PRESETS["imagenet-1k"]
    assert (p["epochs"], p["batch_size"], p["lr"], p["weight_decay"], p["temperature"],
            p["optimizer"], p["loss_scale"], p["mix"]) == (300, 1024, 0.001, 0.01, 20.0, "adamw",
                                                           "none", "cutmix")
    assert set(STUDENT_PRESETS) >= {"imagenette", "tiny-imagenet", "imagenet-1k", "cifar10",
                                    "cifar100", "mnist"}
    with pytest.raises(ValueError, match="unknown preset"):
        resolve_student({"preset": "svhn"})
    with pytest.raises(ValueError, match="unknown student setting"):
        resolve_student({"learning_rate": 1})


def _cfg(setup, out, **kw):
    base = dict(STUDENT, out=str(out), soft_labels=str(setup["rl"]), epochs=12)
    return resolve_student({**base, **kw})


def test_student_learns_from_the_relabel_folder(mnist_setup, tmp_path, capsys):
    s = mnist_setup
    m = train_student(_cfg(s, tmp_path / "run", val_every=4), distilled=s["ds"],
                      val_data=s["val"])
    rows = [json.loads(l) for l in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == list(range(1, 13))
    first, last = rows[0], rows[-1]
    with capsys.disabled():
        print(f"\nstudent (ConvNet-16, 10 ipc MNIST, 12 epochs): kd {first['train_kd']:.4g} -> "
              f"{last['train_kd']:.4g}, teacher agreement {last['train_teacher_agree']:.2f}, "
              f"val acc {rows[3]['val_acc']:.3f} (epoch 4) -> {m['val_acc']:.3f} "
              f"(teacher {s['t_acc']:.3f}, chance 0.1)")
    assert sum(r["train_kd"] for r in rows[-3:]) < 0.7 * sum(r["train_kd"] for r in rows[:3])
    assert m["val_acc"] > 0.35 and "val_acc" not in rows[0]
    cfg = json.loads((tmp_path / "run" / "config.json").read_text())
    # view settings resolved from the store
    assert (cfg["batch_size"], cfg["image_size"], cfg["min_scale"], cfg["mix"]) == (50, 32, 0.25,
                                                                                   "cutmix")
    assert json.loads((tmp_path / "run" / "run.json").read_text())["status"] == "complete"
    ck = load_checkpoint(tmp_path / "run" / "student.pt")
    assert ck["arch"]["num_classes"] == 10 and ck["arch"]["mean"] == list(s["mean"])


def test_online_mode_trains_on_the_same_views(mnist_setup, tmp_path):
    """Online targets are the teacher's fp32 logits (stored: fp16), on the same inputs: after
    two epochs the weights agree with the replayed run up to that rounding."""
    s = mnist_setup
    rep = _cfg(s, tmp_path / "rep", epochs=2, optimizer="sgd", lr=0.5, weight_decay=0.0)
    train_student(rep, distilled=s["ds"])
    # the mnist preset's online views are the fixture's relabel settings (batch 50, 32 px,
    # min scale 0.25, cutmix, seed 0)
    onl = resolve_student(dict(STUDENT, out=str(tmp_path / "onl"), epochs=2, optimizer="sgd",
                               lr=0.5, weight_decay=0.0))
    assert (onl.batch_size, onl.image_size, onl.min_scale, onl.mix, onl.seed) == (
        50, 32, 0.25, "cutmix", 0)
    train_student(onl, distilled=s["ds"], teacher=s["teacher"])
    a = load_checkpoint(tmp_path / "rep" / "student.pt")["model"]
    b = load_checkpoint(tmp_path / "onl" / "student.pt")["model"]
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-3, atol=1e-4, msg=k)
    assert any(not torch.equal(a[k], b[k]) for k in a)  # fp16 vs fp32 targets: not identical


def test_resume_gives_identical_weights(mnist_setup, tmp_path):
    s = mnist_setup
    full = _cfg(s, tmp_path / "full", epochs=3)
    train_student(full, distilled=s["ds"])
    cut = _cfg(s, tmp_path / "cut", epochs=3)
    train_student(cut, distilled=s["ds"], stop_after=1)
    assert (tmp_path / "cut" / "checkpoint.pt").exists()
    assert not (tmp_path / "cut" / "student.pt").exists(), "a cut run must not look complete"
    with pytest.raises(FileExistsError, match="resume"):  # without resume: refuses
        train_student(_cfg(s, tmp_path / "cut", epochs=3), distilled=s["ds"])
    with pytest.raises(ValueError, match="different settings.*lr"):
        train_student(_cfg(s, tmp_path / "cut", epochs=3, lr=0.5, resume=True), distilled=s["ds"])
    train_student(_cfg(s, tmp_path / "cut", epochs=3, resume=True), distilled=s["ds"])
    a = load_checkpoint(tmp_path / "full" / "student.pt")["model"]
    b = load_checkpoint(tmp_path / "cut" / "student.pt")["model"]
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    rows = [json.loads(l) for l in (tmp_path / "cut" / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2, 3]


def test_student_pt_loads_with_load_teacher(mnist_setup, tmp_path):
    from guard_fast.runtime import load_classifier

    s = mnist_setup
    small = {"images": s["ds"]["images"][::10], "labels": s["ds"]["labels"][::10]}
    relabel(s["teacher"], small, tmp_path / "rl", epochs=1, batch_size=10, mix="none")
    train_student(StudentConfig(out=str(tmp_path / "r18"), model="resnet18", epochs=1,
                                soft_labels=str(tmp_path / "rl")), distilled=small)
    model, arch = load_classifier(tmp_path / "r18" / "student.pt")
    assert arch["model"] == "resnet18" and arch["num_classes"] == 10
    ck = load_checkpoint(tmp_path / "r18" / "student.pt")
    for k, v in model.state_dict().items():
        assert torch.equal(v, ck["model"][k]), k
    x = torch.rand(2, 3, 32, 32)
    assert model.eval()(x).shape == (2, 10)


def test_convnet_student_with_options_reloads_through_load_classifier(mnist_setup, tmp_path):
    """A ConvNet student of width 16 and depth 2 (not the registry's default 128 x 3):
    student.pt records the options and load_classifier rebuilds that network, with the
    outputs of the same network built by hand; a save_classifier round trip keeps them."""
    from guard_fast.runtime import load_classifier, save_classifier

    s = mnist_setup
    small = {"images": s["ds"]["images"][::10], "labels": s["ds"]["labels"][::10]}
    relabel(s["teacher"], small, tmp_path / "rl", epochs=1, batch_size=10, mix="none")
    opts = {"width": 16, "depth": 2}
    train_student(StudentConfig(out=str(tmp_path / "cn"), model="convnet", model_options=opts,
                                epochs=1, soft_labels=str(tmp_path / "rl")), distilled=small)
    ck = load_checkpoint(tmp_path / "cn" / "student.pt")
    assert set(ck) == {"model", "arch", "metrics"} and ck["arch"]["options"] == opts
    model, arch = load_classifier(tmp_path / "cn" / "student.pt")
    convs = [m for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
    assert len(convs) == 2 and all(c.out_channels == 16 for c in convs)
    ref = build_model("convnet", 10, 3, s["mean"], s["std"], image_size=32, **opts)
    ref.load_state_dict(ck["model"])
    x = torch.rand(4, 3, 32, 32)
    with torch.no_grad():
        want = ref.eval()(x)
        assert torch.equal(model.eval()(x), want)
        save_classifier(tmp_path / "again.pt", model, arch)
        again, arch2 = load_classifier(tmp_path / "again.pt")
        assert arch2 == arch and torch.equal(again.eval()(x), want)


def test_a_run_folder_of_the_earlier_format_resumes(mnist_setup, tmp_path):
    """A folder as the earlier version wrote it (config.json: the StudentConfig fields and no
    "stage"; checkpoint.pt: a plain torch.save of model, optimizer, scheduler and epoch)
    resumes and ends with the weights of an uninterrupted run."""
    from dataclasses import fields

    s = mnist_setup
    train_student(_cfg(s, tmp_path / "full", epochs=2), distilled=s["ds"])
    old = tmp_path / "old"
    train_student(_cfg(s, old, epochs=2), distilled=s["ds"], stop_after=1)
    cfg = json.loads((old / "config.json").read_text())
    del cfg["stage"]
    assert set(cfg) == {f.name for f in fields(StudentConfig)}
    (old / "config.json").write_text(json.dumps(cfg, indent=2))
    ck = load_checkpoint(old / "checkpoint.pt")
    assert set(ck) == {"model", "optimizer", "scheduler", "epoch"} and ck["epoch"] == 0
    torch.save({k: ck[k] for k in ("model", "optimizer", "scheduler", "epoch")},
               old / "checkpoint.pt")
    (old / "run.json").write_text(json.dumps({"status": "running", "stage": "student"}))
    train_student(_cfg(s, old, epochs=2, resume=True), distilled=s["ds"])
    a = load_checkpoint(tmp_path / "full" / "student.pt")["model"]
    b = load_checkpoint(old / "student.pt")["model"]
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert json.loads((old / "run.json").read_text())["status"] == "complete"
    rows = [json.loads(l) for l in (old / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2]


def test_bad_inputs_name_the_problem(mnist_setup, tmp_path):
    s = mnist_setup
    with pytest.raises(FileNotFoundError, match="run the relabel stage first"):
        train_student(_cfg(s, tmp_path / "a", soft_labels=str(tmp_path / "none")),
                      distilled=s["ds"])
    with pytest.raises(ValueError, match="stores soft labels for 12 epochs but 20"):
        train_student(_cfg(s, tmp_path / "b", epochs=20), distilled=s["ds"])
    with pytest.raises(ValueError, match="image count mismatch"):
        train_student(_cfg(s, tmp_path / "c"), distilled={"images": s["ds"]["images"][:60],
                                                          "labels": s["ds"]["labels"][:60]})
    with pytest.raises(ValueError, match="image/label count mismatch"):
        train_student(_cfg(s, tmp_path / "d"), distilled={"images": s["ds"]["images"],
                                                          "labels": s["ds"]["labels"][:60]})
    with pytest.raises(ValueError, match="class count mismatch"):
        train_student(_cfg(s, tmp_path / "e"), distilled={
            "images": s["ds"]["images"], "labels": s["ds"]["labels"],
            "meta": {"class_names": [str(i) for i in range(12)]}})
    with pytest.raises(ValueError, match="batch_size = 32 but the relabel folder"):
        train_student(_cfg(s, tmp_path / "f", batch_size=32), distilled=s["ds"])
    with pytest.raises(ValueError, match="run the relabel stage first"):
        train_student(resolve_student(dict(STUDENT, out=str(tmp_path / "g"))), distilled=s["ds"])
    with pytest.raises(ValueError, match="online mode: image_size must be set"):
        train_student(StudentConfig(out=str(tmp_path / "j")), distilled=s["ds"],
                      teacher=s["teacher"])
    with pytest.raises(ValueError, match="not both"):
        train_student(_cfg(s, tmp_path / "h"), distilled=s["ds"], teacher=s["teacher"])
    with pytest.raises(ValueError, match="unknown optimizer"):
        train_student(_cfg(s, tmp_path / "i", optimizer="lamb"), distilled=s["ds"])
    assert not any((tmp_path / n).exists() for n in "abcdefghij")


def _free_port():
    with socket.socket() as sk:
        sk.bind(("127.0.0.1", 0))
        return sk.getsockname()[1]


def test_ddp_two_gloo_processes_equal_single_process(mnist_setup, tmp_path):
    """Each rank builds its half of every stored global batch; ConvNet (instance norm: no
    batch statistics), so 2 x 25 rows == 1 x 50 rows up to summation order. SGD: AdamW would
    blow float noise up to full steps on the conv biases, whose true gradient under instance
    norm is exactly zero."""
    from guard_fast.data.distilled import save_distilled

    s = mnist_setup
    save_distilled(tmp_path / "set", s["ds"]["images"], s["ds"]["labels"], s["ds"]["ipc_ids"],
                   write_pngs=False)
    cfg = dict(STUDENT, soft_labels=str(s["rl"]), distilled=str(tmp_path / "set"), epochs=2,
               device="cpu", optimizer="sgd", lr=0.1)
    train_student(resolve_student(dict(cfg, out=str(tmp_path / "single"))))
    (tmp_path / "ddp.json").write_text(json.dumps(dict(cfg, out=str(tmp_path / "ddp"))))
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                        "--master_port", str(_free_port()), "-m", "guard_fast.train", "student",
                        "--config", str(tmp_path / "ddp.json")], cwd=ROOT,
                       env=dict(os.environ, OMP_NUM_THREADS="1"), capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    a = load_checkpoint(tmp_path / "single" / "student.pt")["model"]
    b = load_checkpoint(tmp_path / "ddp" / "student.pt")["model"]
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5, msg=k)
    ra = [json.loads(l) for l in (tmp_path / "single" / "metrics.jsonl").read_text().splitlines()]
    rb = [json.loads(l) for l in (tmp_path / "ddp" / "metrics.jsonl").read_text().splitlines()]
    assert math.isclose(ra[-1]["train_kd"], rb[-1]["train_kd"], rel_tol=1e-4)
