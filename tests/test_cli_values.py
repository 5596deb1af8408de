"""Every value flag of every stage of ``python -m guard_fast.train``, tried with a negative,
a zero, a NaN and an absurd value, in-process through ``train.main`` (the real parser and
the real resolution path of each stage, up to the point where the stage would start work).

Each try must end one of two ways:
  * accepted: the stage reaches its first piece of work (entering its process group, or
    loading the model to evaluate), which this test replaces by a sentinel, and the value
    lies inside the field's declared range;
  * refused: exit status 2 with a message that names the flag and its accepted range (or
    its accepted values), and no folder was created.
Every numeric flag must refuse NaN and the absurd value, so every one declares both bounds.

Flags that take no value (switches) and free-text flags (paths, names, device, attack list,
memory budget) are not walked here: the stages check those where they are used, before
any folder is made (tests/test_squeeze.py, test_student.py, test_runtime.py).
"""
from __future__ import annotations

import dataclasses
import math
import shutil

import pytest

from guard_fast import config as C
from guard_fast import train
from guard_fast.config.base import _range_text, spec_of

VALUES = {"negative": "-5", "zero": "0", "nan": "nan"}
ABSURD = {int: "1000000000000000", float: "1e30"}

# arguments each stage needs to get past its first non-value checks; --out is added per try
BASE = {"squeeze": [], "recover": [], "relabel": ["--teacher", "t.pt"],
        "student": ["--teacher", "t.pt", "--distilled", "d"], "evaluate": ["--model", "m.pt"],
        "all": [], "experts": [], "mtt": ["--buffer", "b"]}
# recover --method dc reads only these of RecoverConfig's flags (into a DCConfig)
DC_FLAGS = ("ipc", "iterations", "seed")
# list values that are valid: one per-channel mean of 0 (one value serves every channel)
LIST_ACCEPTS = {("student", "mean", "zero")}


class Reached(Exception):
    """Raised where a stage would start its work: the values were accepted."""


def _cases():
    out = []
    for stage, (_, _, clsname, _kw) in train._STAGES.items():
        if clsname is None:
            continue
        cls = getattr(C, clsname)
        for f in dataclasses.fields(cls):
            if "help" not in f.metadata or not f.metadata.get("cli", True) or f.name == "out":
                continue
            kind, _ = spec_of(cls, f.name)
            if kind is str and f.metadata.get("choices") is None:
                continue  # free text
            if kind is bool:
                continue  # a switch takes no value
            values = dict(VALUES, absurd=ABSURD.get(kind, "1e30"))
            for what, v in values.items():
                out.append((stage, cls, f, what, v))
    return out


CASES = _cases()


@pytest.fixture(scope="module")
def stubbed(tmp_path_factory):
    """train.main with each stage's first piece of work replaced by Reached, in a tmp folder."""
    import guard_fast.data.distilled as distilled
    import guard_fast.distill.dc as dc
    import guard_fast.distill.experts as experts
    import guard_fast.distill.mtt as mtt
    import guard_fast.distill.recover as recover
    import guard_fast.distill.relabel as relabel
    import guard_fast.distill.squeeze as squeeze
    import guard_fast.distill.student as student
    import guard_fast.pipeline.run as prun
    import guard_fast.runtime as runtime

    def reached(*a, **k):
        raise Reached()

    with pytest.MonkeyPatch.context() as mp:
        for mod in (squeeze, recover, relabel, student, prun, experts):
            mp.setattr(mod, "distributed", reached)
        mp.setattr(mtt, "load_buffer", reached)   # mtt's first work: reading the expert buffer
        mp.setattr(dc, "RunFolder", reached)
        mp.setattr(runtime, "load_classifier", reached)
        # recover resolves its presets against the teacher's data set, relabel against the
        # distilled set's: stand-ins for those two reads
        mp.setattr(recover, "teacher_path", lambda p: p)
        mp.setattr(recover, "load_classifier", lambda p: (None, {"data": "mnist"}))
        mp.setattr(distilled, "load_distilled",
                   lambda p: {"meta": {"arch": {"data": "mnist"}, "teacher": "t.pt"}})
        parser = train.build_parser()
        mp.setattr(train, "build_parser", lambda: parser)
        where = tmp_path_factory.mktemp("cli")
        mp.chdir(where)
        yield where


def _run(argv, capsys) -> tuple[str, str]:
    """('accepted' | 'refused', stderr) of one train.main call."""
    capsys.readouterr()
    try:
        rc = train.main(argv)
    except Reached:
        return "accepted", capsys.readouterr().err
    except SystemExit as e:  # argparse: a value of the wrong type
        rc = e.code
    err = capsys.readouterr().err
    assert rc == 2, (argv, rc, err)
    return "refused", err


def _in_range(f, v: float) -> bool:
    m = f.metadata
    lo, hi = m.get("min"), m.get("max")
    return math.isfinite(v) and not (
        (lo is not None and (v < lo if m["min_inclusive"] else v <= lo))
        or (hi is not None and (v > hi if m["max_inclusive"] else v >= hi)))


def _accepted_text(f) -> str:
    """What the refusal must state: the known values, or the range."""
    m = f.metadata
    if m.get("choices") is not None:
        return ", ".join(map(str, m["choices"]))
    return _range_text(m)


def _problem(where, capsys, stage, cls, f, what, value) -> str | None:
    """None if the try ended as the module docstring says, else what went wrong."""
    kind, _ = spec_of(cls, f.name)
    flag = C.flag_of(f)
    argv = [stage, *BASE[stage], "--out", "o", flag, value]
    if stage == "recover" and f.name in DC_FLAGS:
        argv += ["--method", "dc"]
    outcome, err = _run(argv, capsys)
    if list(where.iterdir()):
        made = list(where.iterdir())
        for p in made:
            shutil.rmtree(p) if p.is_dir() else p.unlink()
        return f"{argv} created {made}"
    numeric = kind in (int, float)
    if numeric and (f.metadata.get("min") is None or f.metadata.get("max") is None):
        return f"{flag} declares no {'min' if f.metadata.get('min') is None else 'max'}"
    if outcome == "accepted":
        if numeric and what not in ("nan", "absurd") and _in_range(f, float(value)):
            return None
        if (stage, f.name, what) in LIST_ACCEPTS:
            return None
        return f"{argv}: {value} accepted"
    if flag not in err:
        return f"{argv}: the refusal does not name {flag}: {err.strip()}"
    text = _accepted_text(f)
    if (numeric or f.metadata.get("choices") is not None) and text not in err:
        return f"{argv}: the refusal does not state {text!r}: {err.strip()}"
    return None


STAGES = sorted({c[0] for c in CASES})


@pytest.mark.parametrize("stage", STAGES)
def test_every_flag_value(stubbed, capsys, stage):
    cases = [c for c in CASES if c[0] == stage]
    problems = [p for p in (_problem(stubbed, capsys, *c) for c in cases) if p]
    assert not problems, f"{len(problems)} of {len(cases)} tries:\n" + "\n".join(problems)


def test_a_valid_value_reaches_the_work(stubbed, capsys):
    """The sentinel is reachable: the walk above can tell accepted from refused."""
    for argv in (["squeeze", "--out", "o", "--epochs", "3"],
                 ["recover", "--out", "o", "--ipc", "2"],
                 ["recover", "--out", "o", "--ipc", "1", "--method", "dc"],
                 ["relabel", *BASE["relabel"], "--out", "o", "--epochs", "2"],
                 ["student", *BASE["student"], "--out", "o", "--epochs", "2"],
                 ["evaluate", *BASE["evaluate"], "--n-examples", "10"],
                 ["all", "--out", "o", "--ipc", "2"]):
        assert _run(argv, capsys)[0] == "accepted", argv
