"""The guard_fast command line: python -m guard_fast.train <stage> [options].

Stages: squeeze (train the teacher), evaluate (robust evaluation of a checkpoint), and
recover, relabel, all, report, which arrive with the recover/relabel and end-to-end issues:
until then they say so and exit with status 2 instead of pretending to run.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path
from typing import Any

from guard_fast.config import REGULARIZERS, SQUEEZE_PRESETS, SqueezeConfig

_NOT_YET = {
    "relabel": "the relabel stage (FKD soft labels) is not implemented yet",
    "all": "the whole pipeline needs recover and relabel, which are not implemented yet",
    "report": "re-rendering a whole pipeline run is not implemented yet (no such run exists)",
}

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
    ev = sub.add_parser("evaluate", help="robust evaluation of a checkpoint")
    ev.add_argument("--model", required=True, help="teacher.pt (or any guard_fast checkpoint)")
    ev.add_argument("--data", dest="data_root", default=None,
                    help="data set path (default: the bundled data, or the checkpoint's data set)")
    ev.add_argument("--protocol", default="standard", help="standard | paper-code (default: standard)")
    ev.add_argument("--eps", type=float, default=None,
                    help="L-inf radius in [0,1] pixel units (default: 1/255, the paper's)")
    ev.add_argument("--attacks", default=None, help="comma list of table columns (default: all)")
    ev.add_argument("--n-examples", type=int, default=500, help="validation images evaluated (default: 500)")
    ev.add_argument("--batch-size", type=int, default=250, help="images per attack batch (default: 250)")
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
    for name, why in _NOT_YET.items():
        sub.add_parser(name, help=f"not implemented yet: {why}")
    return p


def _run_squeeze(ns: argparse.Namespace) -> int:
    from guard_fast.config import resolve_squeeze
    from guard_fast.distill.squeeze import squeeze

    overrides = {f.name: getattr(ns, f.name) for f in dataclasses.fields(SqueezeConfig)}
    cfg = resolve_squeeze(overrides)
    metrics = squeeze(cfg)
    print(f"teacher written to {Path(cfg.out) / 'teacher.pt'}")
    print(json.dumps({k: round(v, 6) if isinstance(v, float) else v for k, v in metrics.items()}))
    return 0


def _run_evaluate(ns: argparse.Namespace) -> int:
    import torch

    from guard_fast.data import get_data
    from guard_fast.distill.squeeze import load_teacher, resolve_device
    from guard_fast.evaluate import format_table, robust_eval

    model, arch = load_teacher(ns.model)
    device = resolve_device(ns.device)
    data = get_data(arch.get("data", "mnist"), root=ns.data_root, image_size=arch["image_size"])
    out = Path(ns.out) if ns.out else Path(ns.model).resolve().parent / "eval"
    attacks = ns.attacks.split(",") if ns.attacks else None
    res = robust_eval(model.to(device), data.val, protocol=ns.protocol, attacks=attacks,
                      eps=ns.eps if ns.eps is not None else 1 / 255, batch_size=ns.batch_size,
                      n_examples=ns.n_examples, seed=ns.seed, out_dir=str(out), device=device)
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


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    argv = sys.argv[1:] if argv is None else argv
    if not argv:
        parser.print_help()
        print("\nThe no-argument run of the whole pipeline arrives with the recover and relabel "
              "stages. Today: python -m guard_fast.train squeeze", file=sys.stderr)
        return 2
    ns = parser.parse_args(argv)
    if ns.stage in _NOT_YET:
        print(f"guard_fast.train {ns.stage}: {_NOT_YET[ns.stage]}.", file=sys.stderr)
        return 2
    try:
        if ns.stage == "squeeze":
            return _run_squeeze(ns)
        if ns.stage == "recover":
            return _run_recover(ns)
        return _run_evaluate(ns)
    except (ValueError, FileNotFoundError, FileExistsError, TypeError) as e:
        print(f"guard_fast.train {ns.stage}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
