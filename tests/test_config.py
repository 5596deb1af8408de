"""The configuration system: declared checks, one resolution path, the generated CLI, and
one rule for the evaluation defaults."""
import argparse
import dataclasses
import math

import pytest

from guard_fast import config as C
from guard_fast.config.base import opt


@dataclasses.dataclass
class _Toy:
    n: int = opt(1, help="a count", min=1)
    rate: float = opt(0.5, help="a rate", unit="per step", min=0, min_inclusive=False, max=1)
    mode: str = opt("a", help="a mode", choices=("a", "b"))
    size: int | None = opt(None, help="optional size", min=1)
    flag: bool = opt(False, help="a switch")


@pytest.mark.parametrize("kw,needle", [
    (dict(n=0), "n must be >= 1, got 0 (flag --n)"),
    (dict(n=1.5), "n must be a whole number"),
    (dict(n="3"), "n must be a number"),
    (dict(rate=0.0), "rate must be > 0"),
    (dict(rate=2.0), "rate must be > 0 and <= 1"),
    (dict(rate=math.nan), "rate must be a finite number"),
    (dict(rate=math.inf), "rate must be a finite number"),
    (dict(mode="c"), "unknown mode 'c'; known: a, b"),
    (dict(size=-5), "size must be >= 1, got -5"),
    (dict(flag=1), "flag must be true or false"),
])
def test_validate_refuses_with_the_flag_name(kw, needle):
    with pytest.raises(ValueError) as ei:
        C.resolve(_Toy, kw)
    assert needle in str(ei.value)


def test_resolve_order_and_unknown_names():
    presets = {"p": dict(n=3, rate=0.25)}
    cfg = C.resolve(_Toy, dict(rate=0.75, size=None), presets, "p")
    assert (cfg.n, cfg.rate, cfg.size) == (3, 0.75, None)  # preset, then overrides; None unset
    assert isinstance(C.resolve(_Toy, dict(rate=1)).rate, float)
    with pytest.raises(ValueError, match=r"unknown _Toy setting\(s\) \['nope'\]"):
        C.resolve(_Toy, dict(nope=1))
    with pytest.raises(ValueError, match="unknown preset 'q'"):
        C.resolve(_Toy, {}, presets, "q")


def test_squeeze_refuses_silent_garbage():
    for kw, needle in [(dict(lr=math.nan), "lr must be a finite"), (dict(lr=1e6), "lr must be"),
                       (dict(momentum=math.nan), "momentum"), (dict(max_train=0), "max_train"),
                       (dict(max_train=-5), "max_train"), (dict(adv_eps=8.0), "adv_eps")]:
        with pytest.raises(ValueError, match=needle):
            C.resolve_squeeze(kw)


def test_generated_cli_parses_and_documents():
    p = argparse.ArgumentParser()
    C.add_options(p, _Toy, fractions=("rate",))
    ns = p.parse_args(["--n", "4", "--rate", "1/4", "--flag"])
    assert C.overrides_from(ns, _Toy) == {"n": 4, "rate": 0.25, "flag": True}
    text = p.format_help()
    assert "a rate [per step; > 0 and <= 1] (default: 0.5)" in " ".join(text.split())
    assert "--no-flag" in text


def test_a_field_added_to_a_stage_config_appears_in_train_help(monkeypatch, capsys):
    from guard_fast import train

    @dataclasses.dataclass
    class Extended(C.SqueezeConfig):
        new_knob: float = opt(0.125, help="a setting added by this test", unit="widgets", min=0)

    monkeypatch.setattr(C, "SqueezeConfig", Extended)
    with pytest.raises(SystemExit):
        train.build_parser().parse_args(["squeeze", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "--new-knob NEW_KNOB a setting added by this test [widgets; >= 0] (default: 0.125; presets may change it)" in text


def test_every_stage_field_is_documented():
    for cls in (C.SqueezeConfig, C.RecoverConfig, C.RelabelConfig, C.StudentConfig, C.DCConfig,
                C.EvaluateConfig, C.PipelineConfig):
        for f in dataclasses.fields(cls):
            assert f.metadata.get("help"), f"{cls.__name__}.{f.name} has no help text"


def test_evaluate_and_all_share_the_evaluation_defaults():
    from guard_fast import train
    parser = train.build_parser()
    ev = parser.parse_args(["evaluate", "--model", "x.pt"])
    al = parser.parse_args(["all"])
    cfg_ev = C.EvaluateConfig(**C.overrides_from(ev, C.EvaluateConfig))
    cfg_al = C.PipelineConfig(**C.overrides_from(al, C.PipelineConfig))
    assert cfg_ev.protocol == cfg_al.protocol == C.EVAL_PROTOCOL
    assert cfg_ev.eps is None and cfg_al.eps is None  # both fall back to the data set's radius
    for text in (parser._subparsers._group_actions[0].choices["evaluate"].format_help(),
                 parser._subparsers._group_actions[0].choices["all"].format_help()):
        assert C.EVAL_RULE[1:] in " ".join(text.split())  # the rule is stated in both --helps
    for preset, values in C.PIPELINE_PRESETS.items():
        assert values["eps"] == C.default_eps(preset), preset
    assert C.default_eps("mnist") == 8 / 255 and C.default_eps("imagenette") == 1 / 255
