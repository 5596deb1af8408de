"""Expert trajectories (MTT's buffer stage) settings and presets.

The defaults are MTT's public buffer.py: ConvNet, SGD at lr_teacher 0.01 with no momentum
and no weight decay, batch 256, 50 epochs, DSA augmentation, 100 experts; ZCA whitening for
the CIFAR buffers it distills with ZCA. The regularizer fields are squeeze's (the same
declarations, so the same flags and help): ``--regularizer guard`` trains every expert with
GUARD's penalty, giving trajectories of GUARD-regularized training to match.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, fields
from typing import Any

from guard_fast.config import limits as L
from guard_fast.config.base import opt, resolve, to_dict
from guard_fast.config.squeeze import REGULARIZERS, SqueezeConfig
from guard_fast.models.convnet import NORMS

__all__ = ["ExpertsConfig", "EXPERTS_PRESETS", "EXPERT_MODELS", "resolve_experts"]

EXPERT_MODELS = ("convnet", "convnet_d4", "convnet_d5")

# cifar10 / cifar100: MTT's README command (100 experts, 50 epochs, --zca); cifar10-nozca: the
# same without ZCA (MTT distills CIFAR-10 IPC 50 on it). mnist: this package's CPU size on the
# bundled digits (1 channel, 28 px, width 32; not a paper setting); fashion-mnist: the same
# sizes on a fixed 6,000-image draw of Fashion-MNIST's training split.
EXPERTS_PRESETS: dict[str, dict[str, Any]] = {
    "mnist": dict(data="mnist", channels=1, image_size=28, width=32, num_experts=4, epochs=6),
    "fashion-mnist": dict(data="fashion-mnist", channels=1, image_size=28, width=32,
                          num_experts=4, epochs=6, max_train=6000),
    "cifar10": dict(data="cifar10", image_size=32, num_experts=100, epochs=50, zca=True),
    "cifar10-nozca": dict(data="cifar10", image_size=32, num_experts=100, epochs=50, zca=False),
    "cifar100": dict(data="cifar100", image_size=32, num_experts=100, epochs=50, zca=True),
    # MTT's buffer.py for its ImageNet subsets (--res 128, ConvNetD5) and Tiny-ImageNet
    # (64 px, ConvNetD4): no ZCA, the other settings its defaults
    "imagenette": dict(data="imagenette", image_size=128, model="convnet_d5", num_experts=100,
                       epochs=50, zca=False),
    "tiny-imagenet": dict(data="tiny-imagenet", image_size=64, model="convnet_d4",
                          num_experts=100, epochs=50, zca=False),
}
_SQ = {f.name: f for f in fields(SqueezeConfig)}


def _squeeze_field(name: str, default: Any = dataclasses.MISSING) -> Any:
    """squeeze's declaration of a regularizer field (its help, unit, range, choices)."""
    f = _SQ[name]
    return dataclasses.field(default=f.default if default is dataclasses.MISSING else default,
                             metadata=f.metadata)


@dataclass
class ExpertsConfig:
    """N experts on the real training set, each saving its flat parameters after every epoch."""

    preset: str = opt("mnist", help="data set and sizes", choices=tuple(EXPERTS_PRESETS))
    data: str = opt("mnist", flag="--dataset",
                    help="real data set: mnist (bundled), fashion-mnist, cifar10, cifar100, "
                         "imagenette, tiny-imagenet, imagefolder (decoded into memory as MTT "
                         "reads them: squashed to image-size, no crop)")
    data_root: str | None = opt(None, flag="--data", help="path of the CIFAR pickles or the "
                                "ImageFolder root")
    image_size: int | None = opt(None, help="image side", unit="pixels", min=1, max=L.SIDE,
                                 default_note="the data set's")
    channels: int | None = opt(None, help="mnist only: image channels (1 or 3)", min=1, max=3)
    model: str = opt("convnet", help="MTT's ConvNet (convnet_d4: 64 px, convnet_d5: 128 px)",
                     choices=EXPERT_MODELS)
    width: int = opt(128, help="ConvNet channels per block (MTT: 128)", min=1, max=L.SIDE)
    depth: int = opt(3, help="convnet only: conv blocks (MTT: 3)", min=1, max=L.DEPTH)
    norm: str = opt("instancenorm", help="ConvNet normalization (MTT: instancenorm)",
                    choices=NORMS)
    num_experts: int = opt(100, help="experts to train (MTT: 100)", min=1, max=L.IPC)
    epochs: int = opt(50, help="training of each expert (MTT's train_epochs: 50)",
                      unit="epochs", min=1, max=L.EPOCHS)
    lr_teacher: float = opt(0.01, help="expert SGD learning rate (MTT: 0.01)", unit="per step",
                            min=0, max=L.LR, min_inclusive=False)
    momentum: float = opt(0.0, help="expert SGD momentum (MTT's --mom: 0)", min=0, max=1,
                          max_inclusive=False)
    weight_decay: float = opt(0.0, help="expert SGD weight decay (MTT's --l2: 0)", min=0, max=1)
    batch_train: int = opt(256, help="expert batch (MTT: 256)", unit="images", min=1, max=L.BATCH)
    dsa: bool = opt(True, help="DSA augmentation of the training batches (MTT: on)")
    dsa_strategy: str = opt("color_crop_cutout_flip_scale_rotate", help="DSA groups joined by _")
    zca: bool = opt(False, help="ZCA-whiten the images (kornia's eps 0.1, as MTT's --zca)")
    regularizer: str = opt("none", help="expert regularizer: none (MTT) or one of squeeze's",
                           choices=REGULARIZERS)
    guard_mode: str = _squeeze_field("guard_mode")
    h: float = _squeeze_field("h")
    lam: float = _squeeze_field("lam")
    beta: float = _squeeze_field("beta")
    bn_mode: str = _squeeze_field("bn_mode")
    chunk_size: int | None = _squeeze_field("chunk_size")
    gr_lam: float = _squeeze_field("gr_lam")
    gr_mode: str = _squeeze_field("gr_mode")
    adv_eps: float = _squeeze_field("adv_eps")
    adv_steps: int = _squeeze_field("adv_steps")
    trades_beta: float = _squeeze_field("trades_beta")
    max_train: int | None = opt(None, help="train on a fixed random subset of this many images",
                                unit="images", min=1, max=L.IMAGES)
    seed: int = opt(0, help="random seed (expert k: inits and batches from (seed, k))", min=0, max=L.SEED)
    device: str = opt("auto", help="auto | cpu | cuda | cuda:N")
    out: str = opt("runs/experts", help="run folder (the expert buffer)")
    resume: bool = opt(False, help="continue the run in --out (mid-expert, from its last epoch)")
    progress: bool = opt(True, help="progress lines (--no-progress to silence)")

    def to_dict(self) -> dict:
        return to_dict(self)


def resolve_experts(overrides: dict[str, Any] | None = None) -> ExpertsConfig:
    """Preset values, then explicit overrides; validated, the bad value named."""
    from guard_fast.data.dsa import check_strategy

    overrides = dict(overrides or {})
    preset = overrides.pop("preset", None) or "mnist"
    cfg = resolve(ExpertsConfig, overrides, EXPERTS_PRESETS, preset, what="experts")
    if cfg.data not in ("mnist", "fashion-mnist") and "channels" not in overrides:
        cfg.channels = None   # a grey preset's channels do not carry to an RGB data set
    check_strategy(cfg.dsa_strategy)
    if cfg.channels not in (None, 1, 3):
        raise ValueError(f"channels must be 1 or 3, got {cfg.channels} (flag --channels)")
    if cfg.data not in ("mnist", "fashion-mnist") and not cfg.data_root:
        raise ValueError(f"--dataset {cfg.data} trains on your copy of the data: pass --data PATH")
    return cfg
