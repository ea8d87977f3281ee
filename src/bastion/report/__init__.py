"""Figures (matplotlib): robust accuracy, success vs queries, certified accuracy and coverage-during-test-generation
curves."""

from __future__ import annotations

from bastion.report.plots import (
    plot_certified_accuracy,
    plot_coverage_history,
    plot_robust_accuracy,
    plot_success_vs_queries,
)

__all__ = ["plot_certified_accuracy", "plot_coverage_history", "plot_robust_accuracy", "plot_success_vs_queries"]
