"""N-FGSM: single-step adversarial training with strong noise and no clipping (de Jorge et al., NeurIPS 2022).

de Jorge, Bibi, Volpi, Sanyal, Torr, Rogez & Dokania, "Make Some Noise: Reliable and Efficient Single-Step
Adversarial Training", NeurIPS 2022, algorithm 1. FGSM from a random start (Fast-AT, Wong et al. 2020) still
overfits catastrophically at large radii: its training points become useless against multi-step attacks within an
epoch or two (de Jorge et al.; Andriushchenko & Flammarion, NeurIPS 2020). N-FGSM changes two things and keeps the
cost of one gradient per step:

* the noise is stronger than the ball: ``η ~ U[-k·eps, k·eps]^d`` with ``k = 2``;
* the perturbation is **not** projected back onto the eps-ball: ``x_adv = x + η + α·sign(∇_x CE(f(x + η), y))``
  with ``α = eps``, so that ``‖x_adv - x‖∞`` can reach ``(k + 1)·eps``.

The training loss is ``CE(f(x_adv), y)``. bastion keeps ``x + η`` and ``x_adv`` inside the input domain, so that
every training point is a valid input. The gradient is taken with the model in eval mode, as for every inner
maximisation of this package (:func:`~bastion.defenses.training.inner.pgd_perturb`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from bastion.defenses.training.inner import check_batch, check_objective_threat, pgd_perturb
from bastion.errors import InputError
from bastion.threat import LpBall

__all__ = ["NFGSM"]


class NFGSM:
    """Loss ``CE(f(x_adv), y)`` with ``x_adv = clip(x + η + α·sign(∇))``, ``η ~ U[-k·eps, k·eps]`` (N-FGSM).

    Args:
        threat: an l∞ ball; its ``eps`` sets the noise (``noise_ratio·eps``) and the step (``step_ratio·eps``).
        noise_ratio: ``k``, the half-width of the uniform noise as a multiple of eps (the paper's 2).
        step_ratio: the step ``α`` as a multiple of eps (the paper's 1).
    """

    paper = "de Jorge et al., Make Some Noise: Reliable and Efficient Single-Step Adversarial Training, NeurIPS 2022"

    def __init__(self, threat: LpBall, *, noise_ratio: float = 2.0, step_ratio: float = 1.0) -> None:
        self.threat = check_objective_threat(threat, "NFGSM")
        if self.threat.norm != "linf":
            raise InputError(f"NFGSM is defined for the linf ball (uniform noise, sign step), got {threat.norm!r}")
        for name, value in (("noise_ratio", noise_ratio), ("step_ratio", step_ratio)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0:
                raise InputError(f"{name} must be a number >= 0, got {value!r}")
        if not step_ratio > 0:
            raise InputError(f"step_ratio must be > 0, got {step_ratio!r}")
        self.noise_ratio = float(noise_ratio)
        self.step_ratio = float(step_ratio)
        # the unclipped perturbation lives in the ball of radius (k + 1)·eps: projecting onto it is a no-op there
        reach = (self.noise_ratio + self.step_ratio) * self.threat.eps
        self._reach = LpBall("linf", reach, domain=self.threat.domain)

    @property
    def step_size(self) -> float:
        """The step length ``α = step_ratio·eps``."""
        return self.step_ratio * self.threat.eps

    def perturb(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """The training points ``x_adv`` (detached, inside the domain, at most ``(k + 1)·eps`` from ``x``)."""
        x, y = check_batch(x, y)
        noise = (2 * torch.rand_like(x) - 1) * (self.noise_ratio * self.threat.eps)
        return pgd_perturb(
            model, x, y, self._reach, steps=1, step_size=self.step_size, random_start=False, start=x + noise
        )

    def __call__(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(model(self.perturb(model, x, y)), y)

    def __repr__(self) -> str:
        return f"NFGSM({self.threat!r}, noise_ratio={self.noise_ratio!r}, step_ratio={self.step_ratio!r})"
