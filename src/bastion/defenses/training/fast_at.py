"""Fast adversarial training: FGSM from a random start (Wong, Rice & Kolter, ICLR 2020).

Wong, Rice & Kolter, "Fast is better than free: Revisiting adversarial training", ICLR 2020, algorithm 3: draw
``δ`` uniformly from the ball, take one gradient-sign step of ``α = 1.25·eps`` on the cross-entropy, project back
onto the ball ∩ domain, and train on ``CE(f(x + δ), y)``. The random start is what keeps single-step training
from the catastrophic overfitting of FGSM-AT with ``α = eps`` from the clean point. The paper pairs it with a cyclic
(one-cycle) learning rate: ``AdversarialTrainer(schedule="cyclic")``.

The step is computed by :func:`~bastion.defenses.training.inner.pgd_perturb`, with the model in eval mode; the
authors' code takes it in train mode. The two coincide for models without BatchNorm or dropout; with BatchNorm,
eval mode keeps the running statistics free of the extra attack pass.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from bastion.defenses.training.inner import check_objective_threat, pgd_perturb
from bastion.errors import InputError
from bastion.threat import LpBall

__all__ = ["FastAT"]


class FastAT:
    """Loss ``CE(f(x_adv), y)``, ``x_adv`` one projected step of ``step_ratio·eps`` from a uniform random start.

    Args:
        threat: the ball.
        step_ratio: the step as a multiple of eps (the paper's 1.25).
    """

    paper = "Wong, Rice & Kolter, Fast is better than free: Revisiting adversarial training, ICLR 2020"

    def __init__(self, threat: LpBall, *, step_ratio: float = 1.25) -> None:
        self.threat = check_objective_threat(threat, "FastAT")
        if isinstance(step_ratio, bool) or not isinstance(step_ratio, (int, float)) or not step_ratio > 0:
            raise InputError(f"step_ratio must be a number > 0, got {step_ratio!r}")
        self.step_ratio = float(step_ratio)

    @property
    def step_size(self) -> float:
        """The step length ``α = step_ratio·eps``."""
        return self.step_ratio * self.threat.eps

    def __call__(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        x_adv = pgd_perturb(model, x, y, self.threat, steps=1, step_size=self.step_size, random_start=True)
        return F.cross_entropy(model(x_adv), y)

    def __repr__(self) -> str:
        return f"FastAT({self.threat!r}, step_ratio={self.step_ratio!r})"
