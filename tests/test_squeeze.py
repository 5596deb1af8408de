"""Squeeze: regularizers, run folders, kill-and-resume, DDP, and the CLI's errors."""
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from guard_fast.config import REGULARIZERS, SqueezeConfig, resolve_squeeze
from guard_fast.distill.squeeze import build_criterion, squeeze
from guard_fast.runtime import load_classifier
from guard_fast.runtime import load_checkpoint

ROOT = Path(__file__).resolve().parents[1]
SMALL = dict(max_train=128, max_val=64, batch_size=32, epochs=2, progress=False)


def _cli(*args, env=None, timeout=600):
    e = dict(os.environ, OMP_NUM_THREADS="1", **(env or {}))
    return subprocess.run([sys.executable, "-m", "guard_fast.train", *args], cwd=ROOT, env=e,
                          capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def digits():
    from guard_fast.data import get_data

    d = get_data("mnist", image_size=32)
    xs = torch.stack([d.train[i][0] for i in range(32)])
    ys = torch.tensor([int(d.train[i][1]) for i in range(32)])
    return xs, ys, d


@pytest.mark.parametrize("reg", REGULARIZERS)
def test_each_regularizer_decreases_its_own_objective(reg, digits):
    from guard_fast.models import build_model

    xs, ys, d = digits
    torch.manual_seed(0)
    model = build_model("convnet", num_classes=10, in_channels=3, mean=d.mean, std=d.std, width=16)
    cfg = resolve_squeeze(dict(regularizer=reg, adv_steps=3))
    crit = build_criterion(cfg)
    opt = torch.optim.SGD(model.parameters(), lr=0.02, momentum=0.9)
    model.train()

    def objective():
        torch.manual_seed(1)  # same attack draws before and after
        return float(crit(model, xs, ys).loss)

    before = objective()
    for _ in range(6):
        opt.zero_grad()
        crit(model, xs, ys).loss.backward()
        opt.step()
    after = objective()
    assert after < before, (reg, before, after)


def test_guard_teacher_has_smaller_penalty_than_plain(tmp_path):
    """Reported numbers: the val GUARD penalty of both teachers after the same training.
    The Table 2 ConvNet (instance norm, width 32): the same separation as the default
    ResNet-18 (penalty ratio ~0.004 here against ~0.36) at a sixth of the time."""
    res = {}
    for reg in ("guard", "none"):
        cfg = resolve_squeeze(dict(regularizer=reg, out=str(tmp_path / reg), max_train=256,
                                   max_val=64, epochs=2, batch_size=64, progress=False,
                                   model="convnet", model_options={"width": 32}))
        res[reg] = squeeze(cfg)
    print("val penalty guard %.4g vs plain %.4g; val acc %.3f vs %.3f" % (
        res["guard"]["val_penalty"], res["none"]["val_penalty"],
        res["guard"]["val_acc"], res["none"]["val_acc"]))
    assert res["guard"]["val_penalty"] < 0.5 * res["none"]["val_penalty"]
    assert (tmp_path / "guard" / "teacher.pt").exists()
    rows = [json.loads(l) for l in (tmp_path / "guard" / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2]
    assert json.loads((tmp_path / "guard" / "run.json").read_text())["status"] == "complete"
    model, arch = load_classifier(tmp_path / "guard" / "teacher.pt")
    assert arch["model"] == "convnet" and arch["num_classes"] == 10
    # the evaluate stage reads the teacher and writes its results next to it
    from guard_fast.train import main

    assert main(["evaluate", "--model", str(tmp_path / "guard" / "teacher.pt"), "--n-examples", "8",
                 "--attacks", "PGD100", "--eps", "0.1", "--device", "cpu"]) == 0
    res = json.loads((tmp_path / "guard" / "eval" / "results.json").read_text())
    assert "PGD100" in json.dumps(res)
    # a checkpoint from a different architecture: a clear error naming it
    with pytest.raises(ValueError, match="different architecture"):
        load_classifier(tmp_path / "guard" / "teacher.pt", arch_expected={"model": "resnet50"})
    ck = load_checkpoint(tmp_path / "guard" / "teacher.pt")
    ck["arch"]["model"], ck["arch"]["options"] = "resnet18", {}
    torch.save(ck, tmp_path / "foreign.pt")
    with pytest.raises(ValueError, match="do not fit architecture resnet18"):
        load_classifier(tmp_path / "foreign.pt")


def test_kill_at_any_moment_then_resume_gives_the_same_weights(tmp_path, capsys):
    # a BatchNorm ConvNet: the resume must restore running statistics, momentum and the
    # loader position like the default ResNet's, at a fraction of the steps' cost
    common = ["squeeze", "--model", "convnet", "--model-options", '{"width": 16, "norm": "batchnorm"}',
              "--max-train", "64", "--max-val", "16", "--batch-size", "32",
              "--epochs", "3", "--no-progress", "--seed", "3"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    # the uninterrupted reference and the run to kill start together (one thread each); the
    # second is SIGKILLed as soon as the first epoch's checkpoint exists (mid epoch 2)
    full = subprocess.Popen([sys.executable, "-m", "guard_fast.train", *common, "--out",
                             str(tmp_path / "full")], cwd=ROOT, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    out = tmp_path / "killed"
    p = subprocess.Popen([sys.executable, "-m", "guard_fast.train", *common, "--out", str(out)],
                         cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 300
    while not (out / "checkpoint.pt").exists() and time.time() < deadline and p.poll() is None:
        time.sleep(0.05)
    p.send_signal(signal.SIGKILL)
    p.wait()
    _, full_err = full.communicate(timeout=600)
    assert full.returncode == 0, full_err[-2000:]
    assert not (out / "teacher.pt").exists(), "killed run must not look complete"
    assert json.loads((out / "run.json").read_text())["status"] == "running"
    from guard_fast.train import main  # without --resume: refuses, overwrites nothing

    assert main([*common, "--out", str(out)]) == 2
    assert "--resume" in capsys.readouterr().err
    r = _cli(*common, "--out", str(out), "--resume")
    assert r.returncode == 0, r.stderr[-2000:]
    a = load_checkpoint(tmp_path / "full" / "teacher.pt")["model"]
    b = load_checkpoint(out / "teacher.pt")["model"]
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_ddp_two_gloo_processes_equal_single_process(tmp_path):
    """Same global batch: 2 processes x 16 images == 1 process x 32 (ConvNet: no BatchNorm,
    so per-process statistics cannot differ). GUARD's injected gradients go through DDP."""
    common = ["squeeze", "--model", "convnet", "--model-options", '{"width": 16}',
              "--max-train", "128", "--max-val", "32",
              "--batch-size", "32", "--epochs", "1", "--no-progress", "--device", "cpu"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    # the single-process run and the torchrun run are independent: start both at once
    single = subprocess.Popen([sys.executable, "-m", "guard_fast.train", *common, "--out",
                               str(tmp_path / "single")], cwd=ROOT, env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                        "--master_port", str(_free_port()), "-m", "guard_fast.train", *common,
                        "--out", str(tmp_path / "ddp")], cwd=ROOT, env=env, capture_output=True,
                       text=True, timeout=600)
    _, single_err = single.communicate(timeout=600)
    assert single.returncode == 0, single_err[-2000:]
    assert r.returncode == 0, r.stderr[-3000:]
    a = load_checkpoint(tmp_path / "single" / "teacher.pt")["model"]
    b = load_checkpoint(tmp_path / "ddp" / "teacher.pt")["model"]
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5, msg=k)


@pytest.mark.parametrize("args,needle", [
    (["squeeze", "--preset", "nope"], "unknown preset"),
    (["squeeze", "--preset", "imagenette"], "--data PATH"),
    (["squeeze", "--model", "resnet1000", "--max-train", "64"], "unknown model"),
    (["squeeze", "--regularizer", "magic"], "unknown regularizer"),
    (["squeeze", "--device", "cuda"], "no CUDA GPU"),
    (["squeeze", "--dataset", "imagefolder", "--data", "/nonexistent/folder"], "/nonexistent/folder"),
    (["squeeze", "--resume", "--out", "/tmp/guard_fast_no_such_run"], "holds no run"),
])
def test_cli_errors_name_the_problem(args, needle, tmp_path, capsys):
    from guard_fast.train import main

    if "cuda" in args and torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    rc = main([*args, "--no-progress"] + ([] if "--out" in args else ["--out", str(tmp_path / "o")]))
    err = capsys.readouterr().err
    assert rc == 2 and needle in err, err
    assert not (tmp_path / "o" / "teacher.pt").exists()


def test_cli_mismatched_resume_and_not_yet_stages(tmp_path, capsys):
    from guard_fast.train import main

    out = tmp_path / "run"
    out.mkdir()
    (out / "config.json").write_text(json.dumps(dict(SqueezeConfig().to_dict(), lr=123.0)))
    assert main(["squeeze", "--out", str(out), "--resume", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "different settings" in err and "lr" in err
    assert main(["report", str(tmp_path)]) == 2  # no pipeline run there: says what to run
    assert "no results.json" in capsys.readouterr().err


def test_help_documents_every_option_with_default(capsys):
    from guard_fast.train import main

    with pytest.raises(SystemExit):
        main(["squeeze", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    for f in SqueezeConfig.__dataclass_fields__:
        flag = {"data": "--dataset", "data_root": "--data"}.get(f, "--" + f.replace("_", "-"))
        assert flag in text, flag
    assert text.count("(default:") >= len(SqueezeConfig.__dataclass_fields__)


def test_speed_flags_run(tmp_path):
    """bf16 autocast + channels_last, and torch.compile with a first-order regularizer."""
    cfg = resolve_squeeze(dict(out=str(tmp_path / "amp"), amp="bf16", channels_last=True,
                               model="convnet", model_options={"width": 16, "norm": "batchnorm"},
                               max_train=64, max_val=16, epochs=1, batch_size=32, progress=False))
    m = squeeze(cfg)
    assert m["train_loss"] == m["train_loss"] and m["train_penalty"] > 0  # finite, GUARD active
    with pytest.raises(ValueError, match="first-order"):
        squeeze(resolve_squeeze(dict(out=str(tmp_path / "c"), compile=True, max_train=64,
                                     epochs=1, batch_size=32, progress=False)))


def test_grad_ratio_steps_log_the_regularizer_to_ce_ratio(tmp_path):
    """--grad-ratio-steps: at each listed step grad_ratio.jsonl gets the CE's and the
    regularizer's parameter-gradient norms and their ratio (GUARD: positive; plain: ~0)."""
    rows = {}
    for reg in ("guard", "none"):
        squeeze(resolve_squeeze(dict(regularizer=reg, out=str(tmp_path / reg), model="convnet",
                                     model_options={"width": 8, "norm": "batchnorm"},
                                     max_train=64, max_val=16, epochs=1, batch_size=16,
                                     grad_ratio_steps=[1, 3], progress=False)))
        rows[reg] = [json.loads(l) for l in
                     (tmp_path / reg / "grad_ratio.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows["guard"]] == [1, 3], rows
    assert all(r["ce_grad_norm"] > 0 and r["grad_ratio"] > 0 for r in rows["guard"]), rows
    assert all(r["grad_ratio"] < 1e-5 for r in rows["none"]), rows
