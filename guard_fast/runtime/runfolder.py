"""The run folder: one stage's outputs, and the rules that keep runs from mixing.

Every stage writes into a folder of its own (``--out``):

  config.json   the resolved settings and the stage name, written first
  run.json      {"status": "running" | "complete", "stage": ..., ...}, rewritten at the end
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
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterable

from guard_fast.runtime.io import append_jsonl, atomic_write_json

__all__ = ["RunFolder", "flatten"]


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
        # a setting added after the old run was written: absent there, at its default here
        added = {k for k, v in b.items() if k not in a and k in self.defaults
                 and self.defaults[k] == v}
        return sorted(k for k in set(a) | set(b)
                      if k not in added and not self._may_differ(k) and a.get(k) != b.get(k))

    def check(self) -> dict | None:
        """Apply the rules; returns the previous config (None for a new run). Writes nothing."""
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
        """Create the folder; config.json first, then run.json "running". Rank 0 only."""
        self.out.mkdir(parents=True, exist_ok=True)
        atomic_write_json(self.config_file, self.config)
        atomic_write_json(self.out / "run.json", {"status": "running", "stage": self.stage})

    def complete(self, **info: Any) -> None:
        """run.json "complete", with what the stage reports (metrics, artifact paths)."""
        atomic_write_json(self.out / "run.json", {"status": "complete", "stage": self.stage, **info})

    def log(self, row: dict, name: str = "metrics.jsonl") -> None:
        append_jsonl(self.out / name, row)
