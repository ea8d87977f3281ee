"""PGD adversarial training (Madry et al., ICLR 2018).

Madry, Makelov, Schmidt, Tsipras & Vladu, "Towards Deep Learning Models Resistant to Adversarial Attacks",
ICLR 2018. The saddle-point problem ``min_θ E_(x,y) [ max_{x' in S(x)} CE(f_θ(x'), y) ]``: the inner maximum is
approximated by projected gradient ascent from a random point of the ball, and the model is trained on the
cross-entropy of the points found (no clean term).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from bastion.defenses.training.inner import check_objective_threat, default_step_size, pgd_perturb
from bastion.errors import InputError
from bastion.threat import LpBall

__all__ = ["PGDAT"]


class PGDAT:
    """Loss ``CE(f(x_adv), y)`` with ``x_adv`` from PGD on the cross-entropy (Madry et al., ICLR 2018).

    Defaults: 40 steps from a uniformly random start (Madry et al.'s MNIST setting) of the library's one PGD step,
    ``2.5·eps / steps`` (:func:`bastion.threat.pgd_step_size`; 0.01875 at eps = 0.3). The paper's own MNIST step,
    0.01, travels only 4/3 of a radius in 40 steps; it is ``step_size=0.01``. (Until version 0.1 the default step
    was ``(4/3)·eps / steps``.)

    Args:
        threat: the ball the adversary moves in, e.g. ``LpBall("linf", 0.3)``.
        steps: PGD iterations of the inner maximisation.
        step_size: step length in the threat's norm; ``None`` for ``2.5·eps / steps``.
        random_start: start from a uniformly random point of the ball.
    """

    paper = "Madry et al., Towards Deep Learning Models Resistant to Adversarial Attacks, ICLR 2018"

    def __init__(
        self, threat: LpBall, *, steps: int = 40, step_size: float | None = None, random_start: bool = True
    ) -> None:
        self.threat = check_objective_threat(threat, "PGDAT")
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
            raise InputError(f"steps must be an integer >= 1, got {steps!r}")
        self.steps = steps
        self.step_size = default_step_size(threat, steps) if step_size is None else float(step_size)
        if not self.step_size > 0:
            raise InputError(f"step_size must be > 0, got {step_size!r}")
        self.random_start = bool(random_start)

    def __call__(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        x_adv = pgd_perturb(
            model, x, y, self.threat, steps=self.steps, step_size=self.step_size, random_start=self.random_start
        )
        return F.cross_entropy(model(x_adv), y)

    def __repr__(self) -> str:
        return (
            f"PGDAT({self.threat!r}, steps={self.steps}, step_size={self.step_size!r}, "
            f"random_start={self.random_start})"
        )
