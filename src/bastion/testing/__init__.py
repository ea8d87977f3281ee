"""Coverage-guided testing of neural networks: coverage criteria (:mod:`.coverage`) and test generation."""

from __future__ import annotations

from bastion.testing.coverage import METRICS, CoverageMetric, CoverageReport, coverage, make_metric, measure
from bastion.testing.generate import GENERATORS, Budget, TestSuiteResult, generate_tests

__all__ = [
    "GENERATORS",
    "METRICS",
    "Budget",
    "CoverageMetric",
    "CoverageReport",
    "TestSuiteResult",
    "coverage",
    "generate_tests",
    "make_metric",
    "measure",
]
