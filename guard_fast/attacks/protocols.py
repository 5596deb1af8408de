"""Named robust-evaluation protocols: which attacks, with which settings, at a given eps.

Two protocols, named plainly (see design.md, "Faithfulness"):

``"paper-code"`` reproduces what GUARD's public evaluation (yumozi/GUARD,
train/evaluate.py, `all_attack_dicts`) ran with torchattacks 3.5.1, at eps = 1/255:

=========== ===============================================================================
PGD100      torchattacks PGD: eps, alpha = 0.25/255, 100 steps, random start
Square      torchattacks Square: eps, 5000 queries, p_init 0.8, margin loss, rescaled
            schedule, seed 0
AutoAttack  torchattacks AutoAttack(model, eps): APGD-CE/APGD-T/FAB-T with 10 iterations,
            n_classes = 10, Square 5000 queries
CW          torchattacks CW L2: c = 1e-4, kappa 0, 50 Adam steps, lr 0.01; NOT bounded by
            eps (the paper's text says c = 1e-5; the code ran 1e-4)
MIM         GUARD's own mim_attack: eps, alpha = 1/255, 20 iterations, decay 1.0, gradient
            divided by one L1 norm over the whole batch
=========== ===============================================================================

Accuracy is measured as the code measured it: the fraction of adversarial inputs the
model classifies correctly (a point the model already gets wrong counts as wrong).

``"standard"`` is the paper's protocol with the standard definitions of each attack:

=========== ===============================================================================
PGD100      PGD: eps, alpha = eps / 4, 100 steps, random start (the paper's PGD100 setting)
Square      Square: eps, 5000 queries, p_init 0.8, margin loss, rescaled schedule
AutoAttack  fra31 AutoAttack "standard" (APGD-CE 100, APGD-T 100 x 9 targets,
            FAB-T 100 x 9 targets, Square 5000)
CW          CW-inf: PGD on the CW margin loss, eps, alpha = eps / 4, 100 steps, random start
CW-L2       CW L2 with the paper's stated c = 1e-5 (kappa 0, 50 Adam steps, lr 0.01, exact
            margin); NOT bounded by eps
MIM         MI-FGSM with per-sample gradient normalization: eps, alpha = eps, 20 iterations,
            decay 1.0 (the paper's MIM schedule)
=========== ===============================================================================

Robust accuracy counts a point as robust when the model classifies both the clean point
and its adversarial point correctly; points the model already gets wrong are not attacked.

Scaling with eps: every step size is a fixed multiple of eps, fixed so that at
eps = 1/255 it is the value above (PGD alpha = eps / 4, MIM alpha = eps, CW-inf
alpha = eps / 4). The CW L2 attacks do not depend on eps.
"""
from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Mapping, Optional, Sequence, Tuple

from torch import nn

from .autoattack import AutoAttack
from .base import Attack
from .cw import CW, CWLinf
from .mim import MIM
from .pgd import PGD
from .square import Square

__all__ = ["Protocol", "PROTOCOLS", "get_protocol", "list_protocols", "TABLE_COLUMNS"]

#: the attack columns of the paper's Table 2, in order
TABLE_COLUMNS = ("PGD100", "Square", "AutoAttack", "CW", "MIM")

Builder = Callable[..., Attack]


@dataclass(frozen=True)
class Protocol:
    """A named set of attack builders. `build(model, eps, ...)` returns {name: Attack}.

    robust_requires_clean: True when a point counts as robust only if the clean point is
    also classified correctly (and then clean-misclassified points are not attacked).
    """

    name: str
    description: str
    builders: Mapping[str, Builder] = field(repr=False)
    robust_requires_clean: bool = True

    @property
    def attack_names(self) -> Tuple[str, ...]:
        return tuple(self.builders)

    def build(self, model: nn.Module, eps: float, names: Optional[Sequence[str]] = None,
              **common) -> Dict[str, Attack]:
        """Attacks of this protocol at `eps`; `common` (mean, std, device, batch_size,
        seed, active_set, ...) goes to every attack."""
        names = self.attack_names if names is None else tuple(names)
        unknown = [n for n in names if n not in self.builders]
        if unknown:
            raise ValueError(f"protocol {self.name!r} has no attack {unknown[0]!r}; it has "
                             f"{', '.join(self.attack_names)}")
        return {n: self.builders[n](model, float(eps), **common) for n in names}

    def with_settings(self, **per_attack: Mapping[str, Any]) -> "Protocol":
        """This protocol with some of its attacks' settings replaced, by attack name:
        ``with_settings(Square={"n_queries": 500}, AutoAttack={"square_queries": 500})``
        keeps every other setting as defined here (a reduced budget stays the same attack).
        The name stays; each attack's repr in the results says what ran."""
        unknown = [n for n in per_attack if n not in self.builders]
        if unknown:
            raise ValueError(f"protocol {self.name!r} has no attack {unknown[0]!r}; it has "
                             f"{', '.join(self.attack_names)}")
        builders = {n: functools.partial(b, **per_attack[n]) if n in per_attack else b
                    for n, b in self.builders.items()}
        return dataclasses.replace(self, builders=builders)


def _attack(cls, **settings) -> Builder:
    """A builder f(model, eps, **kw) -> cls(model, **settings, **kw). A setting given as a
    function is called with eps (step sizes are fixed multiples of eps); kw (the common
    settings of Protocol.build, the overrides of Protocol.with_settings) goes on top."""
    def build(model, eps, **kw):
        values = {k: v(eps) if callable(v) else v for k, v in settings.items()}
        return cls(model, **{**values, **kw})
    return build


def _eps(e: float) -> float:
    return e


# the same in both protocols
_PGD100 = _attack(PGD, eps=_eps, alpha=lambda e: e / 4, steps=100, random_start=True)
_SQUARE = _attack(Square, eps=_eps, n_queries=5000, p_init=0.8, loss="margin",
                  rescale_schedule=True)


def _paper_code() -> Protocol:
    b = {
        "PGD100": _PGD100,
        "Square": _SQUARE,
        "AutoAttack": _attack(AutoAttack, eps=_eps, version="torchattacks", n_classes=10),
        "CW": _attack(CW, c=1e-4, kappa=0.0, steps=50, lr=0.01, margin="torchattacks"),
        "MIM": _attack(MIM, eps=_eps, alpha=_eps, steps=20, decay=1.0, grad_norm="batch"),
    }
    return Protocol("paper-code", "GUARD public evaluation code (torchattacks 3.5.1)", b,
                    robust_requires_clean=False)


def _standard() -> Protocol:
    b = {
        "PGD100": _PGD100,
        "Square": _SQUARE,
        "AutoAttack": _attack(AutoAttack, eps=_eps, version="standard"),
        "CW": _attack(CWLinf, eps=_eps, alpha=lambda e: e / 4, steps=100, kappa=0.0,
                      random_start=True),
        "CW-L2": _attack(CW, c=1e-5, kappa=0.0, steps=50, lr=0.01, margin="exact"),
        "MIM": _attack(MIM, eps=_eps, alpha=_eps, steps=20, decay=1.0, grad_norm="per_sample"),
    }
    return Protocol("standard", "the paper's protocol with standard attack definitions "
                    "(fra31 AutoAttack standard, per-sample MIM, CW-inf and CW-L2)", b,
                    robust_requires_clean=True)


PROTOCOLS: Dict[str, Protocol] = {p.name: p for p in (_paper_code(), _standard())}


def list_protocols() -> Tuple[str, ...]:
    return tuple(PROTOCOLS)


def get_protocol(name) -> Protocol:
    if isinstance(name, Protocol):
        return name
    key = str(name).lower().replace("_", "-")
    if key not in PROTOCOLS:
        raise ValueError(f"unknown protocol {name!r}; known: {', '.join(PROTOCOLS)}")
    return PROTOCOLS[key]
