"""Kills at any moment: SIGKILL each stage at chosen and random moments, rerun the same
command, and compare the final artifacts with an uninterrupted run.

    python bench/fault_inject.py                       # every stage, 2 random kills each
    python bench/fault_inject.py --stages squeeze,recover --random 2 --out /tmp/fi

Stages, on tiny settings (the bundled digits, CPU): squeeze, recover, dc (recover --method
dc), relabel, student, evaluate (--model), experts (MTT's buffer), mtt (distillation from
that buffer), all (the whole pipeline, --smoke, one method).
The uninterrupted reference run of each stage is also the input of the next (its teacher,
distilled set, soft labels, student).

Kill points:
  chosen  via GUARD_FAST_FAULT (guard_fast.runtime.io): during a checkpoint write (after the
          temporary file is written, before the rename), right after a checkpoint or a
          stage's final artifact is renamed into place (between epochs / between stages),
          right after config.json (the run has just started), and during the final write;
  random  SIGKILL from outside after a delay drawn uniformly in (0, the reference run's
          wall time): mid-step, mid-epoch, during start-up, anywhere.
A kill point whose trigger never comes (the run ends first) is counted as tried and its run
compared like the others.

The rerun is the same command, with --resume where the stage takes it (squeeze, recover,
dc, student) and the killed run had written its config.json, as a user would rerun it;
relabel, evaluate and all continue on their own.

Comparison: every tensor bit for bit (torch.equal) and every number exactly, except keys
that are timings (seconds, *_s, *_ms, *per_s, time); strings (paths, which differ between the
folders) are not compared. All of these stages are deterministic on the CPU, so the
documented tolerance is zero. "lost" counts reruns that failed or whose artifacts are
missing; "differ" those whose artifacts are not identical; "stale temps" counts temporary
files of atomic writes still present after the rerun (they must be removed on resume).

Prints, per stage: "kill points tried N, resumed identical M, lost L" (and differ D), and
appends a row to bench/results/fault_inject.jsonl.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

_TIME_KEYS = ("seconds", "time", "per_s", "_s", "_ms", "elapsed")


def _is_time_key(k: str) -> bool:
    k = str(k)
    return any(k == t or k.endswith(t) for t in _TIME_KEYS) or "seconds" in k


def differences(a, b, where: str = "") -> list[str]:
    """Where a and b differ: tensors bit for bit, numbers exactly, timing keys and strings
    skipped (see the module docstring)."""
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        if not (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor)):
            return [where]
        same = a.shape == b.shape and a.dtype == b.dtype and (torch.equal(a, b) or (
            a.is_floating_point() and bool(((a == b) | (a.isnan() & b.isnan())).all())))
        return [] if same else [where]
    if isinstance(a, dict) and isinstance(b, dict):
        out = []
        for k in set(a) | set(b):
            if _is_time_key(k):
                continue
            if k not in a or k not in b:
                out.append(f"{where}.{k} (missing)")
            else:
                out += differences(a[k], b[k], f"{where}.{k}")
        return out
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        if len(a) != len(b):
            return [f"{where} (length)"]
        return [d for i, (x, y) in enumerate(zip(a, b)) for d in differences(x, y, f"{where}[{i}]")]
    if isinstance(a, bool) or isinstance(b, bool):
        return [] if a == b else [where]
    if isinstance(a, (int, float)) and isinstance(b, (int, float)):
        if isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b):
            return []
        return [] if a == b else [where]
    return []  # strings (paths), None


def load_artifact(path: Path):
    if path.suffix == ".json":
        return json.loads(path.read_text())
    return torch.load(path, map_location="cpu", weights_only=True)


def _ckpt_glob(stage: str) -> str:
    return {"recover": "state_rank*.pt", "relabel": "epoch_*.pt"}.get(stage, "checkpoint.pt")


class Stage:
    """One stage's command, its artifacts and its chosen kill points."""

    def __init__(self, name: str, args: list[str], artifacts: list[str], resume_flag: bool,
                 final: str, ckpt: str | None):
        self.name, self.args, self.artifacts = name, args, artifacts
        self.resume_flag, self.final, self.ckpt = resume_flag, final, ckpt

    def chosen(self) -> list[str]:
        pts = ["kill-after-rename@1:config.json"]
        if self.ckpt:
            pts += [f"kill-before-rename@1:{self.ckpt}", f"kill-after-rename@1:{self.ckpt}",
                    f"kill-before-rename@2:{self.ckpt}"]
        if self.name == "all":  # between stages of the pipeline, and its last write
            pts += ["kill-after-rename@1:teacher.pt", "kill-after-rename@1:images.pt",
                    "kill-after-rename@1:student.pt", "kill-before-rename@2:results.json"]
        else:
            pts += [f"kill-before-rename@1:{self.final}"]
        return pts

    def files(self, out: Path) -> list[Path]:
        got = []
        for a in self.artifacts:
            got += sorted(out.glob(a)) if any(c in a for c in "*?[") else [out / a]
        return got


def build_stages(root: Path) -> list[Stage]:
    """The stages in order; each reads the reference run of the one before."""
    ref = lambda s: str(root / s / "ref")  # noqa: E731
    cpu = ["--device", "cpu"]
    return [
        Stage("squeeze", ["squeeze", "--max-train", "32", "--max-val", "8", "--batch-size", "16",
                          "--epochs", "3", "--seed", "3", "--no-progress", *cpu],
              ["teacher.pt"], True, "teacher.pt", "checkpoint.pt"),
        Stage("recover", ["recover", "--teacher", ref("squeeze"), "--ipc", "2", "--iterations",
                          "6", "--save-every", "2", "--group-size", "1", "--no-progress", *cpu],
              ["images.pt"], True, "images.pt", "state_rank*.pt"),
        Stage("dc", ["recover", "--method", "dc", "--ipc", "1", "--iterations", "3",
                     "--no-progress", *cpu], ["images.pt"], True, "images.pt", "checkpoint.pt"),
        Stage("relabel", ["relabel", "--teacher", ref("squeeze"), "--distilled", ref("recover"),
                          "--epochs", "4", "--batch-size", "5", *cpu],
              ["epoch_*.pt"], False, "summary.json", "epoch_*.pt"),
        Stage("student", ["student", "--preset", "mnist", "--distilled", ref("recover"),
                          "--soft-labels", ref("relabel"), "--epochs", "4", "--batch-size", "5",
                          "--no-progress", *cpu],
              ["student.pt"], True, "student.pt", "checkpoint.pt"),
        Stage("evaluate", ["evaluate", "--model", str(Path(ref("student")) / "student.pt"),
                           "--n-examples", "8", "--attacks", "PGD100,MIM", "--eps", "8/255",
                           *cpu], ["results.json"], False, "results.json", None),
        Stage("experts", ["experts", "--preset", "mnist", "--num-experts", "2", "--epochs", "3",
                          "--max-train", "64", "--width", "4", "--batch-train", "16",
                          "--no-progress", *cpu],
              ["expert_*.pt", "buffer.json"], True, "buffer.json", "expert_001.pt"),
        Stage("mtt", ["mtt", "--preset", "mnist", "--buffer", ref("experts"), "--width", "4",
                      "--ipc", "1", "--iterations", "4", "--checkpoint-every", "1",
                      "--syn-steps", "2", "--expert-epochs", "1", "--max-start-epoch", "2",
                      "--eval-models", "1", "--eval-epochs", "2", "--no-progress", *cpu],
              ["images.pt", "synthetic.pt"], True, "images.pt", "checkpoint.pt"),
        Stage("all", ["all", "--smoke", "--methods", "guard", "--no-progress", *cpu],
              ["results.json", "*/squeeze/teacher.pt", "*/recover/images.pt",
               "*/relabel/epoch_*.pt", "*/student/student.pt", "*/eps_sweep.json"],
              False, "results.json", None),
    ]


def _env(fault: str | None) -> dict:
    e = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT) + os.pathsep
             + os.environ.get("PYTHONPATH", ""))
    e.pop("GUARD_FAST_FAULT", None)
    if fault:
        e["GUARD_FAST_FAULT"] = fault
    return e


def run(args: list[str], out: Path, fault: str | None = None, kill_after: float | None = None,
        timeout: float = 1800) -> tuple[int, float, str]:
    """(exit status, seconds, stderr tail) of python -m guard_fast.train ARGS --out OUT."""
    cmd = [sys.executable, "-m", "guard_fast.train", *args, "--out", str(out)]
    t0 = time.perf_counter()
    with tempfile.TemporaryFile() as err:
        p = subprocess.Popen(cmd, cwd=ROOT, env=_env(fault), stdout=subprocess.DEVNULL,
                             stderr=err)
        try:
            p.wait(timeout=kill_after if kill_after is not None else timeout)
        except subprocess.TimeoutExpired:
            if kill_after is None:
                p.kill()
                p.wait()
                raise
            p.send_signal(signal.SIGKILL)
            p.wait()
        err.seek(0)
        tail = err.read().decode(errors="replace")[-1500:]
    return p.returncode, time.perf_counter() - t0, tail


def temps(out: Path) -> list[Path]:
    return [p for p in out.rglob(".*.tmp")] if out.exists() else []


def try_point(st: Stage, out: Path, ref_files: dict, fault: str | None,
              kill_after: float | None) -> dict:
    """Kill one run at the point, rerun it, compare. Returns the point's record."""
    rc1, s1, _ = run(st.args, out, fault=fault, kill_after=kill_after)
    killed = rc1 == -signal.SIGKILL
    orphans = len(temps(out))
    again = st.args + (["--resume"] if st.resume_flag and (out / "config.json").exists() else [])
    rc2, s2, err2 = run(again, out)
    rec = {"point": fault or f"random {kill_after:.1f}s", "killed": killed, "rc_first": rc1,
           "rc_rerun": rc2, "temps_after_kill": orphans, "temps_after_rerun": len(temps(out))}
    if rc2 != 0:
        rec.update(outcome="lost", why=err2[-400:])
        return rec
    diffs = []
    files = st.files(out)
    if sorted(p.relative_to(out) for p in files) != sorted(ref_files):
        rec.update(outcome="lost", why=f"artifacts {sorted(map(str, ref_files))} expected, "
                   f"found {sorted(str(p.relative_to(out)) for p in files)}")
        return rec
    for rel, want in ref_files.items():
        diffs += differences(want, load_artifact(out / rel), str(rel))
    rec.update(outcome="identical" if not diffs else "differ", diffs=diffs[:5])
    return rec


def run_stage(st: Stage, root: Path, n_random: int, rng: random.Random, log=print) -> dict:
    """The reference run, then every chosen and n_random random kill points."""
    base = root / st.name
    rc, secs, err = run(st.args, base / "ref")
    if rc != 0:
        raise RuntimeError(f"{st.name}: the reference run failed ({rc}):\n{err}")
    ref_files = {p.relative_to(base / "ref"): load_artifact(p) for p in st.files(base / "ref")}
    points = [(f, None) for f in st.chosen()] + [(None, rng.uniform(0.0, secs))
                                                 for _ in range(n_random)]
    recs = []
    for i, (fault, delay) in enumerate(points):
        rec = try_point(st, base / f"kill{i:02d}", ref_files, fault, delay)
        recs.append(rec)
        with open(root / "points.jsonl", "a") as f:  # figures survive an interrupted run
            f.write(json.dumps({"stage": st.name, **rec}) + "\n")
        log(f"  {st.name} {rec['point']}: killed={rec['killed']} -> {rec['outcome']}"
            + (f" {rec.get('why', rec.get('diffs'))}" if rec["outcome"] != "identical" else ""),
            flush=True)
    n = len(recs)
    summary = {"stage": st.name, "tried": n, "killed": sum(r["killed"] for r in recs),
               "identical": sum(r["outcome"] == "identical" for r in recs),
               "differ": sum(r["outcome"] == "differ" for r in recs),
               "lost": sum(r["outcome"] == "lost" for r in recs),
               "orphan_temps_seen": sum(r["temps_after_kill"] > 0 for r in recs),
               "stale_temps_after_rerun": sum(r["temps_after_rerun"] for r in recs),
               "reference_s": round(secs, 1), "points": recs}
    log(f"{st.name}: kill points tried {n}, resumed identical {summary['identical']}, "
        f"lost {summary['lost']} (differ {summary['differ']}; killed before the end "
        f"{summary['killed']}; orphan temps seen after the kill {summary['orphan_temps_seen']}, "
        f"left after the rerun {summary['stale_temps_after_rerun']})", flush=True)
    return summary


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--stages",
                    default="squeeze,recover,dc,relabel,student,evaluate,experts,mtt,all")
    ap.add_argument("--random", type=int, default=2, help="random kill points per stage")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=None, help="scratch folder (default: a temporary one)")
    ap.add_argument("--no-record", action="store_true", help="do not append to bench/results")
    a = ap.parse_args(argv)
    names = a.stages.split(",")
    root = Path(a.out or tempfile.mkdtemp(prefix="fault_inject_"))
    stages = {s.name: s for s in build_stages(root)}
    unknown = [n for n in names if n not in stages]
    if unknown:
        ap.error(f"unknown stages {unknown}; known: {', '.join(stages)}")
    order = [s for s in stages if s in names]
    need = {"recover": ["squeeze"], "dc": [], "relabel": ["squeeze", "recover"],
            "student": ["squeeze", "recover", "relabel"],
            "evaluate": ["squeeze", "recover", "relabel", "student"], "mtt": ["experts"]}
    rng = random.Random(a.seed)
    t0 = time.perf_counter()
    results = []
    for name in order:
        for dep in need.get(name, []):  # inputs: the reference run of an earlier stage
            if not (root / dep / "ref" / stages[dep].final).exists():
                rc, _, err = run(stages[dep].args, root / dep / "ref")
                if rc != 0:
                    raise RuntimeError(f"{dep} (input of {name}) failed:\n{err}")
        results.append(run_stage(stages[name], root, a.random, rng))
    total = {k: sum(r[k] for r in results) for k in ("tried", "identical", "differ", "lost")}
    print(f"all stages: kill points tried {total['tried']}, resumed identical "
          f"{total['identical']}, lost {total['lost']} (differ {total['differ']}) in "
          f"{time.perf_counter() - t0:.0f} s; scratch folder {root}")
    if not a.no_record:
        from harness import append_result

        append_result("fault_inject", {"random_per_stage": a.random,
                                       "seed": a.seed, "stages": [
                                           {k: v for k, v in r.items() if k != "points"}
                                           for r in results], "total": total})
    return 0 if total["lost"] == 0 and total["differ"] == 0 else 1


if __name__ == "__main__":
    raise SystemExit(main())
