"""Running the pipeline: for each method squeeze -> recover -> relabel -> student -> robust
evaluation -> PGD eps sweep, then the run's summary and report.

Run folder (cfg.out):
  config.json                 the pipeline settings (a different run there is refused)
  <method>/squeeze/           teacher.pt and its run files   (guard_fast.distill.squeeze)
  <method>/recover/           images.pt, images/, grid.png   (guard_fast.distill.recover)
  <method>/relabel/           stored views and soft labels   (guard_fast.distill.relabel)
  <method>/student/           student.pt                     (guard_fast.distill.student)
  <method>/eval/              results.json, table.md         (guard_fast.evaluate)
  <method>/eps_sweep.json     PGD accuracy per eps
  <method>/times.json         seconds per stage
  results.md, results.json    the table (markdown and JSON), with timings per stage
  grid_<method>.png           the distilled sets
  eps_sweep.png               PGD-100 accuracy vs eps, one line per method
  run.json                    status

Every stage skips work whose final file exists and resumes a stage that was interrupted, so
rerunning the same command after a kill continues where it stopped.
"""
from __future__ import annotations

import json
import time

import numpy as np
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from guard_fast.attacks.protocols import Protocol, get_protocol
from guard_fast.config.pipeline import RESUMABLE, PipelineConfig, resolve_settings
from guard_fast.config.methods import method_spec, split_control
from guard_fast.runtime import (RunFolder, atomic_write_bytes, atomic_write_json, barrier,
                                dist_env, distributed, load_classifier, recorded_seconds,
                                resolve_device)

__all__ = ["run_pipeline", "run_method", "eval_protocol", "check_run_folder", "seed_runs",
           "seeded_rows", "REFERENCE_METHOD"]


# the method every other is compared with, paired by seed
REFERENCE_METHOD = "sre2l"
# offset of the control's draw from the run seed (independent of the other seeded streams)
_REAL_SEED_OFFSET = 54321


def _quiet(*args, **kwargs) -> None:
    pass


def eval_protocol(name: str, square_queries: int | None) -> Protocol:
    """The evaluation protocol `name`, with Square's query budget (alone and inside
    AutoAttack) set to square_queries when given; every other setting is the protocol's."""
    prot = get_protocol(name)
    if square_queries is None:
        return prot
    q = int(square_queries)
    return prot.with_settings(Square={"n_queries": q}, AutoAttack={"square_queries": q})


def check_run_folder(out: Path, cfg: PipelineConfig) -> RunFolder:
    """The pipeline's run folder, checked: another stage's run there is refused, and so is a
    pipeline run with different settings (naming them); the same settings continue it."""
    folder = RunFolder(out, "pipeline", asdict(cfg), resume="auto", resumable=RESUMABLE,
                       defaults=asdict(PipelineConfig()))
    folder.check()
    return folder


def _stage_resume(folder: Path, final: str) -> bool | None:
    """None: the stage is complete (skip); True: a run exists there (resume it); False: new."""
    if (folder / final).exists():
        return None
    return (folder / "config.json").exists()


@dataclass
class _MethodRun:
    """One method's run inside a pipeline: its folders, settings and stage seconds."""

    name: str
    cfg: PipelineConfig
    p: dict
    out: Path
    log: object
    times: dict = field(default_factory=dict)

    def __post_init__(self):
        self.folder, self.label, self.sq_over = method_spec(self.name)
        self.control, teacher_method = split_control(self.name)
        self.root = self.out / self.folder
        # squeeze runs in the shared teachers folder when one is given; a control uses the
        # squeeze folder of its teacher method
        t_folder = method_spec(teacher_method)[0]
        self.sq_dir = Path(self.cfg.teachers or self.out) / t_folder / "squeeze"
        self.rc_dir, self.rl_dir = self.root / "recover", self.root / "relabel"
        self.st_dir, self.ev_dir = self.root / "student", self.root / "eval"
        self.teacher_pt = self.sq_dir / "teacher.pt"
        self.device = resolve_device(self.cfg.device)

    def timed(self, key: str, fn, folder: Path | None = None):
        """fn(), its seconds kept in times.json as soon as it ends (rank 0), so a stage
        finished before a kill keeps its time in the report of the resumed run. With the
        stage's run folder: the seconds its run.json records over all attempts (a stage
        killed and resumed counts both parts), else the seconds of this call."""
        t0 = time.perf_counter()
        r = fn()
        took = recorded_seconds(folder) if folder is not None else None
        self._keep(key, round(time.perf_counter() - t0, 2) if took is None else took)
        return r

    def recorded(self, key: str, folder: Path) -> None:
        """A stage found complete: its seconds from its run folder (e.g. a teacher trained by
        another method or table sharing it), when recorded there."""
        took = recorded_seconds(folder)
        if took is not None:
            self._keep(key, took)

    def _keep(self, key: str, seconds: float) -> None:
        self.times[key] = seconds
        if dist_env()[0] == 0:
            tf = self.root / "times.json"
            atomic_write_json(tf, {**(json.loads(tf.read_text()) if tf.exists() else {}),
                                   key: self.times[key]})

    def common(self) -> dict:
        """The settings every stage of this run shares."""
        return {"device": self.cfg.device, "seed": self.cfg.seed, "progress": self.cfg.progress}


# ----------------------------------------------------------------------------- stages
def _squeeze_stage(m: _MethodRun) -> None:
    from guard_fast.config import resolve_squeeze
    from guard_fast.distill.squeeze import squeeze

    state = _stage_resume(m.sq_dir, "teacher.pt")
    if state is None:
        return m.recorded("squeeze_s", m.sq_dir)
    m.log(f"[{m.label}] squeeze (teacher: {m.sq_over['regularizer']})")
    scfg = resolve_squeeze({"preset": m.cfg.preset, "data_root": m.cfg.data_root,
                            "on_corrupt": m.cfg.on_corrupt,
                            **m.p["squeeze"], **m.sq_over, "out": str(m.sq_dir),
                            **m.common(), "resume": state})
    m.timed("squeeze_s", lambda: squeeze(scfg), m.sq_dir)


def _real_subset_stage(m: _MethodRun) -> None:
    """The control's "recover": IPC real training images per class (un-augmented), drawn by
    the run's seed, saved as a distilled set; run.json holds the teacher's accuracy on them."""
    import torch

    from guard_fast.data import get_data
    from guard_fast.data.distilled import save_distilled
    from guard_fast.data.subsets import dataset_labels
    from guard_fast.runtime import RunFolder

    if (m.rc_dir / "images.pt").exists():
        return m.recorded("recover_s", m.rc_dir)
    teacher, arch = load_classifier(m.teacher_pt)
    ipc = m.p["ipc"]
    folder = RunFolder(m.rc_dir, "real-subset", {"teacher": str(m.teacher_pt), "ipc": ipc,
                                                  "seed": m.cfg.seed}, resume="auto")
    folder.check()
    folder.start()
    m.log(f"[{m.label}] real subset ({ipc} training images per class)")
    data = get_data(arch.get("data", "mnist"), root=m.cfg.data_root, image_size=arch["image_size"],
                    channels=arch["in_channels"], on_corrupt=m.cfg.on_corrupt,
                    on_corrupt_splits=("train",))
    train = data.train
    train.transform = data.val.transform   # the same data set's un-augmented transform
    labels = dataset_labels(train)
    rng = np.random.default_rng(m.cfg.seed + _REAL_SEED_OFFSET)
    idx = [i for c in range(data.num_classes)
           for i in sorted(rng.permutation(np.flatnonzero(labels == c))[:ipc].tolist())]
    images = torch.stack([train[i][0] for i in idx])
    ys = torch.as_tensor(labels[idx], dtype=torch.int64)
    ipc_ids = torch.arange(len(idx)) % ipc
    with torch.no_grad():
        acc = (teacher.eval()(images).argmax(1) == ys).float().mean().item()
    save_distilled(m.rc_dir, images, ys, ipc_ids, data.class_names,
                   meta={"stage": "real-subset", "method": "real", "teacher": str(m.teacher_pt),
                         "arch": arch, "mean": list(arch["mean"]), "std": list(arch["std"]),
                         "num_classes": data.num_classes, "ipc": ipc,
                         "image_size": int(arch["image_size"]), "train_indices": idx})
    folder.complete(teacher_acc_on_recovered=acc)
    m.recorded("recover_s", m.rc_dir)


def _recover_stage(m: _MethodRun) -> None:
    from guard_fast.config import RecoverConfig
    from guard_fast.distill.recover import recover

    if m.control:
        return _real_subset_stage(m)
    state = _stage_resume(m.rc_dir, "images.pt")
    if state is None:
        return m.recorded("recover_s", m.rc_dir)
    ipc = m.p["ipc"]
    m.log(f"[{m.label}] recover ({m.cfg.recover_method}, ipc {ipc})")
    rcfg = RecoverConfig(**{"teacher": str(m.teacher_pt), "method": m.cfg.recover_method,
                            "ipc": ipc, "out": str(m.rc_dir), **m.common(), "resume": state,
                            "group_size": min(ipc, 10), **m.p["recover"]})
    rsum = m.timed("recover_s", lambda: recover(rcfg), m.rc_dir)
    if rsum.get("teacher_acc_on_recovered") is not None:   # rank 0 merges and checks
        m.log(f"[{m.label}] teacher accuracy on its recovered images: "
              f"{rsum['teacher_acc_on_recovered']:.3f}")


def _student_stage(m: _MethodRun) -> None:
    """Relabel (it keeps the epoch files it already wrote and adds the missing ones), then
    train the student, unless student.pt exists."""
    from guard_fast.distill.relabel import relabel
    from guard_fast.config import resolve_student
    from guard_fast.distill.student import train_student

    if (m.st_dir / "student.pt").exists():
        m.recorded("relabel_s", m.rl_dir)
        return m.recorded("student_s", m.st_dir)
    probe = resolve_student({"preset": m.cfg.preset, **m.p["student"]})
    m.log(f"[{m.label}] relabel ({probe.epochs} epochs of views)")
    m.timed("relabel_s", lambda: relabel(
        str(m.teacher_pt), str(m.rc_dir), str(m.rl_dir), epochs=probe.epochs,
        batch_size=probe.batch_size, seed=m.cfg.seed, device=m.cfg.device,
        min_scale=probe.min_scale, max_scale=probe.max_scale, mix=probe.mix,
        progress=m.cfg.progress), m.rl_dir)
    m.log(f"[{m.label}] student ({probe.model}, {probe.epochs} epochs)")
    st_cfg = resolve_student({"preset": m.cfg.preset, **m.p["student"],
                              "soft_labels": str(m.rl_dir), "distilled": str(m.rc_dir),
                              "out": str(m.st_dir), "device": m.cfg.device,
                              "progress": m.cfg.progress,
                              "resume": (m.st_dir / "config.json").exists()})
    m.timed("student_s", lambda: train_student(st_cfg), m.st_dir)


# the evaluation images do not depend on the run seed: every method and every seed of an
# experiment is evaluated on the same draw (paired comparisons)
_EVAL_SUBSET_SEED = 0
_MAIN_ATTACK = "PGD100"   # the attack run on every evaluation image, with clean accuracy


def _eval_sets(m: _MethodRun, arch: dict):
    """(main, costly): the class-stratified validation draws for clean accuracy + PGD-100
    (eval_examples; None: all) and for the costlier attacks (attack_examples; None when it
    is the main draw)."""
    from guard_fast.data import fixed_subset, get_data

    data = get_data(arch.get("data", "mnist"), root=m.cfg.data_root, image_size=arch["image_size"],
                    channels=arch["in_channels"], on_corrupt=m.cfg.on_corrupt,
                    on_corrupt_splits=("val",))
    main = fixed_subset(data.val, m.p["eval_examples"], _EVAL_SUBSET_SEED)
    n = m.p.get("attack_examples")
    if n is None or n >= len(main[1]):
        return main, None
    return main, fixed_subset(data.val, n, _EVAL_SUBSET_SEED)


def _load_student(m: _MethodRun):
    """(student on the device in eval mode, (main, costly) validation draws)."""
    student, arch = load_classifier(m.st_dir / "student.pt")
    student.to(m.device).eval()
    return student, _eval_sets(m, arch)


def _split_eval(m: _MethodRun, model, sets, attacks: tuple | None = None) -> dict:
    """robust_eval of the protocol's attacks (or `attacks`): the main attack and clean
    accuracy on the main draw, the others on the costly draw when there is one; each
    attack's "total" says how many images it saw."""
    from guard_fast.evaluate import robust_eval

    prot = eval_protocol(m.cfg.protocol, m.p["square_queries"])
    names = tuple(attacks or prot.attack_names)
    main, costly = sets
    kw = dict(protocol=prot, eps=m.p["eps"], batch_size=256, seed=m.cfg.seed, device=m.device,
              progress=m.cfg.progress)
    if costly is None or names == (_MAIN_ATTACK,):
        return robust_eval(model, main, attacks=list(names), **kw)
    res = robust_eval(model, main, attacks=[n for n in names if n == _MAIN_ATTACK], **kw)
    rest = robust_eval(model, costly, attacks=[n for n in names if n != _MAIN_ATTACK], **kw)
    res["attacks"] = {n: (res if n == _MAIN_ATTACK else rest)["attacks"][n] for n in names}
    for e_main, e_rest in zip(res.get("sweep") or [], rest.get("sweep") or []):
        e_main["attacks"] = {**e_main["attacks"], **e_rest["attacks"]}
    res["costly_examples"] = rest["n_examples"]
    return res


def _evaluate_stage(m: _MethodRun, student, sets, rank: int) -> dict:
    """The protocol's attacks at eps on rank 0 (the others wait); returns its results."""
    from guard_fast.evaluate import write_outputs

    if rank == 0 and not (m.ev_dir / "results.json").exists():
        main, costly = sets
        m.log(f"[{m.label}] robust evaluation ({m.cfg.protocol}, eps {m.p['eps'] * 255:g}/255, "
              f"{len(main[1])} images" + (f", the costlier attacks on {len(costly[1])}"
                                          if costly is not None else "") + ")")
        res = m.timed("eval_s", lambda: _split_eval(m, student, sets))
        write_outputs(res, str(m.ev_dir))
    barrier()   # under torchrun: rank 0 evaluates, the others wait for its results
    return json.loads((m.ev_dir / "results.json").read_text())


def _teacher_stage(m: _MethodRun, sets, rank: int) -> dict:
    """The teacher's clean accuracy (main draw) and its own PGD-100 accuracy at the table's
    eps (on the costly draw when there is one, else the main draw), kept in the teacher's
    squeeze folder under a name holding the settings, so tables sharing the teacher share it."""
    main, costly = sets
    n = len((costly or main)[1])
    f = m.sq_dir / f"robust_{m.cfg.protocol}_eps{m.p['eps'] * 255:g}_n{len(main[1])}_{n}.json"
    if rank == 0 and not f.exists():
        teacher, _ = load_classifier(m.teacher_pt)
        teacher.to(m.device).eval()
        m.log(f"[{m.label}] teacher PGD-100 ({n} images)")
        res = m.timed("teacher_eval_s", lambda: _split_eval(
            m, teacher, (costly or main, None), attacks=(_MAIN_ATTACK,)))
        clean = res["clean"] if costly is None else _clean_acc(teacher, main, m.device)
        atomic_write_json(f, {"clean": clean, "PGD100": res["attacks"][_MAIN_ATTACK],
                              "eps": m.p["eps"], "protocol": m.cfg.protocol})
    barrier()
    return json.loads(f.read_text())


def _clean_acc(model, data, device) -> dict:
    import torch

    x, y = data
    with torch.no_grad():
        correct = sum(int((model(x[i:i + 256].to(device)).argmax(1).cpu() == y[i:i + 256]).sum())
                      for i in range(0, len(y), 256))
    return {"acc": 100.0 * correct / len(y), "correct": correct, "total": len(y)}


def _sweep_stage(m: _MethodRun, student, sets, res: dict, rank: int) -> dict:
    """PGD-100 at the sweep's eps on rank 0; the main evaluation's PGD-100 is the sweep's
    point at eps (not run again). Returns eps_sweep.json."""
    from guard_fast.evaluate import robust_eval

    sweep_f = m.root / "eps_sweep.json"
    sweep = m.p["sweep"]
    if rank == 0 and not sweep_f.exists():
        m.log(f"[{m.label}] PGD-100 eps sweep {[round(e * 255, 2) for e in sweep]} /255")
        # eps_sweep holds every point (sweep[0] twice is run once): with sweep[1:] a
        # one-point sweep came back with no "sweep" list and its point was dropped
        sw = m.timed("sweep_s", lambda: robust_eval(
            student, sets[0], protocol=m.cfg.protocol, attacks=["PGD100"], eps=sweep[0],
            eps_sweep=sweep, batch_size=256, seed=m.cfg.seed, device=m.device,
            progress=m.cfg.progress)) if sweep else {"sweep": [], "clean": res["clean"]}
        main_pt = {"eps": m.p["eps"], "eps_255": m.p["eps"] * 255,
                   "attacks": {"PGD100": res["attacks"]["PGD100"]}}
        points = sorted([*sw["sweep"], main_pt], key=lambda e: e["eps"])
        atomic_write_json(sweep_f, {"sweep": points, "clean": sw["clean"]})
    barrier()
    return json.loads(sweep_f.read_text())


def _method_row(m: _MethodRun, res: dict, sweep: dict, teacher: dict, rank: int) -> dict:
    """The method's row of results.json; stage seconds add to those of earlier calls."""
    tf = m.root / "times.json"
    times = {**(json.loads(tf.read_text()) if tf.exists() else {}), **m.times}
    if rank == 0:
        atomic_write_json(tf, times)
    teacher_metrics = json.loads((m.sq_dir / "run.json").read_text()).get("metrics", {})
    gr = m.sq_dir / "grad_ratio.jsonl"
    grad_ratio = [json.loads(ln) for ln in gr.read_text().splitlines() if ln.strip()] \
        if gr.exists() else []
    rc_run = json.loads((m.rc_dir / "run.json").read_text())
    return {"method": m.folder, "name": m.label, "result": res, "sweep": sweep, "times": times,
            "teacher_val_acc": teacher_metrics.get("val_acc"), "teacher": teacher,
            "teacher_grad_ratio": grad_ratio,
            "teacher_val_penalty": teacher_metrics.get("val_penalty"),
            "teacher_acc_on_recovered": rc_run.get("teacher_acc_on_recovered")}


def run_method(name: str, cfg: PipelineConfig, p: dict, out: Path, log=print) -> dict:
    """Every stage of one method (completed stages skipped, interrupted ones resumed);
    p: resolve_settings(cfg). Returns the method's row of the summary."""
    from guard_fast.pipeline.trajectory import is_trajectory_method, run_trajectory_method

    if is_trajectory_method(name):   # mtt, tesla, mtt-guard: experts -> mtt -> evaluation
        return run_trajectory_method(name, cfg, p, Path(out), log)
    m = _MethodRun(name, cfg, p, Path(out), log)
    rank = dist_env()[0]
    # torchrun: every process decides on each stage from the same files
    for stage in (_squeeze_stage, _recover_stage, _student_stage):
        barrier()
        stage(m)
    barrier()   # rank 0 has written student.pt
    student, sets = _load_student(m)
    res = _evaluate_stage(m, student, sets, rank)
    sweep = _sweep_stage(m, student, sets, res, rank)
    teacher = _teacher_stage(m, sets, rank)
    return _method_row(m, res, sweep, teacher, rank)


# ----------------------------------------------------------------------------- the pipeline
def run_pipeline(cfg: PipelineConfig | None = None, log=print) -> dict:
    """Run (or continue) the pipeline per cfg; returns the summary written to results.json.

    Under torchrun (WORLD_SIZE > 1) every stage shares its work out (squeeze and student
    with DistributedDataParallel, recover by ipc id, relabel by epoch); the robust
    evaluation, the sweep and the report run on rank 0 while the others wait, and only
    rank 0 logs and writes the run folder's own files. The process group is created here,
    once for all stages (each stage leaves a group it did not create alone)."""
    cfg = cfg or PipelineConfig()
    p = resolve_settings(cfg)
    with distributed(resolve_device(cfg.device)) as d:
        run = _run_seeds if cfg.seeds > 1 else _run_pipeline
        return run(cfg, p, d.rank, log if d.is_main else _quiet)


def seed_runs(cfg: PipelineConfig) -> list[tuple[int, PipelineConfig]]:
    """(seed, the one-seed pipeline of that seed) for each seed of a seeded run: its own
    folder <out>/seed<k> and, with shared teachers, <teachers>/seed<k>."""
    out = Path(cfg.out)
    runs = []
    for s in range(cfg.seed, cfg.seed + cfg.seeds):
        teachers = str(Path(cfg.teachers) / f"seed{s}") if cfg.teachers else None
        runs.append((s, replace(cfg, seed=s, seeds=1, out=str(out / f"seed{s}"),
                                teachers=teachers)))
    return runs


def _open_folder(out: Path, cfg: PipelineConfig, rank: int) -> RunFolder | None:
    """Rank 0 checks and starts the pipeline's run folder; every rank waits for it."""
    folder = None
    if rank == 0:
        folder = check_run_folder(out, cfg)
        folder.start()
    barrier()
    return folder


def _run_seeds(cfg: PipelineConfig, p: dict, rank: int, log) -> dict:
    """Every seed's pipeline (each resumable on its own: a rerun skips the complete ones),
    then the seeded summary: per method, its row of every seed."""
    out = Path(cfg.out)
    folder = _open_folder(out, cfg, rank)
    t0 = time.perf_counter()
    runs = seed_runs(cfg)
    per_seed = []
    for s, sub in runs:
        log(f"== seed {s} ({len(per_seed) + 1} of {len(runs)}) ==")
        per_seed.append(_run_pipeline(sub, resolve_settings(sub), rank, log))
    if rank != 0:
        barrier()
        return json.loads((out / "results.json").read_text())
    summary = _summary(cfg, p, seeded_rows(per_seed), time.perf_counter() - t0)
    summary.update(seeds=[s for s, _ in runs], reference=REFERENCE_METHOD)
    return _finish(out, folder, summary, log)


def seeded_rows(per_seed: list[dict]) -> list[dict]:
    """Rows of several one-seed summaries merged by method: {"method", "name", "per_seed":
    [that method's row in each seed's summary]}."""
    rows = []
    for r in per_seed[0]["rows"]:
        runs = [next(x for x in s["rows"] if x["method"] == r["method"]) for s in per_seed]
        rows.append({"method": r["method"], "name": r["name"], "per_seed": runs})
    return rows


def _summary(cfg: PipelineConfig, p: dict, rows: list, seconds: float) -> dict:
    return {"preset": cfg.preset, "protocol": cfg.protocol, "eps": p["eps"],
            "eps_255": p["eps"] * 255, "ipc": p["ipc"], "eval_examples": p["eval_examples"],
            "attack_examples": p.get("attack_examples"),
            "smoke": cfg.smoke, "rows": rows, "seconds_this_call": seconds,
            "settings": {k: v for k, v in p.items() if k != "sweep"}, "sweep": p["sweep"]}


def _run_pipeline(cfg: PipelineConfig, p: dict, rank: int, log) -> dict:
    out = Path(cfg.out)
    folder = _open_folder(out, cfg, rank)
    t0 = time.perf_counter()
    rows = [run_method(m, cfg, p, out, log) for m in cfg.methods]
    if rank != 0:
        barrier()   # rank 0 writes results.json and the report
        return json.loads((out / "results.json").read_text())
    for r in rows:
        src = out / r["method"] / "recover" / "grid.png"
        if src.exists():
            atomic_write_bytes(out / f"grid_{r['method']}.png", src.read_bytes())
    summary = _summary(cfg, p, rows, time.perf_counter() - t0)
    return _finish(out, folder, summary, log)


def _finish(out: Path, folder, summary: dict, log) -> dict:
    """Rank 0's end of a pipeline run: results.json, the report, the complete marker."""
    from guard_fast.evaluate import render_report

    atomic_write_json(out / "results.json", summary)
    log(render_report(out))
    folder.complete()
    barrier()
    return summary
