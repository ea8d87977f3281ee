"""Statistical robustness estimates: CLEVER scores and multilevel splitting (estimates, never certificates).

* :mod:`.clever`: CLEVER (Weng et al., ICLR 2018), an extreme-value estimate of the minimal adversarial distortion;
* :mod:`.splitting`: adaptive multilevel splitting (Webb et al., ICLR 2019), the log-probability that a random input
  of the threat ball is misclassified, with naive Monte Carlo for comparison.
"""

from bastion.statistical.clever import CleverResult, CleverRun, clever, clever_scores
from bastion.statistical.splitting import (
    EstimateResult,
    MonteCarloResult,
    SplittingResult,
    estimate_violation,
    multilevel_splitting,
    naive_monte_carlo,
)

__all__ = [
    "CleverResult",
    "CleverRun",
    "EstimateResult",
    "MonteCarloResult",
    "SplittingResult",
    "clever",
    "clever_scores",
    "estimate_violation",
    "multilevel_splitting",
    "naive_monte_carlo",
]
