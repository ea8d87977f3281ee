"""Figures from evaluation and certification results (matplotlib): robust accuracy and certified accuracy curves."""

from __future__ import annotations

from bastion.report.plots import plot_certified_accuracy, plot_robust_accuracy

__all__ = ["plot_certified_accuracy", "plot_robust_accuracy"]
