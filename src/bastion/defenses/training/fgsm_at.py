"""FGSM adversarial training (Goodfellow, Shlens & Szegedy, ICLR 2015).

Goodfellow, Shlens & Szegedy, "Explaining and Harnessing Adversarial Examples", ICLR 2015, section 5: the
adversarial objective ``α·CE(f(x), y) + (1 - α)·CE(f(x + eps·sign(∇_x CE(f(x), y))), y)`` with ``α = 0.5``. The
fast gradient sign step is recomputed with the current weights at every training step and treated as a constant.
For l2 (and l1) balls the sign step is the threat's normalised steepest-ascent step of length eps (the fast
gradient method).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from bastion.defenses.training.inner import check_objective_threat, pgd_perturb
from bastion.errors import InputError
from bastion.threat import LpBall

__all__ = ["FGSMAT"]


class FGSMAT:
    """Loss ``α·CE(f(x), y) + (1 - α)·CE(f(x_fgsm), y)`` (Goodfellow et al., ICLR 2015).

    Args:
        threat: the ball; its eps is the length of the single step from the clean input.
        alpha: weight of the clean term (the paper's 0.5).
    """

    paper = "Goodfellow, Shlens & Szegedy, Explaining and Harnessing Adversarial Examples, ICLR 2015"

    def __init__(self, threat: LpBall, *, alpha: float = 0.5) -> None:
        self.threat = check_objective_threat(threat, "FGSMAT")
        if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not 0.0 <= alpha <= 1.0:
            raise InputError(f"alpha must be a number in [0, 1], got {alpha!r}")
        self.alpha = float(alpha)

    def __call__(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        x_adv = pgd_perturb(model, x, y, self.threat, steps=1, step_size=self.threat.eps, random_start=False)
        return self.alpha * F.cross_entropy(model(x), y) + (1.0 - self.alpha) * F.cross_entropy(model(x_adv), y)

    def __repr__(self) -> str:
        return f"FGSMAT({self.threat!r}, alpha={self.alpha!r})"
