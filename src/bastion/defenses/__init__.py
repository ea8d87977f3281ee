"""Defences: training objectives and procedures that make models harder to fool, and randomized smoothing."""

from __future__ import annotations

from bastion.defenses.smoothing import Smooth, certified_accuracy, evaluate_smoothed

__all__ = ["Smooth", "certified_accuracy", "evaluate_smoothed"]
