"""Atomic writes, weights-only checkpoint loads, JSON-lines metrics.

Everything a stage writes goes through a temporary file in the same folder and os.replace,
so a killed run never leaves a half-written checkpoint or result; a stage's final artifact
is written last, so a folder without it is visibly incomplete.
"""
from __future__ import annotations

import contextlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any, Iterator

import torch


@contextlib.contextmanager
def _atomic_target(path: str | Path) -> Iterator[str]:
    """A temporary file beside path to write into; on success it is fsynced and renamed
    over path (atomic on POSIX), on any failure removed, leaving path as it was."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        yield tmp
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    with _atomic_target(path) as tmp, open(tmp, "wb") as f:
        f.write(data)


def atomic_write_json(path: str | Path, obj: Any) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n").encode())


def atomic_torch_save(path: str | Path, obj: Any) -> None:
    with _atomic_target(path) as tmp:
        torch.save(obj, tmp)


def load_checkpoint(path: str | Path) -> dict:
    """torch.load with weights_only=True (no pickled code), with an error naming the file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # corrupt or foreign file: say which
        raise ValueError(f"could not load checkpoint {path}: {type(e).__name__}: {e}") from e


def append_jsonl(path: str | Path, row: dict) -> None:
    """Append one metrics row; a line is written with one write call and fsynced."""
    path = Path(path)
    with open(path, "a") as f:
        f.write(json.dumps(row, default=str) + "\n")
        f.flush()
        os.fsync(f.fileno())
