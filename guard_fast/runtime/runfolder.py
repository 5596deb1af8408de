"""The run folder: one stage's outputs, and the rules that keep runs from mixing.

Every stage writes into a folder of its own (``--out``):

  config.json   the resolved settings and the stage name, written first
  run.json      {"status": "running" | "complete", "stage": ..., "wall_seconds": ..., ...},
                rewritten at the end; "wall_seconds" is the wall time of every attempt so
                far (a killed attempt counts up to its last metrics row, when run.json is
                refreshed)
  <final>       the stage's artifact (teacher.pt, images.pt, student.pt, ...), written last:
                its presence, with run.json's "complete", marks a finished run

Rules, the same for every stage:
  - a folder without config.json is a new run (unless it already holds the stage's final
    artifact: then it is refused, nothing is overwritten);
  - a folder holding another stage's run is refused;
  - a folder holding this stage's run is continued only when resuming (``resume=True``, the
    ``--resume`` flag; ``resume="auto"``: whenever the settings agree) and only with the same
    settings: the refusal names every setting that differs (nested settings by dotted name).
    Fields in ``resumable`` (device, progress bars, ...) may differ.

Folders written before the stage name was stored in config.json (squeeze, student) are
taken to hold this stage's run, so old runs keep resuming.

One run per folder: the process that runs a stage holds an advisory lock (``fcntl.flock``
on ``.lock`` in the folder) from the check of an existing folder, or the start of a new one,
until it ends; the kernel drops it when the process dies, so a killed run never leaves a
stale lock. A second process on the same folder is refused at once, naming the holder (pid,
host, command, start time, written into the lock file). Under torchrun only rank 0 takes
it (the ranks of one job share the folder; only rank 0 writes the run files), and a process
may take a folder's lock again while it holds it (a stage run twice in one process).

Moved or copied folders resume: settings that are paths (:data:`PATH_KEYS`, matched by
their last dotted name; ``out`` among them) are equal when they name the same file, or the
same file relative to the run folder (the folder, recorded as the ``out`` setting, was moved
together with its inputs). A stage whose settings hold no ``out`` (relabel) identifies its
inputs by fingerprints instead and lets their paths differ.

A new run's start removes the temporary files a killed writer left (see
guard_fast.runtime.io.remove_stale_temps).
"""
from __future__ import annotations

import json
import os
import socket
import sys
import time
import weakref
from pathlib import Path
from typing import Any, Iterable

from guard_fast.runtime.io import append_jsonl, atomic_write_json, remove_stale_temps

__all__ = ["RunFolder", "flatten", "FolderInUseError", "PATH_KEYS", "LOCK_NAME"]

# settings (by their last dotted name) that hold file or folder paths: compared leniently
PATH_KEYS = frozenset({"out", "teacher", "distilled", "soft_labels", "data_root", "val_root",
                       "teachers", "student_out", "path"})
LOCK_NAME = ".lock"


class FolderInUseError(FileExistsError):
    """Another live process holds the run folder's lock."""


# this process's folder locks: real path -> [fd, number of RunFolder objects holding it]
_HELD: dict[str, list] = {}


def _release(key: str) -> None:
    held = _HELD.get(key)
    if held is None:
        return
    held[1] -= 1
    if held[1] <= 0:
        del _HELD[key]
        os.close(held[0])  # closing the descriptor drops the flock


def _holder_text(lock_file: Path) -> str:
    try:
        h = json.loads(lock_file.read_text() or "{}")
    except (OSError, ValueError):
        h = {}
    if not h:
        return "a process whose details are not (yet) written"
    return (f"pid {h.get('pid')} on host {h.get('host')}, started {h.get('started')}, "
            f"command: {h.get('command')}")


def _acquire(out: Path, out_flag: str) -> str:
    """Take out/.lock for this process (reentrant); returns its key. Refuses, naming the
    holder, when another process holds it."""
    import fcntl

    key = os.path.realpath(out)
    if key in _HELD:
        _HELD[key][1] += 1
        return key
    lock_file = out / LOCK_NAME
    fd = os.open(lock_file, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise FolderInUseError(f"{out} is in use by another run ({_holder_text(lock_file)}; lock "
                               f"file {lock_file}): one run per folder; wait for it to end or "
                               f"choose another {out_flag} (nothing was overwritten)") from None
    from guard_fast.runtime.io import _STARTED

    # the process's start: the same holder writes the same text (a rerun in one process
    # leaves the folder's files untouched)
    info = (json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                        "command": " ".join([os.path.basename(sys.executable), *sys.argv]),
                        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z",
                                                 time.localtime(_STARTED))}) + "\n").encode()
    if os.pread(fd, len(info) + 1, 0) != info:
        os.ftruncate(fd, 0)
        os.pwrite(fd, info, 0)
    _HELD[key] = [fd, 1]
    return key


def _writable_or_refuse(out: Path, out_flag: str) -> None:
    """A new folder must be creatable: its first existing ancestor a writable directory."""
    p = out
    while not p.exists() and p != p.parent:
        p = p.parent
    if not p.is_dir():
        raise NotADirectoryError(f"{out_flag} {out}: {p} is a file, not a folder; choose "
                                 f"another {out_flag}")
    if not os.access(p, os.W_OK | os.X_OK):
        raise PermissionError(f"{out_flag} {out}: {p} is not writable (read-only file system or "
                              f"no permission); choose a writable {out_flag}")


def _same_path(old: Any, new: Any, old_folder: Any, new_folder: str) -> bool:
    """Two path settings name the same file, or the same file relative to their run folder
    (the folder recorded in the old settings' "out"; relative paths are read from the
    current directory on both sides, so two relative spellings compare consistently)."""
    if old == new:
        return True
    if not isinstance(old, str) or not isinstance(new, str):
        return False
    a, b = os.path.abspath(old), os.path.abspath(new)
    if a == b:
        return True
    if not isinstance(old_folder, str):
        return False
    return os.path.relpath(a, os.path.abspath(old_folder)) == os.path.relpath(
        b, os.path.abspath(new_folder))


def recorded_seconds(out: str | Path) -> float | None:
    """run.json's "wall_seconds" of the run folder ``out`` (None: none recorded, e.g. written
    before seconds were kept, or unreadable)."""
    try:
        v = json.loads((Path(out) / "run.json").read_text()).get("wall_seconds")
    except (OSError, ValueError, AttributeError):
        return None
    return float(v) if isinstance(v, (int, float)) else None


def flatten(d: dict, prefix: str = "") -> dict:
    """{"a": {"b": 1}} -> {"a.b": 1}: settings compared (and named) leaf by leaf."""
    out: dict = {}
    for k, v in d.items():
        if isinstance(v, dict) and v:
            out.update(flatten(v, f"{prefix}{k}."))
        else:
            out[prefix + str(k)] = v
    return out


def _jsonable(obj: Any) -> Any:
    return json.loads(json.dumps(obj, default=str))


class RunFolder:
    """One stage's run folder (see the module docstring).

    config: the resolved settings (a JSON-able dict; tuples compare as lists). resume: True
    (continue a run that exists, refuse to start over one), False (refuse an existing run),
    "auto" (continue when the settings agree). resumable: setting names that may differ on
    resume (a prefix "x." matches nested settings of x). final: the file name of the stage's
    artifact. flag / out_flag: how the user spells these options, for the messages.
    defaults: the settings' defaults (a dict like config): a setting missing from an old run's
    config.json and at its default now is no difference (settings added later keep old runs
    resumable)."""

    def __init__(self, out: str | Path, stage: str, config: dict, *, resume: bool | str = False,
                 resumable: Iterable[str] = (), final: str | None = None,
                 flag: str = "--resume", out_flag: str = "--out", defaults: dict | None = None):
        if resume not in (True, False, "auto"):
            raise ValueError(f"resume must be True, False or 'auto', got {resume!r}")
        self.out = Path(out)
        self.stage = stage
        self.config = _jsonable(dict(config, stage=stage))
        self.resume = resume
        self.resumable = set(resumable) | {"stage"}
        self.final = final
        self.defaults = _jsonable(flatten(dict(defaults or {})))
        self.flag, self.out_flag = flag, out_flag
        self._lock_key: str | None = None
        self._t0: float | None = None
        self._seconds_before = 0.0

    # ------------------------------------------------------------------ paths and state
    def path(self, name: str) -> Path:
        return self.out / name

    @property
    def config_file(self) -> Path:
        return self.out / "config.json"

    def previous_config(self) -> dict | None:
        f = self.config_file
        if not f.is_file():
            return None
        try:
            return json.loads(f.read_text())
        except (OSError, ValueError) as e:
            raise ValueError(f"{f} is not readable JSON ({e}); this folder's run cannot be "
                             f"continued: choose another {self.out_flag}") from e

    @property
    def is_complete(self) -> bool:
        return self.final is not None and (self.out / self.final).exists()

    # ------------------------------------------------------------------------- checks
    def _may_differ(self, key: str) -> bool:
        return key in self.resumable or any(key.startswith(r + ".") for r in self.resumable)

    def differing(self, old: dict) -> list[str]:
        a, b = flatten(old), flatten(self.config)
        new_folder = self.config.get("out") if isinstance(self.config.get("out"), str) \
            else str(self.out)
        # a setting added after the old run was written: absent there, at its default here
        added = {k for k, v in b.items() if k not in a and k in self.defaults
                 and self.defaults[k] == v}

        def same(k: str) -> bool:
            if k in added:
                return True
            if k.rsplit(".", 1)[-1] in PATH_KEYS:
                return _same_path(a.get(k), b.get(k), old.get("out"), new_folder)
            return a.get(k) == b.get(k)
        return sorted(k for k in set(a) | set(b) if not self._may_differ(k) and not same(k))

    def _lock(self) -> None:
        """This process's hold on the folder's lock (rank 0 of a torchrun job only)."""
        from guard_fast.runtime.dist import dist_env

        if self._lock_key is None and dist_env()[0] == 0:
            self._lock_key = _acquire(self.out, self.out_flag)
            weakref.finalize(self, _release, self._lock_key)

    def check(self) -> dict | None:
        """Apply the rules; returns the previous config (None for a new run). Writes nothing
        to a new folder (it is not created); an existing folder is locked first, so its rules
        are read while no other process can change it."""
        if self.out.is_dir():
            self._lock()
        elif self.out.exists():
            raise NotADirectoryError(f"{self.out_flag} {self.out} is a file, not a run folder; "
                                     f"choose another {self.out_flag}")
        else:
            _writable_or_refuse(self.out, self.out_flag)
        return self._rules()

    def _rules(self) -> dict | None:
        old = self.previous_config()
        if old is None:
            if self.resume is True:
                raise FileNotFoundError(f"{self.flag}: {self.out} holds no run (no config.json) to "
                                        f"continue; drop {self.flag} to start one")
            if self.is_complete:
                raise FileExistsError(f"{self.out} already holds a {self.stage} result "
                                      f"({self.final}); choose another {self.out_flag} (nothing "
                                      "was overwritten)")
            return None
        old_stage = old.get("stage", self.stage)
        if old_stage != self.stage:
            raise FileExistsError(f"{self.out} holds a {old_stage} run, not a {self.stage} run "
                                  f"(a run of another stage); choose another {self.out_flag} "
                                  "(nothing was overwritten)")
        if self.resume is False:
            raise FileExistsError(f"{self.out} already holds a {self.stage} run; pass {self.flag} "
                                  f"to continue it or choose another {self.out_flag} (nothing was "
                                  "overwritten)")
        diff = self.differing(old)
        if diff:
            raise ValueError(f"{self.out} holds a different {self.stage} run (different settings "
                             f"for {diff}); use the same settings to continue it, or another "
                             f"{self.out_flag} (nothing was overwritten)")
        return old

    # ------------------------------------------------------------------------- writes
    def start(self) -> None:
        """Create and lock the folder (a new one is checked again under the lock: another
        process may have started a run there since check()), remove the temporary files of a
        killed writer, then config.json, then run.json "running". Rank 0 only."""
        if self._lock_key is None:
            _writable_or_refuse(self.out, self.out_flag)
            self.out.mkdir(parents=True, exist_ok=True)
            self._lock()
            self._rules()
        remove_stale_temps(self.out)
        self._seconds_before = recorded_seconds(self.out) or 0.0
        self._t0 = time.monotonic()
        atomic_write_json(self.config_file, self.config)
        self._write_status("running")

    @property
    def seconds(self) -> float:
        """Wall time of this run over all its attempts (earlier ones as last recorded)."""
        now = 0.0 if self._t0 is None else time.monotonic() - self._t0
        return round(self._seconds_before + now, 2)

    def _write_status(self, status: str, **info: Any) -> None:
        atomic_write_json(self.out / "run.json", {"status": status, "stage": self.stage,
                                                  **info, "wall_seconds": self.seconds})

    def complete(self, **info: Any) -> None:
        """run.json "complete", with what the stage reports (metrics, artifact paths) and its
        seconds over all attempts."""
        self._write_status("complete", **info)

    def log(self, row: dict, name: str = "metrics.jsonl") -> None:
        """A metrics row; run.json's seconds are refreshed with it, so a killed attempt's time
        up to its last row counts in the resumed run's total."""
        append_jsonl(self.out / name, row)
        if self._t0 is not None:
            self._write_status("running")

    def history(self, key: str, name: str = "metrics.jsonl") -> list[tuple[int, Any]]:
        """(epoch, row[key]) of every logged row holding both (a torn last line skipped):
        what a resumed run already did."""
        f = self.out / name
        rows = []
        for line in (f.read_text().splitlines() if f.is_file() else []):
            try:
                row = json.loads(line)
            except ValueError:
                continue
            if isinstance(row, dict) and "epoch" in row and key in row:
                rows.append((row["epoch"], row[key]))
        return rows

    def last_log(self, name: str = "metrics.jsonl", **match: Any) -> dict | None:
        """The last row of a metrics file whose entries equal match (e.g. epoch=3), or None;
        a torn last line (a kill mid-append) is skipped. What a run resumed after its last
        epoch reports as its final metrics, as the uninterrupted run did."""
        f = self.out / name
        if not f.is_file():
            return None
        for line in reversed(f.read_text().splitlines()):
            try:
                row = json.loads(line)
            except ValueError:
                continue
            if isinstance(row, dict) and all(row.get(k) == v for k, v in match.items()):
                return row
        return None
