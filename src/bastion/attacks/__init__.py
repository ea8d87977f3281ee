"""Attacks: each module holds one family; every attack shares the base ``__call__`` of :class:`Attack`."""

from __future__ import annotations

from typing import Any

from bastion.attacks.base import ATTACKS, Attack, CountingModel
from bastion.attacks.fgsm import FGM, FGSM
from bastion.attacks.pgd import BIM, PGD
from bastion.errors import InputError

__all__ = ["ATTACKS", "BIM", "FGM", "FGSM", "PGD", "Attack", "CountingModel", "make_attack"]


def make_attack(name: str, **options: Any) -> Attack:
    """Build a registered attack by name with keyword options (``make_attack("pgd", steps=100)``).

    Raises:
        InputError: unknown attack name or option, naming the accepted ones.
    """
    key = name.strip().lower()
    if key not in ATTACKS:
        raise InputError(f"unknown attack {name!r}; available: {', '.join(sorted(ATTACKS))} (see `bastion attacks`)")
    cls = ATTACKS[key]
    try:
        return cls(**options)
    except TypeError as exc:
        import inspect

        accepted = [p for p in inspect.signature(cls.__init__).parameters if p != "self"]
        raise InputError(f"bad option for attack {key!r}: {exc}; accepted options: {', '.join(accepted)}") from None
