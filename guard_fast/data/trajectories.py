"""The expert buffer: MTT's expert trajectories on disk, and the input space they live in.

Written by the experts stage (guard_fast.distill.experts), read by MTT/TESLA
(guard_fast.distill.mtt). A buffer is a run folder holding

  expert_000.pt, ...  one file per expert (atomic; rewritten after every epoch):
                      {"trajectory": (epochs_done + 1, P) float32, row e = the flat parameter
                       vector (guard_fast.models.flat order) after e epochs (row 0: the init);
                       "epochs_done", "optimizer" (until complete), "val_acc": per epoch,
                       "meta": the buffer's meta (below)}
  zca.pt              the fitted ZCA transform, when the buffer was trained with --zca
  buffer.json         written last: the meta and the list of expert files (marks it complete)

meta: stage "experts", data, arch {model, num_classes, channels, image_size, width, depth,
norm}, num_params, epochs, lr_teacher, zca, mean, std, regularizer. A distillation refuses a
buffer whose data set, architecture or length does not fit what it was asked to do.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from guard_fast.runtime import atomic_torch_save, load_checkpoint

__all__ = ["InputSpace", "Buffer", "build_net", "space_of", "expert_path", "save_expert",
           "load_expert", "load_buffer",
           "BUFFER_INDEX", "EXPERTS_COMMAND"]

BUFFER_INDEX = "buffer.json"
EXPERTS_COMMAND = "python -m guard_fast.train experts --preset PRESET --out DIR"


class InputSpace(nn.Module):
    """Pixels [0, 1] -> what the ConvNet is trained on: (x - mean) / std (MTT's Normalize), or
    ZCA-whitened pixels (MTT's --zca, on un-normalized images). invert() maps back."""

    def __init__(self, mean, std, zca: nn.Module | None = None):
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1))
        self.zca = zca

    def forward(self, x: Tensor) -> Tensor:
        if self.zca is not None:
            return self.zca(x)
        return (x - self.mean.to(x.dtype)) / self.std.to(x.dtype)

    def invert(self, z: Tensor) -> Tensor:
        if self.zca is not None:
            return self.zca.invert(z)
        return z * self.std.to(z.dtype) + self.mean.to(z.dtype)

    def pixel_model(self, net: nn.Module) -> nn.Module:
        """A model that takes [0, 1] pixels: this space's transform, then net."""
        return nn.Sequential(self, net)


def expert_path(out: str | Path, k: int) -> Path:
    return Path(out) / f"expert_{k:03d}.pt"


def save_expert(out: str | Path, k: int, trajectory: Tensor, meta: dict, *, epochs_done: int,
                val_acc: list, optimizer: dict | None = None) -> None:
    """Write expert k's file (atomic)."""
    atomic_torch_save(expert_path(out, k), {
        "trajectory": trajectory.detach().float().cpu().contiguous(), "epochs_done": epochs_done,
        "val_acc": list(val_acc), "optimizer": optimizer, "meta": meta})


def load_expert(out: str | Path, k: int) -> dict | None:
    """Expert k's file, or None when it has not been started."""
    p = expert_path(out, k)
    return load_checkpoint(p) if p.exists() else None


@dataclass
class Buffer:
    """A complete expert buffer: trajectories (each (epochs + 1, P)), its meta, its folder."""

    trajectories: list
    meta: dict
    path: Path
    zca: dict | None

    @property
    def length(self) -> int:
        """Epochs per trajectory (rows - 1)."""
        return int(self.meta["epochs"])


def load_buffer(path: str | Path) -> Buffer:
    """The expert buffer in ``path``, or an error saying what to run to make one."""
    path = Path(path)
    index = path / BUFFER_INDEX
    if not index.is_file():
        partial = sorted(path.glob("expert_*.pt")) if path.is_dir() else []
        what = (f"{path} holds {len(partial)} expert file(s) but no {BUFFER_INDEX}: the experts "
                f"run there is unfinished; continue it with `python -m guard_fast.train experts "
                f"--out {path} --resume` (and its other settings)") if partial else (
            f"no expert buffer at {path} ({BUFFER_INDEX} missing): train one first with "
            f"`{EXPERTS_COMMAND}` and pass --buffer DIR")
        raise FileNotFoundError(what)
    info = json.loads(index.read_text())
    trajs = []
    for name in info["experts"]:
        ck = load_checkpoint(path / name)
        if ck["epochs_done"] != info["meta"]["epochs"]:
            raise ValueError(f"{path / name} is incomplete ({ck['epochs_done']} of "
                             f"{info['meta']['epochs']} epochs)")
        trajs.append(ck["trajectory"])
    zca = load_checkpoint(path / "zca.pt") if info["meta"].get("zca") else None
    return Buffer(trajs, info["meta"], path, zca)


def build_net(arch: dict) -> nn.Module:
    """The ConvNet of a buffer's arch (taking inputs in its InputSpace), freshly initialized
    from torch's global RNG."""
    from guard_fast.models import build_model

    kw = dict(width=arch["width"], norm=arch["norm"])
    if arch["model"] == "convnet":
        kw["depth"] = arch["depth"]
    return build_model(arch["model"], arch["num_classes"], arch["channels"],
                       image_size=arch["image_size"], **kw)


def space_of(meta: dict, zca: dict | None) -> InputSpace:
    """The InputSpace of a buffer (its mean/std, or its fitted ZCA)."""
    from guard_fast.data.zca import ZCA

    z = ZCA(zca["mean"], zca["transform"], zca["inverse"]) if zca is not None else None
    return InputSpace(meta["mean"], meta["std"], z)
