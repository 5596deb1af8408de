"""Adversarial attacks for robust evaluation, on one base class (see base.py).

    from guard_fast.attacks import PGD, get_attack
    atk = PGD(model, eps=1/255, alpha=0.25/255, steps=100)   # torchattacks-compatible call
    adv = atk(images, labels)                                # images in [0, 1]

One file per attack: pgd (PGD), mim (MIM / MI-FGSM), cw (CW L2, CW-inf), square
(Square), apgd (APGD-CE, APGD-T), fab (FAB-T), autoattack (AutoAttack). protocols.py
names the two evaluation protocols, "paper-code" and "standard".
"""
from .apgd import APGD, APGDT, dlr_loss, dlr_loss_targeted
from .autoattack import AA_VERSIONS, AutoAttack
from .base import Attack, attack_registry, eval_mode, get_attack, list_attacks, register_attack
from .cw import CW, CWLinf, cw_margin
from .fab import FAB, project_linf_box
from .mim import MIM
from .pgd import PGD
from .protocols import PROTOCOLS, TABLE_COLUMNS, Protocol, get_protocol, list_protocols
from .square import Square, square_p_selection

__all__ = [
    "Attack", "get_attack", "list_attacks", "register_attack", "attack_registry", "eval_mode",
    "PGD", "MIM", "CW", "CWLinf", "Square", "APGD", "APGDT", "FAB", "AutoAttack", "AA_VERSIONS",
    "cw_margin", "dlr_loss", "dlr_loss_targeted",
    "project_linf_box", "square_p_selection",
    "Protocol", "PROTOCOLS", "get_protocol", "list_protocols", "TABLE_COLUMNS",
]
