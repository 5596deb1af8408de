"""Classifier checkpoints: one format for teachers and students, and the training state.

teacher.pt / student.pt (the format of every earlier version, which keeps loading):
  {"model": state_dict of the Normalized model (takes [0, 1] pixels),
   "arch": {"model", "num_classes", "in_channels", "image_size", "mean", "std", "data",
            "options": keyword options of the model builder (e.g. ConvNet width/depth)},
   "metrics": {...}}
checkpoint.pt (resumable training state): {"model", "optimizer", "scheduler", "scaler"?,
  "epoch", ...}. Every load is ``torch.load(weights_only=True)``: no code runs from a file.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

from torch import nn

from guard_fast.runtime.io import atomic_torch_save, load_checkpoint
from guard_fast.runtime.numeric import check_finite_weights

__all__ = ["classifier_arch", "save_classifier", "load_classifier", "teacher_path", "save_training_state",
           "load_training_state", "ARCH_KEYS"]

ARCH_KEYS = ("model", "num_classes", "in_channels", "image_size", "mean", "std")


def classifier_arch(model: str, num_classes: int, in_channels: int, image_size: int,
                    mean: Sequence[float], std: Sequence[float], data: str | None = None,
                    options: dict | None = None) -> dict:
    """The "arch" entry: everything build_model needs to rebuild the network."""
    return {"model": model, "num_classes": int(num_classes), "in_channels": int(in_channels),
            "image_size": int(image_size), "mean": [float(v) for v in mean],
            "std": [float(v) for v in std], "data": data, "options": dict(options or {})}


def save_classifier(path: str | Path, model: nn.Module, arch: dict, metrics: dict | None = None,
                    **extra: Any) -> Path:
    """Write a teacher.pt / student.pt atomically; model is the Normalized wrapper. Refused
    (NonFiniteError) when the model holds NaN/Inf."""
    check_finite_weights("checkpoint", model, f"{path}")
    missing = [k for k in ARCH_KEYS if k not in arch]
    if missing:
        raise ValueError(f"arch is missing {missing}: build it with classifier_arch()")
    atomic_torch_save(path, {"model": model.state_dict(), "arch": dict(arch),
                             "metrics": dict(metrics or {}), **extra})
    return Path(path)


def teacher_path(p: str | Path) -> Path:
    """teacher.pt given as the file or as the squeeze run folder that holds it (the stages
    that take --teacher accept both); FileNotFoundError saying what to run when absent."""
    p = Path(p)
    if p.is_dir():
        if not (p / "teacher.pt").is_file():
            raise FileNotFoundError(f"{p} holds no teacher.pt: run the squeeze stage first "
                                    f"(python -m guard_fast.train squeeze --out {p})")
        return p / "teacher.pt"
    if not p.is_file():
        raise FileNotFoundError(f"teacher {p} does not exist: run the squeeze stage first "
                                "(python -m guard_fast.train squeeze)")
    return p


def load_classifier(path: str | Path, arch_expected: dict | None = None) -> tuple[nn.Module, dict]:
    """Rebuild a teacher or student from its checkpoint (weights_only load).

    The model is built with the arch's options (a ConvNet of width 16 comes back as one).
    A file that is not a classifier checkpoint, weights that do not fit the architecture,
    or an arch that differs from arch_expected raise a ValueError naming the file."""
    from guard_fast.models import build_model

    ck = load_checkpoint(path)
    if not isinstance(ck, dict) or "arch" not in ck or "model" not in ck:
        raise ValueError(f"{path} is not a guard_fast teacher or student checkpoint (no "
                         "'arch'/'model' entries)")
    arch = ck["arch"]
    missing = [k for k in ARCH_KEYS if k not in arch]
    if missing:
        raise ValueError(f"{path}: its 'arch' entry lacks {missing}")
    if arch_expected:
        bad = {k: (arch.get(k), v) for k, v in arch_expected.items() if arch.get(k) != v}
        if bad:
            raise ValueError(f"{path} holds a different architecture: {bad} (found, expected)")
    try:
        model = build_model(arch["model"], num_classes=arch["num_classes"],
                            in_channels=arch["in_channels"], mean=arch["mean"], std=arch["std"],
                            image_size=arch["image_size"], **dict(arch.get("options") or {}))
    except (TypeError, ValueError, KeyError) as e:
        raise ValueError(f"{path}: cannot build its architecture {arch['model']} with options "
                         f"{arch.get('options')}: {e}") from e
    try:
        model.load_state_dict(ck["model"])
    except RuntimeError as e:
        raise ValueError(f"{path}: weights do not fit architecture {arch['model']}: {e}") from e
    # a NaN teacher would only show up steps later, as a NaN loss of the stage reading it
    check_finite_weights("load", model, f"{path}", "This checkpoint holds NaN or Inf weights: "
                         "use an earlier checkpoint or train it again.")
    return model, arch


def save_training_state(path: str | Path, *, epoch: int, model: nn.Module, optimizer,
                        scheduler=None, scaler=None, **extra: Any) -> None:
    """checkpoint.pt after a finished epoch (atomic): what --resume continues from. Refused
    (NonFiniteError) when the model holds NaN/Inf: the previous checkpoint stays."""
    check_finite_weights("checkpoint", model, f"{path} (epoch {epoch + 1})")
    state = {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "epoch": int(epoch),
             **extra}
    if scheduler is not None:
        state["scheduler"] = scheduler.state_dict()
    if scaler is not None:
        state["scaler"] = scaler.state_dict()
    atomic_torch_save(path, state)


def load_training_state(path: str | Path, model: nn.Module, optimizer, scheduler=None,
                        scaler=None) -> dict:
    """Load checkpoint.pt into the given objects; returns the checkpoint (its "epoch" is the
    last finished epoch). Missing entries raise a ValueError naming the file."""
    ck = load_checkpoint(path)
    need = ["model", "optimizer", "epoch"] + (["scheduler"] if scheduler is not None else []) + (
        ["scaler"] if scaler is not None else [])
    missing = [k for k in need if k not in ck]
    if missing:
        raise ValueError(f"{path} is not a resumable checkpoint of this stage (missing {missing})")
    model.load_state_dict(ck["model"])
    optimizer.load_state_dict(ck["optimizer"])
    if scheduler is not None:
        scheduler.load_state_dict(ck["scheduler"])
    if scaler is not None:
        scaler.load_state_dict(ck["scaler"])
    return ck
