"""Carlini & Wagner's l2 attack: minimal-distortion adversarial examples by penalised optimisation.

Carlini & Wagner, "Towards Evaluating the Robustness of Neural Networks", IEEE Symposium on Security and Privacy
(S&P) 2017.

The attack solves ``min ||x' - x||_2² + c · f(x')`` over the input domain, where ``f`` is the margin loss f_6 of the
paper (``f <= 0`` exactly when ``x'`` is adversarial with confidence κ), with a tanh change of variables that keeps
``x'`` in the domain and Adam as the optimiser; a per-sample binary search over ``c`` finds the smallest penalty that
still succeeds, and the smallest successful perturbation seen is kept.
"""

from __future__ import annotations

import math

import torch

from bastion.attacks.base import Attack, CountingModel, positive_int
from bastion.errors import InputError
from bastion.results import Criterion
from bastion.threat import LpBall, ThreatModel


def _positive_float(name: str, value: object, *, allow_zero: bool = False) -> float:
    """``value`` as a finite float > 0 (or >= 0), or an InputError naming the hyperparameter."""
    bound = ">= 0" if allow_zero else "> 0"
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise InputError(f"{name} must be a finite number {bound}, got {value!r}")
    if value < 0 or (value == 0 and not allow_zero):
        raise InputError(f"{name} must be a finite number {bound}, got {value!r}")
    return float(value)


class CarliniWagnerL2(Attack):
    """Carlini & Wagner's l2 attack (IEEE S&P 2017), targeted and untargeted.

    Objective, per sample: ``min_w ||x'(w) - x||_2² + c · f(x'(w))`` with the change of variables
    ``x'(w) = lo + (hi - lo) · (tanh(w) + 1) / 2`` (``(lo, hi)`` the threat's input domain, so every iterate is in
    the domain) and the paper's loss f_6:

    * untargeted: ``f(x') = max(Z_y - max_{i != y} Z_i, -κ)``;
    * targeted:   ``f(x') = max(max_{i != t} Z_i - Z_t, -κ)``;

    with ``Z`` the logits (``f = -Criterion.loss(Z, "cw", kappa=κ)``). Each of ``binary_search_steps`` rounds starts
    from ``w`` at the clean input and runs ``steps`` Adam iterations. Between rounds the constant ``c`` of each
    sample is bisected between the largest constant that failed and the smallest that succeeded, or multiplied by 10
    while no constant has succeeded. Over all iterations the successful iterate (adversarial with a margin of at
    least κ) of smallest l2 distance is kept; samples never broken are returned unchanged.

    Early abort, as in the authors' implementation: every ``steps // 10`` iterations the round stops if the loss
    has not decreased by 0.01 %. Here the test is per sample (``loss > prev - 1e-4 · |prev|``, sign-safe for the
    negative losses κ > 0 allows): the round stops once every sample of the batch has stalled at some check
    (stalled samples keep optimising until then, which can only improve their result), so that no sample is cut
    short by the progress of the others. As in the authors' code, when
    ``binary_search_steps >= 10`` the last round uses the smallest successful constant. The distance is measured to
    the clean input itself (not to its tanh reconstruction).

    Args:
        binary_search_steps: rounds of the binary search over ``c`` (paper: 9).
        steps: Adam iterations per round (paper: at most 10000; fewer is usually enough on small models).
        lr: Adam learning rate, in ``w`` space (paper: 1e-2).
        initial_const: the constant ``c`` of the first round (paper: 1e-3).
        confidence: κ >= 0, the margin by which the adversarial class must win (paper: 0).
        abort_early: stop a round once the loss stalls (paper's implementation: on).
    """

    name = "cw-l2"
    norms = ("l2",)
    minimal = True
    paper = "Carlini & Wagner, Towards Evaluating the Robustness of Neural Networks, IEEE S&P 2017"

    def __init__(
        self,
        *,
        binary_search_steps: int = 9,
        steps: int = 10000,
        lr: float = 1e-2,
        initial_const: float = 1e-3,
        confidence: float = 0.0,
        abort_early: bool = True,
    ) -> None:
        self.binary_search_steps = positive_int("binary_search_steps", binary_search_steps)
        self.steps = positive_int("steps", steps)
        self.lr = _positive_float("lr", lr)
        self.initial_const = _positive_float("initial_const", initial_const)
        self.confidence = _positive_float("confidence", confidence, allow_zero=True)
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
        lo, hi = threat.domain
        half = (hi - lo) / 2.0
        kappa = self.confidence
        n = x.shape[0]

        # the clean input in w space (shrunk a little so that inputs at the bounds have a finite preimage)
        w0 = torch.atanh(((x - lo) / half - 1.0) * (1.0 - 1e-6))
        const = torch.full((n,), self.initial_const, dtype=x.dtype, device=x.device)
        lower = torch.zeros_like(const)
        upper = torch.full_like(const, math.inf)  # smallest successful constant so far
        best_l2 = torch.full_like(const, math.inf)
        best = x.clone()
        check_every = max(1, self.steps // 10)

        for round_ in range(self.binary_search_steps):
            if self.binary_search_steps >= 10 and round_ == self.binary_search_steps - 1:
                const = torch.where(torch.isfinite(upper), upper, const)
            c = const.clone()

            def penalty(logits: torch.Tensor, c: torch.Tensor = c) -> torch.Tensor:
                return -c * criterion.loss(logits, "cw", kappa=kappa)  # c · f(x')

            w = w0.clone().requires_grad_(True)
            optimizer = torch.optim.Adam([w], lr=self.lr)
            found = torch.zeros(n, dtype=torch.bool, device=x.device)
            prev = torch.full_like(const, math.inf)
            stalled = torch.zeros_like(found)
            for it in range(self.steps):
                tanh_w = torch.tanh(w.detach())
                x_new = lo + half * (tanh_w + 1.0)
                logits, cf, grad_x = model.logits_and_grad(x_new, penalty)
                diff = x_new - x
                l2sq = diff.flatten(1).pow(2).sum(dim=1)
                loss = l2sq + cf
                # successful iterates: adversarial, by a margin of at least κ
                hit = criterion.is_adversarial(logits) & (criterion.loss(logits, "cw") >= kappa)
                improved = hit & (l2sq < best_l2)
                best_l2 = torch.where(improved, l2sq, best_l2)
                best[improved] = x_new[improved]
                found |= hit
                # chain rule through the change of variables: dx'/dw = (hi - lo) / 2 · (1 - tanh²(w))
                w.grad = (2.0 * diff + grad_x) * (half * (1.0 - tanh_w * tanh_w))
                optimizer.step()
                if self.abort_early and it % check_every == 0:
                    stalled |= loss > prev - 1e-4 * prev.abs()
                    if bool(stalled.all()):
                        break
                    prev = loss
            # binary search on c: bisect once bracketed, else grow by 10 until some c succeeds
            upper = torch.where(found, torch.minimum(upper, c), upper)
            lower = torch.where(found, lower, torch.maximum(lower, c))
            const = torch.where(torch.isfinite(upper), (lower + upper) / 2, c * 10)
        return best
