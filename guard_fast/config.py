"""Run configuration: one dataclass per stage, with the paper's (and its public code's)
settings as named presets. Every field can be overridden from the CLI."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field, fields
from typing import Any

REGULARIZERS = ("guard", "none", "gr", "pgd-at", "trades", "fbf")

# Squeeze presets. imagenette/tiny-imagenet/imagenet-1k: the public GUARD code's pretrain.py
# run (run.sh / pretrain.sh): SGD lr 0.025, momentum 0.9, weight decay 1e-4, batch 32, cosine,
# 50 epochs, h = 3, lambda = 100. cifar10/cifar100: its pretrain_cifar.py (SGD lr 0.1, momentum
# 0.9, weight decay 5e-4, batch 128, cosine over 200 epochs). "mnist" is this package's own
# CPU-sized default on the bundled digits (not a paper setting).
SQUEEZE_PRESETS: dict[str, dict[str, Any]] = {
    # lr 0.05 diverged here (GUARD penalty -> inf in the first epoch, caught by the finite
    # check); 0.01 reached 58% validation accuracy after 16 steps.
    "mnist": dict(data="mnist", model="resnet18", image_size=32, epochs=2, batch_size=64,
                  lr=0.01, weight_decay=1e-4),
    "imagenette": dict(data="imagenette", model="resnet18", image_size=224, epochs=50,
                       batch_size=32, lr=0.025, weight_decay=1e-4),
    "tiny-imagenet": dict(data="tiny-imagenet", model="resnet18_small", image_size=64,
                          epochs=50, batch_size=32, lr=0.025, weight_decay=1e-4),
    "imagenet-1k": dict(data="imagenet-1k", model="resnet18", image_size=224, epochs=50,
                        batch_size=32, lr=0.025, weight_decay=1e-4),
    "cifar10": dict(data="cifar10", model="resnet18_small", image_size=32, epochs=200,
                    batch_size=128, lr=0.1, weight_decay=5e-4),
    "cifar100": dict(data="cifar100", model="resnet18_small", image_size=32, epochs=200,
                     batch_size=128, lr=0.1, weight_decay=5e-4),
}
PRESETS_NEEDING_DATA = tuple(k for k in SQUEEZE_PRESETS if k != "mnist")


@dataclass
class SqueezeConfig:
    """Teacher training ("squeeze"). Units: lr per step; eps, h in the units of the space
    named by h_space; image_size in pixels; batch_size is the global batch (all processes)."""

    preset: str = "mnist"
    data: str = "mnist"
    data_root: str | None = None
    image_size: int = 32
    model: str = "resnet18"
    epochs: int = 2
    batch_size: int = 64
    lr: float = 0.01
    momentum: float = 0.9
    weight_decay: float = 1e-4
    warmup_epochs: int = 0
    regularizer: str = "guard"
    # GUARD (Eq. 11) and its public-code modes
    guard_mode: str = "exact"
    h: float = 3.0
    lam: float = 100.0
    beta: float = 1e-4  # official-imagenet only
    bn_mode: str = "eval"
    chunk_size: int | None = None
    h_space: str = "normalized"  # where h is measured: "normalized" (public code) or "pixel"
    # gradient-norm regularization (Table 3)
    gr_lam: float = 1e-2
    gr_mode: str = "exact"
    # adversarial-training baselines (Table 1)
    adv_eps: float = 1 / 255  # PGD-AT radius (Table 1), [0,1] pixel units
    adv_steps: int = 7  # PGD-AT steps of adv_eps/4 (Madry's training schedule)
    trades_beta: float = 1e-4  # the public code's args.beta default
    # speed
    amp: str = "none"  # none | bf16 | fp16
    channels_last: bool = False
    compile: bool = False
    workers: int = 0
    # bookkeeping
    device: str = "auto"
    seed: int = 0
    max_train: int | None = None  # use only the first N training images (smoke runs)
    max_val: int | None = None
    out: str = "runs/squeeze"
    resume: bool = False
    progress: bool = True

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def field_help() -> dict[str, tuple[Any, type]]:
    return {f.name: (f.default, f.type) for f in fields(SqueezeConfig)}


def resolve_squeeze(overrides: dict[str, Any]) -> SqueezeConfig:
    """Preset values, then explicit overrides; validates choices and names the bad value."""
    preset = overrides.get("preset") or "mnist"
    if preset not in SQUEEZE_PRESETS:
        raise ValueError(f"unknown preset {preset!r}; known: {', '.join(SQUEEZE_PRESETS)}")
    values = dict(SQUEEZE_PRESETS[preset], preset=preset)
    values.update({k: v for k, v in overrides.items() if v is not None})
    names = {f.name for f in fields(SqueezeConfig)}
    unknown = sorted(set(values) - names)
    if unknown:
        raise ValueError(f"unknown squeeze option(s): {unknown}")
    cfg = SqueezeConfig(**values)
    if preset in PRESETS_NEEDING_DATA and not cfg.data_root:
        raise ValueError(f"--preset {preset} trains on your copy of the data set: pass --data PATH")
    if cfg.regularizer not in REGULARIZERS:
        raise ValueError(f"unknown regularizer {cfg.regularizer!r}; known: {', '.join(REGULARIZERS)}")
    if cfg.amp not in ("none", "bf16", "fp16"):
        raise ValueError(f"amp must be none, bf16 or fp16, got {cfg.amp!r}")
    if cfg.h_space not in ("normalized", "pixel"):
        raise ValueError(f"h_space must be 'normalized' or 'pixel', got {cfg.h_space!r}")
    for name in ("epochs", "batch_size", "image_size"):
        if getattr(cfg, name) < 1:
            raise ValueError(f"{name} must be >= 1, got {getattr(cfg, name)}")
    if cfg.lr <= 0:
        raise ValueError(f"lr must be > 0, got {cfg.lr}")
    return cfg


# Recover presets, keyed by the teacher's data set. Values from the public code:
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
RECOVER_PRESETS: dict[str, dict[str, Any]] = {
    "mnist": dict(lr=0.25, r_bn=0.01, iterations=300, crop=False, flip=False, jitter=2,
                  jitter_mode="positive"),
    "imagenette": dict(lr=0.25, r_bn=0.01, iterations=2000, crop=True, flip=True, jitter=32,
                       jitter_mode="positive"),
    "imagenet-1k": dict(lr=0.25, r_bn=0.01, iterations=2000, crop=True, flip=True, jitter=32,
                        jitter_mode="positive"),
    "imagefolder": dict(lr=0.25, r_bn=0.01, iterations=2000, crop=True, flip=True, jitter=32,
                        jitter_mode="positive"),
    "tiny-imagenet": dict(lr=0.1, r_bn=1.0, iterations=2000, crop=True, flip=True, jitter=4,
                          jitter_mode="symmetric"),
    "cifar10": dict(lr=0.25, r_bn=0.01, iterations=1000, crop=False, flip=False, jitter=4,
                    jitter_mode="positive"),
    "cifar100": dict(lr=0.25, r_bn=0.01, iterations=1000, crop=False, flip=False, jitter=4,
                     jitter_mode="positive"),
}
RECOVER_METHODS = ("sre2l", "cda")
CDA_MODES = ("step", "linear", "cosine")


@dataclass
class RecoverConfig:
    """Recover (SRe2L / CDA synthesis). None fields take the preset of the teacher's data set
    (RECOVER_PRESETS). Units: lr per Adam step; jitter in pixels; crop scales are fractions of
    the image area."""

    teacher: str = "runs/squeeze"  # teacher.pt, or the squeeze run folder holding it
    method: str = "sre2l"  # sre2l | cda
    ipc: int = 10
    iterations: int | None = None
    lr: float | None = None
    r_bn: float | None = None
    first_bn_multiplier: float = 10.0  # the public code's --first-bn-multiplier
    crop: bool | None = None  # RandomResizedCrop (+ its curriculum under cda)
    flip: bool | None = None
    jitter: int | None = None
    jitter_mode: str | None = None  # positive: roll by 0..jitter; symmetric: -jitter..jitter
    min_crop: float = 0.08
    max_crop: float = 1.0
    cda_mode: str = "cosine"  # step | linear | cosine
    milestone: float = 1.0  # fraction of the iterations over which the CDA curriculum runs
    class_batch: int = 100  # classes per synthesis batch (the public code's --batch-size)
    group_size: int = 1  # ipc ids synthesized together in one batch (per-group BN statistics)
    amp: str = "none"  # none | bf16 | fp16 (autocast on the forward)
    channels_last: bool = False
    compile: bool = False
    save_every: int = 100  # iterations between resumable checkpoints
    device: str = "auto"
    seed: int = 0
    out: str = "runs/recover"
    resume: bool = False
    progress: bool = True
