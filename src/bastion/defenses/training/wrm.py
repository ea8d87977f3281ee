"""Wasserstein robust method (WRM): distributionally robust training with a Lagrangian transport penalty.

Sinha, Namkoong & Duchi, "Certifying Some Distributional Robustness with Principled Adversarial Training",
ICLR 2018.

Instead of a hard threat set, WRM penalises how far the adversary moves each point. For a transport cost
``c(z, x) = ||z - x||_2^2`` and a penalty ``gamma > 0``, the robust surrogate of a sample is

    phi_gamma(theta; x, y) = sup_z  loss(theta; z, y) - gamma · ||z - x||_2^2,

and training minimises ``E[phi_gamma]``: the loss at the maximiser ``z*`` (by the envelope theorem its gradient in
``theta`` is the gradient of the loss at ``z*``). When ``gamma`` exceeds the smoothness constant of the loss in the
input, the inner problem is strongly concave, so gradient ascent finds its global maximum and the method is
principled. Lagrangian duality gives the paper's certificate: for every distribution ``Q`` within Wasserstein
distance ``rho`` of the data distribution ``P`` (``W_c(Q, P) <= rho``),

    sup_Q E_Q[loss] <= gamma · rho + E_P[phi_gamma],

an upper bound on the worst-case loss (the paper adds a generalisation term for the empirical estimate),
estimated on data by :meth:`WRM.certificate`. The inequality holds for every ``gamma``; strong concavity is what
makes the computed ``phi_gamma`` the true supremum rather than an underestimate.

The inner maximisation follows the authors' released MNIST code: the objective scaled by ``1 / (2 gamma)``,
``loss / (2 gamma) - ||z - x||^2 / 2``, one plain gradient step from ``x`` followed by ``steps = 15`` gradient-ascent
steps with learning rate ``1 / sqrt(t + 2)``. The default ``gamma = 1 / (2 · 1.3) ≈ 0.385`` is their MNIST setting
(written there as ``eps = 1 / (2 gamma) = 1.3``, for 28x28 inputs in [0, 1]); larger ``gamma`` means a weaker
adversary. The paper does not clip ``z`` to the input domain; ``domain`` optionally does.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from bastion.attacks.base import positive_float, positive_int
from bastion.defenses.training.inner import check_batch
from bastion.errors import InputError
from bastion.models.checks import eval_mode

__all__ = ["WRM"]


class WRM:
    """Wasserstein robust method (Sinha, Namkoong & Duchi, ICLR 2018): train on ``argmax_z loss(z) - gamma||z - x||²``.

    Args:
        gamma: transport penalty (default 1/2.6 ≈ 0.385, the authors' MNIST setting).
        steps: gradient-ascent steps of the inner maximisation after the first plain step (paper: 15).
        domain: ``(lo, hi)`` to clip the adversarial points to the input domain after every step, or ``None``
            (the paper: no clipping).
    """

    paper = (
        "Sinha, Namkoong & Duchi, Certifying Some Distributional Robustness with Principled Adversarial Training, "
        "ICLR 2018"
    )

    def __init__(
        self,
        *,
        gamma: float = 1.0 / 2.6,
        steps: int = 15,
        domain: tuple[float, float] | None = None,
    ) -> None:
        self.gamma = positive_float("gamma", gamma)
        self.steps = positive_int("steps", steps)
        if domain is not None:
            try:
                lo, hi = (float(v) for v in domain)
            except (TypeError, ValueError):
                raise InputError(f"domain must be a pair (lo, hi) or None, got {domain!r}") from None
            if not lo < hi:
                raise InputError(f"domain must satisfy lo < hi, got {domain!r}")
            domain = (lo, hi)
        self.domain = domain

    def _clip(self, z: Tensor) -> Tensor:
        return z if self.domain is None else z.clamp(*self.domain)

    def perturb(self, model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
        """The approximate maximiser ``z*`` of ``loss(z, y) - gamma ||z - x||²`` for each sample (detached).

        Runs in eval mode (deterministic function, no batch-norm statistics updated); no gradient reaches the model.
        """
        x, y = check_batch(x, y)
        x = x.detach()
        y = y.to(x.device)
        scale = 1.0 / (2.0 * self.gamma)
        with eval_mode(model), torch.enable_grad():
            z = x.clone().requires_grad_(True)
            (g,) = torch.autograd.grad(scale * F.cross_entropy(model(z), y, reduction="sum"), z)
            z = self._clip(x + g)
            for t in range(self.steps):
                z = z.detach().requires_grad_(True)
                objective = scale * F.cross_entropy(model(z), y, reduction="sum") - 0.5 * ((z - x) ** 2).sum()
                (g,) = torch.autograd.grad(objective, z)
                z = self._clip(z.detach() + g / math.sqrt(t + 2))
        return z.detach()

    def robust_surrogate(self, model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
        """Per-sample estimate of ``phi_gamma = sup_z loss(z) - gamma ||z - x||²`` (N,), a lower estimate of the sup.

        The larger of the value at the ascent's end point and at ``x`` itself (where the penalty vanishes), so the
        estimate never falls below the clean loss.
        """
        x, y = check_batch(x, y)
        y = y.to(x.device)
        z = self.perturb(model, x, y)
        with torch.no_grad(), eval_mode(model):
            at_z = F.cross_entropy(model(z), y, reduction="none") - self.gamma * (z - x).flatten(1).pow(2).sum(1)
            at_x = F.cross_entropy(model(x), y, reduction="none")
        return torch.maximum(at_z, at_x)

    def certificate(self, model: nn.Module, x: Tensor, y: Tensor, rho: float) -> float:
        """Sinha et al.'s bound ``gamma · rho + mean phi_gamma`` on the worst-case expected loss within ``W_c <= rho``.

        A valid bound when the inner supremum is attained, i.e. for ``gamma`` above the loss's smoothness in the
        input (the regime where the ascent converges to the global maximum); otherwise ``phi_gamma`` may be
        underestimated.
        """
        rho = positive_float("rho", rho, allow_zero=True)
        return self.gamma * rho + float(self.robust_surrogate(model, x, y).mean())

    def __call__(self, model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
        x, y = check_batch(x, y)
        y = y.to(x.device)
        z = self.perturb(model, x, y)
        return F.cross_entropy(model(z), y)

    def __repr__(self) -> str:
        return f"WRM(gamma={self.gamma}, steps={self.steps}, domain={self.domain})"
