"""Relabel (FKD soft labels on the student's views) settings.

The relabel stage stores the views the student will train on, so its unset view settings
(and the number of epochs) come from the student preset of the distilled set's data set:
a student run with that preset replays the folder without any view setting of its own.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

from guard_fast.config import limits as L
from guard_fast.config.base import opt, resolve, validate
from guard_fast.config.student import STUDENT_PRESETS, VIEW_DEFAULTS, check_choices, view_opt

__all__ = ["RelabelConfig", "DTYPES", "PRESET_FIELDS", "resolve_relabel", "check_relabel"]

DTYPES = ("float16", "bfloat16", "float32")
# the settings an unset value takes from the student preset of the distilled set's data set
PRESET_FIELDS = ("epochs", "batch_size", "min_scale", "mix")
_PRESET_NOTE = "unset: the student preset of the distilled set's data set"


@dataclass
class RelabelConfig:
    """Relabel: the teacher's logits on every view of ``epochs`` epochs of student training.
    None fields are filled by :func:`resolve_relabel` (see PRESET_FIELDS)."""

    teacher: str | None = opt(None, help="teacher.pt, or the squeeze run folder that holds it",
                              default_note="the teacher the distilled set was recovered from")
    distilled: str = opt("runs/recover", help="distilled-set folder (the recover stage's --out) "
                         "or images.pt")
    out: str = opt("runs/relabel", help="relabel folder; a rerun with the same settings "
                   "continues it (complete epochs are kept, more epochs are added)")
    epochs: int | None = opt(None, help="epochs of views (and soft labels) to store",
                             unit="epochs", min=1, max=L.EPOCHS, default_note=_PRESET_NOTE)
    batch_size: int | None = view_opt("batch_size", default_note=_PRESET_NOTE)
    seed: int = view_opt("seed", VIEW_DEFAULTS["seed"])
    top_k: int | None = opt(None, help="store only the k largest logits of every view (the "
                            "target is then the teacher's top-k distribution)", min=1, max=L.BATCH,
                            default_note="all")
    dtype: str = opt("float16", help="dtype of the stored logits (float16: the public "
                     "--use-fp16)", choices=DTYPES)
    device: str = opt("auto", help="auto | cpu | cuda | cuda:N")
    out_size: int | None = view_opt("image_size", default_note="the distilled images' height")
    min_scale: float | None = view_opt("min_scale", default_note=_PRESET_NOTE)
    max_scale: float = view_opt("max_scale", VIEW_DEFAULTS["max_scale"])
    mix: str | None = view_opt("mix", default_note=_PRESET_NOTE)
    cutmix_alpha: float = view_opt("cutmix_alpha", VIEW_DEFAULTS["cutmix_alpha"])
    mixup_alpha: float = view_opt("mixup_alpha", VIEW_DEFAULTS["mixup_alpha"])
    teacher_chunk: int | None = opt(None, help="run the teacher on at most this many views at a "
                                    "time (less memory; the same targets up to rounding)",
                                    unit="views", min=1, max=L.BATCH,
                                    default_note="the whole batch")
    progress: bool = opt(True, help="progress bar (--no-progress to silence)")


def _check_scales(min_scale: float | None, max_scale: float) -> None:
    if min_scale is not None and min_scale > max_scale:
        raise ValueError(f"need 0 < min_scale <= max_scale <= 1, got ({min_scale}, {max_scale})")


def check_relabel(**settings: Any) -> dict:
    """Some of RelabelConfig's settings (relabel()'s keyword arguments, a ViewSpec's fields)
    checked against the fields' declarations: choices as "unknown <name>", then type and
    range, then min_scale <= max_scale. Returns them (ints made floats where declared)."""
    check_choices(RelabelConfig, settings)
    cfg = validate(RelabelConfig(**settings))
    _check_scales(cfg.min_scale, cfg.max_scale)
    return {k: getattr(cfg, k) for k in settings}


def resolve_relabel(overrides: Mapping[str, Any] | None,
                    meta: Mapping[str, Any]) -> RelabelConfig:
    """RelabelConfig from the user's settings (None = unset) and the distilled set's meta
    (``load_distilled(distilled)["meta"]``, as recover writes it).

    An unset teacher is the one the set was recovered from (meta["teacher"]); unset epochs,
    batch_size, min_scale and mix are the student preset of the set's data set
    (meta["arch"]["data"], "mnist" when absent; imagenette's preset for a data set without
    one). Validated; a set that names no teacher (a DC set) needs --teacher."""
    overrides = dict(overrides or {})
    check_choices(RelabelConfig, overrides)
    if overrides.get("teacher") is None and meta.get("teacher"):
        overrides["teacher"] = str(meta["teacher"])
    data = (meta.get("arch") or {}).get("data", "mnist")
    pre = STUDENT_PRESETS.get(data, STUDENT_PRESETS["imagenette"])
    cfg = resolve(RelabelConfig, overrides, {"student": {k: pre[k] for k in PRESET_FIELDS}},
                  "student", what="relabel")
    _check_scales(cfg.min_scale, cfg.max_scale)
    if cfg.teacher is None:
        raise ValueError(f"{cfg.distilled} does not name its teacher (a DC set?): pass --teacher")
    return cfg
