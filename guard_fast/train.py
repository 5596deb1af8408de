"""The guard_fast command line: python -m guard_fast.train [<stage>] [options].

With no arguments: the whole pipeline on the bundled digits on this machine (a plain SRe2L
teacher and a GUARD teacher; recover, relabel, students, robust evaluation; the paper's
Table 2 layout) in about ten minutes of a laptop CPU, written to runs/pipeline.

Stages (each reads the previous stage's run folder and writes its own):
  squeeze   train the teacher (GUARD or a baseline regularizer)
  recover   synthesize the distilled images (--method sre2l | cda | dc)
  relabel   store the teacher's soft labels on the student's views (FKD)
  evaluate  train a student on a distilled set and evaluate it under attack, or evaluate
            a checkpoint (--model)
  all       the whole pipeline (--preset, --data, --device, --smoke, --experiment)
  report    re-render the tables and plots of a pipeline run
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path
from typing import Any

from guard_fast.config import REGULARIZERS, SQUEEZE_PRESETS, SqueezeConfig

_NOT_YET: dict[str, str] = {}

# help text and unit for each squeeze option (the default is appended automatically)
_HELP: dict[str, str] = {
    "preset": f"paper settings per data set: {', '.join(SQUEEZE_PRESETS)}",
    "data": "data set name: mnist (bundled, no download), imagenette, tiny-imagenet, imagenet-1k, "
            "imagefolder, cifar10, cifar100 (flag --dataset)",
    "data_root": "path to your copy of the data set (flag --data); needed by every preset but mnist",
    "image_size": "training image side, pixels",
    "model": "architecture name (guard_fast.models.list_models())",
    "epochs": "training epochs",
    "batch_size": "global batch size (all processes together), images",
    "lr": "peak learning rate of SGD (cosine schedule, per step)",
    "momentum": "SGD momentum",
    "weight_decay": "SGD weight decay",
    "warmup_epochs": "linear warm-up, epochs",
    "regularizer": f"teacher regularizer: {', '.join(REGULARIZERS)}",
    "guard_mode": "GUARD mode: exact | fd | official-cifar | official-imagenet",
    "h": "GUARD step h, in the units of --h-space (paper: 3)",
    "lam": "GUARD weight lambda (paper: 100; unused by official-imagenet)",
    "beta": "official-imagenet weight (public code: 1e-4)",
    "bn_mode": "BatchNorm mode of the penalty passes: eval (published) | train",
    "chunk_size": "penalty passes in chunks of this many images (less memory, same result)",
    "h_space": "space h is measured in: normalized (the public code's) | pixel ([0,1] images)",
    "gr_lam": "gradient-norm weight lambda_g (Table 3 sweep: 1e-4 .. 1)",
    "gr_mode": "gradient-norm mode: exact | official (public code: a detached constant)",
    "adv_eps": "PGD-AT radius, L-inf in [0,1] pixel units (paper: 1/255)",
    "adv_steps": "PGD-AT attack steps (step adv_eps/4)",
    "trades_beta": "TRADES weight beta (public code: 1e-4; its attack constants are fixed)",
    "amp": "autocast precision: none | bf16 | fp16",
    "channels_last": "channels_last model and inputs",
    "compile": "torch.compile the model (first-order regularizers only)",
    "workers": "data-loading worker processes",
    "device": "auto | cpu | cuda | cuda:N",
    "seed": "random seed (data order, init, attacks)",
    "max_train": "use only the first N training images (smoke runs)",
    "max_val": "use only the first N validation images",
    "out": "run folder",
    "resume": "continue the run in --out from its last checkpoint",
    "progress": "progress bars and per-epoch lines (--no-progress to silence)",
}
_FLAG = {"data": "--dataset", "data_root": "--data"}


def _fmt_default(v: Any) -> str:
    if isinstance(v, float) and 0 < abs(v) < 1e-2:
        return f"{v:.4g}"
    return repr(v)


_RECOVER_HELP: dict[str, str] = {
    "teacher": "teacher.pt, or the squeeze run folder that holds it",
    "method": "sre2l | cda (curriculum on the crop scale) | dc (gradient matching on real data; "
              "takes the dc options)",
    "ipc": "images per class",
    "iterations": "synthesis iterations per batch (preset: 2000 ImageNet-style, 1000 CIFAR)",
    "lr": "Adam learning rate (cosine schedule; preset per data set)",
    "r_bn": "weight of the BatchNorm-statistics loss (preset per data set)",
    "first_bn_multiplier": "extra weight of the first BatchNorm layer's statistics",
    "crop": "RandomResizedCrop of the batch each iteration (preset per data set)",
    "flip": "random horizontal flip of the batch each iteration (preset per data set)",
    "jitter": "random roll of the pixels, at most this many pixels (preset per data set)",
    "jitter_mode": "positive (roll by 0..jitter) | symmetric (-jitter..jitter)",
    "min_crop": "smallest crop area fraction (CDA: the curriculum's end value)",
    "max_crop": "largest crop area fraction",
    "cda_mode": "CDA curriculum: step | linear | cosine",
    "milestone": "CDA: fraction of the iterations over which the crop scale decreases",
    "class_batch": "classes per synthesis batch (one image per class)",
    "group_size": "ipc ids synthesized together in one batch (same result, bigger batch)",
    "amp": "autocast precision of the forward: none | bf16 | fp16",
    "channels_last": "channels_last teacher and inputs",
    "compile": "torch.compile the synthesis step",
    "save_every": "iterations between resumable checkpoints",
    "device": "auto | cpu | cuda | cuda:N",
    "seed": "random seed (initial noise and every augmentation draw)",
    "out": "run folder for the distilled set",
    "resume": "continue the run in --out from its last checkpoint",
    "progress": "progress bars (--no-progress to silence)",
}


def _add_options(p: argparse.ArgumentParser, cls, helps: dict, flags: dict | None = None,
                 note: str = "presets may change it") -> None:
    for f in dataclasses.fields(cls):
        flag = (flags or {}).get(f.name, "--" + f.name.replace("_", "-"))
        help_ = f"{helps[f.name]} (default: {_fmt_default(f.default)}; {note})"
        if f.type in ("bool", bool, "bool | None"):
            p.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction, default=None,
                           help=help_)
            continue
        kind = {"int": int, "float": float, "str": str, "int | None": int, "float | None": float,
                "str | None": str}.get(str(f.type), str)
        p.add_argument(flag, dest=f.name, type=kind, default=None, help=help_)


def _add_squeeze_options(p: argparse.ArgumentParser) -> None:
    for f in dataclasses.fields(SqueezeConfig):
        flag = _FLAG.get(f.name, "--" + f.name.replace("_", "-"))
        help_ = f"{_HELP[f.name]} (default: {_fmt_default(f.default)}; presets may change it)"
        if f.type in ("bool", bool):
            p.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction, default=None,
                           help=help_)
            continue
        kind = {"int": int, "float": float, "str": str, "int | None": int,
                "str | None": str}.get(str(f.type), str)
        p.add_argument(flag, dest=f.name, type=kind, default=None, help=help_)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m guard_fast.train", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="stage", metavar="STAGE")
    sq = sub.add_parser("squeeze", help="train the (GUARD) teacher",
                        description="Train the teacher. With no options: a GUARD teacher on the "
                                    "bundled MNIST digits, on this machine's CPU, in a few minutes.")
    _add_squeeze_options(sq)
    ev = sub.add_parser("evaluate", help="train a student on a distilled set, then evaluate it "
                        "under attack (or evaluate a checkpoint with --model)")
    ev.add_argument("--model", default=None, help="evaluate this checkpoint (teacher.pt, "
                    "student.pt) instead of training a student")
    ev.add_argument("--distilled", default=None, help="distilled-set folder (the recover stage's "
                    "--out) to train a student on")
    ev.add_argument("--soft-labels", default=None, help="relabel folder: replay its views and "
                    "soft labels (default: online soft labels from --teacher)")
    ev.add_argument("--teacher", default=None, help="teacher for online soft labels (default: the "
                    "distilled set's teacher)")
    ev.add_argument("--student-model", default=None, help="student architecture (default: the "
                    "preset's, resnet18)")
    ev.add_argument("--student-epochs", type=int, default=None, help="student epochs (default: "
                    "the preset's: 300 ImageNet-style, 30 bundled digits)")
    ev.add_argument("--student-out", default=None, help="student run folder (default: "
                    "<distilled>/../student)")
    ev.add_argument("--data", dest="data_root", default=None,
                    help="data set path (default: the bundled data, or the checkpoint's data set)")
    ev.add_argument("--protocol", default="standard", help="standard | paper-code (default: standard)")
    ev.add_argument("--eps", type=float, default=None,
                    help="L-inf radius in [0,1] pixel units (default: 1/255, the paper's)")
    ev.add_argument("--attacks", default=None, help="comma list of table columns (default: all)")
    ev.add_argument("--n-examples", type=int, default=500, help="validation images evaluated (default: 500)")
    ev.add_argument("--batch-size", type=int, default=250, help="images per attack batch (default: 250)")
    ev.add_argument("--memory-budget", default=None,
                    help="memory one attack chunk may use, e.g. 4GiB: each batch is split into the "
                         "largest chunks that fit (default: no limit)")
    ev.add_argument("--device", default="auto", help="auto | cpu | cuda (default: auto)")
    ev.add_argument("--seed", type=int, default=0, help="attack seed (default: 0)")
    ev.add_argument("--out", default=None, help="folder for results.json, table.md, plot (default: next to --model)")
    rc = sub.add_parser("recover", help="synthesize the distilled images from a teacher",
                        description="Synthesize the distilled set from a squeezed teacher "
                                    "(SRe2L; --method cda adds CDA's crop curriculum). Options "
                                    "left unset take the preset of the teacher's data set.")
    from guard_fast.config import RecoverConfig

    _add_options(rc, RecoverConfig, _RECOVER_HELP,
                 note="unset: the preset of the teacher's data set" )
    rc.add_argument("--dataset", dest="dc_dataset", default=None,
                    help="--method dc only: real data set, mnist (bundled) | cifar10 | cifar100")
    rc.add_argument("--data", dest="dc_data_root", default=None,
                    help="--method dc only: path of the CIFAR pickles")
    rc.add_argument("--regularizer", dest="dc_regularizer", default=None,
                    help="--method dc only: none | guard (GUARD on the real-data gradient)")
    rl = sub.add_parser("relabel", help="store the teacher's soft labels on the student's views",
                        description="FKD relabel: for every epoch of student training, the crop, "
                                    "flip and CutMix of each view and the teacher's logits on it.")
    rl.add_argument("--distilled", default="runs/recover", help="distilled-set folder (default: "
                    "runs/recover)")
    rl.add_argument("--teacher", default=None, help="teacher.pt (default: the one the distilled "
                    "set was recovered from)")
    rl.add_argument("--out", default="runs/relabel", help="relabel folder (default: runs/relabel)")
    rl.add_argument("--epochs", type=int, default=None, help="epochs of views (default: the "
                    "student preset of the data set)")
    rl.add_argument("--batch-size", type=int, default=None, help="student batch (default: the "
                    "student preset)")
    rl.add_argument("--seed", type=int, default=0, help="view seed (default: 0)")
    rl.add_argument("--top-k", type=int, default=None, help="store the k largest logits only")
    rl.add_argument("--dtype", default="float16", help="stored logits: float16 | bfloat16 | "
                    "float32 (default: float16)")
    rl.add_argument("--min-scale", type=float, default=None, help="crop scale minimum (default: "
                    "the student preset)")
    rl.add_argument("--mix", default=None, help="cutmix | mixup | none (default: the student "
                    "preset)")
    rl.add_argument("--device", default="auto", help="auto | cpu | cuda (default: auto)")
    al = sub.add_parser("all", help="the whole pipeline (what no arguments run)",
                        description="squeeze -> recover -> relabel -> student -> robust evaluation "
                                    "for a plain SRe2L and a GUARD teacher, then the Table 2 "
                                    "layout, the distilled-image grids and the eps plot.")
    _add_pipeline_options(al)
    rp = sub.add_parser("report", help="re-render a pipeline run's tables and plots")
    rp.add_argument("run_dir", help="the pipeline's --out folder")
    return p


def _add_pipeline_options(p: argparse.ArgumentParser) -> None:
    from guard_fast.pipeline import EXPERIMENTS, METHODS, PIPELINE_PRESETS

    p.add_argument("--preset", default="mnist", help=f"{' | '.join(PIPELINE_PRESETS)} (default: "
                   "mnist, the bundled digits; the others need --data)")
    p.add_argument("--data", dest="data_root", default=None, help="your copy of the data set")
    p.add_argument("--out", default=None, help="run folder (default: runs/pipeline, or "
                   "runs/<experiment>)")
    p.add_argument("--methods", default=None, help=f"comma list of {', '.join(METHODS)}, "
                   "gr:<lambda_g>, or a method with teacher settings such as guard:lam=10 or "
                   "sre2l:epochs=3 (default: sre2l,guard)")
    p.add_argument("--recover-method", default="sre2l", help="sre2l | cda (default: sre2l)")
    p.add_argument("--ipc", type=int, default=None, help="images per class (default: the preset's)")
    p.add_argument("--eps", type=float, default=None, help="evaluation L-inf radius in [0,1] "
                   "pixel units (default: the preset's: 8/255 bundled digits, 1/255 others)")
    p.add_argument("--protocol", default="paper-code", help="paper-code | standard "
                   "(default: paper-code, the public GUARD evaluation)")
    p.add_argument("--eval-examples", type=int, default=None, help="validation images attacked "
                   "(default: the preset's)")
    p.add_argument("--experiment", default=None, help=f"a paper experiment: {', '.join(EXPERIMENTS)}")
    p.add_argument("--smoke", action="store_true", help="tiny sizes: every stage and file in a "
                   "couple of minutes (CI)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda (default: auto)")
    p.add_argument("--seed", type=int, default=0, help="seed (default: 0)")
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True,
                   help="progress bars (default: on)")


def _run_squeeze(ns: argparse.Namespace) -> int:
    from guard_fast.config import resolve_squeeze
    from guard_fast.distill.squeeze import squeeze

    overrides = {f.name: getattr(ns, f.name) for f in dataclasses.fields(SqueezeConfig)}
    cfg = resolve_squeeze(overrides)
    metrics = squeeze(cfg)
    print(f"teacher written to {Path(cfg.out) / 'teacher.pt'}")
    print(json.dumps({k: round(v, 6) if isinstance(v, float) else v for k, v in metrics.items()}))
    return 0


def _train_student_for_eval(ns: argparse.Namespace) -> Path:
    from guard_fast.distill.common import load_distilled
    from guard_fast.distill.student import resolve_student, train_student

    dist_dir = Path(ns.distilled)
    meta = load_distilled(dist_dir)["meta"]
    data = meta.get("arch", {}).get("data", "mnist")
    from guard_fast.distill.student import STUDENT_PRESETS

    preset = data if data in STUDENT_PRESETS else "imagenette"
    over: dict = {"preset": preset, "distilled": str(dist_dir), "device": ns.device,
                  "out": ns.student_out or str(dist_dir.resolve().parent / "student"),
                  "progress": True}
    if ns.soft_labels:
        over["soft_labels"] = ns.soft_labels
    else:
        over["teacher"] = ns.teacher or meta.get("teacher")
        if not over["teacher"]:
            raise ValueError("online soft labels need a teacher: pass --teacher or --soft-labels")
    if ns.student_model:
        over["model"] = ns.student_model
    if ns.student_epochs:
        over["epochs"] = ns.student_epochs
    out = Path(over["out"])
    over["resume"] = (out / "config.json").exists() and not (out / "student.pt").exists()
    if not (out / "student.pt").exists():
        train_student(resolve_student(over))
    return out / "student.pt"


def _run_evaluate(ns: argparse.Namespace) -> int:
    import torch

    from guard_fast.data import get_data
    from guard_fast.runtime import load_classifier, resolve_device
    from guard_fast.evaluate import format_table, robust_eval

    if bool(ns.model) == bool(ns.distilled):
        raise ValueError("pass either --model CKPT (evaluate it) or --distilled FOLDER (train a "
                         "student on it, then evaluate), not both or neither")
    if ns.distilled:
        ns.model = str(_train_student_for_eval(ns))
    model, arch = load_classifier(ns.model)
    device = resolve_device(ns.device)
    data = get_data(arch.get("data", "mnist"), root=ns.data_root, image_size=arch["image_size"])
    out = Path(ns.out) if ns.out else Path(ns.model).resolve().parent / "eval"
    attacks = ns.attacks.split(",") if ns.attacks else None
    res = robust_eval(model.to(device), data.val, protocol=ns.protocol, attacks=attacks,
                      eps=ns.eps if ns.eps is not None else 1 / 255, batch_size=ns.batch_size,
                      n_examples=ns.n_examples, seed=ns.seed, out_dir=str(out), device=device,
                      memory_budget=ns.memory_budget)
    print(format_table([res]))
    print(f"results written to {out}")
    del torch
    return 0


def _run_recover(ns: argparse.Namespace) -> int:
    from guard_fast.config import RecoverConfig
    from guard_fast.distill.recover import recover

    vals = {f.name: getattr(ns, f.name) for f in dataclasses.fields(RecoverConfig)}
    defaults = RecoverConfig()
    # None = unset: the dataclass default, or (for the preset fields) the teacher's preset
    cfg = RecoverConfig(**{k: (v if v is not None else getattr(defaults, k)) for k, v in vals.items()})
    summary = recover(cfg)
    print(f"distilled set written to {cfg.out} (images.pt, images/, grid.png)")
    print(json.dumps({k: round(v, 6) if isinstance(v, float) else v for k, v in summary.items()}))
    return 0


def _run_relabel(ns: argparse.Namespace) -> int:
    from guard_fast.distill.common import load_distilled
    from guard_fast.distill.relabel import relabel
    from guard_fast.distill.student import STUDENT_PRESETS

    d = load_distilled(ns.distilled)
    meta = d["meta"]
    teacher = ns.teacher or meta.get("teacher")
    if not teacher:
        raise ValueError(f"{ns.distilled} does not name its teacher (a DC set?): pass --teacher")
    data = meta.get("arch", {}).get("data", "mnist")
    pre = STUDENT_PRESETS.get(data, STUDENT_PRESETS["imagenette"])
    s = relabel(teacher, ns.distilled, ns.out, epochs=ns.epochs or pre["epochs"],
                batch_size=ns.batch_size or pre["batch_size"], seed=ns.seed, top_k=ns.top_k,
                dtype=ns.dtype, device=ns.device,
                min_scale=ns.min_scale if ns.min_scale is not None else pre["min_scale"],
                mix=ns.mix or pre["mix"], progress=True)
    print(f"soft labels written to {ns.out}")
    print(json.dumps(s, default=str))
    return 0


def _run_dc(ns: argparse.Namespace) -> int:
    from guard_fast.distill.dc import DCConfig, dc

    kw = {"data": ns.dc_dataset or "mnist", "data_root": ns.dc_data_root,
          "regularizer": ns.dc_regularizer or "none",
          "out": ns.out or "runs/dc", "resume": bool(ns.resume)}
    for k in ("ipc", "iterations", "seed", "device", "progress"):
        if getattr(ns, k) is not None:
            kw[k] = getattr(ns, k)
    res = dc(DCConfig(**kw))
    print(f"distilled set written to {kw['out']} (images.pt, images/, grid.png)")
    print(json.dumps(res, default=str))
    return 0


def _pipeline_config(ns: argparse.Namespace):
    from guard_fast.pipeline import PipelineConfig

    kw = dict(preset=ns.preset, data_root=ns.data_root, recover_method=ns.recover_method,
              ipc=ns.ipc, eps=ns.eps, protocol=ns.protocol, eval_examples=ns.eval_examples,
              smoke=ns.smoke, device=ns.device, seed=ns.seed, progress=ns.progress)
    if ns.methods:
        kw["methods"] = tuple(m.strip() for m in ns.methods.split(","))
    if ns.out:
        kw["out"] = ns.out
    return PipelineConfig(**kw)


def _run_all(ns: argparse.Namespace) -> int:
    from guard_fast.pipeline import run_experiment, run_pipeline

    from guard_fast.runtime import resolve_device

    resolve_device(ns.device)  # a CUDA device on a machine without one: say so first
    cfg = _pipeline_config(ns)
    if ns.experiment:
        run_experiment(ns.experiment, cfg, out=ns.out)
    else:
        run_pipeline(cfg)
    return 0


def _run_report(ns: argparse.Namespace) -> int:
    from guard_fast.pipeline import render_report

    print(render_report(ns.run_dir))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    argv = sys.argv[1:] if argv is None else argv
    if not argv:
        argv = ["all"]
        print("guard_fast: the whole pipeline on the bundled digits (python -m guard_fast.train "
              "--help for the stages and options)", flush=True)
    elif argv[0].startswith("-") and argv[0] not in ("-h", "--help"):
        argv = ["all", *argv]  # python -m guard_fast.train --preset imagenette --data PATH
    ns = parser.parse_args(argv)
    if ns.stage in _NOT_YET:
        print(f"guard_fast.train {ns.stage}: {_NOT_YET[ns.stage]}.", file=sys.stderr)
        return 2
    try:
        if ns.stage == "squeeze":
            return _run_squeeze(ns)
        if ns.stage == "recover":
            if ns.method == "dc":
                return _run_dc(ns)
            if ns.dc_dataset or ns.dc_data_root or ns.dc_regularizer:
                raise ValueError("--dataset, --data and --regularizer belong to --method dc; a "
                                 "sre2l/cda recover reads everything from its teacher")
            return _run_recover(ns)
        if ns.stage == "relabel":
            return _run_relabel(ns)
        if ns.stage == "all":
            return _run_all(ns)
        if ns.stage == "report":
            return _run_report(ns)
        return _run_evaluate(ns)
    except (ValueError, FileNotFoundError, FileExistsError, TypeError) as e:
        print(f"guard_fast.train {ns.stage}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
