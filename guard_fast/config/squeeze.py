"""Squeeze (teacher training) settings and the paper's presets."""
from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any

from guard_fast.config import limits as L
from guard_fast.config.base import diverge_opt, on_corrupt_opt, opt, resolve, to_dict

__all__ = ["SqueezeConfig", "SQUEEZE_PRESETS", "PRESETS_NEEDING_DATA", "REGULARIZERS",
           "GUARD_MODES", "resolve_squeeze", "field_help"]

REGULARIZERS = ("guard", "none", "gr", "pgd-at", "trades", "fbf")
GUARD_MODES = ("exact", "fd", "official-cifar", "official-imagenet")
AMP = ("none", "bf16", "fp16")

# imagenette/tiny-imagenet/imagenet-1k: the public GUARD code's pretrain.py run (run.sh /
# pretrain.sh): SGD lr 0.025, momentum 0.9, weight decay 1e-4, batch 32, cosine, 50 epochs,
# h = 3, lambda = 100. cifar10/cifar100: its pretrain_cifar.py (SGD lr 0.1, momentum 0.9,
# weight decay 5e-4, batch 128, cosine over 200 epochs). "mnist" is this package's own
# CPU-sized default on the bundled digits (not a paper setting).
SQUEEZE_PRESETS: dict[str, dict[str, Any]] = {
    # lr 0.05 diverged on the digits (GUARD penalty -> inf in the first epoch, caught by the
    # finite check), so the bundled preset uses 0.01.
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
# Fashion-MNIST: the digits' CPU-sized settings on its own data (found where Debian installs it)
SQUEEZE_PRESETS["fashion-mnist"] = dict(SQUEEZE_PRESETS["mnist"], data="fashion-mnist")
PRESETS_NEEDING_DATA = tuple(k for k in SQUEEZE_PRESETS if k not in ("mnist", "fashion-mnist"))


@dataclass
class SqueezeConfig:
    """Teacher training ("squeeze"). batch_size is the global batch (all processes)."""

    preset: str = opt("mnist", help="paper settings per data set", choices=tuple(SQUEEZE_PRESETS))
    data: str = opt("mnist", flag="--dataset",
                    help="data set name: mnist (bundled, no download), imagenette, tiny-imagenet, "
                         "imagenet-1k, imagefolder, cifar10, cifar100")
    data_root: str | None = opt(None, flag="--data", help="path to your copy of the data set; "
                                "needed by every preset but mnist")
    on_corrupt: str = on_corrupt_opt()
    image_size: int = opt(32, help="training image side", unit="pixels", min=1, max=L.SIDE)
    model: str = opt("resnet18", help="architecture name (guard_fast.models.list_models())")
    model_options: dict = opt(help='keyword options of the architecture, a JSON object, e.g. '
                              '{"width": 32, "norm": "batchnorm"} for convnet',
                              default_factory=dict)
    epochs: int = opt(2, help="training epochs", min=1, max=L.EPOCHS)
    batch_size: int = opt(64, help="global batch size (all processes together)", unit="images",
                          min=1, max=L.BATCH)
    lr: float = opt(0.01, help="peak learning rate of SGD (cosine schedule)", unit="per step",
                    min=0, min_inclusive=False, max=10)
    momentum: float = opt(0.9, help="SGD momentum", min=0, max=1, max_inclusive=False)
    weight_decay: float = opt(1e-4, help="SGD weight decay", min=0, max=1)
    warmup_epochs: int = opt(0, help="linear warm-up", unit="epochs", min=0, max=L.EPOCHS)
    regularizer: str = opt("guard", help="teacher regularizer", choices=REGULARIZERS)
    diverge_factor: float = diverge_opt()
    grad_ratio_steps: list[int] = opt(help="global steps (from 1) at which the ratio of the "
                                      "regularizer's to the CE's parameter-gradient norm is "
                                      "written to grad_ratio.jsonl (comma list)",
                                      min=1, max=L.STEPS, default_factory=list)
    # GUARD (Eq. 11) and its public-code modes
    guard_mode: str = opt("exact", help="GUARD mode", choices=GUARD_MODES)
    h: float = opt(3.0, help="GUARD step h, in the units of --h-space (paper: 3)", min=0, max=L.H,
                   min_inclusive=False)
    lam: float = opt(100.0, help="GUARD weight lambda (paper: 100; unused by official-imagenet)",
                     min=0, max=L.WEIGHT)
    beta: float = opt(1e-4, help="official-imagenet weight (public code: 1e-4)", min=0,
                      max=L.WEIGHT)
    bn_mode: str = opt("eval", help="module mode of the penalty passes: eval (published) | "
                       "model (the model's own, train mode in training; 'train' is its older "
                       "spelling)", choices=("eval", "model", "train"))
    chunk_size: int | None = opt(None, help="penalty passes in chunks of this many images (less "
                                 "memory, same result)", unit="images", min=1, max=L.BATCH)
    h_space: str = opt("normalized", help="space h is measured in: normalized (the public "
                       "code's) | pixel ([0,1] images)", choices=("normalized", "pixel"))
    # gradient-norm regularization (Table 3)
    gr_lam: float = opt(1e-2, help="gradient-norm weight lambda_g (Table 3 sweep: 1e-4 .. 1)",
                        min=0, max=L.WEIGHT)
    gr_mode: str = opt("exact", help="gradient-norm mode (official: the public code's detached "
                       "constant)", choices=("exact", "official"))
    # adversarial-training baselines (Table 1)
    adv_eps: float = opt(1 / 255, help="PGD-AT radius, L-inf (paper: 1/255)",
                         unit="[0,1] pixel units", min=0, max=1)
    adv_steps: int = opt(7, help="PGD-AT attack steps of adv_eps/4 (Madry's schedule)", min=1,
                         max=L.STEPS)
    trades_beta: float = opt(1e-4, help="TRADES weight beta (public code: 1e-4; its attack "
                             "constants are fixed)", min=0, max=L.WEIGHT)
    # speed
    amp: str = opt("none", help="autocast precision", choices=AMP)
    channels_last: bool = opt(False, help="channels_last model and inputs")
    compile: bool = opt(False, help="torch.compile the model (first-order regularizers only)")
    workers: int = opt(0, help="data-loading worker processes", min=0, max=L.WORKERS)
    # bookkeeping
    device: str = opt("auto", help="auto | cpu | cuda | cuda:N")
    seed: int = opt(0, help="random seed (data order, init, attacks)", min=0, max=L.SEED)
    max_train: int | None = opt(None, help="train on a fixed random subset of this many images "
                                "(smoke runs)", unit="images", min=1, max=L.IMAGES)
    max_val: int | None = opt(None, help="validate on a fixed random subset of this many images",
                              unit="images", min=1, max=L.IMAGES)
    out: str = opt("runs/squeeze", help="run folder")
    resume: bool = opt(False, help="continue the run in --out from its last checkpoint")
    progress: bool = opt(True, help="progress bars and per-epoch lines (--no-progress to silence)")

    def to_dict(self) -> dict:
        return to_dict(self)


def field_help() -> dict[str, tuple[Any, type]]:
    """{field: (default, annotation)}: what method strings such as guard:lam=10 may set."""
    return {f.name: (f.default, f.type) for f in fields(SqueezeConfig)}


def resolve_squeeze(overrides: dict[str, Any]) -> SqueezeConfig:
    """Preset values, then explicit overrides; validated, the bad value named."""
    overrides = dict(overrides)
    preset = overrides.pop("preset", None) or "mnist"
    cfg = resolve(SqueezeConfig, overrides, SQUEEZE_PRESETS, preset, what="squeeze")
    if preset in PRESETS_NEEDING_DATA and not cfg.data_root:
        raise ValueError(f"--preset {preset} trains on your copy of the data set: pass --data PATH")
    return cfg
