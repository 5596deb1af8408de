"""Faults on purpose: kills during a checkpoint write, full disks and failing devices, two
processes on one folder, NaN/Inf in data, weights and losses, and what a new user found
(refused commands leave nothing behind, another run's results are never overwritten, moved
folders resume, stale temporary files are removed, ordinary file modes, stage times kept).
The full kill-at-any-moment run is bench/fault_inject.py; its reduced form is below."""
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from guard_fast.runtime import (FolderInUseError, NonFiniteError, RunFolder, StepWatch,
                                WriteError, atomic_torch_save, atomic_write_bytes,
                                atomic_write_json, classifier_arch, load_checkpoint, load_classifier,
                                save_classifier, save_training_state)
from guard_fast.runtime import io as rio
from guard_fast.train import main

ROOT = Path(__file__).resolve().parents[1]
SQ = ["squeeze", "--regularizer", "none", "--model", "convnet", "--model-options", '{"width": 8}',
      "--max-train", "32",
      "--max-val", "8", "--batch-size", "16", "--epochs", "2", "--no-progress", "--device", "cpu"]


@pytest.fixture
def fault(monkeypatch):
    """Set GUARD_FAST_FAULT for this process, counting writes from zero."""
    def set_(spec):
        monkeypatch.setattr(rio, "_fault_count", 0)
        monkeypatch.setenv("GUARD_FAST_FAULT", spec)
    return set_


def _temps(p: Path) -> list:
    return list(p.rglob(".*.tmp"))


def _tiny_classifier(path: Path, nan: bool = False) -> Path:
    from guard_fast.models import build_model

    torch.manual_seed(0)
    net = build_model("convnet", num_classes=10, in_channels=3, mean=(0.5,) * 3, std=(0.5,) * 3,
                      image_size=32, width=8)
    arch = classifier_arch("convnet", 10, 3, 32, (0.5,) * 3, (0.5,) * 3, data="mnist",
                           options={"width": 8})
    if nan:  # written without the check, as a diverged run of an older version would
        with torch.no_grad():
            next(net.parameters())[0].fill_(float("nan"))
        torch.save({"model": net.state_dict(), "arch": arch, "metrics": {}}, path)
        return path
    save_classifier(path, net, arch)
    return path


# ----------------------------------------------------------------------- full disk, EIO
@pytest.mark.parametrize("action,code", [("enospc", "ENOSPC"), ("eio", "EIO")])
def test_failed_write_names_path_and_free_space_and_keeps_the_old_file(tmp_path, fault, action,
                                                                      code):
    f = tmp_path / "checkpoint.pt"
    atomic_torch_save(f, {"epoch": 0})
    fault(f"{action}@1:checkpoint.pt")
    with pytest.raises(WriteError) as ei:
        atomic_torch_save(f, {"epoch": 1})
    msg = str(ei.value)
    assert str(f) in msg and "MiB free of" in msg and code in msg and "intact" in msg
    assert load_checkpoint(f) == {"epoch": 0} and not _temps(tmp_path)


def _mount_tmpfs(where: Path, opts: str) -> bool:
    where.mkdir()
    if os.geteuid() != 0 or shutil.which("mount") is None:
        return False
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", opts, "tmpfs", str(where)],
                       capture_output=True)
    return r.returncode == 0


def test_real_full_disk_on_a_small_tmpfs(tmp_path):
    """torch.save's own failure on a full file system ("enforce fail at inline_container")
    comes back as the WriteError of its ENOSPC; the last complete file stays."""
    mnt = tmp_path / "small"
    if not _mount_tmpfs(mnt, "size=256k"):
        pytest.skip("cannot mount a tmpfs here (not root); the injected ENOSPC test covers it")
    try:
        atomic_torch_save(mnt / "checkpoint.pt", {"w": torch.zeros(1000)})
        with pytest.raises(WriteError, match=r"checkpoint.pt: No space left on device \(ENOSPC\)"):
            atomic_torch_save(mnt / "checkpoint.pt", {"w": torch.ones(200_000)})
        assert torch.equal(load_checkpoint(mnt / "checkpoint.pt")["w"], torch.zeros(1000))
        assert not _temps(mnt)
    finally:
        subprocess.run(["umount", str(mnt)], check=False)


def test_full_disk_mid_squeeze_exits_1_then_the_rerun_resumes(tmp_path, fault, capsys):
    out = tmp_path / "sq"
    fault("enospc@2:checkpoint.pt")  # epoch 2's checkpoint write fails
    assert main([*SQ, "--out", str(out)]) == 1
    err = capsys.readouterr().err
    assert "checkpoint.pt" in err and "MiB free" in err and "Traceback" not in err
    assert load_checkpoint(out / "checkpoint.pt")["epoch"] == 0  # epoch 1's: intact
    assert not (out / "teacher.pt").exists() and not _temps(out)
    os.environ.pop("GUARD_FAST_FAULT")
    assert main([*SQ, "--out", str(out), "--resume"]) == 0
    ref = tmp_path / "ref"
    assert main([*SQ, "--out", str(ref)]) == 0
    a, b = (load_checkpoint(p / "teacher.pt")["model"] for p in (out, ref))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_final_write_failed_then_rerun_reports_the_same_metrics(tmp_path, fault, capsys):
    """Found by bench/fault_inject.py: a rerun after the last epoch (teacher.pt not yet
    written) reported only validation metrics; it now reports the last epoch's row."""
    out, ref = tmp_path / "sq", tmp_path / "ref"
    fault("enospc@1:teacher.pt")
    assert main([*SQ, "--out", str(out)]) == 1
    os.environ.pop("GUARD_FAST_FAULT")
    assert main([*SQ, "--out", str(out), "--resume"]) == 0
    assert main([*SQ, "--out", str(ref)]) == 0
    a, b = (load_checkpoint(p / "teacher.pt") for p in (out, ref))
    drop = lambda m: {k: v for k, v in m.items() if k != "images_per_s"}  # noqa: E731
    assert drop(a["metrics"]) == drop(b["metrics"]) and "train_loss" in a["metrics"]
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])


def test_unwritable_or_impossible_out_refused_before_any_work(tmp_path, capsys):
    afile = tmp_path / "afile"
    afile.write_text("x")
    assert main([*SQ, "--out", str(afile / "run")]) == 2
    assert "is a file, not a folder" in capsys.readouterr().err
    ro = tmp_path / "ro"
    if _mount_tmpfs(ro, "ro,size=64k"):
        try:
            assert main([*SQ, "--out", str(ro / "run")]) == 2
            assert "is not writable" in capsys.readouterr().err
        finally:
            subprocess.run(["umount", str(ro)], check=False)
    elif os.geteuid() != 0:
        ro.chmod(0o555)
        assert main([*SQ, "--out", str(ro / "run")]) == 2
        assert "is not writable" in capsys.readouterr().err


# --------------------------------------------------------------------- one run per folder
def test_second_process_on_a_folder_is_refused_naming_the_holder(tmp_path, monkeypatch, capsys):
    out = tmp_path / "run"
    code = ("import sys, time; from guard_fast.runtime import RunFolder; "
            f"f = RunFolder({str(out)!r}, 'squeeze', {{}}); f.check(); f.start(); "
            "print('ready', flush=True); time.sleep(120)")
    p = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True,
                         env=dict(os.environ, PYTHONPATH=str(ROOT)))
    try:
        assert p.stdout.readline().strip() == "ready"
        t0 = time.perf_counter()
        with pytest.raises(FolderInUseError, match=rf"in use by another run \(pid {p.pid} on host"):
            RunFolder(out, "squeeze", {}, resume=True).check()
        assert time.perf_counter() - t0 < 2  # refused at once, not after waiting
        assert main([*SQ, "--out", str(out), "--resume"]) == 2
        assert f"pid {p.pid}" in capsys.readouterr().err
        # a torchrun rank other than 0 shares the folder of its job's rank 0
        monkeypatch.setenv("RANK", "1")
        monkeypatch.setenv("WORLD_SIZE", "2")
        assert RunFolder(out, "squeeze", {}, resume=True).check() is not None
        monkeypatch.delenv("RANK")
        monkeypatch.delenv("WORLD_SIZE")
    finally:
        p.send_signal(signal.SIGKILL)
        p.wait()
    # the kernel dropped the lock with the killed process: no stale lock
    assert RunFolder(out, "squeeze", {}, resume=True).check() is not None


# ----------------------------------------------------------------------- numeric faults
def test_step_watch_names_the_first_bad_step_and_its_statistics():
    w = StepWatch("student")
    for step in range(5):
        x = torch.ones(2, 3)
        if step == 3:
            x[0, 1] = float("inf")
        w.observe(step, x=x, loss=torch.tensor(float("nan") if step >= 2 else 1.0), lr=0.1)
    with pytest.raises(NonFiniteError, match=r"student: non-finite values at epoch 1, step 2 "
                       r"\(loss=nan, lr=0.1, nonfinite_inputs=0\).*last good one"):
        w.check("epoch 1")
    w.check("epoch 2")  # reset: nothing observed since


def test_nan_input_batch_stops_squeeze_with_exit_1_and_writes_no_checkpoint(tmp_path,
                                                                          monkeypatch, capsys):
    import guard_fast.distill.squeeze as sq

    real = sq._datasets

    def poisoned(cfg):
        data, train, val = real(cfg)
        x, y = zip(*[train[i] for i in range(len(train))])
        x = torch.stack(x)
        x[5, 0, 3, 3] = float("nan")
        return data, torch.utils.data.TensorDataset(x, torch.as_tensor(y)), val

    monkeypatch.setattr(sq, "_datasets", poisoned)
    for reg in ("none", "guard"):  # GuardLoss's own input check becomes the same error
        out = tmp_path / reg
        args = [*SQ, "--out", str(out)]
        args[args.index("none")] = reg
        assert main(args) == 1
        err = capsys.readouterr().err
        assert "squeeze: non-finite values at epoch 1, step" in err and "nonfinite_inputs=1" in err
        assert "Traceback" not in err
        assert not (out / "checkpoint.pt").exists() and not (out / "teacher.pt").exists()


def test_a_loss_that_diverges_but_stays_finite_stops_squeeze_keeping_the_checkpoint(
        tmp_path, monkeypatch, capsys):
    """An epoch whose mean loss is far above the best epoch's (finite, no NaN anywhere):
    exit 1 naming the epoch and both means, the previous epoch's checkpoint kept; the watch
    of a resumed run knows the logged epochs; --diverge-factor 0 turns it off."""
    import guard_fast.distill.squeeze as sq
    from guard_fast.runtime import DivergedError, DivergenceWatch, load_checkpoint

    real = sq._train_epoch

    def blows_up(cfg, epoch, *a, **k):
        m = real(cfg, epoch, *a, **k)
        return dict(m, train_loss=m["train_loss"] * (1e4 if epoch == 1 else 1))

    monkeypatch.setattr(sq, "_train_epoch", blows_up)
    out = tmp_path / "run"
    args = [*SQ, "--epochs", "3", "--out", str(out)]
    assert main(args) == 1
    err = capsys.readouterr().err
    assert "squeeze: the training loss diverged at epoch 2" in err and "best epoch mean" in err
    assert "Traceback" not in err and not (out / "teacher.pt").exists()
    assert load_checkpoint(out / "checkpoint.pt")["epoch"] == 0   # epoch 1's, kept
    assert main([*args, "--resume"]) == 1                          # the logged epoch 1 counts
    assert main([*args, "--resume", "--diverge-factor", "0"]) == 0
    assert (out / "teacher.pt").exists()
    w = DivergenceWatch("x", 10, [(1, 2.0), (2, 0.5)])
    w.check(3, 4.9)                     # below 10 x the best (0.5)
    with pytest.raises(DivergedError, match=r"epoch 4 .*epoch mean 6 .*10x the best epoch "
                                            r"mean 0\.5, epoch 2"):
        w.check(4, 6.0)
    DivergenceWatch("x", 0, [(1, 1e-9)]).check(2, 1e9)   # off


def test_nonfinite_weights_never_replace_a_checkpoint(tmp_path):
    from guard_fast.models import build_model

    net = build_model("convnet", 10, 3, (0.5,) * 3, (0.5,) * 3, image_size=32, width=8)
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    ck = tmp_path / "checkpoint.pt"
    save_training_state(ck, epoch=0, model=net, optimizer=opt)
    with torch.no_grad():
        next(net.parameters()).view(-1)[0] = float("inf")
    with pytest.raises(NonFiniteError, match="non-finite tensors=model.features.0.weight"):
        save_training_state(ck, epoch=1, model=net, optimizer=opt)
    assert load_checkpoint(ck)["epoch"] == 0


def test_nan_teacher_is_refused_when_loaded(tmp_path, capsys):
    t = _tiny_classifier(tmp_path / "teacher.pt", nan=True)
    with pytest.raises(NonFiniteError, match="teacher.pt.*NaN or Inf weights"):
        load_classifier(t)
    assert main(["recover", "--teacher", str(t), "--ipc", "1", "--iterations", "1",
                 "--out", str(tmp_path / "rc"), "--device", "cpu", "--no-progress"]) == 1
    assert "non-finite tensors" in capsys.readouterr().err


def test_nan_views_stop_the_student_before_its_checkpoint(tmp_path):
    from guard_fast.config import resolve_student
    from guard_fast.distill.student import train_student
    from guard_fast.models import build_model

    torch.manual_seed(0)
    teacher = build_model("convnet", 10, 3, (0.5,) * 3, (0.5,) * 3, image_size=32, width=8)
    images = torch.rand(20, 3, 32, 32)
    images[7] = float("nan")
    ds = {"images": images, "labels": torch.arange(20) % 10, "ipc_ids": torch.arange(20) // 10,
          "meta": {}}
    cfg = resolve_student(dict(model="convnet", model_options={"width": 8}, epochs=1,
                               batch_size=10, progress=False, out=str(tmp_path / "st")))
    with pytest.raises(NonFiniteError, match=r"student: non-finite values at epoch 1, step \d"):
        train_student(cfg, distilled=ds, teacher=teacher)
    assert not (tmp_path / "st" / "checkpoint.pt").exists()


# ------------------------------------------------------------------ a new user's findings
@pytest.mark.parametrize("args", [["all", "--protocol", "bogus"], ["all", "--eps", "nan"],
                                  ["all", "--eval-examples", "0"],
                                  ["evaluate", "--model", "m.pt", "--protocol", "bogus"],
                                  ["evaluate", "--model", "m.pt", "--eps", "nan"],
                                  ["evaluate", "--model", "m.pt", "--attacks", "PGD7"]])
def test_refused_command_leaves_no_folder(tmp_path, args, capsys):
    out = tmp_path / "out"
    assert main([*args, "--out", str(out)]) == 2
    assert "error:" in capsys.readouterr().err and not out.exists()


def test_evaluate_never_overwrites_another_runs_results(tmp_path, capsys):
    model = _tiny_classifier(tmp_path / "student.pt")
    pipe = tmp_path / "pipe"
    RunFolder(pipe, "pipeline", {"preset": "mnist"}).start()
    (pipe / "results.json").write_text('{"rows": []}')
    other = tmp_path / "other"
    other.mkdir()
    (other / "results.json").write_text('{"clean": 1}')
    for out, needle in ((pipe, "holds a pipeline run"), (other, "already holds a evaluate result")):
        before = (out / "results.json").read_text()
        assert main(["evaluate", "--model", str(model), "--n-examples", "2", "--out", str(out),
                     "--device", "cpu"]) == 2
        assert needle in capsys.readouterr().err
        assert (out / "results.json").read_text() == before


def test_stale_temps_removed_when_the_next_run_starts(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "parts").mkdir()
    stale = [out / ".checkpoint.pt.k1l2m3.tmp", out / "parts" / ".chunk0_ipc0.pt.ab12.tmp"]
    for p in stale:
        p.write_bytes(b"half a checkpoint")
        os.utime(p, (time.time() - 3600,) * 2)
    fresh = out / ".state_rank1.pt.zz99.tmp"  # a live rank of this job writes it now
    fresh.write_bytes(b"x")
    keep = out / "notes.tmp"
    keep.write_bytes(b"not ours")
    os.utime(keep, (time.time() - 3600,) * 2)
    RunFolder(out, "squeeze", {}).start()
    assert not any(p.exists() for p in stale) and fresh.exists() and keep.exists()


def test_moved_or_copied_folder_resumes(tmp_path, monkeypatch):
    cfg = lambda root: {"teacher": str(root / "sq" / "teacher.pt"), "out": str(root / "rc"),  # noqa
                        "data_root": "/data/elsewhere", "lr": 0.1}
    a = tmp_path / "a"
    RunFolder(a / "rc", "recover", cfg(a)).start()
    shutil.copytree(a, tmp_path / "b")
    shutil.move(str(a), str(tmp_path / "c"))
    for root in (tmp_path / "b", tmp_path / "c"):
        assert RunFolder(root / "rc", "recover", cfg(root), resume=True).check()["lr"] == 0.1
    with pytest.raises(ValueError, match=r"different settings for \['teacher'\]"):
        RunFolder(tmp_path / "b" / "rc", "recover",
                  dict(cfg(tmp_path / "b"), teacher=str(tmp_path / "x.pt")), resume=True).check()
    # relative spellings, run from another directory after the move
    monkeypatch.chdir(tmp_path)
    rel = {"teacher": "d/sq/teacher.pt", "out": "d/rc", "lr": 0.1}
    RunFolder("d/rc", "recover", rel).start()
    shutil.move("d", "e/f")
    monkeypatch.chdir(tmp_path / "e")
    assert RunFolder("f/rc", "recover", {"teacher": "f/sq/teacher.pt", "out": "f/rc", "lr": 0.1},
                     resume=True).check() is not None


def test_outputs_get_ordinary_file_modes(tmp_path):
    old = os.umask(0o022)
    try:
        atomic_write_bytes(tmp_path / "a.json", b"{}")
        assert (tmp_path / "a.json").stat().st_mode & 0o777 == 0o666 & ~rio._UMASK
    finally:
        os.umask(old)
    assert (tmp_path / "a.json").stat().st_mode & 0o077 != 0  # not private 0600


def test_finished_stage_times_are_kept_for_the_resumed_report(tmp_path):
    from guard_fast.pipeline.run import _MethodRun
    from guard_fast.config.pipeline import PipelineConfig

    m = _MethodRun("guard", PipelineConfig(out=str(tmp_path), device="cpu"), {}, tmp_path, print)
    m.timed("squeeze_s", lambda: None)
    # a kill now loses nothing: the rerun's row reads the squeeze time back
    assert "squeeze_s" in json.loads((tmp_path / "guard" / "times.json").read_text())


def test_stage_seconds_come_from_the_stage_folders(tmp_path):
    """A stage timed with its run folder reports the seconds its run.json holds over all
    attempts (a killed first part included); a stage found complete (a teacher trained by
    another method or table) still gets its seconds in the row."""
    from guard_fast.pipeline.run import _MethodRun
    from guard_fast.config.pipeline import PipelineConfig

    teachers = tmp_path / "teachers"
    m = _MethodRun("guard", PipelineConfig(out=str(tmp_path / "a"), device="cpu",
                                           teachers=str(teachers)), {}, tmp_path / "a", print)
    m.sq_dir.mkdir(parents=True)
    atomic_write_json(m.sq_dir / "run.json", {"status": "complete", "wall_seconds": 123.5})
    m.timed("squeeze_s", lambda: None, m.sq_dir)
    assert m.times["squeeze_s"] == 123.5
    other = _MethodRun("guard", PipelineConfig(out=str(tmp_path / "b"), device="cpu",
                                               teachers=str(teachers)), {}, tmp_path / "b", print)
    other.recorded("squeeze_s", other.sq_dir)      # the shared teacher's seconds
    other.recorded("student_s", other.st_dir)      # nothing recorded there: left out
    assert other.times == {"squeeze_s": 123.5}
    assert json.loads((tmp_path / "b" / "guard" / "times.json").read_text()) == {"squeeze_s": 123.5}


# ------------------------------------------------------------- kills: the driver, reduced
def test_kill_during_a_checkpoint_write_resumes_identical(tmp_path):
    """bench/fault_inject.py on squeeze with one chosen kill point: SIGKILL between the
    temporary file and the rename of epoch 1's checkpoint; the rerun (--resume) is not
    refused by a stale lock, removes the orphan temporary file, and ends bit for bit equal."""
    sys.path.insert(0, str(ROOT / "bench"))
    import fault_inject as fi

    st = fi.Stage("squeeze", SQ, ["teacher.pt"], True, "teacher.pt", "checkpoint.pt")
    st.chosen = lambda: ["kill-before-rename@1:checkpoint.pt"]
    s = fi.run_stage(st, tmp_path, 0, None, log=lambda *a, **k: None)
    assert (s["tried"], s["identical"], s["lost"]) == (1, 1, 0), s["points"]
    assert s["killed"] == 1 and s["orphan_temps_seen"] == 1 and s["stale_temps_after_rerun"] == 0
