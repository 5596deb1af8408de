"""The whole pipeline, as `python -m guard_fast.train` runs it with no arguments: for each
teacher regularizer (plain SRe2L and GUARD by default) squeeze -> recover -> relabel ->
student -> robust evaluation, then the paper's Table 2 layout, the distilled-image grids
(Figure 1) and an accuracy-vs-eps plot.

Run folder (cfg.out):
  config.json                 the pipeline settings (a different run there is refused)
  <method>/squeeze/           teacher.pt and its run files   (guard_fast.distill.squeeze)
  <method>/recover/           images.pt, images/, grid.png   (guard_fast.distill.recover)
  <method>/relabel/           stored views and soft labels   (guard_fast.distill.relabel)
  <method>/student/           student.pt                     (guard_fast.distill.student)
  <method>/eval/              results.json, table.md         (guard_fast.evaluate)
  <method>/eps_sweep.json     PGD accuracy per eps
  results.md, results.json    the table (markdown and JSON), with timings per stage
  grid_<method>.png           the distilled sets
  eps_sweep.png               PGD-100 accuracy vs eps, one line per method
  run.json                    status

Every stage skips work whose final file exists and resumes a stage that was interrupted, so
rerunning the same command after a kill continues where it stopped.
"""
from __future__ import annotations

import dataclasses
import json
import os
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from guard_fast.runtime import atomic_write_bytes, atomic_write_json

__all__ = ["PipelineConfig", "run_pipeline", "render_report", "run_experiment", "METHODS",
           "PIPELINE_PRESETS", "EXPERIMENTS", "method_spec"]

# name -> (table label, squeeze overrides)
METHODS: dict[str, tuple[str, dict[str, Any]]] = {
    "sre2l": ("SRe2L", dict(regularizer="none")),
    "guard": ("GUARD", dict(regularizer="guard")),
    "sre2l-adv": ("SRe2L + Adv", dict(regularizer="pgd-at")),
    "gr": ("SRe2L + GR", dict(regularizer="gr")),
}



def method_spec(name: str) -> tuple[str, str, dict[str, Any]]:
    """(folder name, table label, squeeze overrides) of a method: one of METHODS, optionally
    with teacher settings as ":key=value" pairs (any SqueezeConfig field, e.g.
    "guard:lam=10", "sre2l:epochs=3:max_train=4000"), or "gr:<lambda_g>" (gradient-norm
    regularization at that weight, Table 3)."""
    if name in METHODS:
        label, over = METHODS[name]
        return name, label, dict(over)
    base, _, rest = name.partition(":")
    if base == "gr" and rest and "=" not in rest:
        try:
            lam = float(rest)
        except ValueError:
            raise ValueError(f"method {name!r}: gr:<lambda_g> needs a number, e.g. gr:0.01") from None
        return f"gr_{lam:g}", f"SRe2L + GR (lambda_g={lam:g})", dict(regularizer="gr", gr_lam=lam)
    if base not in METHODS or not rest:
        raise ValueError(f"unknown method {name!r}; known: {', '.join(METHODS)}, gr:<lambda_g>, "
                         "and <method>:key=value[:key=value] with SqueezeConfig fields")
    from guard_fast.config import field_help

    fields_ = field_help()
    label, over = METHODS[base]
    over = dict(over)
    tags = []
    for item in rest.split(":"):
        key, eq, raw = item.partition("=")
        if not eq or key not in fields_ or key in ("regularizer", "out", "device", "resume",
                                                    "progress", "data", "data_root", "preset"):
            raise ValueError(f"method {name!r}: {item!r} is not key=value with a teacher "
                             f"setting (a SqueezeConfig field such as lam, h, epochs, max_train)")
        default, typ = fields_[key]
        if default is None:   # optional fields ("int | None"): parse by the declared type
            typ = str(typ)
            default = 0 if "int" in typ else 0.0 if "float" in typ else ""
        try:
            if isinstance(default, bool):
                value: Any = raw.lower() in ("1", "true", "yes")
            elif isinstance(default, int) and not isinstance(default, bool):
                value = int(raw)
            elif isinstance(default, float):
                value = float(raw)
            else:
                value = raw
        except ValueError:
            raise ValueError(f"method {name!r}: {key}={raw!r} is not a valid "
                             f"{type(default).__name__}") from None
        over[key] = value
        tags.append(f"{key}={value:g}" if isinstance(value, float) else f"{key}={value}")
    folder = base + "_" + "_".join(t.replace("=", "") for t in tags)
    return folder, f"{label} ({', '.join(tags)})", over


# Per-preset pipeline sizes. mnist: sized to run all stages for two teachers on a 2-core
# CPU in about 10 minutes (see the README for the measured stage times); the others are
# the paper's settings on the user's data (squeeze/recover/student presets of each stage).
PIPELINE_PRESETS: dict[str, dict[str, Any]] = {
    # Square (alone and inside AutoAttack) at 500 queries instead of the paper's 5000: at
    # 5000 it alone took 176 s for 50 digits on the 2-core CPU (robust points cost 5000
    # forwards each).
    "mnist": dict(squeeze=dict(epochs=1, max_train=2000, max_val=500, batch_size=64),
                  recover=dict(iterations=150), ipc=10,
                  student=dict(epochs=20), eval_examples=100, eps=8 / 255,
                  sweep=(2 / 255, 16 / 255), square_queries=500),
    "imagenette": dict(squeeze={}, recover={}, ipc=10, student={}, eval_examples=None,
                       eps=1 / 255, sweep=(0.5 / 255, 2 / 255, 4 / 255), square_queries=None),
    "tiny-imagenet": dict(squeeze={}, recover={}, ipc=10, student={}, eval_examples=None,
                          eps=1 / 255, sweep=(0.5 / 255, 2 / 255, 4 / 255), square_queries=None),
    "imagenet-1k": dict(squeeze={}, recover={}, ipc=10, student={}, eval_examples=5000,
                        eps=1 / 255, sweep=(0.5 / 255, 2 / 255, 4 / 255), square_queries=None),
    "cifar10": dict(squeeze={}, recover={}, ipc=10, student={}, eval_examples=None,
                    eps=1 / 255, sweep=(0.5 / 255, 2 / 255, 4 / 255), square_queries=None),
    "cifar100": dict(squeeze={}, recover={}, ipc=10, student={}, eval_examples=None,
                     eps=1 / 255, sweep=(0.5 / 255, 2 / 255, 4 / 255), square_queries=None),
}
# The smoke setting (CI): every stage and artifact, minutes less work.
_SMOKE = dict(squeeze=dict(epochs=1, max_train=64, max_val=32, batch_size=64),
              recover=dict(iterations=2), ipc=2, student=dict(epochs=1), eval_examples=4,
              sweep=(2 / 255,), square_queries=10)
_RESUMABLE = {"progress", "device"}


@dataclass
class PipelineConfig:
    preset: str = "mnist"
    data_root: str | None = None
    out: str = "runs/pipeline"
    methods: tuple = ("sre2l", "guard")
    recover_method: str = "sre2l"  # sre2l | cda
    ipc: int | None = None
    eps: float | None = None  # [0, 1] pixel units; None: the preset's
    protocol: str = "paper-code"
    eval_examples: int | None = None  # None: the preset's (None there: the whole val set)
    square_queries: int | None = None  # None: the preset's (None there: the protocol's 5000)
    sweep: tuple | None = None  # PGD eps sweep besides eps; None: the preset's
    smoke: bool = False
    squeeze: dict = field(default_factory=dict)  # extra squeeze overrides (all methods)
    recover: dict = field(default_factory=dict)
    student: dict = field(default_factory=dict)
    device: str = "auto"
    seed: int = 0
    progress: bool = True
    teachers: str | None = None  # folder of squeeze runs shared between pipelines (experiments)


def _resolved(cfg: PipelineConfig) -> dict:
    if cfg.preset not in PIPELINE_PRESETS:
        raise ValueError(f"unknown preset {cfg.preset!r}; known: {', '.join(PIPELINE_PRESETS)}")
    if cfg.preset != "mnist" and not cfg.data_root:
        raise ValueError(f"--preset {cfg.preset} runs on your copy of the data set: pass --data "
                         "PATH (nothing is downloaded; with no preset the bundled digits are used)")
    if not cfg.methods:
        raise ValueError(f"no methods given; known: {', '.join(METHODS)}, gr:<lambda_g>")
    for m in cfg.methods:
        method_spec(m)
    if cfg.recover_method not in ("sre2l", "cda"):
        raise ValueError(f"recover_method must be sre2l or cda, got {cfg.recover_method!r}")
    p = {k: (dict(v) if isinstance(v, dict) else v) for k, v in PIPELINE_PRESETS[cfg.preset].items()}
    if cfg.smoke:
        for k, v in _SMOKE.items():
            p[k] = {**p.get(k, {}), **v} if isinstance(v, dict) else v
    p["squeeze"].update(cfg.squeeze)
    p["recover"].update(cfg.recover)
    p["student"].update(cfg.student)
    if cfg.ipc is not None:
        p["ipc"] = cfg.ipc
    if cfg.eps is not None:
        p["eps"] = cfg.eps
    if cfg.eval_examples is not None:
        p["eval_examples"] = cfg.eval_examples
    p["sweep"] = sorted(set(p["sweep"]) - {p["eps"]})
    if cfg.square_queries is not None:
        p["square_queries"] = cfg.square_queries
    if cfg.sweep is not None:
        p["sweep"] = sorted(set(cfg.sweep) - {p["eps"]})
    if p["ipc"] < 1:
        raise ValueError(f"ipc must be >= 1, got {p['ipc']}")
    if p["eps"] < 0:
        raise ValueError(f"eps must be >= 0, got {p['eps']}")
    return p


def _timed(times: dict, key: str, fn):
    t0 = time.perf_counter()
    r = fn()
    times[key] = round(time.perf_counter() - t0, 2)
    return r


def _stage_resume(folder: Path, final: str) -> bool | None:
    """None: the stage is complete (skip); True: a run exists there (resume it); False: new."""
    if (folder / final).exists():
        return None
    return (folder / "config.json").exists()


def _run_method(name: str, cfg: PipelineConfig, p: dict, out: Path, log) -> dict:
    from guard_fast.config import RecoverConfig, resolve_squeeze, resolve_student
    from guard_fast.data import get_data
    from guard_fast.distill.recover import recover
    from guard_fast.distill.relabel import relabel
    from guard_fast.distill.squeeze import squeeze
    from guard_fast.runtime import load_classifier, resolve_device
    from guard_fast.distill.student import train_student
    from guard_fast.evaluate import robust_eval

    folder, label, sq_over = method_spec(name)
    root = out / folder
    times: dict = {}
    device = resolve_device(cfg.device)

    # squeeze (in the shared teachers folder when one is given)
    sq_dir = (Path(cfg.teachers) / folder if cfg.teachers else root) / "squeeze"
    _sync()   # torchrun: every process decides on each stage from the same files
    state = _stage_resume(sq_dir, "teacher.pt")
    if state is not None:
        log(f"[{label}] squeeze (teacher: {sq_over['regularizer']})")
        scfg = resolve_squeeze({"preset": cfg.preset, "data_root": cfg.data_root, **p["squeeze"],
                                **sq_over, "out": str(sq_dir), "device": cfg.device,
                                "seed": cfg.seed, "progress": cfg.progress, "resume": state})
        _timed(times, "squeeze_s", lambda: squeeze(scfg))
    teacher_pt = sq_dir / "teacher.pt"

    # recover
    rc_dir = root / "recover"
    _sync()
    state = _stage_resume(rc_dir, "images.pt")
    if state is not None:
        log(f"[{label}] recover ({cfg.recover_method}, ipc {p['ipc']})")
        rcfg = RecoverConfig(**{"teacher": str(teacher_pt), "method": cfg.recover_method,
                                "ipc": p["ipc"], "out": str(rc_dir), "device": cfg.device,
                                "seed": cfg.seed, "progress": cfg.progress, "resume": state,
                                "group_size": min(p["ipc"], 10), **p["recover"]})
        rsum = _timed(times, "recover_s", lambda: recover(rcfg))
        if rsum.get("teacher_acc_on_recovered") is not None:   # rank 0 merges and checks
            log(f"[{label}] teacher accuracy on its recovered images: "
                f"{rsum['teacher_acc_on_recovered']:.3f}")

    # relabel + student
    scfg_probe = resolve_student({"preset": cfg.preset, **p["student"]})
    st_dir, rl_dir = root / "student", root / "relabel"
    _sync()
    if not (st_dir / "student.pt").exists():
        if True:  # relabel keeps the epoch files it already wrote and adds the missing ones
            log(f"[{label}] relabel ({scfg_probe.epochs} epochs of views)")
            _timed(times, "relabel_s", lambda: relabel(
                str(teacher_pt), str(rc_dir), str(rl_dir), epochs=scfg_probe.epochs,
                batch_size=scfg_probe.batch_size, seed=cfg.seed, device=cfg.device,
                min_scale=scfg_probe.min_scale, max_scale=scfg_probe.max_scale,
                mix=scfg_probe.mix, progress=cfg.progress))
        log(f"[{label}] student ({scfg_probe.model}, {scfg_probe.epochs} epochs)")
        st_cfg = resolve_student({"preset": cfg.preset, **{k: v for k, v in p["student"].items()},
                                  "soft_labels": str(rl_dir), "distilled": str(rc_dir),
                                  "out": str(st_dir), "device": cfg.device,
                                  "progress": cfg.progress,
                                  "resume": (st_dir / "config.json").exists()})
        _timed(times, "student_s", lambda: train_student(st_cfg))

    # robust evaluation on the real validation set
    _sync()   # rank 0 has written student.pt
    ev_dir = root / "eval"
    student, arch = load_classifier(st_dir / "student.pt")
    student.to(device).eval()
    data = get_data(arch.get("data", "mnist"), root=cfg.data_root, image_size=arch["image_size"])
    val = _fixed_subset(data.val, p["eval_examples"], cfg.seed)
    rank = _rank_world()[0]
    if rank == 0 and not (ev_dir / "results.json").exists():
        log(f"[{label}] robust evaluation ({cfg.protocol}, eps {p['eps'] * 255:g}/255, "
            f"{len(val[1])} images)")
        res = _timed(times, "eval_s", lambda: robust_eval(
            student, val, protocol=cfg.protocol, eps=p["eps"], batch_size=256,
            attacks=_attacks(cfg.protocol, p["square_queries"]),
            seed=cfg.seed, out_dir=str(ev_dir), device=device, progress=cfg.progress))
    _sync()   # under torchrun: rank 0 evaluates, the others wait for its results
    res = json.loads((ev_dir / "results.json").read_text())
    sweep_f = root / "eps_sweep.json"
    if rank == 0 and not sweep_f.exists():
        log(f"[{label}] PGD-100 eps sweep {[round(e * 255, 2) for e in p['sweep']]} /255")
        sw = _timed(times, "sweep_s", lambda: robust_eval(
            student, val, protocol=cfg.protocol, attacks=["PGD100"], eps=p["sweep"][0],
            eps_sweep=p["sweep"][1:], batch_size=256, seed=cfg.seed, device=device,
            progress=cfg.progress)) if p["sweep"] else {"sweep": [], "clean": res["clean"]}
        # the main evaluation's PGD-100 is the sweep's point at eps
        main_pt = {"eps": p["eps"], "eps_255": p["eps"] * 255,
                   "attacks": {"PGD100": res["attacks"]["PGD100"]}}
        points = sorted([*sw["sweep"], main_pt], key=lambda e: e["eps"])
        atomic_write_json(sweep_f, {"sweep": points, "clean": sw["clean"]})
    _sync()
    sweep = json.loads(sweep_f.read_text())
    old_times = {}
    tf = root / "times.json"
    if tf.exists():
        old_times = json.loads(tf.read_text())
    times = {**old_times, **times}
    if rank == 0:
        atomic_write_json(tf, times)
    teacher_metrics = json.loads((sq_dir / "run.json").read_text()).get("metrics", {})
    rc_run = json.loads((rc_dir / "run.json").read_text())
    return {"method": folder, "name": label, "result": res, "sweep": sweep, "times": times,
            "teacher_val_acc": teacher_metrics.get("val_acc"),
            "teacher_val_penalty": teacher_metrics.get("val_penalty"),
            "teacher_acc_on_recovered": rc_run.get("teacher_acc_on_recovered")}


def _attacks(protocol: str, square_queries: int | None, names=None):
    """The protocol's attacks by name, with Square's query budget (alone and inside
    AutoAttack) replaced when square_queries is given."""
    from guard_fast.attacks.protocols import get_protocol

    prot = get_protocol(protocol)
    names = list(names or prot.attack_names)
    out = {}
    for n in names:
        b = prot.builders[n]
        if square_queries is not None and n == "Square":
            def b(m, eps, **kw):  # the protocols' Square with another query budget
                from guard_fast.attacks import Square

                return Square(m, eps=eps, n_queries=int(square_queries), p_init=0.8,
                              loss="margin", rescale_schedule=True, **kw)
        elif square_queries is not None and n == "AutoAttack":
            def b(m, eps, _prot=prot, **kw):
                from guard_fast.attacks import AutoAttack

                version = "torchattacks" if _prot.name == "paper-code" else "standard"
                extra = {"n_classes": 10} if version == "torchattacks" else {}
                return AutoAttack(m, eps=eps, version=version, square_queries=int(square_queries),
                                  **extra, **kw)
        out[n] = b
    return out


def _fixed_subset(ds, n: int | None, seed: int):
    """(images, labels) of n validation images drawn once (stratified data may be sorted)."""
    idx = torch.arange(len(ds))
    if n is not None and n < len(ds):
        g = torch.Generator().manual_seed(seed + 12345)
        idx = torch.randperm(len(ds), generator=g)[:n].sort().values
    xs, ys = zip(*(ds[int(i)] for i in idx))
    return torch.stack(xs), torch.tensor(ys)


def _check_folder(out: Path, cfg: PipelineConfig) -> None:
    f = out / "config.json"
    if not f.exists():
        return
    old = json.loads(f.read_text())
    if old.get("stage") != "pipeline":
        raise FileExistsError(f"{out} holds a {old.get('stage', 'different')} run; choose another "
                              "--out (nothing was overwritten)")
    new = json.loads(json.dumps(dict(asdict(cfg), stage="pipeline")))
    diff = sorted(k for k in set(old) | set(new) if k not in _RESUMABLE and old.get(k) != new.get(k))
    if diff:
        raise ValueError(f"{out} holds a pipeline run with different settings for {diff}; rerun "
                         "with the same options to continue it, or choose another --out")


def _rank_world() -> tuple[int, int]:
    return int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))


def _sync() -> None:
    """A barrier across the torchrun processes (nothing in a single process)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


def run_pipeline(cfg: PipelineConfig | None = None, log=print) -> dict:
    """Run (or continue) the pipeline per cfg; returns the summary written to results.json.

    Under torchrun (WORLD_SIZE > 1) every stage shares its work out (squeeze and student
    with DistributedDataParallel, recover by ipc id, relabel by epoch); the robust
    evaluation, the sweep and the report run on rank 0 while the others wait, and only
    rank 0 logs and writes the run folder's own files."""
    cfg = cfg or PipelineConfig()
    p = _resolved(cfg)
    rank, world = _rank_world()
    we_init = False
    if world > 1:
        import torch.distributed as dist

        from guard_fast.runtime import resolve_device

        if not dist.is_initialized():
            if resolve_device(cfg.device).type == "cuda":
                torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
                dist.init_process_group("nccl")
            else:
                dist.init_process_group("gloo")
            we_init = True
    if rank != 0:
        log = _quiet
    try:
        return _run_pipeline(cfg, p, rank, log)
    finally:
        if we_init:
            import torch.distributed as dist

            dist.destroy_process_group()


def _quiet(*args, **kwargs) -> None:
    pass


def _run_pipeline(cfg: PipelineConfig, p: dict, rank: int, log) -> dict:
    out = Path(cfg.out)
    if rank == 0:
        _check_folder(out, cfg)
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_json(out / "config.json", dict(asdict(cfg), stage="pipeline"))
        atomic_write_json(out / "run.json", {"status": "running", "stage": "pipeline"})
    _sync()
    t0 = time.perf_counter()
    rows = [_run_method(m, cfg, p, out, log) for m in cfg.methods]
    if rank != 0:
        _sync()   # rank 0 writes results.json and the report
        return json.loads((out / "results.json").read_text())
    for r in rows:
        src = out / r["method"] / "recover" / "grid.png"
        if src.exists():
            atomic_write_bytes(out / f"grid_{r['method']}.png", src.read_bytes())
    summary = {"preset": cfg.preset, "protocol": cfg.protocol, "eps": p["eps"],
               "eps_255": p["eps"] * 255, "ipc": p["ipc"], "eval_examples": p["eval_examples"],
               "smoke": cfg.smoke, "rows": rows, "seconds_this_call": time.perf_counter() - t0,
               "settings": {k: v for k, v in p.items() if k != "sweep"}, "sweep": p["sweep"]}
    atomic_write_json(out / "results.json", summary)
    text = render_report(out)
    atomic_write_json(out / "run.json", {"status": "complete", "stage": "pipeline"})
    log(text)
    _sync()
    return summary


def render_report(run_dir: str | Path) -> str:
    """Re-render results.md and eps_sweep.png of a pipeline run from its results.json."""
    from guard_fast.evaluate import format_table

    run_dir = Path(run_dir)
    f = run_dir / "results.json"
    if not f.exists():
        raise FileNotFoundError(f"{run_dir} holds no pipeline results (no results.json): run "
                                "python -m guard_fast.train (or train all) first")
    s = json.loads(f.read_text())
    rows = [dict(r["result"], name=r["name"]) for r in s["rows"]]
    lines = [f"# guard_fast pipeline: {s['preset']}" + (" (smoke setting)" if s.get("smoke") else ""),
             "",
             f"Student accuracy (%) on {s['eval_examples'] or 'all'} real validation images, "
             f"protocol {s['protocol']}, eps = {s['eps_255']:g}/255, IPC {s['ipc']}.", "",
             format_table(rows), "",
             "| Method | teacher val acc | teacher acc on its recovered images | "
             "squeeze s | recover s | relabel s | student s | eval s |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in s["rows"]:
        t = r["times"]

        def fmt(v, pct=False):
            if v is None:
                return "-"
            return f"{100 * v:.1f}" if pct else f"{v:.0f}"
        lines.append(f"| {r['name']} | {fmt(r['teacher_val_acc'], True)} | "
                     f"{fmt(r['teacher_acc_on_recovered'], True)} | {fmt(t.get('squeeze_s'))} | "
                     f"{fmt(t.get('recover_s'))} | {fmt(t.get('relabel_s'))} | "
                     f"{fmt(t.get('student_s'))} | {fmt(t.get('eval_s'))} |")
    lines += ["", "PGD-100 accuracy (%) by eps (x 1/255):", "",
              "| Method | " + " | ".join(f"{e['eps_255']:g}" for e in s["rows"][0]["sweep"]["sweep"]) + " |",
              "|---|" + "---:|" * len(s["rows"][0]["sweep"]["sweep"])]
    for r in s["rows"]:
        lines.append(f"| {r['name']} | " + " | ".join(
            f"{e['attacks']['PGD100']['acc']:.1f}" for e in r["sweep"]["sweep"]) + " |")
    lines += ["", "Files: grid_<method>.png (distilled sets), eps_sweep.png, <method>/ (every stage's "
              "run folder).", ""]
    text = "\n".join(lines)
    atomic_write_bytes(run_dir / "results.md", text.encode())
    _plot(s, run_dir / "eps_sweep.png")
    return text


def _plot(s: dict, path: Path) -> None:
    import io

    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6, 4), dpi=120)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    for r in s["rows"]:
        sw = r["sweep"]["sweep"]
        ax.plot([e["eps_255"] for e in sw], [e["attacks"]["PGD100"]["acc"] for e in sw],
                marker="o", label=f"{r['name']} (clean {r['sweep']['clean']['acc']:.1f})")
    ax.set_xlabel("eps (x 1/255)")
    ax.set_ylabel("PGD-100 accuracy (%)")
    ax.set_title(f"students on {s['preset']} distilled sets, IPC {s['ipc']}")
    ax.set_ylim(0, 100)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    atomic_write_bytes(path, buf.getvalue())


# ----------------------------------------------------------------------------- experiments
EXPERIMENTS = {
    "table1": "GUARD vs SRe2L vs SRe2L + PGD adversarial training (teacher eps 1/255)",
    "table2": "GUARD vs SRe2L at IPC 1, 10, 50",
    "table3": "gradient-norm regularization lambda_g = 1e-4 .. 1 against GUARD",
    "table4": "time per squeeze iteration and peak memory: GUARD vs adversarial training",
    "table5": "SRe2L, CDA and DC, each with and without GUARD",
}


def _combine(out: Path, title: str, parts: list[tuple[str, Path]], note: str = "") -> str:
    """One table from several pipeline runs: rows prefixed by each part's tag."""
    from guard_fast.evaluate import format_table

    rows, js = [], []
    for tag, d in parts:
        s = json.loads((d / "results.json").read_text())
        for r in s["rows"]:
            rows.append(dict(r["result"], name=f"{r['name']}{tag}"))
            js.append({"part": tag.strip(), "name": r["name"], "result": r["result"],
                       "times": r["times"], "teacher_val_acc": r["teacher_val_acc"]})
        proto, eps255, n = s["protocol"], s["eps_255"], s["eval_examples"]
    text = (f"# {title}\n\n{note}Student accuracy (%) on {n or 'all'} real validation images, "
            f"protocol {proto}, eps = {eps255:g}/255.\n\n" + format_table(rows))
    atomic_write_bytes(out / "results.md", text.encode())
    atomic_write_json(out / "results.json", {"title": title, "rows": js})
    return text


def _table4(cfg: PipelineConfig, out: Path, log) -> str:
    """Time per squeeze iteration and peak memory per regularizer (the paper's Table 4)."""
    from guard_fast.config import resolve_squeeze
    from guard_fast.data import get_data
    from guard_fast.distill.squeeze import build_criterion
    from guard_fast.runtime import resolve_device
    from guard_fast.models import build_model

    device = resolve_device(cfg.device)
    p = _resolved(cfg)
    sq = resolve_squeeze({"preset": cfg.preset, "data_root": cfg.data_root, **p["squeeze"]})
    data = get_data(sq.data, root=cfg.data_root, image_size=sq.image_size)
    batch = 16 if cfg.smoke else sq.batch_size
    xs, ys = _fixed_subset(data.train, batch, cfg.seed)
    xs, ys = xs.to(device), ys.to(device)
    reps = 2 if cfg.smoke else 10
    rows = []
    for reg in ("none", "guard", "pgd-at", "trades", "fbf"):
        torch.manual_seed(cfg.seed)
        model = build_model(sq.model, data.num_classes, data.channels, data.mean, data.std,
                            image_size=sq.image_size).to(device).train()
        crit = build_criterion(resolve_squeeze({"preset": cfg.preset, "data_root": cfg.data_root,
                                                "regularizer": reg}))
        opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)

        def step():
            opt.zero_grad(set_to_none=True)
            crit(model, xs, ys).loss.backward()
            opt.step()
        step()  # warm-up
        if device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
        times = []
        for _ in range(reps):
            t0 = time.perf_counter()
            step()
            if device.type == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - t0)
        if device.type == "cuda":
            peak = (torch.cuda.max_memory_allocated() - base) / 2**20
        else:
            import sys
            from pathlib import Path as _P

            sys.path.insert(0, str(_P(__file__).resolve().parents[1] / "bench"))
            try:
                from harness import peak_tensor_mb
                peak = peak_tensor_mb(step)
            except ImportError:  # installed without the repository's bench/ folder
                peak = float("nan")
        t = sorted(times)[len(times) // 2]
        rows.append({"regularizer": reg, "s_per_iteration": t, "peak_mem_mb": peak,
                     "batch": int(batch), "model": sq.model, "image_size": sq.image_size})
        log(f"table4 {reg}: {t * 1e3:.0f} ms/iteration, peak {peak:.0f} MB")
    base = rows[0]
    lines = [f"# Table 4: squeeze cost per iteration ({sq.model}, {sq.image_size} px, batch "
             f"{batch}, {device.type})", "",
             "| Teacher regularizer | s / iteration | x plain | peak memory (MB) | x plain |",
             "|---|---:|---:|---:|---:|"]
    names = {"none": "SRe2L (plain CE)", "guard": "GUARD", "pgd-at": "PGD-AT (7 steps)",
             "trades": "TRADES (public code)", "fbf": "Fast-is-better-than-free"}
    for r in rows:
        lines.append(f"| {names[r['regularizer']]} | {r['s_per_iteration']:.3f} | "
                     f"{r['s_per_iteration'] / base['s_per_iteration']:.2f} | "
                     f"{r['peak_mem_mb']:.0f} | {r['peak_mem_mb'] / max(base['peak_mem_mb'], 1e-9):.2f} |")
    text = "\n".join(lines) + "\n"
    atomic_write_bytes(out / "results.md", text.encode())
    atomic_write_json(out / "results.json", {"rows": rows, "device": str(device)})
    return text


def _dc_rows(cfg: PipelineConfig, p: dict, out: Path, log) -> Path:
    """DC with and without GUARD on the bundled digits: distill, train DC's ConvNet on the
    synthetic set (hard labels, DC's evaluation), evaluate it like the students."""
    from guard_fast.data import get_data
    from guard_fast.data.distilled import load_distilled
    from guard_fast.distill.dc import DCConfig, _train_epochs, dc
    from guard_fast.runtime import resolve_device
    from guard_fast.evaluate import robust_eval
    from guard_fast.models import build_model

    device = resolve_device(cfg.device)
    small = cfg.smoke
    rows = []
    for reg, label in (("none", "DC"), ("guard", "DC + GUARD")):
        d = out / f"dc_{reg}"
        if not (d / "images.pt").exists():
            log(f"[{label}] DC distillation")
            dc(DCConfig(data="mnist", ipc=1, iterations=1 if small else 40, outer_loop=1,
                        inner_loop=1, batch_real=16 if small else 64, width=32,
                        regularizer=reg, out=str(d), device=cfg.device, seed=cfg.seed,
                        progress=cfg.progress, resume=(d / "config.json").exists()))
        s = load_distilled(d)
        data = get_data("mnist", image_size=s["images"].shape[-1])
        ev = d / "eval"
        if not (ev / "results.json").exists():
            torch.manual_seed(cfg.seed)
            net = build_model("convnet", 10, s["images"].shape[1], data.mean, data.std,
                              image_size=s["images"].shape[-1], width=32).to(device)
            gen = torch.Generator().manual_seed(cfg.seed)
            epochs = 5 if small else 300
            _train_epochs(net, s["images"].to(device), s["labels"].to(device), epochs, 256,
                          0.01, 0.9, 5e-4, gen, decay_at=epochs // 2)
            net.eval()
            val = _fixed_subset(data.val, p["eval_examples"], cfg.seed)
            robust_eval(net, val, protocol=cfg.protocol, eps=p["eps"], batch_size=256,
                        seed=cfg.seed, out_dir=str(ev), device=device, progress=cfg.progress)
        rows.append({"name": label, "result": json.loads((ev / "results.json").read_text()),
                     "times": {}, "teacher_val_acc": None})
    return rows


def run_experiment(name: str, cfg: PipelineConfig, out: str | None = None, log=print) -> str:
    """One of the paper's experiments (EXPERIMENTS) on cfg's data; writes <out>/results.md."""
    if name not in EXPERIMENTS:
        raise ValueError(f"unknown experiment {name!r}; known: {', '.join(EXPERIMENTS)}")
    root = Path(out or f"runs/{name}")
    root.mkdir(parents=True, exist_ok=True)
    teachers = cfg.teachers or str(root / "teachers")
    base = dataclasses.replace(cfg, teachers=teachers)
    if name == "table4":
        text = _table4(cfg, root, log)
    elif name == "table1":
        c = dataclasses.replace(base, methods=("sre2l", "sre2l-adv", "guard"), out=str(root / "run"))
        run_pipeline(c, log=log)
        text = _combine(root, EXPERIMENTS[name], [("", Path(c.out))])
    elif name == "table2":
        ipcs = (1,) if cfg.smoke else (1, 10, 50)
        parts = []
        for k in ipcs:
            c = dataclasses.replace(base, ipc=k, out=str(root / f"ipc{k}"))
            run_pipeline(c, log=log)
            parts.append((f" (IPC {k})", Path(c.out)))
        text = _combine(root, EXPERIMENTS[name], parts)
    elif name == "table3":
        lams = ("1e-2",) if cfg.smoke else ("1e-4", "1e-3", "1e-2", "1e-1", "1")
        c = dataclasses.replace(base, methods=("guard", *[f"gr:{v}" for v in lams]),
                                out=str(root / "run"))
        run_pipeline(c, log=log)
        text = _combine(root, EXPERIMENTS[name], [("", Path(c.out))])
    else:  # table5
        parts = []
        for rm in ("sre2l", "cda"):
            c = dataclasses.replace(base, recover_method=rm, out=str(root / rm))
            run_pipeline(c, log=log)
            parts.append((" (CDA recover)" if rm == "cda" else "", Path(c.out)))
        text = _combine(root, EXPERIMENTS[name], parts,
                        note="SRe2L rows: SRe2L recover; CDA rows: CDA's crop curriculum. ")
        p = _resolved(cfg)
        dc_rows = _dc_rows(cfg, p, root, log)
        js = json.loads((root / "results.json").read_text())
        js["rows"] += [{"part": "dc", **r} for r in dc_rows]
        atomic_write_json(root / "results.json", js)
        from guard_fast.evaluate import format_table

        text += ("\nDC rows (IPC 1, DC's ConvNet trained on the synthetic set with hard labels):"
                 "\n\n" + format_table([dict(r["result"], name=r["name"]) for r in dc_rows]))
        atomic_write_bytes(root / "results.md", text.encode())
    log(text)
    return text
