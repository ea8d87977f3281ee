"""Named attack cascades for :func:`bastion.evaluate`, each named by its budget: ``standard``, ``fast``, ``rapid``.

Croce & Hein, "Reliable evaluation of adversarial robustness with an ensemble of diverse parameter-free attacks",
ICML 2020. Every preset runs AutoAttack's cascade (or a prefix of it), each attack on the points every earlier
attack failed on:

* ``standard``: AutoAttack's paper budget. APGD-CE (100 iterations, no restarts), targeted APGD-DLR on the 9 most
  likely wrong classes (100 iterations each), targeted FAB on the same 9 classes (100 iterations each) and the
  score-based Square attack with 5000 queries.
* ``fast``: torchattacks' default budget (``torchattacks.AutoAttack(version="standard")`` builds its members with
  their class defaults: 10 iterations for APGD-CE, APGD-T and FAB-T, ``n_classes=10`` so 9 targets, one restart,
  Square with 5000 queries), for a like-for-like comparison with that tool.
* ``rapid``: the first two attacks of ``standard`` (the cheapest part, which already decides almost every point on
  most models).

Attacks that do not support the threat's norm are left out (Square has no l1 version), as in AutoAttack. APGD-T and
FAB-T run their targets as one batch and stop a sample at its first success within eps (see :class:`APGDT`,
:class:`FABT`): the same points are broken as in AutoAttack's target-by-target order.

Cost, in forward-equivalent passes per sample (a forward pass of one input counts 1, a backward pass 1 more), for a
sample that survives the whole cascade on a 10-class model (the most any sample costs; broken samples stop early;
:func:`preset_cost` computes it for any number of classes):

=========  =======  =======  =======  ======  ========
preset     APGD-CE  APGD-T   FAB-T    Square  total
=========  =======  =======  =======  ======  ========
standard   203      1,811    2,702    5,002   9,719
fast       23       191      272      5,002   5,489
rapid      203      1,811    -        -       2,015
=========  =======  =======  =======  ======  ========

Per attack: its ``steps`` forward+backward passes (FAB-T: plus one forward to test each new iterate), one forward on
APGD's last iterate per target, and the shared attack frame's clean forward and re-verification forward; the
total adds the evaluation's own clean forward. :func:`bastion.evaluate` reports the passes it actually spent
(``EvaluationResult.passes``), which are far fewer on a non-robust model.
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
        ("fab-t", {"steps": 100, "n_target_classes": 9, "early_stop": True}),
        ("square", {"queries": 5000}),
    ],
    "fast": [
        ("apgd", {"loss": "ce", "steps": 10, "restarts": 1}),
        ("apgd-t", {"steps": 10, "n_target_classes": 9}),
        ("fab-t", {"steps": 10, "n_target_classes": 9, "early_stop": True}),
        ("square", {"queries": 5000}),
    ],
    "rapid": [
        ("apgd", {"loss": "ce", "steps": 100, "restarts": 1}),
        ("apgd-t", {"steps": 100, "n_target_classes": 9}),
    ],
}


def preset_cost(name: str, num_classes: int = 10, norms: Sequence[str] = ("linf",)) -> dict[str, int]:
    """Forward-equivalent passes per sample of each attack of preset ``name``, for a sample that survives them all.

    A forward pass of one input counts 1 and a backward pass 1 more. Each attack's count includes the attack frame's
    clean forward and re-verification forward; the ``"total"`` entry adds the evaluation's own clean forward.

    Args:
        name: a preset of :data:`PRESETS`.
        num_classes: classes of the model (sets the number of targets, at most ``num_classes - 1``).
        norms: the threat norms (attacks that do not support them are left out, as in :func:`preset`).
    """
    if name not in PRESETS:
        raise InputError(f"unknown attack preset {name!r}; available: {', '.join(PRESETS)}")
    out: dict[str, int] = {}
    for attack_name, opts in PRESETS[name]:
        if attack_name in ATTACKS and not all(n in ATTACKS[attack_name].norms for n in norms):
            continue
        targets = min(int(opts.get("n_target_classes", 1)), num_classes - 1)
        restarts = int(opts.get("restarts", 1))
        if attack_name == "apgd":
            work = restarts * (2 * int(opts["steps"]) + 1)
        elif attack_name == "apgd-t":
            work = targets * restarts * (2 * int(opts["steps"]) + 1)
        elif attack_name == "fab-t":
            work = targets * restarts * 3 * int(opts["steps"])
        else:  # square
            work = restarts * int(opts["queries"])
        out[attack_name] = work + 2  # the frame's clean forward and re-verification
    out["total"] = sum(out.values()) + 1
    return out


def preset(name: str, norms: Sequence[str], overrides: dict[str, dict[str, Any]] | None = None) -> list[Attack]:
    """The attacks of preset ``name`` that support every norm in ``norms``, configured and in order.

    Args:
        name: ``"standard"``, ``"fast"`` or ``"rapid"``.
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
