"""End to end: the no-argument pipeline in its smoke form produces every artifact and
resumes; the stage CLI chain (squeeze -> recover -> relabel -> evaluate) works from run
folders; the paper's experiments run in their smoke form; bad input names the problem."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from guard_fast.pipeline import PipelineConfig, render_report, run_experiment, run_pipeline
from guard_fast.train import main

ROOT = Path(__file__).resolve().parents[1]


# One intra-op thread per subprocess, as in test_squeeze: the smoke batches are a few images,
# and more threads only oversubscribe the small shared CI machine (torchrun: two processes).
_ENV = dict(os.environ, OMP_NUM_THREADS="1")


def _cli(*args, timeout=900):
    return subprocess.run([sys.executable, "-m", "guard_fast.train", *args], capture_output=True,
                          text=True, timeout=timeout, env=_ENV)


@pytest.fixture(scope="module")
def teachers(tmp_path_factory):
    """Squeeze runs shared by the pipeline and experiment tests (trained once)."""
    return tmp_path_factory.mktemp("teachers")


def test_no_argument_pipeline_smoke_writes_every_artifact_and_resumes(tmp_path, capsys):
    out = tmp_path / "pipe"
    r = _cli("all", "--smoke", "--out", str(out), "--no-progress")
    assert r.returncode == 0, r.stderr[-3000:]
    for f in ("config.json", "results.md", "results.json", "eps_sweep.png", "grid_sre2l.png",
              "grid_guard.png", "run.json"):
        assert (out / f).stat().st_size > 0, f
    for m in ("sre2l", "guard"):
        for f in ("squeeze/teacher.pt", "recover/images.pt", "recover/grid.png",
                  "relabel/summary.json", "student/student.pt", "eval/results.json",
                  "eval/table.md", "eps_sweep.json"):
            assert (out / m / f).exists(), f"{m}/{f}"
    s = json.loads((out / "results.json").read_text())
    assert [r["name"] for r in s["rows"]] == ["SRe2L", "GUARD"]
    table = (out / "results.md").read_text()
    assert "| SRe2L |" in table and "| GUARD |" in table and "PGD100" in table and "MIM" in table
    for row in s["rows"]:
        res = row["result"]
        assert 0 <= res["clean"]["acc"] <= 100
        for a in res["attacks"].values():
            assert a["acc"] <= res["clean"]["acc"] + 1e-9 or res["protocol"] == "paper-code"
        # the smoke sweep's one point (2/255) and the main eps (8/255)
        assert [round(e["eps_255"]) for e in row["sweep"]["sweep"]] == [2, 8]
    # rerunning continues (every stage is complete: nothing retrained) and the table stays
    before = (out / "guard" / "student" / "student.pt").stat().st_mtime_ns
    # (the follow-up commands run in this process: the CLI's entry point, one start-up less each)
    assert main(["all", "--smoke", "--out", str(out), "--no-progress"]) == 0
    assert (out / "guard" / "student" / "student.pt").stat().st_mtime_ns == before
    # report re-renders from results.json
    (out / "results.md").unlink()
    (out / "eps_sweep.png").unlink()
    assert main(["report", str(out)]) == 0
    assert (out / "results.md").exists() and (out / "eps_sweep.png").exists()
    # the methods may change when a run is continued (each has its own folders): a subset
    # is tabled from what is there, nothing retrained
    assert main(["all", "--smoke", "--out", str(out), "--methods", "sre2l", "--no-progress"]) == 0
    assert [r["name"] for r in json.loads((out / "results.json").read_text())["rows"]] == ["SRe2L"]
    assert (out / "guard" / "student" / "student.pt").stat().st_mtime_ns == before
    # a different pipeline in the same folder is refused, naming the setting
    capsys.readouterr()
    assert main(["all", "--smoke", "--out", str(out), "--ipc", "3", "--no-progress"]) == 2
    assert "ipc" in capsys.readouterr().err


def test_dc_through_the_recover_stage(tmp_path, monkeypatch):
    """`recover --method dc` reaches the DC stage with the CLI's settings and writes a
    distilled set. The wiring is what is tested here (test_dc tests DC itself), so DC's
    network and real batch are shrunk under the flags (its full size costs ~20 s a step)."""
    from guard_fast import config as C

    seen = []

    def small_dc(**kw):
        seen.append(kw)
        return C.dc.DCConfig(**kw, width=16, batch_real=16, image_size=16)

    monkeypatch.setattr(C, "DCConfig", small_dc)
    out = tmp_path / "dc"
    assert main(["recover", "--method", "dc", "--ipc", "1", "--iterations", "1", "--out",
                 str(out), "--no-progress", "--regularizer", "guard"]) == 0
    assert seen and seen[0]["ipc"] == 1 and seen[0]["iterations"] == 1
    assert seen[0]["regularizer"] == "guard" and seen[0]["out"] == str(out)
    assert (out / "images.pt").exists() and (out / "grid.png").exists()


@pytest.mark.parametrize("name", ["table1", "table3", "table5"])   # table2: below
def test_experiments_smoke(name, tmp_path, teachers, single_thread):
    """Each named experiment end to end in its smoke form (teachers shared between them).
    One validation image per evaluation: these tests check which runs and rows each
    experiment makes (the smoke CLI test above evaluates the smoke setting's own images)."""
    cfg = PipelineConfig(smoke=True, progress=False, teachers=str(teachers), eval_examples=1)
    text = run_experiment(name, cfg, out=str(tmp_path / name), log=lambda *a: None)
    assert (tmp_path / name / "results.md").read_text() == text
    rows = json.loads((tmp_path / name / "results.json").read_text())["rows"]
    expect = {"table1": 6, "table3": 3, "table5": 6}[name]
    assert len(rows) == expect, [r.get("name") for r in rows]
    if name == "table5":
        assert "DC + GUARD" in text and "CDA" in text
    if name == "table1":
        assert "Real subset (SRe2L teacher)" in text and "official-cifar" in text
        assert "Teacher PGD100" in text


def test_table2_trajectory_rows_are_paired_with_sre2l_and_guard(tmp_path, teachers,
                                                                 single_thread):
    """Table 2 end to end in its smoke form with 2 seeds. Its trajectory rows are tabled
    beside the same IPC's SRe2L and GUARD rows with paired differences to both;
    --experiment table2-trajectory on table2's --out reruns nothing and writes the same
    tables to <out>/trajectory/; the trajectory part without table2's rows is tabled on
    its own."""
    cfg = PipelineConfig(smoke=True, progress=False, teachers=str(teachers / "s2"),
                         eval_examples=2, attack_examples=1, seeds=2)
    out = tmp_path / "t2"
    text = run_experiment("table2", cfg, out=str(out), log=lambda *a: None)
    assert (out / "results.md").read_text() == text
    rows = json.loads((out / "results.json").read_text())["rows"]
    assert [r["name"] for r in rows] == [   # SRe2L, the two GUARD modes, the trajectory rows
        "SRe2L (IPC 1)", "GUARD (IPC 1)", "GUARD (guard_mode=official-cifar) (IPC 1)",
        "MTT (IPC 1)", "TESLA (IPC 1)", "MTT + GUARD experts (IPC 1)"]
    traj = text[text.index("## Trajectory matching"):]
    for diff in ("Difference to SRe2L", "Difference to GUARD"):
        block = traj[traj.index(diff):].split("\n\n")[1]
        assert "| MTT |" in block and "| TESLA |" in block and "| MTT + GUARD experts |" in block
    assert traj.count("| SRe2L |") == 2     # in the mean table and in the GUARD differences
    seen = []
    alone = run_experiment("table2-trajectory", cfg, out=str(out), log=seen.append)
    assert not any("experts (regularizer" in str(x) for x in seen), "a complete run reran"
    assert (out / "trajectory" / "results.md").read_text() == alone
    assert alone.split("## Trajectory matching")[1] == text.split("## Trajectory matching")[1]
    rows = json.loads((out / "trajectory" / "results.json").read_text())["rows"]
    assert [r["name"] for r in rows] == ["MTT (IPC 1)", "TESLA (IPC 1)",
                                         "MTT + GUARD experts (IPC 1)"]
    lone = run_experiment("table2-trajectory", cfg, out=str(tmp_path / "lone"),
                          log=lambda *a: None)
    assert "| MTT |" in lone and "| SRe2L |" not in lone and "Difference to" not in lone


def test_table2_ipc_option_selects_one_ipc():
    from guard_fast.pipeline.experiments import table2_ipcs

    assert table2_ipcs(PipelineConfig(preset="mnist")) == (10, 50)
    assert table2_ipcs(PipelineConfig(preset="mnist", ipc=50)) == (50,)
    assert table2_ipcs(PipelineConfig(smoke=True, ipc=50)) == (1,)


def test_table4_is_the_squeeze_cost_bench(tmp_path, capsys):
    """Table 4 (squeeze cost per regularizer) is measured by bench/bench_table4.py, which
    writes the table and one row per regularizer; `--experiment table4` names that command."""
    assert main(["all", "--experiment", "table4", "--out", str(tmp_path / "x")]) == 2
    assert "bench/bench_table4.py" in capsys.readouterr().err
    out = tmp_path / "table4"
    r = subprocess.run([sys.executable, str(ROOT / "bench" / "bench_table4.py"), "--smoke",
                        "--device", "cpu", "--out", str(out), "--results-dir", str(tmp_path)],
                       capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    text = (out / "results.md").read_text()
    assert text in r.stdout
    rows = json.loads((out / "results.json").read_text())["rows"]
    assert len(rows) == 5, [r.get("regularizer") for r in rows]
    # measured numbers only; the comparison is the bench's, not a test's
    assert all(r["s_per_iteration"] > 0 and r["peak_mem_mb"] > 0 for r in rows), rows
    assert len((tmp_path / "table4.jsonl").read_text().splitlines()) == 5


# ----------------------------------------------------------------------------- bad input
def test_bad_input_names_the_problem(tmp_path, capsys):
    # an experiment's rows are fixed: --methods with --experiment is refused, not ignored
    assert main(["all", "--experiment", "table1", "--methods", "sre2l", "--smoke",
                 "--out", str(tmp_path / "t1")]) == 2
    assert "--methods does not apply to --experiment table1" in capsys.readouterr().err
    assert not (tmp_path / "t1").exists()
    # table5 sets the recover method of its rows itself (SRe2L and CDA)
    assert main(["all", "--experiment", "table5", "--recover-method", "cda", "--smoke",
                 "--out", str(tmp_path / "t5")]) == 2
    assert "--recover-method does not apply to --experiment table5" in capsys.readouterr().err
    assert not (tmp_path / "t5").exists()
    assert main(["relabel", "--distilled", str(tmp_path / "nothing"), "--out",
                 str(tmp_path / "rl")]) == 2
    assert "run the recover" in capsys.readouterr().err
    assert main(["recover", "--teacher", str(tmp_path), "--out", str(tmp_path / "r")]) == 2
    assert "squeeze" in capsys.readouterr().err
    assert main(["all", "--preset", "imagenette", "--out", str(tmp_path / "p")]) == 2
    assert "--data" in capsys.readouterr().err
    import torch

    if not torch.cuda.is_available():
        assert main(["all", "--device", "cuda", "--out", str(tmp_path / "p2")]) == 2
        assert "no CUDA" in capsys.readouterr().err
    assert main(["report", str(tmp_path)]) == 2
    assert "no results.json" in capsys.readouterr().err
    assert main(["all", "--experiment", "table9", "--out", str(tmp_path / "x")]) == 2
    assert "unknown experiment" in capsys.readouterr().err
    assert main(["evaluate", "--out", str(tmp_path / "e")]) == 2
    assert "--model" in capsys.readouterr().err
    with pytest.raises(ValueError, match="unknown method"):
        run_pipeline(PipelineConfig(methods=("sre2l", "magic"), out=str(tmp_path / "m")))
    with pytest.raises(FileNotFoundError, match="no results.json"):
        render_report(tmp_path)


def test_method_spec_with_teacher_settings():
    """Methods carry teacher settings as :key=value pairs (typed by SqueezeConfig), get their
    own folders and labels; malformed ones are refused with the offending part named."""
    from guard_fast.pipeline import method_spec

    assert method_spec("guard") == ("guard", "GUARD", {"regularizer": "guard"})
    assert method_spec("gr:0.01")[2] == {"regularizer": "gr", "gr_lam": 0.01}
    folder, label, over = method_spec("sre2l:epochs=3:max_train=4000")
    assert folder == "sre2l_epochs3_max_train4000" and label == "SRe2L (epochs=3, max_train=4000)"
    assert over == {"regularizer": "none", "epochs": 3, "max_train": 4000}
    assert method_spec("guard:lam=10:h_space=pixel")[2] == {"regularizer": "guard", "lam": 10.0,
                                                            "h_space": "pixel"}
    for bad, msg in (("guard:lam", "not key=value"), ("guard:foo=1", "not key=value"),
                     ("guard:regularizer=gr", "not key=value"), ("guard:lam=x", "not a valid float"),
                     ("nope:lam=1", "unknown method"), ("gr:abc", "needs a number")):
        with pytest.raises(ValueError, match=msg):
            method_spec(bad)


def test_whole_pipeline_under_torchrun(tmp_path):
    """`python -m guard_fast.train all` under torchrun (2 gloo processes): every stage shares
    its work out, rank 0 alone evaluates, logs and writes the report; the run completes with
    every artifact. One validation image: what is tested is who evaluates, not the attacks."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = tmp_path / "ddp"
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
                        f"--master_port={port}", "-m", "guard_fast.train", "all", "--smoke",
                        "--methods", "sre2l", "--device", "cpu", "--no-progress",
                        "--eval-examples", "1", "--out", str(out)], capture_output=True,
                       text=True, timeout=900, env=_ENV)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert r.stdout.count("robust evaluation") == 1, r.stdout[-3000:]   # rank 0 only
    js = json.loads((out / "results.json").read_text())
    assert [row["method"] for row in js["rows"]] == ["sre2l"]
    for f in ("results.md", "grid_sre2l.png", "eps_sweep.png", "sre2l/eval/results.json",
              "sre2l/student/student.pt"):
        assert (out / f).exists(), f
    assert json.loads((out / "run.json").read_text())["status"] == "complete"
