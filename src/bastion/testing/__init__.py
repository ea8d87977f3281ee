"""Coverage-guided testing of neural networks: coverage criteria (:mod:`.coverage`) and test generation."""

from __future__ import annotations

from bastion.testing.coverage import METRICS, CoverageMetric, CoverageReport, coverage, make_metric, measure

__all__ = ["METRICS", "CoverageMetric", "CoverageReport", "coverage", "make_metric", "measure"]
