"""The runtime layer: run-folder rules, the one classifier checkpoint format, device and
torchrun helpers, and that a run folder written before the layer existed still resumes."""
import json

import pytest
import torch

from guard_fast.runtime import (RunFolder, classifier_arch, distributed, flatten,
                                load_classifier, load_training_state, resolve_device,
                                save_classifier, save_training_state)


def _listing(p):
    return sorted((f.name, f.stat().st_mtime_ns) for f in p.iterdir()) if p.exists() else []


def test_run_folder_new_then_refusals(tmp_path):
    out = tmp_path / "run"
    cfg = {"lr": 0.1, "nested": {"a": 1, "b": [1, 2]}, "device": "cpu"}
    f = RunFolder(out, "squeeze", cfg, resume=False, resumable={"device"}, final="teacher.pt")
    assert f.check() is None and not out.exists()  # check writes nothing
    f.start()
    assert json.loads((out / "config.json").read_text())["stage"] == "squeeze"
    assert json.loads((out / "run.json").read_text())["status"] == "running"
    before = _listing(out)
    with pytest.raises(FileExistsError, match="already holds a squeeze run.*--resume"):
        RunFolder(out, "squeeze", cfg).check()
    with pytest.raises(FileExistsError, match="holds a squeeze run, not a recover run"):
        RunFolder(out, "recover", cfg, resume=True).check()
    other = dict(cfg, lr=0.2, nested={"a": 2, "b": [1, 2]}, device="cuda")
    with pytest.raises(ValueError, match=r"different squeeze run.*\['lr', 'nested.a'\]") as ei:
        RunFolder(out, "squeeze", other, resume=True, resumable={"device"}).check()
    assert "nothing was overwritten" in str(ei.value)
    assert _listing(out) == before
    # the same settings (tuples as lists, a resumable field changed) continue the run
    same = dict(cfg, nested={"a": 1, "b": (1, 2)}, device="cuda")
    assert RunFolder(out, "squeeze", same, resume=True, resumable={"device"}).check()["lr"] == 0.1
    assert RunFolder(out, "squeeze", same, resume="auto", resumable={"device"}).check() is not None
    f.complete(metrics={"acc": 1.0})
    run = json.loads((out / "run.json").read_text())
    assert run.pop("wall_seconds") >= 0
    assert run == {"status": "complete", "stage": "squeeze", "metrics": {"acc": 1.0}}


def test_run_folder_wall_seconds_add_up_over_attempts(tmp_path, monkeypatch):
    """run.json's wall_seconds: refreshed with each metrics row, so a killed attempt's time up
    to its last row is added to the resumed attempt's; recorded_seconds reads it back."""
    from guard_fast.runtime import runfolder as rf

    clock = [100.0]
    monkeypatch.setattr(rf.time, "monotonic", lambda: clock[0])
    out = tmp_path / "run"
    first = RunFolder(out, "squeeze", {"lr": 0.1})
    first.check()
    first.start()
    clock[0] += 7
    first.log({"epoch": 0})
    assert rf.recorded_seconds(out) == 7
    clock[0] += 50          # killed here: these 50 s after the last row are not counted
    again = RunFolder(out, "squeeze", {"lr": 0.1}, resume=True)
    again.check()
    again.start()
    clock[0] += 3
    again.complete()
    assert rf.recorded_seconds(out) == 10
    assert rf.recorded_seconds(tmp_path / "none") is None


def test_run_folder_resume_without_run_and_bare_artifact(tmp_path):
    with pytest.raises(FileNotFoundError, match="holds no run"):
        RunFolder(tmp_path / "none", "student", {}, resume=True).check()
    bare = tmp_path / "bare"
    bare.mkdir()
    (bare / "images.pt").write_bytes(b"x")
    with pytest.raises(FileExistsError, match="already holds a recover result"):
        RunFolder(bare, "recover", {}, final="images.pt").check()
    with pytest.raises(ValueError, match="resume must be"):
        RunFolder(bare, "recover", {}, resume="yes")


def test_run_folder_accepts_configs_from_before_the_stage_name(tmp_path):
    out = tmp_path / "old"
    out.mkdir()
    (out / "config.json").write_text(json.dumps({"lr": 0.1, "epochs": 2}))  # no "stage"
    assert RunFolder(out, "squeeze", {"lr": 0.1, "epochs": 2}, resume=True).check() == {
        "lr": 0.1, "epochs": 2}
    (out / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match="not readable JSON"):
        RunFolder(out, "squeeze", {}, resume=True).check()


def test_flatten_names_nested_settings():
    assert flatten({"a": {"b": {"c": 1}, "d": 2}, "e": {}}) == {"a.b.c": 1, "a.d": 2, "e": {}}


def test_classifier_checkpoint_keeps_model_options(tmp_path):
    from guard_fast.models import build_model

    torch.manual_seed(0)
    net = build_model("convnet", num_classes=3, in_channels=1, mean=(0.5,), std=(0.25,),
                      image_size=16, width=16, depth=2)
    arch = classifier_arch("convnet", 3, 1, 16, (0.5,), (0.25,), data="mnist",
                           options={"width": 16, "depth": 2})
    save_classifier(tmp_path / "m.pt", net, arch, {"acc": 0.5})
    back, arch2 = load_classifier(tmp_path / "m.pt")
    assert arch2["options"] == {"width": 16, "depth": 2}
    x = torch.rand(2, 1, 16, 16)
    net.eval(), back.eval()
    torch.testing.assert_close(back(x), net(x), rtol=0, atol=0)
    with pytest.raises(ValueError, match="different architecture"):
        load_classifier(tmp_path / "m.pt", arch_expected={"num_classes": 10})
    with pytest.raises(ValueError, match="arch is missing"):
        save_classifier(tmp_path / "bad.pt", net, {"model": "convnet"})
    torch.save({"weights": 1}, tmp_path / "foreign.pt")
    with pytest.raises(ValueError, match="not a guard_fast teacher or student"):
        load_classifier(tmp_path / "foreign.pt")


def test_training_state_round_trip(tmp_path):
    net = torch.nn.Linear(3, 2)
    opt = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)
    net(torch.ones(1, 3)).sum().backward()
    opt.step()
    save_training_state(tmp_path / "c.pt", epoch=4, model=net, optimizer=opt)
    net2 = torch.nn.Linear(3, 2)
    opt2 = torch.optim.SGD(net2.parameters(), lr=0.1, momentum=0.9)
    assert load_training_state(tmp_path / "c.pt", net2, opt2)["epoch"] == 4
    torch.testing.assert_close(net2.weight, net.weight)
    sched = torch.optim.lr_scheduler.LambdaLR(opt2, lambda s: 1.0)
    with pytest.raises(ValueError, match=r"missing \['scheduler'\]"):
        load_training_state(tmp_path / "c.pt", net2, opt2, sched)


def test_device_and_single_process_job():
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto").type in ("cpu", "cuda")
    with pytest.raises(ValueError, match="not a device"):
        resolve_device("tpu0")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="no CUDA GPU"):
            resolve_device("cuda")
    with distributed(torch.device("cpu")) as d:
        assert (d.rank, d.world, d.is_main, d.owns) == (0, 1, True, False)
        d.barrier()  # a no-op in one process


def test_squeeze_folder_from_before_the_runtime_layer_resumes(tmp_path):
    """A squeeze folder as earlier versions wrote it (config.json without the stage name,
    killed after its first epoch) is continued by --resume."""
    from guard_fast.config import resolve_squeeze
    from guard_fast.distill.squeeze import squeeze

    out = tmp_path / "sq"
    kw = dict(model="convnet", image_size=16, epochs=1, batch_size=32, max_train=64, max_val=32,
              regularizer="none", out=str(out), progress=False)
    squeeze(resolve_squeeze(kw))
    old = json.loads((out / "config.json").read_text())
    old.pop("stage")
    (out / "config.json").write_text(json.dumps(old))
    (out / "teacher.pt").unlink()
    (out / "run.json").write_text(json.dumps({"status": "running", "stage": "squeeze"}))
    m = squeeze(resolve_squeeze(dict(kw, epochs=2, resume=True)))
    assert m["epoch"] == 2
    rows = [json.loads(r) for r in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2]
    assert json.loads((out / "run.json").read_text())["status"] == "complete"
    load_classifier(out / "teacher.pt")
