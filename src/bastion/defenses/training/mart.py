"""MART: misclassification-aware adversarial training (Wang et al., ICLR 2020).

Wang, Zou, Yi, Bailey, Ma & Gu, "Improving Adversarial Robustness Requires Revisiting Misclassified Examples",
ICLR 2020, equation 7:

    ``BCE(p(x'), y) + λ · KL(p(x) || p(x')) · (1 - p_y(x))``

with ``x'`` from PGD on the cross-entropy and the boosted cross-entropy
``BCE(p(x'), y) = -log p_y(x') - log(1 - max_{k != y} p_k(x'))``: the second term pushes the strongest wrong class
down as well. The KL term, a TRADES-like regulariser, is weighted by ``1 - p_y(x)`` so that it counts most for
samples the model gets wrong on clean inputs. Defaults are the paper's: λ = 6, 10 steps of ``eps/4`` (2/255 at
8/255), PGD started at ``x + 0.001·N(0, I)`` as in the authors' code.
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
)
from bastion.errors import InputError
from bastion.results import ce_loss
from bastion.threat import LpBall

__all__ = ["MART", "boosted_ce"]


def boosted_ce(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Per-sample boosted cross-entropy ``-log p_y - log(1 - max_{k != y} p_k)`` (Wang et al., ICLR 2020, eq. 5)."""
    probs = F.softmax(logits, dim=1)
    other = probs.scatter(1, y[:, None], 0.0).amax(dim=1)
    # log1p(-p) is exact near p = 0; the clamp keeps it finite when the wrong class takes all the mass
    return ce_loss(logits, y) - torch.log1p(-other.clamp(max=1.0 - 1e-6))


class MART:
    """Loss ``BCE(p(x_adv), y) + λ·KL(p(x) || p(x_adv))·(1 - p_y(x))`` (Wang et al., ICLR 2020).

    Args:
        threat: the ball.
        lam: weight ``λ`` of the misclassification-aware KL term (the paper's 6).
        steps: PGD iterations of the inner maximisation (cross-entropy).
        step_size: step length; ``None`` for ``2.5·eps / steps`` (2/255 at eps 8/255 and 10 steps).
        init_std: standard deviation of the Gaussian start around ``x`` (0.001 in the authors' code).
    """

    paper = "Wang et al., Improving Adversarial Robustness Requires Revisiting Misclassified Examples, ICLR 2020"

    def __init__(
        self,
        threat: LpBall,
        *,
        lam: float = 6.0,
        steps: int = 10,
        step_size: float | None = None,
        init_std: float = 0.001,
    ) -> None:
        self.threat = check_objective_threat(threat, "MART")
        if isinstance(lam, bool) or not isinstance(lam, (int, float)) or not lam >= 0:
            raise InputError(f"lam must be a number >= 0, got {lam!r}")
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
            raise InputError(f"steps must be an integer >= 1, got {steps!r}")
        if isinstance(init_std, bool) or not isinstance(init_std, (int, float)) or not init_std >= 0:
            raise InputError(f"init_std must be a number >= 0, got {init_std!r}")
        self.lam = float(lam)
        self.steps = steps
        self.step_size = default_step_size(threat, steps) if step_size is None else float(step_size)
        if not self.step_size > 0:
            raise InputError(f"step_size must be > 0, got {step_size!r}")
        self.init_std = float(init_std)

    def __call__(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        x, y = check_batch(x, y)
        start = x + self.init_std * torch.randn_like(x)
        x_adv = pgd_perturb(model, x, y, self.threat, steps=self.steps, step_size=self.step_size, start=start)
        logits = model(x)
        logits_adv = model(x_adv)
        p_true = F.softmax(logits, dim=1).gather(1, y[:, None]).squeeze(1)
        weighted_kl = kl_div_logits(logits, logits_adv) * (1.0 - p_true)
        return boosted_ce(logits_adv, y).mean() + self.lam * weighted_kl.mean()

    def __repr__(self) -> str:
        return (
            f"MART({self.threat!r}, lam={self.lam!r}, steps={self.steps}, step_size={self.step_size!r}, "
            f"init_std={self.init_std!r})"
        )
