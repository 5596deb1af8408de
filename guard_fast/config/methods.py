"""The methods a pipeline compares: a teacher regularizer with its table label, optionally
with teacher settings.

    method_spec("guard")            -> ("guard", "GUARD", {"regularizer": "guard"})
    method_spec("gr:0.01")          -> gradient-norm regularization at lambda_g = 0.01 (Table 3)
    method_spec("guard:lam=10")     -> GUARD with a SqueezeConfig field changed
    method_spec("real")             -> the control: IPC real training images per class,
                                       relabelled by the SRe2L teacher ("real@guard": by the
                                       GUARD teacher; any method after the @)

A control run shares its teacher with the method after "@" (the same squeeze folder) and
replaces recover by a seeded draw of real images; relabel, student and evaluation are the
same as every method's. So its row against that method's row separates what the distilled
images carry from what the teacher's soft labels carry.
"""
from __future__ import annotations

from typing import Any

__all__ = ["METHODS", "TRAJECTORY_METHODS", "REAL_CONTROL", "method_spec", "split_control"]

REAL_CONTROL = "real"   # method name prefix of the real-subset control

# name -> (table label, squeeze overrides)
METHODS: dict[str, tuple[str, dict[str, Any]]] = {
    "sre2l": ("SRe2L", dict(regularizer="none")),
    "guard": ("GUARD", dict(regularizer="guard")),
    "sre2l-adv": ("SRe2L + Adv", dict(regularizer="pgd-at")),
    "gr": ("SRe2L + GR", dict(regularizer="gr")),
}

# trajectory-matching methods (guard_fast.pipeline.trajectory): name -> (table label, the
# experts' regularizer, the distillation method); they run experts -> mtt -> evaluation
# instead of squeeze -> recover -> relabel -> student
TRAJECTORY_METHODS: dict[str, tuple[str, str, str]] = {
    "mtt": ("MTT", "none", "mtt"),
    "tesla": ("TESLA", "none", "tesla"),
    "mtt-guard": ("MTT + GUARD experts", "guard", "mtt"),
}

# SqueezeConfig fields a method may not set: the regularizer is the method itself, the rest
# belong to the pipeline (folders, device, data)
_NOT_METHOD_SETTINGS = ("regularizer", "out", "device", "resume", "progress", "data",
                        "data_root", "preset")


def _typed_value(name: str, key: str, raw: str, default: Any, typ: Any) -> Any:
    """raw parsed as the SqueezeConfig field's type (by its default, or its declared type
    for an optional field)."""
    if default is None:   # optional fields ("int | None"): parse by the declared type
        typ = str(typ)
        default = 0 if "int" in typ else 0.0 if "float" in typ else ""
    try:
        if isinstance(default, bool):
            return raw.lower() in ("1", "true", "yes")
        if isinstance(default, int):
            return int(raw)
        if isinstance(default, float):
            return float(raw)
        return raw
    except ValueError:
        raise ValueError(f"method {name!r}: {key}={raw!r} is not a valid "
                         f"{type(default).__name__}") from None


def _gr_spec(name: str, rest: str) -> tuple[str, str, dict[str, Any]]:
    try:
        lam = float(rest)
    except ValueError:
        raise ValueError(f"method {name!r}: gr:<lambda_g> needs a number, e.g. gr:0.01") from None
    return f"gr_{lam:g}", f"SRe2L + GR (lambda_g={lam:g})", dict(regularizer="gr", gr_lam=lam)


def split_control(name: str) -> tuple[bool, str]:
    """(is it the real-subset control, the method whose teacher it uses): "real" ->
    (True, "sre2l"), "real@guard" -> (True, "guard"), "guard" -> (False, "guard")."""
    head, at, teacher = name.partition("@")
    if head != REAL_CONTROL:
        return False, name
    if at and not teacher:
        raise ValueError(f"method {name!r}: real@<method> needs a teacher method, e.g. real@guard")
    teacher = teacher or "sre2l"
    if split_control(teacher)[0]:
        raise ValueError(f"method {name!r}: the teacher of a control must be a method, not a control")
    return True, teacher


def method_spec(name: str) -> tuple[str, str, dict[str, Any]]:
    """(folder name, table label, squeeze overrides) of a method: one of METHODS, optionally
    with teacher settings as ":key=value" pairs (any SqueezeConfig field, e.g.
    "guard:lam=10", "sre2l:epochs=3:max_train=4000"), or "gr:<lambda_g>" (gradient-norm
    regularization at that weight, Table 3), or a real-subset control (see the module
    docstring: its squeeze overrides are its teacher method's)."""
    control, teacher = split_control(name)
    if control:
        folder, label, over = method_spec(teacher)
        return f"real_{folder}", f"Real subset ({label} teacher)", over
    if name in METHODS:
        label, over = METHODS[name]
        return name, label, dict(over)
    if name in TRAJECTORY_METHODS:
        label, regularizer, method = TRAJECTORY_METHODS[name]
        return name, label, dict(regularizer=regularizer, method=method)
    base, _, rest = name.partition(":")
    if base == "gr" and rest and "=" not in rest:
        return _gr_spec(name, rest)
    if base not in METHODS or not rest:
        raise ValueError(f"unknown method {name!r}; known: {', '.join(METHODS)}, "
                         f"{', '.join(TRAJECTORY_METHODS)}, gr:<lambda_g>, "
                         "<method>:key=value[:key=value] with SqueezeConfig fields, and the "
                         "controls real, real@<method>")
    from guard_fast.config import field_help

    fields_ = field_help()
    label, over = METHODS[base]
    over = dict(over)
    tags = []
    for item in rest.split(":"):
        key, eq, raw = item.partition("=")
        if not eq or key not in fields_ or key in _NOT_METHOD_SETTINGS:
            raise ValueError(f"method {name!r}: {item!r} is not key=value with a teacher "
                             f"setting (a SqueezeConfig field such as lam, h, epochs, max_train)")
        value = _typed_value(name, key, raw, *fields_[key])
        over[key] = value
        tags.append(f"{key}={value:g}" if isinstance(value, float) else f"{key}={value}")
    folder = base + "_" + "_".join(t.replace("=", "") for t in tags)
    return folder, f"{label} ({', '.join(tags)})", over
