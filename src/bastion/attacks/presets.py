"""Named attack cascades for :func:`bastion.evaluate`: AutoAttack's standard ensemble and its rapid subset.

Croce & Hein, "Reliable evaluation of adversarial robustness with an ensemble of diverse parameter-free attacks",
ICML 2020. The *standard* version runs APGD-CE (no restarts, 100 iterations), targeted APGD-DLR on the 9 most likely
wrong classes, targeted FAB on the same 9 classes, and the score-based Square attack with 5000 queries, each on the
points every earlier attack failed on. *rapid* is the first two (the cheapest part, which already decides almost
every point on most models). Attacks that do not support the threat's norm are left out (Square has no l1
version), as in AutoAttack.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from bastion.attacks.base import ATTACKS, Attack
from bastion.errors import InputError

#: preset name -> the cascade as (registered attack name, options) pairs, in order.
PRESETS: dict[str, list[tuple[str, dict[str, Any]]]] = {
    "standard": [
        ("apgd", {"loss": "ce", "steps": 100, "restarts": 1}),
        ("apgd-t", {"steps": 100, "n_target_classes": 9}),
        ("fab-t", {"steps": 100, "n_target_classes": 9}),
        ("square", {"queries": 5000}),
    ],
    "rapid": [
        ("apgd", {"loss": "ce", "steps": 100, "restarts": 1}),
        ("apgd-t", {"steps": 100, "n_target_classes": 9}),
    ],
}


def preset(name: str, norms: Sequence[str], overrides: dict[str, dict[str, Any]] | None = None) -> list[Attack]:
    """The attacks of preset ``name`` that support every norm in ``norms``, configured and in order.

    Args:
        name: ``"standard"`` or ``"rapid"``.
        norms: the norms of the threat models to be evaluated.
        overrides: per attack name, options replacing the preset's (e.g. ``{"square": {"queries": 1000}}``).
    """
    from bastion.attacks import make_attack

    if name not in PRESETS:
        raise InputError(f"unknown attack preset {name!r}; available: {', '.join(PRESETS)}")
    overrides = overrides or {}
    unknown = set(overrides) - {n for n, _ in PRESETS[name]}
    if unknown:
        raise InputError(f"options given for {sorted(unknown)}, which are not in the {name!r} preset")
    out = []
    for attack_name, options in PRESETS[name]:
        if attack_name not in ATTACKS:
            raise InputError(f"the {name!r} preset needs the attack {attack_name!r}, which is not available")
        if all(n in ATTACKS[attack_name].norms for n in norms):
            out.append(make_attack(attack_name, **{**options, **overrides.get(attack_name, {})}))
    if not out:
        raise InputError(f"no attack of the {name!r} preset supports the norms {list(norms)}")
    return out
