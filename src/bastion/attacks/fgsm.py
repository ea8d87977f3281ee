"""Single-step gradient attacks: the fast gradient sign method (FGSM) and the fast gradient method (FGM).

Goodfellow, Shlens & Szegedy, "Explaining and Harnessing Adversarial Examples", ICLR 2015: one step of length eps
along the sign of the loss gradient (l∞). FGM is the same step for other norms (unit-l2 gradient for l2, the sparse
steepest-ascent direction for l1), as in Miyato et al. 2016 and the common library usage.
"""

from __future__ import annotations

import math

import torch

from bastion.attacks.base import Attack, CountingModel
from bastion.errors import InputError
from bastion.results import Criterion, LossName, check_loss_name
from bastion.threat import LpBall, ThreatModel


class FGSM(Attack):
    """Fast gradient sign method (Goodfellow et al., ICLR 2015); FGM for the l2 and l1 balls.

    ``x_adv = proj(x + eps · direction(∇_x loss))`` where the direction is the threat norm's normalised
    steepest-ascent direction (the sign for l∞). One gradient evaluation per sample.

    Args:
        loss: ``"ce"`` (the paper's), ``"dlr"`` or ``"cw"``.
        rel_stepsize: step length as a fraction of eps (1.0 in the paper).
    """

    name = "fgsm"
    paper = "Goodfellow, Shlens & Szegedy, Explaining and Harnessing Adversarial Examples, ICLR 2015"

    def __init__(self, *, loss: LossName = "ce", rel_stepsize: float = 1.0) -> None:
        if not rel_stepsize > 0:
            raise InputError(f"rel_stepsize must be > 0, got {rel_stepsize!r}")
        self.loss: LossName = check_loss_name(loss)
        self.rel_stepsize = float(rel_stepsize)

    def run(
        self,
        model: CountingModel,
        x: torch.Tensor,
        criterion: Criterion,
        threat: ThreatModel,
        generator: torch.Generator | None,
    ) -> torch.Tensor:
        if not isinstance(threat, LpBall) or math.isinf(threat.eps):
            raise InputError(f"{type(self).__name__} needs an LpBall threat model with a finite eps, got {threat!r}")
        _, _, grad = model.logits_and_grad(x, lambda logits: criterion.loss(logits, self.loss))
        return threat.project(threat.step(x, grad, self.rel_stepsize * threat.eps), x)


#: The fast gradient method: the same attack, named as in the literature for non-l∞ norms.
FGM = FGSM
