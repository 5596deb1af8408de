"""Robust-evaluation settings, and the one rule for the evaluation defaults that the
``evaluate`` stage and the pipeline (``all``) share.

The rule: the protocol is ``paper-code`` (the attacks as the GUARD paper's public evaluation
code runs them, so that the numbers compare with its tables; ``standard`` is the attacks as
their own papers define them), and eps is the data set's: 8/255 on the bundled digits (and
other 28x28 grey-scale sets, where 1/255 leaves every model robust), 1/255 elsewhere, as the
paper evaluates ImageNette, Tiny-ImageNet and ImageNet-1K.
"""
from __future__ import annotations

from dataclasses import dataclass

from guard_fast.config import limits as L
from guard_fast.config.base import on_corrupt_opt, opt

__all__ = ["EvaluateConfig", "EVAL_PROTOCOL", "PROTOCOL_CHOICES", "default_eps", "EVAL_RULE"]

EVAL_PROTOCOL = "paper-code"
PROTOCOL_CHOICES = ("paper-code", "standard")
_GREY_28PX = ("mnist", "fashion-mnist")
EVAL_RULE = ("default protocol paper-code; default eps 8/255 on the bundled digits, 1/255 "
             "(the paper's) on every other data set")


def default_eps(data: str | None) -> float:
    """The evaluation radius of a data set (L-inf, [0, 1] pixel units): see the module doc."""
    return 8 / 255 if data in _GREY_28PX else 1 / 255


@dataclass
class EvaluateConfig:
    """``evaluate``: evaluate a checkpoint under attack, or train a student on a distilled set
    first and evaluate that."""

    model: str | None = opt(None, help="evaluate this checkpoint (teacher.pt, student.pt) "
                            "instead of training a student")
    distilled: str | None = opt(None, help="distilled-set folder (the recover stage's --out) to "
                                "train a student on")
    soft_labels: str | None = opt(None, help="relabel folder: replay its views and soft labels "
                                  "(default: online soft labels from --teacher)")
    teacher: str | None = opt(None, help="teacher for online soft labels (default: the "
                              "distilled set's teacher)")
    student_model: str | None = opt(None, help="student architecture (default: the preset's, "
                                    "resnet18)")
    student_epochs: int | None = opt(None, help="student epochs (default: the preset's: 300 "
                                     "ImageNet-style, 30 bundled digits)", min=1, max=L.EPOCHS)
    student_out: str | None = opt(None, help="student run folder (default: "
                                  "<distilled>/../student)")
    data_root: str | None = opt(None, flag="--data", help="data set path (default: the bundled "
                                "data, or the checkpoint's data set)")
    on_corrupt: str = on_corrupt_opt()
    protocol: str = opt(EVAL_PROTOCOL, help="attack settings: paper-code (the GUARD public "
                        "code's) | standard (the attacks' own papers')", choices=PROTOCOL_CHOICES)
    eps: float | None = opt(None, help="L-inf radius; accepts fractions such as 8/255",
                            unit="[0,1] pixel units", min=0, max=1,
                            default_note="8/255 bundled digits, 1/255 other data sets")
    attacks: str | None = opt(None, help="comma list of table columns (default: all)")
    n_examples: int = opt(500, help="validation images evaluated", unit="images", min=1,
                          max=L.IMAGES)
    batch_size: int = opt(250, help="images per attack batch", min=1, max=L.BATCH)
    memory_budget: str | None = opt(None, help="memory one attack chunk may use, e.g. 4GiB: each "
                                    "batch is split into the largest chunks that fit (default: "
                                    "no limit)")
    device: str = opt("auto", help="auto | cpu | cuda | cuda:N")
    seed: int = opt(0, help="attack seed", min=0, max=L.SEED)
    out: str | None = opt(None, help="folder for results.json, table.md, plot (default: next to "
                          "--model)")
