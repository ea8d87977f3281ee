"""EAD: the elastic-net attack, a minimal-distortion attack with sparse (l1) perturbations.

Chen, Sharma, Zhang, Yi & Hsieh, "EAD: Elastic-Net Attacks to Deep Neural Networks via Adversarial Examples",
AAAI 2018.

EAD solves, for each sample, ``min_x'  c·f(x') + ||x' - x||_2² + β·||x' - x||_1`` over the input domain, with ``f``
the Carlini & Wagner margin loss ``f(x') = max(z_y(x') - max_{i != y} z_i(x'), -κ)`` (untargeted) or
``max(max_{i != t} z_i(x') - z_t(x'), -κ)`` (targeted). The non-smooth l1 term is handled by the fast iterative
shrinkage-thresholding algorithm (FISTA): a gradient step on the smooth part ``g = c·f + ||·||_2²`` taken at the
slack point ``y_k``, followed by the projected shrinkage-thresholding operator :func:`shrinkage` ``S_β``, and the
momentum update of the slack variable. The constant ``c`` is found per sample by a binary search; the best
successful ``x'`` under the decision rule (elastic-net or l1 distance) is kept.
"""

from __future__ import annotations

import math
from typing import Literal

import torch

from bastion.attacks.base import Attack, CountingModel, positive_float, positive_int
from bastion.attacks.cw import NO_UPPER, update_consts
from bastion.errors import InputError
from bastion.results import Criterion
from bastion.threat import LpBall, ThreatModel

DecisionRule = Literal["EN", "L1"]

#: Upper bound of c before any success: ``c`` is multiplied by 10 while the bound is still this value.


def shrinkage(z: torch.Tensor, x: torch.Tensor, beta: float, domain: tuple[float, float]) -> torch.Tensor:
    """The projected shrinkage-thresholding operator ``S_β`` of EAD (Chen et al., AAAI 2018, eq. 8).

    Element-wise: ``min(z - β, hi)`` where ``z - x > β``; ``x`` where ``|z - x| <= β``; ``max(z + β, lo)`` where
    ``z - x < -β``. Equivalently, ``x`` plus the soft-threshold of ``z - x`` by ``β``, clipped to the domain (the
    two agree because ``x`` lies in the domain).
    """
    lo, hi = domain
    d = z - x
    return (x + d.sign() * (d.abs() - beta).clamp(min=0.0)).clamp(lo, hi)


class EAD(Attack):
    """Elastic-net attack (Chen, Sharma, Zhang, Yi & Hsieh, AAAI 2018), targeted or untargeted, l1 and l2.

    Objective per sample: ``min_x'  c·f(x') + ||x' - x||_2² + β·||x' - x||_1`` over the input domain, with ``f`` the
    C&W margin loss capped at ``-κ`` (``κ = confidence``). Iteration ``k`` of FISTA (the paper's Algorithm 1):

        ``x_{k+1} = S_β(y_k - α_k ∇g(y_k))``,   ``y_{k+1} = x_{k+1} + k / (k + 3) · (x_{k+1} - x_k)``,

    with ``g = c·f + ||· - x||_2²``, ``S_β`` the projected shrinkage-thresholding operator (:func:`shrinkage`) and the
    square-root decay ``α_k = lr · (1 - k / steps)^½``. A binary search over ``c`` per sample (``c`` times 10 while
    never successful, bisection afterwards; :func:`update_consts`) runs ``binary_search_steps`` such optimisations
    from the clean input. Every iterate ``x_k`` that is adversarial with margin at least ``κ`` is a candidate; the
    best one per sample by the decision rule is returned: ``"EN"`` (elastic net, ``||δ||_2² + β||δ||_1``) or
    ``"L1"`` (``||δ||_1``). The distance reported follows the threat's norm: call it with ``LpBall("l1", math.inf)``
    (the natural one) or ``LpBall("l2", math.inf)``; eps is not used (a minimal-distortion attack).

    As in the authors' code, with ``abort_early`` the optimisation for one value of ``c`` stops when the batch's
    total objective has not decreased by 0.01 % over a tenth of the steps. The whole batch runs together (per-sample
    constants, no per-sample loops); each iteration costs one gradient and one forward evaluation.

    Args:
        beta: weight β of the l1 term (the paper's 1e-3); 0 gives C&W-l2 solved by FISTA.
        binary_search_steps: number of values of ``c`` tried per sample.
        steps: FISTA iterations per value of ``c``.
        lr: initial step α_0, decayed as ``(1 - k / steps)^½``.
        initial_const: first value of ``c``.
        confidence: margin κ by which the adversarial class must win.
        decision_rule: ``"EN"`` or ``"L1"``: the distance that chooses the best adversarial example.
        abort_early: stop an optimisation that no longer makes progress.
    """

    name = "ead"
    norms = ("l1", "l2")
    minimal = True
    paper = (
        "Chen, Sharma, Zhang, Yi & Hsieh, EAD: Elastic-Net Attacks to Deep Neural Networks via Adversarial "
        "Examples, AAAI 2018"
    )

    def __init__(
        self,
        *,
        beta: float = 1e-3,
        binary_search_steps: int = 9,
        steps: int = 1000,
        lr: float = 1e-2,
        initial_const: float = 1e-3,
        confidence: float = 0.0,
        decision_rule: DecisionRule = "EN",
        abort_early: bool = True,
    ) -> None:
        self.beta = positive_float("beta", beta, allow_zero=True)
        self.binary_search_steps = positive_int("binary_search_steps", binary_search_steps)
        self.steps = positive_int("steps", steps)
        self.lr = positive_float("lr", lr)
        self.initial_const = positive_float("initial_const", initial_const)
        self.confidence = positive_float("confidence", confidence, allow_zero=True)
        if decision_rule not in ("EN", "L1"):
            raise InputError(f"decision_rule must be 'EN' or 'L1', got {decision_rule!r}")
        self.decision_rule: DecisionRule = decision_rule
        if not isinstance(abort_early, bool):
            raise InputError(f"abort_early must be True or False, got {abort_early!r}")
        self.abort_early = abort_early

    def run(
        self,
        model: CountingModel,
        x: torch.Tensor,
        criterion: Criterion,
        threat: ThreatModel,
        generator: torch.Generator | None,
    ) -> torch.Tensor:
        if not isinstance(threat, LpBall):
            raise InputError(f"{type(self).__name__} needs an LpBall threat model, got {threat!r}")
        n = x.shape[0]
        view = (-1,) + (1,) * (x.dim() - 1)
        kappa, beta = self.confidence, self.beta
        const = torch.full((n,), self.initial_const, dtype=x.dtype, device=x.device)
        lower = torch.zeros_like(const)
        upper = torch.full_like(const, NO_UPPER)
        best = x.clone()
        best_dist = torch.full_like(const, math.inf)
        check_every = math.ceil(self.steps / 10)

        for _ in range(self.binary_search_steps):
            c = const.clone()

            def smooth_loss(logits: torch.Tensor, c: torch.Tensor = c) -> torch.Tensor:
                # c·f with f = -(C&W margin capped at κ); the l2 term's gradient is added in closed form
                return -c * criterion.loss(logits, "cw", kappa=kappa)

            x_k = x.clone()
            y_k = x.clone()
            found = torch.zeros(n, dtype=torch.bool, device=x.device)
            previous = math.inf
            for k in range(self.steps):
                alpha = self.lr * (1.0 - k / self.steps) ** 0.5
                _, _, grad = model.logits_and_grad(y_k, smooth_loss)
                grad = grad + 2.0 * (y_k - x)
                x_next = shrinkage(y_k - alpha * grad, x, beta, threat.domain)
                y_k = x_next + (k / (k + 3.0)) * (x_next - x_k)
                x_k = x_next

                logits = model(x_k)
                margin = criterion.loss(logits, "cw")
                delta = (x_k - x).flatten(1)
                l1 = delta.abs().sum(dim=1)
                l2sq = delta.square().sum(dim=1)
                dist = l1 if self.decision_rule == "L1" else l2sq + beta * l1
                success = criterion.is_adversarial(logits) & (margin >= kappa)
                better = success & (dist < best_dist)
                best_dist = torch.where(better, dist, best_dist)
                best = torch.where(better.view(view), x_k, best)
                found |= success

                if self.abort_early and k % check_every == 0:
                    objective = float((-c * margin.clamp(max=kappa) + l2sq + beta * l1).sum())
                    if objective > 0.9999 * previous:
                        break
                    previous = objective
            const, lower, upper = update_consts(const, lower, upper, found)
        return best
