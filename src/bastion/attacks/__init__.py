"""Attacks: each module holds one family; every attack shares the base ``__call__`` of :class:`Attack`."""

from __future__ import annotations

import inspect
import types
import typing
from typing import Any

from bastion.attacks.apgd import APGD, APGDT
from bastion.attacks.base import ATTACKS, Attack, CountingModel
from bastion.attacks.blackbox import (
    NES,
    OPT,
    ZOO,
    AutoZOOM,
    BanditsTD,
    BoundaryAttack,
    HopSkipJump,
    RayS,
    SignOPT,
    SimBA,
    SimBADCT,
)
from bastion.attacks.cw import CarliniWagnerL0, CarliniWagnerL2, CarliniWagnerLinf
from bastion.attacks.deepfool import DeepFool
from bastion.attacks.ead import EAD
from bastion.attacks.fab import FAB, FABT
from bastion.attacks.fgsm import FGM, FGSM
from bastion.attacks.jsma import JSMA
from bastion.attacks.l0tre import L0TRE
from bastion.attacks.lbfgs import LBFGS
from bastion.attacks.patch import AdversarialPatch, PatchResult
from bastion.attacks.pgd import BIM, PGD
from bastion.attacks.square import Square
from bastion.attacks.stadv import StAdv
from bastion.attacks.transfer import (
    DIFGSM,
    MIDITIFGSM,
    MIFGSM,
    TIFGSM,
    Ensemble,
    TransferAttack,
    Transferred,
    TransferResult,
    transfer_attack,
)
from bastion.attacks.universal import (
    GeneralizedUniversalPerturbation,
    GeneralizedUniversalResult,
    UniversalPerturbation,
    UniversalResult,
)
from bastion.attacks.wrappers import BPDA, EOT
from bastion.errors import InputError

__all__ = [
    "APGD",
    "APGDT",
    "ATTACKS",
    "BIM",
    "BPDA",
    "DIFGSM",
    "EAD",
    "EOT",
    "FAB",
    "FABT",
    "FGM",
    "FGSM",
    "JSMA",
    "L0TRE",
    "LBFGS",
    "MIDITIFGSM",
    "MIFGSM",
    "NES",
    "OPT",
    "PGD",
    "TIFGSM",
    "ZOO",
    "AdversarialPatch",
    "Attack",
    "AutoZOOM",
    "BanditsTD",
    "BoundaryAttack",
    "CarliniWagnerL0",
    "CarliniWagnerL2",
    "CarliniWagnerLinf",
    "CountingModel",
    "DeepFool",
    "Ensemble",
    "GeneralizedUniversalPerturbation",
    "GeneralizedUniversalResult",
    "HopSkipJump",
    "PatchResult",
    "RayS",
    "SignOPT",
    "SimBA",
    "SimBADCT",
    "Square",
    "StAdv",
    "TransferAttack",
    "TransferResult",
    "Transferred",
    "UniversalPerturbation",
    "UniversalResult",
    "make_attack",
    "transfer_attack",
]


def make_attack(name: str, **options: Any) -> Attack:
    """Build a registered attack by name with keyword options (``make_attack("pgd", steps=100)``).

    Option values are checked against the constructor's type hints and converted where the intent is
    unambiguous (``"false"`` → ``False``, ``"8/255"`` or ``1`` → a float, ``40.0`` → ``40``), so option strings
    from the command line or a config file behave as the same values typed in Python.

    Raises:
        InputError: unknown attack name, unknown option, or a value of the wrong type, naming the accepted ones.
    """
    key = name.strip().lower()
    if key not in ATTACKS:
        raise InputError(f"unknown attack {name!r}; available: {', '.join(sorted(ATTACKS))} (see `bastion attacks`)")
    cls = ATTACKS[key]
    params = [p for p in inspect.signature(cls.__init__).parameters if p != "self"]
    hints = typing.get_type_hints(cls.__init__)
    converted = {}
    for opt, value in options.items():
        if opt not in params:
            raise InputError(f"attack {key!r} has no option {opt!r}; accepted options: {', '.join(params)}")
        converted[opt] = _coerce(f"{key}.{opt}", value, hints.get(opt, Any))
    return cls(**converted)


def _coerce(where: str, value: Any, hint: Any) -> Any:
    """``value`` as the type ``hint`` asks for, or an InputError naming the option, the value and the type."""
    if hint is Any:
        return value
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        choices = typing.get_args(hint)
        if value is None or (isinstance(value, str) and value.lower() == "none"):
            if type(None) in choices:
                return None
        for choice in choices:
            if choice is type(None):
                continue
            try:
                return _coerce(where, value, choice)
            except InputError:
                continue
        raise InputError(f"option {where}: {value!r} is not a valid {_type_name(hint)}")
    if origin is typing.Literal:
        if value in typing.get_args(hint):
            return value
        raise InputError(f"option {where}: {value!r} is not one of {', '.join(map(repr, typing.get_args(hint)))}")
    if hint is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false"):
            return value.lower() == "true"
        raise InputError(f"option {where}: expected true or false, got {value!r}")
    if hint is int:
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise InputError(f"option {where}: expected an integer, got {value!r}")
    if hint is float:
        if isinstance(value, str) and "/" in value:
            num, _, den = value.partition("/")
            try:
                return float(num) / float(den)
            except (ValueError, ZeroDivisionError):
                pass
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise InputError(f"option {where}: expected a number, got {value!r}")
    if hint is str:
        if isinstance(value, str):
            return value
        raise InputError(f"option {where}: expected a string, got {value!r}")
    return value


def _type_name(hint: Any) -> str:
    return " or ".join(getattr(a, "__name__", str(a)) for a in typing.get_args(hint)) or str(hint)
