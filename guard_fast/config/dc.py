"""DC (Dataset Condensation by gradient matching, + an optional GUARD regularizer) settings.

The defaults are the DC paper's and its public code's (Zhao, Mopuri & Bilen, ICLR 2021);
DC has no per-data-set presets, only its table of loop counts per IPC (:func:`get_loops`).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Mapping

from guard_fast.config import limits as L
from guard_fast.config.base import opt, resolve, to_dict, validate
from guard_fast.models.convnet import NORMS

__all__ = ["DCConfig", "DC_REGULARIZERS", "DC_INITS", "DC_GUARD_MODES", "DC_H_SPACES",
           "DC_DATASETS", "DC_LOOPS", "get_loops", "resolve_dc"]

DC_REGULARIZERS = ("none", "guard")
DC_INITS = ("real", "noise")
# the modes of guard_fast.losses.guard_loss's fused path, through which DC takes the real
# gradient (official-imagenet has no fused path, and it ignores lambda)
DC_GUARD_MODES = ("exact", "fd", "official-cifar")
DC_H_SPACES = ("normalized", "pixel")
DC_DATASETS = ("mnist", "cifar10", "cifar100")
# DC's get_loops (public code, utils.py): ipc -> (outer_loop, inner_loop)
DC_LOOPS = {1: (1, 1), 10: (10, 50), 20: (20, 25), 30: (30, 20), 40: (40, 15), 50: (50, 10)}
_LOOPS_NOTE = "unset: DC's get_loops for the IPC (set both or neither)"


def get_loops(ipc: int) -> tuple[int, int]:
    """(outer_loop, inner_loop) of DC's public code for this IPC."""
    if ipc not in DC_LOOPS:
        raise ValueError(f"DC defines (outer_loop, inner_loop) only for IPC in {sorted(DC_LOOPS)}; "
                         f"for IPC {ipc} set both outer_loop and inner_loop")
    return DC_LOOPS[ipc]


@dataclass
class DCConfig:
    """DC (+ GUARD) distillation. Defaults are the DC paper's / public code's; learning rates
    are per step; h is in the units of h_space. Resolve with :func:`resolve_dc` (dc() does)."""

    data: str = opt("mnist", flag="--dataset",
                    help=f"real data set: {' | '.join(DC_DATASETS)} (mnist: bundled, no download)")
    data_root: str | None = opt(None, flag="--data",
                                help="path of the CIFAR pickles (cifar10, cifar100)")
    image_size: int | None = opt(None, help="image side", unit="pixels", min=1, max=L.SIDE,
                                 default_note="unset: the data set's (32)")
    channels: int | None = opt(None, help="mnist only: image channels", choices=(1, 3),
                               default_note="unset: 3, the bundle's default")
    ipc: int = opt(10, help="synthetic images per class", min=1, max=L.IPC)
    iterations: int = opt(1000, help="outer iterations K, each on a freshly initialized network "
                          "(paper: 1000)", min=1, max=L.STEPS)
    outer_loop: int | None = opt(None, help="image updates per iteration", min=1, max=L.STEPS,
                                 default_note=_LOOPS_NOTE)
    inner_loop: int | None = opt(None, help="network training on the synthetic set between two "
                                 "image updates", unit="epochs", min=0, max=L.EPOCHS,
                                 default_note=_LOOPS_NOTE)
    batch_real: int = opt(256, help="real images of one class per matching step (DC: 256)",
                          unit="images", min=1, max=L.BATCH)
    batch_train: int = opt(256, help="batch of the inner-loop and evaluation training (DC: 256)",
                           unit="images", min=1, max=L.BATCH)
    lr_img: float = opt(0.1, help="SGD learning rate of the synthetic images, which live in the "
                        "normalized space (DC: 0.1)", unit="per step", min=0, max=L.LR,
                        min_inclusive=False)
    momentum_img: float = opt(0.5, help="SGD momentum of the synthetic images (DC: 0.5)", min=0,
                              max=1, max_inclusive=False)
    lr_net: float = opt(0.01, help="SGD learning rate of the network, inner loop and evaluation "
                        "(DC: 0.01)", unit="per step", min=0, max=L.LR, min_inclusive=False)
    init: str = opt("real", help="initial synthetic images: real (random real images of the "
                    "class, DC's) | noise (standard normal in the normalized space)",
                    choices=DC_INITS)
    clip_pixels: bool = opt(False, help="project the images onto [0, 1] pixels after every image "
                            "step (not in DC; the saved set is then exactly what was learned)")
    model: str = opt("convnet", help="DC's ConvNet, the only choice (width, depth and norm vary "
                     "it)", choices=("convnet",))
    width: int = opt(128, help="ConvNet channels per block (DC: 128)", min=1, max=L.SIDE)
    depth: int = opt(3, help="ConvNet conv blocks (DC: 3)", min=1, max=L.DEPTH)
    norm: str = opt("instancenorm", help="ConvNet normalization (DC: instancenorm)",
                    choices=NORMS)
    regularizer: str = opt("none", flag="--regularizer", help="none (DC) | guard (GUARD's Eq. 11 "
                           "on the matched real-data gradient)", choices=DC_REGULARIZERS)
    h: float = opt(3.0, help="GUARD step h, in the units of h_space (paper: 3)", min=0, max=L.H,
                   min_inclusive=False)
    lam: float = opt(100.0, help="GUARD weight lambda (paper: 100)", min=0, max=L.WEIGHT)
    guard_mode: str = opt("exact", help="GUARD mode (guard_fast.losses)", choices=DC_GUARD_MODES)
    h_space: str = opt("normalized", help="space h is measured in: normalized (what DC and the "
                       "public GUARD code feed the network) | pixel ([0, 1] images)",
                       choices=DC_H_SPACES)
    eval_models: int = opt(0, help="networks trained on the result at the end to measure it (DC: "
                           "20); 0: none", min=0, max=L.IPC)
    eval_epochs: int = opt(1000, help="training of each evaluation network (DC's "
                           "epoch_eval_train: 1000; 300 in the first DC code)", unit="epochs",
                           min=0, max=L.EPOCHS)
    max_train: int | None = opt(None, help="use a fixed random draw of this many real training "
                                "images", unit="images", min=1, max=L.IMAGES)
    checkpoint_every: int = opt(10, help="iterations between resumable checkpoints", min=1,
                                max=L.STEPS)
    seed: int = opt(0, help="random seed (initial images, network inits, real batches)", min=0,
                    max=L.SEED)
    device: str = opt("auto", help="auto | cpu | cuda | cuda:N")
    out: str = opt("runs/dc", help="run folder for the distilled set")
    resume: bool = opt(False, help="continue the run in --out from its last checkpoint")
    progress: bool = opt(True, help="progress bar (--no-progress to silence)")

    def loops(self) -> tuple[int, int]:
        """(outer_loop, inner_loop): the fields when set, else DC's get_loops(ipc)."""
        if (self.outer_loop is None) != (self.inner_loop is None):
            raise ValueError("set both outer_loop and inner_loop, or neither (DC's get_loops)")
        if self.outer_loop is None:
            return get_loops(self.ipc)
        return int(self.outer_loop), int(self.inner_loop)

    def to_dict(self) -> dict:
        return to_dict(self)


def resolve_dc(cfg: DCConfig | Mapping[str, Any] | None = None) -> DCConfig:
    """A checked DCConfig: from a DCConfig (copied) or from overrides of the defaults.

    Every field is checked against its declaration (type, range, choices); the data set is
    matched case-insensitively; the loop counts must be given together or come from DC's
    get_loops. A bad value raises a ValueError naming it, before any work is done."""
    if isinstance(cfg, DCConfig):
        cfg = validate(dataclasses.replace(cfg))
    else:
        cfg = resolve(DCConfig, cfg, what="dc")
    if str(cfg.data).lower() not in DC_DATASETS:
        raise ValueError(f"DC runs on {DC_DATASETS}, got data={cfg.data!r}")
    cfg.loops()
    return cfg
