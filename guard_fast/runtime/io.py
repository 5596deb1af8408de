"""Atomic writes, weights-only checkpoint loads, JSON-lines metrics, and the write faults.

Everything a stage writes goes through a temporary file in the same folder and os.replace,
so a killed run never leaves a half-written checkpoint or result; a stage's final artifact
is written last, so a folder without it is visibly incomplete. A temporary file left by a
killed process (``.<name>.<random>.tmp``) is removed when the folder's next run starts
(:func:`remove_stale_temps`, called by RunFolder.start).

Files get the mode an ordinary ``open(path, "w")`` would give (0666 less the umask), not
mkstemp's private 0600: run folders are meant to be shared and copied.

A write that fails (a full disk, an I/O error) raises :class:`WriteError`, an OSError that
names the file, the cause and the free space left, and says that nothing was replaced: the
previous version of the file and every finished file are intact, so the same command
continues once space is back. The command line prints it and exits with status 1.

Fault injection (tests and bench/fault_inject.py): ``GUARD_FAST_FAULT=<action>@<n>[:<glob>]``
acts on the n-th atomic write of this process (counting from 1) whose file name matches the
glob (default: every file). Actions: ``kill-before-rename`` (SIGKILL after the temporary
file is written and fsynced, before the rename: a kill during a checkpoint write),
``kill-after-rename`` (SIGKILL right after the rename: between a write and the next step),
``enospc`` / ``eio`` (the write fails with that errno). Unset, nothing is counted.
"""
from __future__ import annotations

import contextlib
import errno
import fnmatch
import json
import os
import shutil
import signal
import tempfile
import time
from pathlib import Path
from typing import Any, Iterator

import torch

__all__ = ["WriteError", "atomic_write_bytes", "atomic_write_json", "atomic_torch_save",
           "load_checkpoint", "append_jsonl", "remove_stale_temps", "free_space_text",
           "FAULT_ACTIONS"]

FAULT_ACTIONS = ("kill-before-rename", "kill-after-rename", "enospc", "eio")
# a process's own temporary files are never older than its start: only older ones are stale
_STARTED = time.time()
_UMASK = os.umask(0)
os.umask(_UMASK)
_TEMP_GLOB = ".*.tmp"


def _fault_spec() -> tuple[str, int, str] | None:
    """(action, n, glob) of GUARD_FAST_FAULT, or None; a malformed value is refused."""
    raw = os.environ.get("GUARD_FAST_FAULT", "")
    if not raw:
        return None
    action, _, rest = raw.partition("@")
    n, _, glob = rest.partition(":")
    if action not in FAULT_ACTIONS or not n.isdigit() or int(n) < 1:
        raise ValueError(f"GUARD_FAST_FAULT={raw!r}: expected <action>@<n>[:<glob>] with action "
                         f"one of {', '.join(FAULT_ACTIONS)} and n >= 1")
    return action, int(n), glob or "*"


_fault_count = 0


def _fault(path: Path, moment: str) -> None:
    """Act on GUARD_FAST_FAULT at this moment ("write" or "renamed") of a write of path."""
    global _fault_count
    spec = _fault_spec()
    if spec is None or not fnmatch.fnmatch(path.name, spec[2]):
        return
    action, n, _ = spec
    if moment == "write":
        _fault_count += 1
    if _fault_count != n:
        return
    if moment == "write" and action in ("enospc", "eio"):
        code = errno.ENOSPC if action == "enospc" else errno.EIO
        raise OSError(code, os.strerror(code) + " (injected by GUARD_FAST_FAULT)", str(path))
    if (moment, action) in (("write", "kill-before-rename"), ("renamed", "kill-after-rename")):
        os.kill(os.getpid(), signal.SIGKILL)


def free_space_text(path: str | Path) -> str:
    """'<free> MiB free of <total> MiB on the file system of <path>' (or why it is unknown)."""
    p = Path(path)
    while not p.exists() and p != p.parent:
        p = p.parent
    try:
        u = shutil.disk_usage(p)
    except OSError as e:
        return f"free space on the file system of {p} unknown ({e.strerror})"
    return f"{u.free / 2**20:.1f} MiB free of {u.total / 2**20:.1f} MiB on the file system of {p}"


class WriteError(OSError):
    """A write that failed (ENOSPC, EIO, ...): names the file, the cause and the free space."""

    def __init__(self, path: Path, cause: OSError):
        what = cause.strerror or str(cause)
        name = errno.errorcode.get(cause.errno or 0, "")
        super().__init__(cause.errno, f"could not write {path}: {what}"
                         + (f" ({name})" if name else "") + f"; {free_space_text(path.parent)}. "
                         f"Nothing was replaced: the previous {path.name} (if any) and every "
                         "finished file are intact; free space (or fix the device) and run the "
                         "same command again (with --resume where the stage takes it) to continue",
                         str(path))

    def __str__(self) -> str:
        return self.strerror


def _os_cause(e: BaseException, path: Path) -> OSError | None:
    """The OSError behind a failed write: e itself; for torch.save's RuntimeError ("enforce
    fail at inline_container.cc", its C++ writer reports no errno) an ENOSPC when the file
    system has (nearly) no space left, else an EIO carrying torch's message."""
    if isinstance(e, OSError):
        return e
    text = str(e)
    if not ("inline_container" in text or "PytorchStreamWriter" in text
            or "file write failed" in text):
        return None
    try:
        u = shutil.disk_usage(path.parent)
        full = u.free < max(2**20, u.total // 1000)
    except OSError:
        full = False
    code = errno.ENOSPC if full else errno.EIO
    return OSError(code, os.strerror(code) + ("" if full else f" (torch: {text[:200]})"))


@contextlib.contextmanager
def _atomic_target(path: str | Path) -> Iterator[str]:
    """A temporary file beside path to write into; on success it is fsynced and renamed
    over path (atomic on POSIX), on any failure removed, leaving path as it was."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        os.chmod(tmp, 0o666 & ~_UMASK)
        try:
            yield tmp
            _fault(path, "write")
            with open(tmp, "rb") as f:
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except (OSError, RuntimeError) as e:
            cause = _os_cause(e, path)
            if cause is None or isinstance(e, WriteError):
                raise
            raise WriteError(path, cause) from e
        _fault(path, "renamed")
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
    # by file name, not a Python file object: the zip layout (record names, alignment) and so
    # the file sizes stay those of every earlier version
    with _atomic_target(path) as tmp:
        torch.save(obj, tmp)


def remove_stale_temps(folder: str | Path, older_than: float | None = None) -> list[Path]:
    """Remove the temporary files of atomic writes under folder (recursively) that are older
    than older_than (default: this process's start), i.e. left by a killed process: another
    process of the same job writes only newer ones. Returns the files removed."""
    cutoff = _STARTED if older_than is None else older_than
    gone = []
    for p in Path(folder).rglob(_TEMP_GLOB):
        try:
            if p.is_file() and not p.is_symlink() and p.stat().st_mtime < cutoff:
                p.unlink()
                gone.append(p)
        except FileNotFoundError:  # removed meanwhile
            continue
    return gone


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
    """Append one metrics row; a line is written with one write call and fsynced. A failed
    write (full disk) raises WriteError; rows already written stay."""
    path = Path(path)
    try:
        with open(path, "a") as f:
            f.write(json.dumps(row, default=str) + "\n")
            f.flush()
            os.fsync(f.fileno())
    except OSError as e:
        raise WriteError(path, e) from e
