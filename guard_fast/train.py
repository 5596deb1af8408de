"""The guard_fast command line: python -m guard_fast.train [<stage>] [options].

With no arguments: the whole pipeline on the bundled digits on this machine (a plain SRe2L
teacher and a GUARD teacher; recover, relabel, students, robust evaluation; the paper's
Table 2 layout) in about ten minutes of a laptop CPU, written to runs/pipeline.

Stages (each reads the previous stage's run folder and writes its own):
  squeeze   train the teacher (GUARD or a baseline regularizer)
  recover   synthesize the distilled images (--method sre2l | cda | dc)
  relabel   store the teacher's soft labels on the student's views (FKD)
  student   train a student on a distilled set with the teacher's soft labels
  evaluate  train a student on a distilled set and evaluate it under attack, or evaluate
            a checkpoint (--model)
  experts   train MTT's expert trajectories (the buffer of mtt / tesla)
  mtt       distill by trajectory matching (MTT; --method tesla: TESLA)
  all       the whole pipeline (--preset, --data, --device, --smoke, --experiment)
  report    re-render the tables and plots of a pipeline run

Exit status: 0 done; 2 refused before any work (bad input, a folder holding another run
or in use by another process); 1 stopped mid-run by a numeric fault (NaN/Inf: the step's
statistics are printed, the last good checkpoint is kept) or a failed write (full disk,
I/O error: the file and the free space are named; rerun the same command to continue).

Every stage's options are generated from its configuration dataclass (guard_fast.config):
each field's help, unit, accepted values and default appear in --help. Evaluation defaults
(evaluate and all alike): protocol paper-code; eps 8/255 on the bundled digits, 1/255 (the
paper's) on every other data set.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from guard_fast import config as C


def _say(line: str) -> None:
    """A stage's closing line; under torchrun only rank 0 says it (one line per job, and the
    ranks' lines cannot interleave into one)."""
    from guard_fast.runtime import dist_env

    if dist_env()[0] == 0:
        print(line, flush=True)


def _print_json(d: dict) -> None:
    _say(json.dumps({k: round(v, 6) if isinstance(v, float) else v for k, v in d.items()},
                    default=str))


# ----------------------------------------------------------------------------- parsers

_RULE = C.EVAL_RULE[0].upper() + C.EVAL_RULE[1:]

# stage -> (one-line help, description, its config dataclass's name in guard_fast.config,
# add_options keywords). The options are generated from the dataclass: a new field appears
# in the stage's --help by itself.
_STAGES: dict[str, tuple[str, str, str | None, dict]] = {
    "squeeze": ("train the (GUARD) teacher",
                "Train the teacher. With no options: a GUARD teacher on the bundled MNIST digits, "
                "on this machine's CPU, in a few minutes.",
                "SqueezeConfig", dict(note="presets may change it")),
    "evaluate": ("train a student on a distilled set, then evaluate it under attack (or "
                 "evaluate a checkpoint with --model)",
                 f"Robust evaluation. {_RULE} (the same rule as the pipeline's).",
                 "EvaluateConfig", dict(fractions=("eps",))),
    "recover": ("synthesize the distilled images from a teacher",
                "Synthesize the distilled set from a squeezed teacher (SRe2L; --method cda adds "
                "CDA's crop curriculum; --method dc distills by gradient matching on real data). "
                "Options left unset take the preset of the teacher's data set.",
                "RecoverConfig", {}),
    "relabel": ("store the teacher's soft labels on the student's views",
                "FKD relabel: for every epoch of student training, the crop, flip and CutMix of "
                "each view and the teacher's logits on it. Unset view settings take the student "
                "preset of the distilled set's data set.",
                "RelabelConfig", {}),
    "student": ("train a student on a distilled set (FKD soft labels)",
                "Train a fresh student on a distilled set, replaying a relabel folder's views and "
                "soft labels (--soft-labels) or running the teacher online (--teacher). Works "
                "under torchrun.",
                "StudentConfig", dict(note="presets may change it")),
    "all": ("the whole pipeline (what no arguments run)",
            "squeeze -> recover -> relabel -> student -> robust evaluation for a plain SRe2L and a "
            "GUARD teacher, then the Table 2 layout, the distilled-image grids and the eps plot. "
            f"{_RULE}.",
            "PipelineConfig", dict(fractions=("eps",))),
    "report": ("re-render a pipeline run's tables and plots", "", None, {}),
    "experts": ("train MTT's expert trajectories (the buffer mtt and tesla match)",
                "Train N ConvNet experts on the real training set (MTT's buffer.py: SGD, no "
                "momentum, DSA, optional ZCA), saving each one's flat parameters after every "
                "epoch. --regularizer guard trains them with GUARD's penalty. Works under "
                "torchrun (experts shared out over the processes).",
                "ExpertsConfig", dict(note="presets may change it")),
    "mtt": ("distill by matching expert trajectories (MTT; --method tesla for TESLA)",
            "Matching training trajectories on an expert buffer (--buffer, from the experts "
            "stage): MTT's full-unroll gradient, or TESLA's constant-memory one with --method "
            "tesla (--tesla-gradient exact for the exact gradient at the same memory).",
            "MTTConfig", dict(note="presets may change it")),
}


def _extra_options(stage: str, p: argparse.ArgumentParser) -> None:
    """The few options that are not fields of the stage's config."""
    if stage == "recover":
        p.add_argument("--dataset", dest="dc_dataset", default=None,
                       help="--method dc only: real data set, mnist (bundled) | cifar10 | cifar100")
        p.add_argument("--data", dest="dc_data_root", default=None,
                       help="--method dc only: path of the CIFAR pickles")
        p.add_argument("--regularizer", dest="dc_regularizer", default=None,
                       help="--method dc only: none | guard (GUARD on the real-data gradient)")
    elif stage == "student":
        p.add_argument("--config", dest="config_file", default=None, help="a JSON file of "
                       "student settings (the fields below); flags given as well override it")
        p.add_argument("--stop-after", type=int, default=None, help="end after this many epochs "
                       "(checkpoint kept, no student.pt): --resume continues it")
    elif stage == "all":
        from guard_fast.pipeline import EXPERIMENTS

        p.add_argument("--experiment", default=None,
                       help=f"a paper experiment: {', '.join(EXPERIMENTS)}")
    elif stage == "report":
        p.add_argument("run_dir", help="the pipeline's --out folder")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m guard_fast.train", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="stage", metavar="STAGE")
    for stage, (help_, description, cls, kw) in _STAGES.items():
        sp = sub.add_parser(stage, help=help_, description=description or None)
        _extra_options(stage, sp)
        if cls is not None:
            C.add_options(sp, getattr(C, cls), **kw)
    return p


# ----------------------------------------------------------------------------- runners

def _run_squeeze(ns: argparse.Namespace) -> int:
    from guard_fast.distill.squeeze import squeeze

    cfg = C.resolve_squeeze(C.overrides_from(ns, C.SqueezeConfig))
    metrics = squeeze(cfg)
    _say(f"teacher written to {Path(cfg.out) / 'teacher.pt'}")
    _print_json(metrics)
    return 0


def _run_recover(ns: argparse.Namespace) -> int:
    from guard_fast.distill.recover import recover

    cfg = C.validate(C.RecoverConfig(**C.overrides_from(ns, C.RecoverConfig)), "cli")
    summary = recover(cfg)
    _say(f"distilled set written to {cfg.out} (images.pt, images/, grid.png)")
    _print_json(summary)
    return 0


def _run_dc(ns: argparse.Namespace) -> int:
    from guard_fast.distill.dc import dc

    kw = {"data": ns.dc_dataset or "mnist", "data_root": ns.dc_data_root,
          "regularizer": ns.dc_regularizer or "none",
          "out": ns.out or "runs/dc", "resume": bool(ns.resume)}
    for k in ("ipc", "iterations", "seed", "device", "progress"):
        if getattr(ns, k) is not None:
            kw[k] = getattr(ns, k)
    res = dc(C.DCConfig(**kw))
    _say(f"distilled set written to {kw['out']} (images.pt, images/, grid.png)")
    _say(json.dumps(res, default=str))
    return 0


def _run_relabel(ns: argparse.Namespace) -> int:
    from dataclasses import asdict

    from guard_fast.data.distilled import load_distilled
    from guard_fast.distill.relabel import relabel

    over = C.overrides_from(ns, C.RelabelConfig)
    distilled = over.get("distilled", C.RelabelConfig().distilled)
    cfg = C.resolve_relabel(over, load_distilled(distilled)["meta"])
    kw = asdict(cfg)
    s = relabel(kw.pop("teacher"), kw.pop("distilled"), kw.pop("out"), **kw)
    _say(f"soft labels written to {cfg.out}")
    _say(json.dumps(s, default=str))
    return 0


def _student_overrides(ns: argparse.Namespace) -> dict:
    over: dict = {}
    if ns.config_file:
        try:
            over = json.loads(Path(ns.config_file).read_text())
        except (OSError, ValueError) as e:
            raise ValueError(f"--config {ns.config_file}: not a readable JSON file ({e})") from e
        if not isinstance(over, dict):
            raise ValueError(f"--config {ns.config_file}: expected a JSON object of student "
                             "settings")
    over.update(C.overrides_from(ns, C.StudentConfig))
    return over


def _run_student(ns: argparse.Namespace) -> int:
    from guard_fast.distill.student import train_student

    if ns.stop_after is not None and ns.stop_after < 1:
        raise ValueError(f"--stop-after must be >= 1, got {ns.stop_after}")
    cfg = C.resolve_student(_student_overrides(ns))
    m = train_student(cfg, stop_after=ns.stop_after)
    _print_json(m)
    return 0


def _student_dir_for_eval(cfg: C.EvaluateConfig) -> Path:
    return Path(cfg.student_out) if cfg.student_out else \
        Path(cfg.distilled).resolve().parent / "student"


def _train_student_for_eval(cfg: C.EvaluateConfig) -> Path:
    from guard_fast.data.distilled import load_distilled
    from guard_fast.distill.student import train_student

    dist_dir = Path(cfg.distilled)
    meta = load_distilled(dist_dir)["meta"]
    data = meta.get("arch", {}).get("data", "mnist")
    preset = data if data in C.STUDENT_PRESETS else "imagenette"
    over: dict = {"preset": preset, "distilled": str(dist_dir), "device": cfg.device,
                  "out": str(_student_dir_for_eval(cfg)), "progress": True}
    if cfg.soft_labels:
        over["soft_labels"] = cfg.soft_labels
    else:
        over["teacher"] = cfg.teacher or meta.get("teacher")
        if not over["teacher"]:
            raise ValueError("online soft labels need a teacher: pass --teacher or --soft-labels")
    if cfg.student_model:
        over["model"] = cfg.student_model
    if cfg.student_epochs:
        over["epochs"] = cfg.student_epochs
    out = Path(over["out"])
    over["resume"] = (out / "config.json").exists() and not (out / "student.pt").exists()
    if not (out / "student.pt").exists():
        train_student(C.resolve_student(over))
    return out / "student.pt"


def _eval_folder(cfg: C.EvaluateConfig):
    """The evaluation's output folder, checked before any work: a folder holding another
    run (a pipeline, another stage, an evaluation with other settings, or results.json
    written by something else) is refused, naming it; nothing there is overwritten."""
    from dataclasses import asdict

    from guard_fast.runtime import RunFolder

    if cfg.out:
        out = Path(cfg.out)
    elif cfg.model:
        out = Path(cfg.model).resolve().parent / "eval"
    else:
        out = _student_dir_for_eval(cfg) / "eval"
    folder = RunFolder(out, "evaluate", asdict(cfg), resume="auto", final="results.json",
                       defaults=asdict(C.EvaluateConfig()),
                       resumable={"device", "memory_budget"})
    folder.check()
    return folder


def _run_evaluate(ns: argparse.Namespace) -> int:
    from guard_fast.data import fixed_subset, get_data, skipped_summary
    from guard_fast.evaluate import format_table, robust_eval
    from guard_fast.runtime import load_classifier, resolve_device

    cfg = C.validate(C.EvaluateConfig(**C.overrides_from(ns, C.EvaluateConfig)), "cli")
    if bool(cfg.model) == bool(cfg.distilled):
        raise ValueError("pass either --model CKPT (evaluate it) or --distilled FOLDER (train a "
                         "student on it, then evaluate), not both or neither")
    device = resolve_device(cfg.device)
    attacks = cfg.attacks.split(",") if cfg.attacks else None
    if attacks:  # before any training: an unknown column fails now, not after the student
        from guard_fast.attacks.protocols import get_protocol

        known = get_protocol(cfg.protocol).attack_names
        bad = [a for a in attacks if a not in known]
        if bad:
            raise ValueError(f"--attacks: unknown {bad}; the {cfg.protocol} protocol has "
                             f"{', '.join(known)}")
    folder = _eval_folder(cfg)
    model_path = cfg.model or str(_train_student_for_eval(cfg))
    model, arch = load_classifier(model_path)
    data_name = arch.get("data", "mnist")
    data = get_data(data_name, root=cfg.data_root, image_size=arch["image_size"],
                    on_corrupt=cfg.on_corrupt, on_corrupt_splits=("val",))
    line = skipped_summary(data)
    if line:
        _say(line)
    out = folder.out
    eps = cfg.eps if cfg.eps is not None else C.default_eps(data_name)
    folder.start()
    # a class-stratified draw: validation sets are stored by class, the first n would be
    # one or two classes
    val = fixed_subset(data.val, cfg.n_examples, 0)
    res = robust_eval(model.to(device), val, protocol=cfg.protocol, attacks=attacks,
                      eps=eps, batch_size=cfg.batch_size,
                      seed=cfg.seed, out_dir=str(out), device=device,
                      memory_budget=cfg.memory_budget)
    folder.complete(results=str(out / "results.json"))
    print(format_table([res]))
    print(f"results written to {out}")
    return 0


def _run_all(ns: argparse.Namespace) -> int:
    from guard_fast.pipeline import run_experiment, run_pipeline
    from guard_fast.runtime import resolve_device

    cfg = C.validate(C.PipelineConfig(**C.overrides_from(ns, C.PipelineConfig)), "cli")
    resolve_device(cfg.device)  # a CUDA device on a machine without one: say so first
    if ns.experiment:
        from guard_fast.pipeline.experiments import EXPERIMENT_FIXES

        for field in EXPERIMENT_FIXES.get(ns.experiment, ()):
            if getattr(ns, field, None) is not None:
                flag = "--" + field.replace("_", "-")
                raise ValueError(f"{flag} does not apply to --experiment {ns.experiment}: an "
                                 "experiment's rows are fixed (the README's experiments "
                                 f"section lists them); for rows of your own run `all {flag} "
                                 "...` without --experiment")
    if ns.experiment:
        run_experiment(ns.experiment, cfg, out=ns.out)
    else:
        run_pipeline(cfg)
    return 0


def _run_report(ns: argparse.Namespace) -> int:
    from guard_fast.pipeline import render_report

    print(render_report(ns.run_dir))
    return 0


def _run_recover_or_dc(ns: argparse.Namespace) -> int:
    if ns.method == "dc":
        return _run_dc(ns)
    if ns.dc_dataset or ns.dc_data_root or ns.dc_regularizer:
        raise ValueError("--dataset, --data and --regularizer belong to --method dc; a "
                         "sre2l/cda recover reads everything from its teacher")
    return _run_recover(ns)


def _run_experts(ns: argparse.Namespace) -> int:
    from guard_fast.config.experts import resolve_experts
    from guard_fast.distill.experts import experts

    cfg = resolve_experts(C.overrides_from(ns, C.ExpertsConfig))
    summary = experts(cfg)
    _say(f"expert buffer written to {cfg.out}")
    _print_json(summary)
    return 0


def _run_mtt(ns: argparse.Namespace) -> int:
    from guard_fast.config.mtt import resolve_mtt
    from guard_fast.distill.mtt import mtt

    cfg = resolve_mtt(C.overrides_from(ns, C.MTTConfig))
    res = mtt(cfg)
    _say(f"distilled set written to {cfg.out} (images.pt, synthetic.pt, grid.png)")
    _say(json.dumps(res, default=str))
    return 0


_RUNNERS = {"experts": _run_experts, "mtt": _run_mtt, "squeeze": _run_squeeze, "recover": _run_recover_or_dc, "relabel": _run_relabel,
            "student": _run_student, "evaluate": _run_evaluate, "all": _run_all,
            "report": _run_report}


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
    from guard_fast.runtime.allocator import tune_cpu_allocator

    tune_cpu_allocator()   # CPU loops reuse their freed buffers (see its docstring)
    if ns.stage is None:
        parser.print_help()
        return 2
    try:
        return _RUNNERS[ns.stage](ns)
    except (ValueError, FileNotFoundError, FileExistsError, TypeError, PermissionError,
            NotADirectoryError) as e:  # refused input: nothing was overwritten
        print(f"guard_fast.train {ns.stage}: error: {e}", file=sys.stderr)
        return 2
    except (FloatingPointError, OSError) as e:  # a numeric fault or a failed write mid-run
        print(f"guard_fast.train {ns.stage}: error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    raise SystemExit(main())
