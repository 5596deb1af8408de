"""MTT / TESLA distillation settings and the published hyper-parameters.

MTT_PRESETS are MTT's per data set and IPC (Cazenavette et al., CVPR 2022; its README's
hyper-parameter table, as the public commands spell it): syn_steps N, expert_epochs M,
max_start_epoch T+, batch_syn (None: the whole synthetic set), ZCA, lr_img, lr_lr and
lr_teacher (the initial learned step size). ImageNette (ConvNetD5, 128 px): IPC 1 is the
README's ImageNet-subset command (ImageFruit, IPC 1: lr_img 1000); IPC 10 is what MTT's author
wrote the ImageNet runs used (mtt-distillation issue #1: syn_steps 20, expert_epochs 2,
max_start_epoch 10, lr_img 100000, lr_lr 1e-6, lr_teacher 0.01, and batch_syn 20 at IPC 10).
The two author sources disagree on lr_img (1000 vs 100000); the per-IPC table itself is
published only as an image. TESLA_PRESETS are TESLA's README commands (Cui et al., ICML 2023).
"mnist" / "fashion-mnist" are this package's CPU sizes (1 channel, 28 px, width 32; not
paper settings).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from guard_fast.config import limits as L
from guard_fast.config.base import opt, resolve, to_dict

__all__ = ["MTTConfig", "MTT_PRESETS", "TESLA_PRESETS", "MTT_METHODS", "TESLA_GRADIENTS",
           "MTT_LABELS", "resolve_mtt", "trajectory_distill_sizes"]

MTT_METHODS = ("mtt", "tesla")
TESLA_GRADIENTS = ("tesla", "exact")
MTT_LABELS = ("hard", "expert")


def _row(n, m, t, batch, zca, lr_img, lr_lr, lr_teacher, **kw) -> dict[str, Any]:
    return dict(syn_steps=n, expert_epochs=m, max_start_epoch=t, batch_syn=batch, zca=zca,
                lr_img=lr_img, lr_lr=lr_lr, lr_teacher=lr_teacher, **kw)


_CPU = dict(width=32, iterations=200, eval_epochs=300)
MTT_PRESETS: dict[str, dict[str, Any]] = {
    "cifar10-ipc1": _row(50, 2, 2, None, True, 100, 1e-7, 0.01, data="cifar10", ipc=1),
    "cifar10-ipc10": _row(30, 2, 20, None, True, 100, 1e-5, 0.001, data="cifar10", ipc=10),
    "cifar10-ipc50": _row(30, 2, 40, None, False, 1000, 1e-5, 0.001, data="cifar10", ipc=50),
    "cifar100-ipc1": _row(20, 3, 20, None, True, 1000, 1e-5, 0.01, data="cifar100", ipc=1),
    "cifar100-ipc10": _row(20, 2, 20, None, False, 1000, 1e-5, 0.01, data="cifar100", ipc=10),
    "cifar100-ipc50": _row(80, 2, 40, 125, True, 1000, 1e-5, 0.01, data="cifar100", ipc=50),
    "tiny-imagenet-ipc1": _row(10, 2, 10, None, False, 10000, 1e-4, 0.01,
                               data="tiny-imagenet", ipc=1),
    "tiny-imagenet-ipc10": _row(20, 2, 40, 200, False, 10000, 1e-4, 0.01,
                                data="tiny-imagenet", ipc=10),
    "tiny-imagenet-ipc50": _row(20, 2, 40, 300, False, 10000, 1e-4, 0.01,
                                data="tiny-imagenet", ipc=50),
    "imagenette-ipc1": _row(20, 2, 10, None, False, 1000, 1e-6, 0.01, data="imagenette", ipc=1),
    "imagenette-ipc10": _row(20, 2, 10, 20, False, 100000, 1e-6, 0.01, data="imagenette",
                             ipc=10),
    "mnist": _row(10, 2, 4, None, False, 100, 1e-5, 0.01, data="mnist", ipc=10, **_CPU),
    "fashion-mnist": _row(10, 2, 4, None, False, 100, 1e-5, 0.01, data="fashion-mnist", ipc=10,
                          **_CPU),
}
TESLA_PRESETS: dict[str, dict[str, Any]] = {
    "tesla-cifar10-ipc1": _row(50, 2, 5, None, False, 1000, 1e-7, 0.01, data="cifar10", ipc=1,
                               method="tesla"),
    "tesla-cifar100-ipc50": _row(80, 2, 40, 125, True, 1000, 1e-5, 0.01, data="cifar100",
                                 ipc=50, method="tesla"),
    "tesla-imagenet-1k-ipc1": _row(10, 3, 10, 100, False, 10000, 1e-4, 0.01,
                                   data="imagenet-1k", ipc=1, method="tesla", labels="expert"),
}
_ALL = {**MTT_PRESETS, **TESLA_PRESETS}


@dataclass
class MTTConfig:
    """Trajectory matching on an expert buffer (guard_fast.distill.mtt). Learning rates are per
    step; the images live in the buffer's input space (normalized, or ZCA-whitened)."""

    preset: str = opt("mnist", help="published hyper-parameters per data set and IPC",
                      choices=tuple(_ALL))
    buffer: str = opt("runs/experts", help="the experts run folder (python -m guard_fast.train "
                      "experts)")
    data: str = opt("mnist", flag="--dataset", help="the data set the buffer must be of")
    data_root: str | None = opt(None, flag="--data", help="path of the real data (CIFAR pickles)")
    method: str = opt("mtt", help="mtt (backpropagate through the whole unroll) | tesla "
                      "(per-step recomputation, memory independent of syn_steps)",
                      choices=MTT_METHODS)
    tesla_gradient: str = opt("tesla", help="tesla only: tesla (the public method's gradient, "
                              "later steps' Hessian terms dropped) | exact (the full-unroll "
                              "gradient by a reverse sweep over stored parameter vectors)",
                              choices=TESLA_GRADIENTS)
    labels: str | None = opt(None, help="hard (class labels, MTT) | expert (TESLA's soft labels: "
                             "softmax of the target expert on the synthetic images)",
                             choices=MTT_LABELS, default_note="hard for mtt, expert for tesla")
    ipc: int = opt(10, help="synthetic images per class", min=1, max=L.IPC)
    syn_steps: int = opt(20, help="student SGD steps per iteration (N)", min=1, max=L.STEPS)
    expert_epochs: int = opt(2, help="target: the expert this many epochs after the start (M)",
                             min=1, max=L.EPOCHS)
    max_start_epoch: int = opt(20, help="start epochs are drawn from [0, this) (T+)", min=1, max=L.EPOCHS)
    batch_syn: int | None = opt(None, help="synthetic images per student step",
                                unit="images", min=1, max=L.BATCH, default_note="unset: the whole set")
    zca: bool = opt(False, help="the buffer must be ZCA-whitened (MTT's --zca)")
    lr_img: float = opt(1000.0, help="SGD learning rate of the images", unit="per step", min=0, max=1e6,  # MTT: 100 .. 10,000
                        min_inclusive=False)
    lr_lr: float = opt(1e-5, help="SGD learning rate of the learned step size", unit="per step",
                       min=0, max=L.LR)
    lr_teacher: float = opt(0.01, help="initial learned student step size", min=0, max=L.LR,
                            min_inclusive=False)
    momentum: float = opt(0.5, help="SGD momentum of images and step size (MTT: 0.5)", min=0,
                          max=1, max_inclusive=False)
    iterations: int = opt(5000, help="distillation iterations (MTT: 5000)", min=1, max=L.STEPS)
    init: str = opt("real", help="initial images: real (random real images of the class) | "
                    "noise (standard normal in the input space)", choices=("real", "noise"))
    dsa: bool = opt(True, help="DSA augmentation in the student steps and the evaluation")
    dsa_strategy: str = opt("color_crop_cutout_flip_scale_rotate", help="DSA groups joined by _")
    width: int = opt(128, help="ConvNet width the buffer must have (MTT: 128)", min=1, max=L.SIDE)
    eval_models: int = opt(0, help="networks trained on the result at the end (MTT: 5)", min=0, max=L.IPC)
    eval_epochs: int = opt(1000, help="evaluation training (MTT's epoch_eval_train: 1000)",
                           unit="epochs", min=0, max=L.EPOCHS)
    batch_train: int = opt(256, help="evaluation batch (MTT: 256)", unit="images", min=1, max=L.BATCH)
    checkpoint_every: int = opt(10, help="iterations between resumable checkpoints", min=1, max=L.STEPS)
    seed: int = opt(0, help="random seed (init, experts and start epochs, batches)", min=0, max=L.SEED)
    device: str = opt("auto", help="auto | cpu | cuda | cuda:N")
    out: str = opt("runs/mtt", help="run folder for the distilled set")
    resume: bool = opt(False, help="continue the run in --out from its last checkpoint")
    progress: bool = opt(True, help="progress bar (--no-progress to silence)")

    def label_mode(self) -> str:
        return self.labels or ("expert" if self.method == "tesla" else "hard")

    def to_dict(self) -> dict:
        return to_dict(self)


def resolve_mtt(overrides: dict[str, Any] | None = None) -> MTTConfig:
    """Preset values, then explicit overrides; validated, the bad value named."""
    from guard_fast.data.dsa import check_strategy

    overrides = dict(overrides or {})
    preset = overrides.pop("preset", None) or "mnist"
    cfg = resolve(MTTConfig, overrides, _ALL, preset, what="mtt")
    check_strategy(cfg.dsa_strategy)
    return cfg


# The pipeline's trajectory methods (guard_fast.pipeline.trajectory): expert buffer and
# distillation sizes per pipeline preset (CPU sizes: the bundled digits and Fashion-MNIST;
# other presets are refused, run the experts and mtt stages with the published presets
# there), and the smoke sizes. distill_by_ipc: distillation settings above an IPC (the largest
# key not above it applies): from IPC 50 on, each differentiable student step takes a
# minibatch of 100 synthetic images (IPC 10's whole set) as MTT does for its larger sets
# (CIFAR-100 IPC 50: 125, Tiny-ImageNet IPC 10/50: 200/300), so that an IPC-50 iteration costs
# what an IPC-10 one does instead of five times as much.
_CPU_BY_IPC = {50: dict(batch_syn=100)}
TRAJECTORY_PIPELINE: dict[str, dict[str, Any]] = {
    "mnist": dict(experts=dict(preset="mnist"), distill=dict(preset="mnist"), eval_epochs=300,
                  distill_by_ipc=_CPU_BY_IPC),
    "fashion-mnist": dict(experts=dict(preset="fashion-mnist"),
                          distill=dict(preset="fashion-mnist"), eval_epochs=300,
                          distill_by_ipc=_CPU_BY_IPC),
    "smoke": dict(experts=dict(preset="mnist", num_experts=1, epochs=2, max_train=64, width=4),
                  distill=dict(preset="mnist", width=4, syn_steps=2, max_start_epoch=1,
                               expert_epochs=1, iterations=2), eval_epochs=1),
}


def trajectory_distill_sizes(sizes: dict[str, Any], ipc: int) -> dict[str, Any]:
    """The distillation settings of a TRAJECTORY_PIPELINE entry at ipc: its distill dict, then
    the distill_by_ipc entry of the largest IPC key not above ipc."""
    by_ipc = sizes.get("distill_by_ipc", {})
    keys = [k for k in by_ipc if k <= ipc]
    return {**sizes["distill"], **(by_ipc[max(keys)] if keys else {})}
