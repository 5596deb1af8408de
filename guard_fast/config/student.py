"""Student (FKD training on soft labels) settings and the public code's presets.

The view settings (image side, batch, crop scale, mixing, seed) are shared with the relabel
stage, which stores the views the student trains on: they are declared once here
(:func:`view_opt`) and used by both StudentConfig and RelabelConfig.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Any, Mapping

from guard_fast.config import limits as L
from guard_fast.config.base import diverge_opt, flag_of, opt, resolve, to_dict, validate

__all__ = ["StudentConfig", "STUDENT_PRESETS", "OPTIMIZERS", "LOSS_SCALES", "MIXES",
           "VIEW_FIELDS", "VIEW_DEFAULTS", "resolve_student", "validate_student",
           "check_choices", "view_opt"]

OPTIMIZERS = ("adamw", "sgd")
LOSS_SCALES = ("none", "T2")
MIXES = ("cutmix", "mixup", "none")

# Public-code settings. imagenet-1k: SRe2L validate/train_FKD.sh (resnet18, batch 1024, --cos,
# -T 20, cutmix, AdamW defaults lr 1e-3 / wd 0.01, RandomResizedCrop(224, scale (0.08, 1)));
# 300 epochs as in SRe2L and in the GUARD paper ("train a ResNet18 ... for 300 epochs").
# imagenette: the same recipe (the GUARD paper's ImageNet-subset evaluation, 300 epochs).
# tiny-imagenet: zeyuanyin/tiny-imagenet script/train_kd.sh (linked from SRe2L's
# README_TINY): SGD lr 0.2, momentum 0.9, wd 1e-4 on every parameter, batch 256, 100 epochs,
# 5 linear warm-up epochs from 0.01 x lr then cosine, T 20 with the T^2 factor, no mixing.
# cifar10/cifar100: SRe2L small_dataset/relabel_cifar.py(.sh): AdamW lr 1e-3 wd 0.01 on every
# parameter, CosineAnnealingLR over 400 epochs, batch 128, T 30, Mixup alpha 0.8 (its crop is
# RandomCrop(32, padding=4), which this package replaces by RandomResizedCrop views).
# mnist: this package's CPU-sized run on the bundled digits (not a paper setting).
_IMAGENET = dict(model="resnet18", image_size=224, epochs=300, batch_size=1024, optimizer="adamw",
                 lr=0.001, weight_decay=0.01, decay_1d=False, temperature=20.0,
                 loss_scale="none", mix="cutmix", min_scale=0.08)
_CIFAR = dict(model="resnet18_small", image_size=32, epochs=400, batch_size=128,
              optimizer="adamw", lr=0.001, weight_decay=0.01, decay_1d=True, temperature=30.0,
              loss_scale="none", mix="mixup", min_scale=0.08)
STUDENT_PRESETS: dict[str, dict[str, Any]] = {
    "imagenet-1k": dict(_IMAGENET),
    "imagenette": dict(_IMAGENET),
    "tiny-imagenet": dict(model="resnet18_small", image_size=64, epochs=100, batch_size=256,
                          optimizer="sgd", lr=0.2, momentum=0.9, weight_decay=1e-4,
                          decay_1d=True, warmup_epochs=5, warmup_start=0.01,
                          temperature=20.0, loss_scale="T2", mix="none", min_scale=0.08),
    "cifar10": dict(_CIFAR),
    "cifar100": dict(_CIFAR),
    "mnist": dict(model="resnet18", image_size=32, epochs=30, batch_size=50, optimizer="adamw",
                  lr=0.001, weight_decay=0.01, decay_1d=False, temperature=20.0,
                  loss_scale="none", mix="cutmix", min_scale=0.25),
}

STUDENT_PRESETS["fashion-mnist"] = dict(STUDENT_PRESETS["mnist"])   # the digits' settings

# The view settings: in replay mode they are the relabel folder's (None: take them from it)
VIEW_FIELDS = ("image_size", "batch_size", "min_scale", "max_scale", "mix", "cutmix_alpha",
               "mixup_alpha", "seed")
# view defaults the presets leave out (the public code's values; seed 0 ours)
VIEW_DEFAULTS = dict(seed=0, max_scale=1.0, cutmix_alpha=1.0, mixup_alpha=0.8)

_VIEW_OPTS: dict[str, dict[str, Any]] = {
    "image_size": dict(help="side of the student's (square) input: the views are resized to it",
                       unit="pixels", min=1, max=L.SIDE),
    "batch_size": dict(help="global batch of the student (all processes together): views are "
                       "drawn and mixed per batch", unit="images", min=1, max=L.BATCH),
    "seed": dict(help="view seed: the crops, flips and mixing of every epoch", min=0, max=L.SEED),
    "min_scale": dict(help="smallest RandomResizedCrop area (SRe2L: --min-scale-crops 0.08)",
                      unit="fraction of the image area", min=0, min_inclusive=False, max=1),
    "max_scale": dict(help="largest RandomResizedCrop area", unit="fraction of the image area",
                      min=0, min_inclusive=False, max=1),
    "mix": dict(help="mixing within each batch: cutmix (the public train_FKD) | mixup (its CIFAR "
                "script) | none", choices=MIXES),
    "cutmix_alpha": dict(help="CutMix: the mixing weight is Beta(alpha, alpha)", min=0, max=L.ALPHA,
                         min_inclusive=False),
    "mixup_alpha": dict(help="Mixup: the mixing weight is Beta(alpha, alpha)", min=0, max=L.ALPHA,
                        min_inclusive=False),
}


def view_opt(name: str, default: Any = None, *, default_note: str | None = None) -> Any:
    """The declaration (help, unit, range) of the view setting ``name``, shared by the student
    and relabel configs so both check a view setting the same way."""
    return opt(default, default_note=default_note, **_VIEW_OPTS[name])


_VIEW_NOTE = "unset: the relabel folder's; online: the preset's"
_TEACHER_NOTE = "unset: the teacher's"


@dataclass
class StudentConfig:
    """Student training. batch_size is the global batch (all processes); lr per step group as
    in torch; image_size is the student's input side (the views' out_size).

    View fields (image_size, batch_size, min_scale, max_scale, mix, *_alpha, seed): online
    mode draws its views with them; in replay mode they must equal the relabel folder's (None
    takes the folder's value). resolve_student fills them from the preset only in online
    mode (no soft_labels), so a replayed run follows its relabel folder unless told
    otherwise -- and then says where they differ."""

    out: str = opt("runs/student", help="run folder")
    preset: str = opt("mnist", help="the public code's settings per data set",
                      choices=tuple(STUDENT_PRESETS))
    distilled: str | None = opt(None, help="distilled-set folder (the recover stage's --out) or "
                                "images.pt", default_note="replay: the relabel folder's")
    soft_labels: str | None = opt(None, help="relabel folder: replay its views and soft labels "
                                  "(unset: online soft labels from --teacher)")
    teacher: str | None = opt(None, help="teacher.pt for online soft labels: the teacher runs "
                              "on every view, nothing is stored (not with --soft-labels)")
    model: str = opt("resnet18", help="student architecture (guard_fast.models.list_models())")
    model_options: dict = opt(help='keyword options of the architecture, a JSON object, e.g. '
                              '{"width": 16, "depth": 2} for convnet', default_factory=dict)
    epochs: int = opt(30, help="training epochs", unit="epochs", min=1, max=L.EPOCHS)
    image_size: int | None = view_opt("image_size", default_note=_VIEW_NOTE)
    batch_size: int | None = view_opt("batch_size", default_note=_VIEW_NOTE)
    seed: int | None = view_opt("seed", default_note=_VIEW_NOTE)
    min_scale: float | None = view_opt("min_scale", default_note=_VIEW_NOTE)
    max_scale: float | None = view_opt("max_scale", default_note=_VIEW_NOTE)
    mix: str | None = view_opt("mix", default_note=_VIEW_NOTE)
    cutmix_alpha: float | None = view_opt("cutmix_alpha", default_note=_VIEW_NOTE)
    mixup_alpha: float | None = view_opt("mixup_alpha", default_note=_VIEW_NOTE)
    optimizer: str = opt("adamw", help="adamw (the public train_FKD) | sgd (the Tiny-ImageNet "
                         "recipe)", choices=OPTIMIZERS)
    lr: float = opt(0.001, help="peak learning rate (linear warm-up, then cosine, stepped per "
                    "epoch)", min=0, max=L.LR, min_inclusive=False)
    momentum: float = opt(0.9, help="SGD momentum (sgd only)", min=0, max=1, max_inclusive=False)
    betas: tuple[float, float] = opt((0.9, 0.999), help="AdamW betas, two numbers in [0, 1) (adamw only)")
    weight_decay: float = opt(0.01, help="weight decay", min=0, max=1)
    decay_1d: bool = opt(False, help="also decay biases and norm weights (the public AdamW path "
                         "decays only weight tensors of more than one dimension)")
    warmup_epochs: int = opt(0, help="linear warm-up of the lr", unit="epochs", min=0, max=L.EPOCHS)
    warmup_start: float = opt(0.01, help="the warm-up starts at this fraction of lr", min=0,
                              max=1)
    temperature: float = opt(20.0, help="KD temperature T (train_FKD.sh: 20; the CIFAR script: "
                             "30)", min=0, max=L.TEMPERATURE, min_inclusive=False)
    loss_scale: str = opt("none", help="none (the public train_FKD: no T^2 factor) | T2 "
                          "(Hinton's T^2 scaling, the Tiny-ImageNet recipe)", choices=LOSS_SCALES)
    accum_steps: int = opt(1, help="micro-batches per optimizer step (the public "
                           "--gradient-accumulation-steps): the same gradient in less memory",
                           min=1, max=L.STEPS)
    init_seed: int = opt(0, help="seed of the student's weight initialisation", min=0, max=L.SEED)
    mean: list[float] | None = opt(None, help="per-channel mean of the normalization inside the "
                            "student", unit="[0,1] pixel units", default_note=_TEACHER_NOTE)
    std: list[float] | None = opt(None, help="per-channel std of the normalization inside the student "
                           "(positive)", unit="[0,1] pixel units", default_note=_TEACHER_NOTE)
    val_data: str | None = opt(None, help="data set whose validation split measures accuracy "
                               "(guard_fast.data.get_data name, e.g. mnist)")
    val_root: str | None = opt(None, help="path to your copy of the validation data set")
    max_val: int | None = opt(None, help="validate on a fixed random subset of this many images",
                              unit="images", min=1, max=L.IMAGES)
    diverge_factor: float = diverge_opt()
    val_every: int = opt(1, help="validate every this many epochs (and after the last)",
                         unit="epochs", min=1, max=L.EPOCHS)
    device: str = opt("auto", help="auto | cpu | cuda | cuda:N")
    resume: bool = opt(False, help="continue the run in --out from its last checkpoint")
    progress: bool = opt(False, help="progress bars and per-epoch lines")

    def to_dict(self) -> dict:
        return to_dict(self)


def check_choices(cls, values: Mapping[str, Any]) -> None:
    """Refuse a value outside a field's declared choices as ``unknown <field> <value>``,
    naming the known ones (the wording these stages have always used)."""
    for f in fields(cls):
        known = f.metadata.get("choices")
        v = values.get(f.name)
        if known is not None and v is not None and v not in known:
            raise ValueError(f"unknown {f.name} {v!r}; known: {', '.join(map(str, known))} "
                             f"(flag {flag_of(f)})")


def _numbers(cfg: StudentConfig, name: str, *, lo: float, lo_ok: bool, hi: float,
             hi_ok: bool, n: int | None = None) -> None:
    """A list field of numbers (a JSON list, or "a,b" from the command line), each in range."""
    v = getattr(cfg, name)
    if v is None:
        return
    flag = "--" + name.replace("_", "-")
    try:
        nums = [float(x) for x in v]
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a list of numbers, got {v!r} (flag {flag})") from None
    bad = [x for x in nums if not math.isfinite(x) or (x < lo if lo_ok else x <= lo)
           or (x > hi if hi_ok else x >= hi)]
    if bad or (n is not None and len(nums) != n) or not nums:
        rng = ("[" if lo_ok else "(") + f"{lo:g}, {hi:g}" + ("]" if hi_ok else ")")
        count = f"{n} numbers" if n else "numbers"
        raise ValueError(f"{name} must be {count} in {rng}, got {v!r} (flag {flag})")
    object.__setattr__(cfg, name, type(v)(nums))


def validate_student(cfg: StudentConfig) -> StudentConfig:
    """Check every field of cfg against its declaration (choices named "unknown ...", then
    type and range); betas, mean and std element by element. Returns cfg (coerced in place)."""
    check_choices(StudentConfig, {f.name: getattr(cfg, f.name) for f in fields(cfg)})
    validate(cfg)
    _numbers(cfg, "betas", lo=0, lo_ok=True, hi=1, hi_ok=False, n=2)
    # statistics of [0, 1] pixels: a mean lies in [0, 1], a std in (0, 0.5]; (0, 1] is kept
    # as the std's bound so that a hand-set wider normalization still passes
    _numbers(cfg, "mean", lo=0, lo_ok=True, hi=1, hi_ok=True)
    _numbers(cfg, "std", lo=0, lo_ok=False, hi=1, hi_ok=True)
    return cfg


def _preset_values(preset: Mapping[str, Any], replay: bool) -> dict:
    """Replay: the views are the relabel folder's, so the preset's view fields are left out
    (None: taken from the folder). Online: the preset's views, completed by VIEW_DEFAULTS."""
    if replay:
        return {k: v for k, v in preset.items() if k not in VIEW_FIELDS}
    return {**VIEW_DEFAULTS, **preset}


def resolve_student(overrides: Mapping[str, Any] | None = None) -> StudentConfig:
    """StudentConfig from a preset (overrides["preset"], default "mnist") and overrides
    (None = unset); validated, the bad value named."""
    overrides = dict(overrides or {})
    preset = overrides.get("preset") or "mnist"
    check_choices(StudentConfig, overrides)
    replay = overrides.get("soft_labels") is not None
    presets = {name: _preset_values(p, replay) for name, p in STUDENT_PRESETS.items()}
    cfg = resolve(StudentConfig, overrides, presets, preset, what="student")
    return validate_student(cfg)
