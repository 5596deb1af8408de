"""Recover (SRe2L / CDA synthesis) settings and their presets per teacher data set."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from guard_fast.config.base import opt, validate

__all__ = ["RecoverConfig", "RECOVER_PRESETS", "RECOVER_METHODS", "CDA_MODES", "resolve_recover"]

# Keyed by the teacher's data set. Values from the public code:
#   imagenette / imagenet-1k / imagefolder: GUARD's run.sh + recover/data_synthesis.py (as
#     SRe2L's ImageNet recipe): Adam lr 0.25, r_bn 0.01, 2000 iterations (run.sh ITERATION),
#     RandomResizedCrop(scale 0.08-1) + flip on the whole batch, roll by 0..32 pixels.
#   tiny-imagenet: lr 0.1 and r_bn 1.0 (GUARD's run.sh); crop + flip and a roll by -4..4
#     pixels (SRe2L's recover_tiny.py; GUARD's script keeps ImageNet's 0..32 roll at 64 px).
#   cifar10 / cifar100: SRe2L's and GUARD's recover_cifar.py: lr 0.25, r_bn 0.01, 1000
#     iterations, roll by 0..4 pixels, no crop or flip.
#   mnist: this package's CPU-sized default on the bundled digits (not a paper setting): the
#     CIFAR recipe with a 0..2 pixel roll and fewer iterations.
# CDA (Yin and Shen 2023) keeps the recipe and adds the crop-scale curriculum; its README
# runs --easy2hard-mode cosine --milestone 1.
_IMAGENET_RECIPE = dict(lr=0.25, r_bn=0.01, iterations=2000, crop=True, flip=True, jitter=32,
                       jitter_mode="positive")
_CIFAR_RECIPE = dict(lr=0.25, r_bn=0.01, iterations=1000, crop=False, flip=False, jitter=4,
                     jitter_mode="positive")
RECOVER_PRESETS: dict[str, dict[str, Any]] = {
    "mnist": dict(_CIFAR_RECIPE, iterations=300, jitter=2),
    "fashion-mnist": dict(_CIFAR_RECIPE, iterations=300, jitter=2),   # the digits' settings
    "imagenette": dict(_IMAGENET_RECIPE),
    "imagenet-1k": dict(_IMAGENET_RECIPE),
    "imagefolder": dict(_IMAGENET_RECIPE),
    "tiny-imagenet": dict(_IMAGENET_RECIPE, lr=0.1, r_bn=1.0, jitter=4, jitter_mode="symmetric"),
    "cifar10": dict(_CIFAR_RECIPE),
    "cifar100": dict(_CIFAR_RECIPE),
}
RECOVER_METHODS = ("sre2l", "cda")
CDA_MODES = ("step", "linear", "cosine")
_PRESET_NOTE = "unset: the preset of the teacher's data set"


@dataclass
class RecoverConfig:
    """Recover (SRe2L / CDA synthesis). None fields take the preset of the teacher's data set
    (RECOVER_PRESETS)."""

    teacher: str = opt("runs/squeeze", help="teacher.pt, or the squeeze run folder that holds it")
    method: str = opt("sre2l", help="sre2l | cda (curriculum on the crop scale) | dc (gradient "
                      "matching on real data; takes the dc options)",
                      choices=RECOVER_METHODS + ("dc",))
    ipc: int = opt(10, help="images per class", min=1)
    iterations: int | None = opt(None, help="synthesis iterations per batch", min=1,
                                 default_note=_PRESET_NOTE)
    lr: float | None = opt(None, help="Adam learning rate (cosine schedule)", unit="per step",
                           min=0, min_inclusive=False, default_note=_PRESET_NOTE)
    r_bn: float | None = opt(None, help="weight of the BatchNorm-statistics loss", min=0,
                             default_note=_PRESET_NOTE)
    first_bn_multiplier: float = opt(10.0, help="extra weight of the first BatchNorm layer's "
                                     "statistics (the public --first-bn-multiplier)", min=0)
    crop: bool | None = opt(None, help="RandomResizedCrop of the batch each iteration (+ its "
                            "curriculum under cda)", default_note=_PRESET_NOTE)
    flip: bool | None = opt(None, help="random horizontal flip of the batch each iteration",
                            default_note=_PRESET_NOTE)
    jitter: int | None = opt(None, help="random roll of the pixels, at most this many",
                             unit="pixels", min=0, default_note=_PRESET_NOTE)
    jitter_mode: str | None = opt(None, help="positive (roll by 0..jitter) | symmetric "
                                  "(-jitter..jitter)", choices=("positive", "symmetric"),
                                  default_note=_PRESET_NOTE)
    min_crop: float = opt(0.08, help="smallest crop area (CDA: the curriculum's end value)",
                          unit="fraction of the image area", min=0, min_inclusive=False, max=1)
    max_crop: float = opt(1.0, help="largest crop area", unit="fraction of the image area",
                          min=0, min_inclusive=False, max=1)
    cda_mode: str = opt("cosine", help="CDA curriculum", choices=CDA_MODES)
    milestone: float = opt(1.0, help="CDA: fraction of the iterations over which the crop scale "
                           "decreases", min=0, max=1)
    class_batch: int = opt(100, help="classes per synthesis batch (one image per class; the "
                           "public --batch-size)", min=1)
    group_size: int = opt(1, help="ipc ids synthesized together in one batch (per-group BN "
                          "statistics; same result, bigger batch)", min=1)
    amp: str = opt("none", help="autocast precision of the forward", choices=("none", "bf16", "fp16"))
    channels_last: bool = opt(False, help="channels_last teacher and inputs")
    compile: bool = opt(False, help="torch.compile the synthesis step")
    save_every: int = opt(100, help="iterations between resumable checkpoints", min=1)
    device: str = opt("auto", help="auto | cpu | cuda | cuda:N")
    seed: int = opt(0, help="random seed (initial noise and every augmentation draw)", min=0)
    out: str = opt("runs/recover", help="run folder for the distilled set")
    resume: bool = opt(False, help="continue the run in --out from its last checkpoint")
    progress: bool = opt(True, help="progress bars (--no-progress to silence)")


def resolve_recover(cfg: RecoverConfig, data: str) -> RecoverConfig:
    """Fill the None fields from the preset of the teacher's data set; validate; name bad values."""
    if cfg.method not in RECOVER_METHODS:
        raise ValueError(f"unknown recover method {cfg.method!r}; known: {', '.join(RECOVER_METHODS)}"
                         " (dc is its own stage: guard_fast.distill.dc)")
    preset = RECOVER_PRESETS.get(data, RECOVER_PRESETS["imagefolder"])
    if cfg.method == "cda" and cfg.crop is None:
        # CDA's curriculum schedules RandomResizedCrop's scale: it needs the crop even where
        # the SRe2L preset has none (CIFAR-style, the bundled digits)
        cfg = dataclasses.replace(cfg, crop=True)
    vals = {k: (preset[k] if getattr(cfg, k) is None and k in preset else getattr(cfg, k))
            for k in (f.name for f in dataclasses.fields(cfg))}
    cfg = validate(RecoverConfig(**vals))
    if cfg.method == "cda" and not cfg.crop:
        raise ValueError("method cda schedules the RandomResizedCrop scale: crop=False leaves it "
                         "nothing to schedule (drop crop=False, or use method sre2l)")
    if not 1 <= cfg.group_size <= cfg.ipc:
        raise ValueError(f"group_size must be between 1 and ipc ({cfg.ipc}), got {cfg.group_size}")
    if cfg.min_crop > cfg.max_crop:
        raise ValueError(f"need 0 < min_crop <= max_crop <= 1, got {cfg.min_crop}, {cfg.max_crop}")
    for k in ("iterations", "lr", "r_bn", "crop", "flip", "jitter", "jitter_mode"):
        if getattr(cfg, k) is None:
            raise ValueError(f"{k} is unset and the preset for {data!r} does not set it")
    return cfg
