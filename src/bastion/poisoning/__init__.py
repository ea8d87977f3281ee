"""Training-phase attacks: poisoned data sets that make the model trained on them misbehave.

Every attack returns a :class:`PoisonedData` (the poisoned training set, the poisons' positions, the attack's
configuration, and the backdoor :class:`Trigger` or the target images); the victim is trained on it with bastion's
trainer (:func:`bastion.defenses.training.train`, or ``bastion train --data poisoned.npz`` after ``bastion poison``),
and judged with :func:`clean_accuracy`, :func:`attack_success_rate`, :func:`poisoning_success` and
:func:`evaluate_poisoning`.

* dirty-label availability: :class:`LabelFlip` (random, or targeted class pairs);
* backdoors: :class:`BadNets` (Gu et al. 2017), :class:`Blended` (Chen et al. 2017), :class:`WaNet` (Nguyen & Tran,
  ICLR 2021), all-to-one or all-to-all, ``rate_of="set"`` or ``"target"``;
* training-time backdoor: :class:`InputAware` (input-aware dynamic backdoor, Nguyen & Tran, NeurIPS 2020), which
  trains the victim jointly with a trigger generator and returns both (:class:`InputAwareResult`);
* targeted clean-label: :class:`FeatureCollision` ("Poison Frogs", Shafahi et al., NeurIPS 2018; transfer learning,
  :func:`retrain_last_layer`) and :class:`GradientMatching` ("Witches' Brew", Geiping et al., ICLR 2021).

:data:`ATTACKS` maps the command-line names to the classes. Defences against these attacks live in the
``bastion.poisoning.defenses`` subpackage (imported by its own path).
"""

from __future__ import annotations

from bastion.poisoning.backdoor import BadNets, Blended, WaNet
from bastion.poisoning.base import (
    MODES,
    TRIGGERS,
    PatternTrigger,
    PoisonAttack,
    PoisonedData,
    PoisonReport,
    Trigger,
    WarpTrigger,
    attack_success_rate,
    clean_accuracy,
    evaluate_poisoning,
    poison_report,
    poisoning_success,
    predict,
)
from bastion.poisoning.collision import FeatureCollision, penultimate, retrain_last_layer
from bastion.poisoning.dynamic import (
    InputAware,
    InputAwareResult,
    InputAwareTrigger,
    TriggerGenerator,
    cross_trigger_accuracy,
)
from bastion.poisoning.labelflip import LabelFlip
from bastion.poisoning.matching import GradientMatching

ATTACKS: dict[str, type[PoisonAttack]] = {
    "labelflip": LabelFlip,
    "badnets": BadNets,
    "blended": Blended,
    "wanet": WaNet,
    "collision": FeatureCollision,
    "matching": GradientMatching,
    "input-aware": InputAware,
}
"""The poisoning attacks by name (the ``--attack`` values of ``bastion poison``). :class:`InputAware` is called as
``attack(model, data)`` and returns an :class:`InputAwareResult`; the others return a :class:`PoisonedData`."""

__all__ = [
    "ATTACKS",
    "MODES",
    "TRIGGERS",
    "BadNets",
    "Blended",
    "FeatureCollision",
    "GradientMatching",
    "InputAware",
    "InputAwareResult",
    "InputAwareTrigger",
    "LabelFlip",
    "PatternTrigger",
    "PoisonAttack",
    "PoisonReport",
    "PoisonedData",
    "Trigger",
    "TriggerGenerator",
    "WaNet",
    "WarpTrigger",
    "attack_success_rate",
    "clean_accuracy",
    "cross_trigger_accuracy",
    "evaluate_poisoning",
    "penultimate",
    "poison_report",
    "poisoning_success",
    "predict",
    "retrain_last_layer",
]
