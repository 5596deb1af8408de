"""Device resolution: one rule for every stage, the pipeline, the benches and the tests."""
from __future__ import annotations

import torch

__all__ = ["resolve_device", "DEVICE_CHOICES"]

DEVICE_CHOICES = ("auto", "cpu", "cuda", "cuda:N")


def resolve_device(name: str | torch.device) -> torch.device:
    """``auto`` -> the GPU when there is one, else the CPU; ``cpu``, ``cuda``, ``cuda:N``.

    A CUDA device on a machine without one, or a name torch does not know, raises a
    ValueError that says what to pass instead (before any work is done)."""
    if isinstance(name, torch.device):
        dev = name
    elif name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        try:
            dev = torch.device(name)
        except (RuntimeError, TypeError) as e:
            raise ValueError(f"--device {name!r} is not a device: use one of "
                             f"{', '.join(DEVICE_CHOICES)}") from e
    if dev.type not in ("cpu", "cuda"):
        raise ValueError(f"--device {name!r}: guard_fast runs on cpu or cuda, not {dev.type}")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {name} requested, but this machine has no CUDA GPU "
                         "(torch.cuda.is_available() is False): use --device cpu")
    return dev
