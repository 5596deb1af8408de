"""The configuration system: one dataclass per stage, with help text, unit and range on each
field, one resolution path and a CLI generated from the fields.

A stage's settings are a dataclass whose fields are declared with :func:`opt`::

    @dataclass
    class SqueezeConfig:
        lr: float = opt(0.01, help="peak SGD learning rate", unit="per step", min=0,
                        min_inclusive=False)

Resolution (:func:`resolve`): the dataclass defaults, then the preset's values, then the
user's overrides (None = unset); unknown names, wrong types, non-finite numbers, values
outside a field's range or choices are refused with the flag's name and the accepted values,
before any work is done. :func:`add_options` turns the fields into argparse options, so a new
field appears in ``--help`` without touching the CLI.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import typing
from dataclasses import MISSING, fields
from typing import Any, Iterable, Mapping, Sequence

__all__ = ["opt", "resolve", "validate", "add_options", "overrides_from", "flag_of", "spec_of",
           "to_dict", "parse_fraction", "ON_CORRUPT", "on_corrupt_opt", "diverge_opt"]

# what a stage reading an ImageFolder data set does with a file it cannot decode
ON_CORRUPT = ("raise", "skip")


def opt(default: Any = MISSING, *, help: str, unit: str | None = None,
        choices: Sequence[Any] | None = None, min: float | None = None,
        max: float | None = None, min_inclusive: bool = True, max_inclusive: bool = True,
        flag: str | None = None, aliases: Sequence[str] = (), cli: bool = True,
        default_factory: Any = MISSING, default_note: str | None = None) -> Any:
    """A dataclass field with its documentation and checks.

    help: what the setting does; unit: its unit ("pixels", "[0,1] pixel units", ...);
    choices / min / max: accepted values (checked by :func:`validate`); flag: the CLI
    spelling (default ``--name-with-dashes``) and aliases: older spellings kept working;
    cli=False: not a command-line option (set by code, e.g. nested overrides);
    default_note: how the default is shown in --help when the value alone would mislead."""
    meta = dict(help=help, unit=unit, choices=tuple(choices) if choices is not None else None,
                min=min, max=max, min_inclusive=min_inclusive, max_inclusive=max_inclusive,
                flag=flag, aliases=tuple(aliases), cli=cli, default_note=default_note)
    if default_factory is not MISSING:
        return dataclasses.field(default_factory=default_factory, metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


def on_corrupt_opt() -> Any:
    """The ``--on-corrupt`` field shared by the stages that read a data folder."""
    return opt("raise", help="an image file that cannot be decoded (zero-byte, truncated, "
               "garbage, a decompression bomb): raise = stop naming it; skip = decode every "
               "file once at start, drop the bad ones and list them in the log (ImageFolder "
               "data sets only)", choices=ON_CORRUPT)


def diverge_opt() -> Any:
    """The ``--diverge-factor`` field shared by the training stages (squeeze, student)."""
    return opt(100.0, help="stop (exit 1, checkpoint kept) when an epoch's mean training loss "
               "exceeds this many times the best epoch's: a loss that diverges without "
               "becoming NaN; 0 = off", min=0, max=1e12)


# ----------------------------------------------------------------------------- field types

def _hints(cls) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def spec_of(cls, name: str) -> tuple[type, bool]:
    """(base type, None allowed) of a field: int, float, bool, str, dict, tuple or list."""
    t = _hints(cls)[name]
    optional = False
    args = typing.get_args(t)
    if args and type(None) in args:
        optional = True
        rest = [a for a in args if a is not type(None)]
        t = rest[0] if len(rest) == 1 else str
    origin = typing.get_origin(t) or t
    return origin, optional


def flag_of(f: dataclasses.Field) -> str:
    return f.metadata.get("flag") or "--" + f.name.replace("_", "-")


def _range_text(m: Mapping) -> str:
    parts = []
    if m.get("min") is not None:
        parts.append((">= " if m["min_inclusive"] else "> ") + f"{m['min']:g}")
    if m.get("max") is not None:
        parts.append(("<= " if m["max_inclusive"] else "< ") + f"{m['max']:g}")
    return " and ".join(parts)


def _check_one(f: dataclasses.Field, kind: type, optional: bool, v: Any, where: str) -> Any:
    """The value, coerced where lossless (int -> float), or a ValueError naming the flag."""
    name = flag_of(f) if where == "cli" else f.name
    m = f.metadata
    if v is None:
        if optional:
            return None
        raise ValueError(f"{name} must be set (got None)")
    if kind is bool:
        if not isinstance(v, bool):
            raise ValueError(f"{name} must be true or false, got {v!r}")
        return v
    if kind in (int, float):
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            raise ValueError(f"{name} must be a number, got {v!r}")
        if kind is int:
            if isinstance(v, float):
                if not v.is_integer():
                    raise ValueError(f"{name} must be a whole number, got {v!r}")
                v = int(v)
        else:
            v = float(v)
            if not math.isfinite(v):
                rng = _range_text(m)
                raise ValueError(f"{name} must be a finite number{' ' + rng if rng else ''}, "
                                 f"got {v!r}")
        lo, hi = m.get("min"), m.get("max")
        bad = (lo is not None and (v < lo if m["min_inclusive"] else v <= lo)) or (
            hi is not None and (v > hi if m["max_inclusive"] else v >= hi))
        if bad:
            raise ValueError(f"{name} must be {_range_text(m)}, got {v!r}")
    elif kind is str and not isinstance(v, str):
        raise ValueError(f"{name} must be a string, got {v!r}")
    elif kind is dict and not isinstance(v, Mapping):
        raise ValueError(f"{name} must be a mapping (JSON object), got {v!r}")
    elif kind in (tuple, list):
        if isinstance(v, str) or not isinstance(v, Iterable):
            raise ValueError(f"{name} must be a list, got {v!r}")
        v = kind(v)
        lo, hi = m.get("min"), m.get("max")
        for e in v:   # a range declared on a list field bounds each element
            if (lo is not None or hi is not None) and not (
                    isinstance(e, (int, float)) and math.isfinite(e)
                    and (lo is None or e >= lo) and (hi is None or e <= hi)):
                raise ValueError(f"every element of {name} must be {_range_text(m)}, got {e!r}")
    choices = m.get("choices")
    if choices is not None and v not in choices:
        raise ValueError(f"unknown {name} {v!r}; known: {', '.join(map(str, choices))}")
    return v


def validate(cfg: Any, where: str = "config") -> Any:
    """Check every field of a config dataclass against its declaration (type, finiteness,
    range, choices); coerces ints to floats where a float is declared. Returns cfg."""
    for f in fields(cfg):
        if "help" not in f.metadata:
            continue
        kind, optional = spec_of(type(cfg), f.name)
        try:
            v = _check_one(f, kind, optional, getattr(cfg, f.name), where)
        except ValueError as e:
            if where == "cli" or not f.metadata.get("cli", True):
                raise
            raise ValueError(f"{e} (flag {flag_of(f)})") from None
        object.__setattr__(cfg, f.name, v)
    return cfg


def resolve(cls, overrides: Mapping[str, Any] | None = None,
            presets: Mapping[str, Mapping[str, Any]] | None = None, preset: str | None = None,
            what: str | None = None, where: str = "config"):
    """cls's defaults, then presets[preset], then overrides (None values are unset).

    Unknown names raise a ValueError listing them; the result is validated."""
    overrides = {k: v for k, v in dict(overrides or {}).items() if v is not None}
    what = what or cls.__name__
    names = {f.name for f in fields(cls)}
    unknown = sorted(set(overrides) - names)
    if unknown:
        raise ValueError(f"unknown {what} setting(s) {unknown}; known: {', '.join(sorted(names))}")
    values: dict[str, Any] = {}
    if presets is not None:
        if preset not in presets:
            flag = " (flag --preset)" if "preset" in names else ""
            raise ValueError(f"unknown preset {preset!r}; known: {', '.join(presets)}{flag}")
        values.update({k: (dict(v) if isinstance(v, dict) else v)
                       for k, v in presets[preset].items()})
        if "preset" in names:
            values["preset"] = preset
    values.update(overrides)
    return validate(cls(**values), where)


def to_dict(cfg: Any) -> dict:
    """The config as a JSON-able dict (tuples as lists)."""
    return json.loads(json.dumps(dataclasses.asdict(cfg), default=str))


def parse_fraction(text: str) -> float:
    """A number, or a fraction such as 8/255 (radii are often written that way)."""
    s = str(text).strip()
    try:
        if "/" in s:
            num, den = s.split("/", 1)
            return float(num) / float(den)
        return float(s)
    except (ValueError, ZeroDivisionError) as e:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number (or a fraction like "
                                         "8/255)") from e


# ----------------------------------------------------------------------------------- CLI

def _fmt_default(f: dataclasses.Field) -> str:
    if f.metadata.get("default_note"):
        return f.metadata["default_note"]
    v = f.default if f.default is not MISSING else (
        f.default_factory() if f.default_factory is not MISSING else None)
    if isinstance(v, float) and 0 < abs(v) < 1e-2:
        return f"{v:.4g}"
    return repr(v)


def _json_arg(text: str):
    try:
        return json.loads(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"{text!r} is not JSON") from e


def _element_type(cls, name: str) -> type:
    """The element type of a list/tuple field (tuple[float, float] -> float; else str)."""
    t = _hints(cls)[name]
    args = [a for a in typing.get_args(t) if a is not type(None)]
    if len(args) == 1 and typing.get_args(args[0]):
        args = list(typing.get_args(args[0]))
    args = [a for a in args if a is not Ellipsis]
    return args[0] if args and all(a is args[0] for a in args) and args[0] in (int, float) else str


def _int_arg(f: dataclasses.Field):
    """argparse type of an int field: a whole number, else an error stating the range."""
    rng = _range_text(f.metadata)

    def parse(text: str) -> int:
        try:
            return int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"{text!r} is not a whole number{' (accepted: ' + rng + ')' if rng else ''}"
            ) from None
    return parse


def _list_arg(kind):
    def parse(text: str):
        return tuple(kind(t.strip()) for t in str(text).split(",") if t.strip())
    return parse


def add_options(p: argparse.ArgumentParser, cls, *, skip: Iterable[str] = (),
                note: str | None = None, fractions: Iterable[str] = ()) -> None:
    """One argparse option per field of cls (fields with cli=False and those in skip are
    left out). Every option defaults to None (unset), so resolution can tell what the user
    gave; the help shows the field's help, unit, accepted values and default.
    fractions: float fields that also accept "8/255"."""
    skip, fractions = set(skip), set(fractions)
    for f in fields(cls):
        m = f.metadata
        if f.name in skip or "help" not in m or not m.get("cli", True):
            continue
        kind, _ = spec_of(cls, f.name)
        extra = []
        if m.get("unit"):
            extra.append(m["unit"])
        if m.get("choices") is not None and kind is not bool:
            extra.append(" | ".join(map(str, m["choices"])))
        elif _range_text(m):
            extra.append(_range_text(m))
        help_ = m["help"] + (f" [{'; '.join(extra)}]" if extra else "")
        help_ += f" (default: {_fmt_default(f)}" + (f"; {note})" if note else ")")
        names = [flag_of(f), *m.get("aliases", ())]
        if kind is bool:
            p.add_argument(*names, dest=f.name, action=argparse.BooleanOptionalAction,
                           default=None, help=help_)
            continue
        if kind is float and f.name in fractions:
            typ = parse_fraction
        elif kind is int:
            typ = _int_arg(f)
        elif kind in (float, str):
            typ = kind
        elif kind is dict:
            typ = _json_arg
        elif kind in (tuple, list):
            typ = _list_arg(_element_type(cls, f.name))
        else:
            typ = str
        p.add_argument(*names, dest=f.name, type=typ, default=None, help=help_.replace("%", "%%"))


def overrides_from(ns: argparse.Namespace, cls) -> dict[str, Any]:
    """The fields of cls the user set on the command line (None = unset)."""
    return {f.name: getattr(ns, f.name) for f in fields(cls)
            if getattr(ns, f.name, None) is not None}
