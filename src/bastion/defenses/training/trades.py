"""TRADES (Zhang et al., ICML 2019).

Zhang, Yu, Jiao, Xing, El Ghaoui & Jordan, "Theoretically Principled Trade-off between Robustness and Accuracy",
ICML 2019. The loss splits the robust error into the natural error and a boundary term:

    ``CE(f(x), y) + β · max_{x' in S(x)} KL(p(x) || p(x'))``

with ``p`` the softmax of the logits. The inner maximum is taken by projected gradient ascent on the KL (with
``p(x)`` held fixed) from ``x + 0.001·N(0, I)``; the outer loss is differentiated through both ``p(x)`` and
``p(x')``. Defaults are the paper's CIFAR-10 setting (β = 6, 10 steps of 0.007 at eps = 0.031, a step of
``2.26·eps / steps``); its MNIST setting is β = 1, 40 steps of 0.01 at eps = 0.3.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from bastion.defenses.training.inner import (
    check_batch,
    check_objective_threat,
    default_step_size,
    kl_div_logits,
    pgd_perturb,
    unwrap,
)
from bastion.errors import InputError
from bastion.models.checks import eval_mode
from bastion.threat import LpBall

__all__ = ["TRADES"]


class TRADES:
    """Loss ``CE(f(x), y) + β·KL(p(x) || p(x_adv))``, ``x_adv`` maximising the KL (Zhang et al., ICML 2019).

    Args:
        threat: the ball.
        beta: weight of the boundary (KL) term; 6 in the paper's CIFAR-10 runs, 1 on MNIST.
        steps: PGD iterations of the inner maximisation.
        step_size: step length; ``None`` for ``2.26·eps / steps`` (0.007 at eps 0.031 and 10 steps).
        init_std: standard deviation of the Gaussian start around ``x`` (the paper's 0.001).
    """

    paper = "Zhang et al., Theoretically Principled Trade-off between Robustness and Accuracy, ICML 2019"

    def __init__(
        self,
        threat: LpBall,
        *,
        beta: float = 6.0,
        steps: int = 10,
        step_size: float | None = None,
        init_std: float = 0.001,
    ) -> None:
        self.threat = check_objective_threat(threat, "TRADES")
        if isinstance(beta, bool) or not isinstance(beta, (int, float)) or not beta >= 0:
            raise InputError(f"beta must be a number >= 0, got {beta!r}")
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
            raise InputError(f"steps must be an integer >= 1, got {steps!r}")
        if isinstance(init_std, bool) or not isinstance(init_std, (int, float)) or not init_std >= 0:
            raise InputError(f"init_std must be a number >= 0, got {init_std!r}")
        self.beta = float(beta)
        self.steps = steps
        self.step_size = default_step_size(threat, steps, 0.07, 0.031) if step_size is None else float(step_size)
        if not self.step_size > 0:
            raise InputError(f"step_size must be > 0, got {step_size!r}")
        self.init_std = float(init_std)

    def perturb(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """The inner maximiser: PGD on ``KL(p(x) || p(x'))`` with ``p(x)`` fixed, from ``x + init_std·N(0, I)``."""
        x, y = check_batch(x, y)
        with torch.no_grad(), eval_mode(model):
            clean_logits = unwrap(model)(x)

        def kl(logits: torch.Tensor) -> torch.Tensor:
            return kl_div_logits(clean_logits, logits)

        start = x + self.init_std * torch.randn_like(x)
        return pgd_perturb(model, x, y, self.threat, steps=self.steps, step_size=self.step_size, loss=kl, start=start)

    def __call__(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        x_adv = self.perturb(model, x, y)
        logits = model(x)
        boundary = kl_div_logits(logits, model(x_adv)).mean()
        return F.cross_entropy(logits, y) + self.beta * boundary

    def __repr__(self) -> str:
        return (
            f"TRADES({self.threat!r}, beta={self.beta!r}, steps={self.steps}, step_size={self.step_size!r}, "
            f"init_std={self.init_std!r})"
        )
