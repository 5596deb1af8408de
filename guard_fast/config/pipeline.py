"""The pipeline's settings: PipelineConfig (what a run is asked for), PIPELINE_PRESETS (the
sizes per data set) and resolve_settings (preset, smoke sizes, then the config's overrides,
checked), which every pipeline run and the paper's experiments start from."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from guard_fast.config import limits as L
from guard_fast.config.base import on_corrupt_opt, opt, validate
from guard_fast.config.evaluate import EVAL_PROTOCOL, PROTOCOL_CHOICES, default_eps
from guard_fast.config.methods import METHODS, method_spec

__all__ = ["PipelineConfig", "PIPELINE_PRESETS", "SMOKE", "RESUMABLE", "resolve_settings",
           "NO_DATA_NEEDED", "EXPERIMENT_ATTACK_EXAMPLES"]


def _paper(data: str, eval_examples: int | None = None) -> dict[str, Any]:
    """The paper's settings on the user's copy of `data`: each stage's own preset for it,
    IPC 10, the data set's evaluation eps and a PGD sweep around it; eval_examples None:
    the whole validation set."""
    return dict(squeeze={}, recover={}, ipc=10, student={}, eval_examples=eval_examples,
                eps=default_eps(data), sweep=(0.5 / 255, 2 / 255, 4 / 255), square_queries=None)


# Per-preset pipeline sizes. mnist: sized to run all stages for two teachers on a 2-core
# CPU in about 10 minutes (see the README for the measured stage times); the others are
# the paper's settings on the user's data.
PIPELINE_PRESETS: dict[str, dict[str, Any]] = {
    # Square (alone and inside AutoAttack) at 500 queries instead of the paper's 5000: at
    # 5000 robust points cost 5000 forwards each, too slow for the 2-core CPU this preset
    # is sized for.
    # The sweep's one point besides eps (2/255; the plot adds eps 0, the clean accuracy) and
    # 100 recover iterations keep the whole job within 10 minutes now that the teachers are
    # attacked too (at 16/255 every digit model measured here was at 0%).
    "mnist": dict(squeeze=dict(epochs=1, max_train=2000, max_val=500, batch_size=64),
                  recover=dict(iterations=100), ipc=10,
                  student=dict(epochs=20), eval_examples=100, eps=default_eps("mnist"),
                  sweep=(2 / 255,), square_queries=500),
    # the real Fashion-MNIST (Debian's dataset-fashion-mnist): the digits' sizes, its own data
    "fashion-mnist": dict(squeeze=dict(data="fashion-mnist", epochs=1, max_train=2000,
                                       max_val=500, batch_size=64),
                          recover=dict(iterations=100), ipc=10, student=dict(epochs=20),
                          eval_examples=100, eps=default_eps("fashion-mnist"),
                          sweep=(2 / 255,), square_queries=500),
    "imagenette": _paper("imagenette"),
    "tiny-imagenet": _paper("tiny-imagenet"),
    "imagenet-1k": _paper("imagenet-1k", eval_examples=5000),
    "cifar10": _paper("cifar10"),
    "cifar100": _paper("cifar100"),
}
# presets whose data set needs no --data (bundled, or found where its package installs it)
NO_DATA_NEEDED = ("mnist", "fashion-mnist")
# The smoke setting (CI): every stage and artifact, minutes less work; width-8 ConvNets
# (BatchNorm, for SRe2L's recover) instead of the preset's networks: the smoke run checks
# the stages and files, the stage tests check the networks
_SMOKE_NET = dict(model="convnet", model_options={"width": 8, "norm": "batchnorm"})
SMOKE: dict[str, Any] = dict(squeeze=dict(epochs=1, max_train=64, max_val=32, batch_size=64,
                                          **_SMOKE_NET),
                             recover=dict(iterations=2), ipc=2,
                             student=dict(epochs=1, **_SMOKE_NET),
                             eval_examples=4, sweep=(2 / 255,), square_queries=10)
# settings that may differ when a run is continued (they do not change its results; the
# methods each have their own folders and checked settings: a continued run may add or drop
# rows)
RESUMABLE = frozenset({"progress", "device", "methods"})
# the experiments' evaluation: every validation image for clean and PGD-100, a stratified
# subset of this many for the costlier attacks
EXPERIMENT_ATTACK_EXAMPLES = 1000


@dataclass
class PipelineConfig:
    """``all``: squeeze -> recover -> relabel -> student -> robust evaluation for each method,
    then the report. None fields take the preset's size (PIPELINE_PRESETS)."""

    preset: str = opt("mnist", help="data set and sizes (the others need --data)",
                      choices=tuple(PIPELINE_PRESETS))
    data_root: str | None = opt(None, flag="--data", help="your copy of the data set")
    on_corrupt: str = on_corrupt_opt()
    out: str = opt("runs/pipeline", help="run folder (with --experiment: runs/<experiment>)")
    methods: tuple = opt(("sre2l", "guard"), help="comma list of " + ", ".join(METHODS) + ", "
                         "gr:<lambda_g>, or a method with teacher settings such as guard:lam=10 "
                         "or sre2l:epochs=3")
    recover_method: str = opt("sre2l", help="sre2l | cda", choices=("sre2l", "cda"))
    ipc: int | None = opt(None, help="images per class", min=1, max=L.IPC,
                          default_note="the preset's")
    eps: float | None = opt(None, help="evaluation L-inf radius, e.g. 8/255",
                            unit="[0,1] pixel units", min=0, max=1,
                            default_note="8/255 bundled digits, 1/255 other data sets")
    protocol: str = opt(EVAL_PROTOCOL, help="attack settings: paper-code (the public GUARD "
                        "evaluation) | standard", choices=PROTOCOL_CHOICES)
    eval_examples: int | None = opt(None, help="validation images for clean accuracy and "
                                    "PGD-100 (a class-stratified draw, the same for every method "
                                    "and seed)", unit="images", min=1, max=L.IMAGES,
                                    default_note="the preset's; experiments: all")
    attack_examples: int | None = opt(None, help="validation images for the costlier attacks "
                                      "(Square, AutoAttack, CW, MIM): a class-stratified subset",
                                      unit="images", min=1, max=L.IMAGES,
                                      default_note="the eval images; experiments: 1000")
    seeds: int = opt(1, help="run every method's whole chain under seeds seed, seed+1, ...: "
                     "tables then give mean +- std and paired 95% intervals against SRe2L",
                     min=1, max=1000)
    whole_split: bool = opt(False, help="clean and PGD-100 on every validation image unless "
                            "--eval-examples is given (what experiments do)", cli=False)
    square_queries: int | None = opt(None, help="Square's queries (alone and in AutoAttack)",
                                     min=1, max=L.STEPS, default_note="the preset's")
    sweep: tuple | None = opt(None, help="PGD eps sweep besides eps (comma list)",
                              default_note="the preset's", cli=False)
    smoke: bool = opt(False, help="tiny sizes: every stage and file in a couple of minutes (CI)")
    squeeze: dict = opt(help="extra squeeze settings for every method", cli=False,
                        default_factory=dict)
    recover: dict = opt(help="extra recover settings", cli=False, default_factory=dict)
    student: dict = opt(help="extra student settings", cli=False, default_factory=dict)
    device: str = opt("auto", help="auto | cpu | cuda | cuda:N")
    seed: int = opt(0, help="seed", min=0, max=L.SEED)
    progress: bool = opt(True, help="progress bars (--no-progress to silence)")
    teachers: str | None = opt(None, help="folder of squeeze runs shared between pipelines "
                               "(experiments)", cli=False)


def _check_choices(cfg: PipelineConfig) -> None:
    if cfg.preset not in PIPELINE_PRESETS:
        raise ValueError(f"unknown preset {cfg.preset!r}; known: {', '.join(PIPELINE_PRESETS)}")
    if cfg.preset not in NO_DATA_NEEDED and not cfg.data_root:
        raise ValueError(f"--preset {cfg.preset} runs on your copy of the data set: pass --data "
                         "PATH (nothing is downloaded; with no preset the bundled digits are used)")
    if not cfg.methods:
        raise ValueError(f"no methods given; known: {', '.join(METHODS)}, gr:<lambda_g>")
    for m in cfg.methods:
        try:
            method_spec(m)
        except ValueError as e:
            raise ValueError(f"--methods: {e}") from None
    if cfg.recover_method not in ("sre2l", "cda"):
        raise ValueError(f"recover_method must be sre2l or cda, got {cfg.recover_method!r}")


def resolve_settings(cfg: PipelineConfig) -> dict:
    """The sizes a run uses: the preset's, then the smoke sizes (cfg.smoke), then cfg's
    overrides; keys squeeze/recover/student (stage overrides), ipc, eps, eval_examples,
    square_queries and sweep (the PGD eps sweep without eps, ascending). Names a bad value."""
    _check_choices(cfg)
    validate(cfg)
    p = {k: (dict(v) if isinstance(v, dict) else v) for k, v in PIPELINE_PRESETS[cfg.preset].items()}
    if cfg.smoke:
        for k, v in SMOKE.items():
            p[k] = {**p.get(k, {}), **v} if isinstance(v, dict) else v
    p["squeeze"].update(cfg.squeeze)
    p["recover"].update(cfg.recover)
    p["student"].update(cfg.student)
    p.setdefault("attack_examples", None)
    if cfg.whole_split and not cfg.smoke:
        p["eval_examples"], p["attack_examples"] = None, EXPERIMENT_ATTACK_EXAMPLES
    for k in ("ipc", "eps", "eval_examples", "attack_examples"):
        if getattr(cfg, k) is not None:
            p[k] = getattr(cfg, k)
    p["sweep"] = sorted(set(p["sweep"]) - {p["eps"]})
    if cfg.square_queries is not None:
        p["square_queries"] = cfg.square_queries
    if cfg.sweep is not None:
        p["sweep"] = sorted(set(cfg.sweep) - {p["eps"]})
    if p["ipc"] < 1:
        raise ValueError(f"ipc must be >= 1, got {p['ipc']}")
    if p["eps"] < 0:
        raise ValueError(f"eps must be >= 0, got {p['eps']}")
    return p
