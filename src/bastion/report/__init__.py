"""The HTML robustness report (:func:`write_report`) and the matplotlib figures: robust accuracy, success vs
queries, certified accuracy and coverage-during-test-generation curves."""

from __future__ import annotations

from bastion.report.html import ReportResult, write_report
from bastion.report.plots import (
    plot_certified_accuracy,
    plot_coverage_history,
    plot_robust_accuracy,
    plot_success_vs_queries,
)

__all__ = [
    "ReportResult",
    "plot_certified_accuracy",
    "plot_coverage_history",
    "plot_robust_accuracy",
    "plot_success_vs_queries",
    "write_report",
]
