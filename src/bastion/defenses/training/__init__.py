"""Model training: one loop, with the loss supplied by an objective (standard, and adversarial objectives)."""

from __future__ import annotations

from bastion.defenses.training.trainer import Objective, StandardObjective, accuracy, train

__all__ = ["Objective", "StandardObjective", "accuracy", "train"]
