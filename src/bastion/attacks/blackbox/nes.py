"""NES: projected gradient ascent with a natural-evolution-strategies gradient estimate (score-based).

Ilyas, Engstrom, Athalye & Lin, "Black-box Adversarial Attacks with Limited Queries and Information", ICML 2018
(the query-limited setting).

The gradient of the loss at the current point ``x_t`` is estimated from ``n`` scores around it, with antithetic
Gaussian sampling: ``n / 2`` directions ``u_j ~ N(0, I)`` are each used twice, as ``+u_j`` and ``-u_j``, and

    g = 1 / (n σ) · Σ_j L(x_t + σ δ_j) δ_j,      δ ∈ {u_1, -u_1, ..., u_{n/2}, -u_{n/2}},

the search-distribution gradient of NES. The estimate drives projected gradient ascent with momentum: ``G_t = m
G_{t-1} + (1 - m) g``, ``x_{t+1} = Π(x_t + lr · sign(G_t))`` for l∞ (the paper) or ``Π(x_t + lr · G_t / ||G_t||_2)``
for l2, where ``Π`` is the projection onto the ball ∩ domain. The step size starts at ``lr`` and is halved when the
estimate's mean loss has not improved over the last ``plateau_length`` iterations, down to ``lr / min_lr_ratio`` (the
reference code's plateau annealing, 1e-2 → 5e-5).

Defaults are the paper's and its code's: ``n = 50``, ``σ = 0.001``, momentum 0.9, plateau length 5, drop 2, and a
step of 0.01 for ``eps = 0.05`` (l∞ on ImageNet), here scaled with the radius: ``lr = 0.2 · eps``. The paper has no
l2 version; the same ratio is used for the normalised l2 step (the NES-l2 baseline of Ilyas, Engstrom & Madry, ICLR
2019, used 0.06 · eps on ImageNet, which on small inputs spends most of a budget before reaching the sphere).

Query accounting (exact, per sample): one iteration is ``n`` estimation queries plus one query of the new point,
which tells whether it is adversarial and its loss. (The reference code also evaluates the current point every
iteration without counting it; here that query is the previous iteration's.) Deviations from the reference: the
estimation points are clipped to the input domain, so a deployed API only ever sees valid inputs (at the domain's
faces the antithetic pair becomes one-sided, which shrinks but does not flip the estimate there), and an estimation
point that is adversarial and inside the threat set ends the search for its sample at no extra cost.
"""

from __future__ import annotations

import math
from typing import Literal

import torch

from bastion.attacks.base import Attack, CountingModel, positive_float, positive_int
from bastion.errors import InputError
from bastion.results import Criterion
from bastion.threat import LpBall, ThreatModel

NESLoss = Literal["ce", "cw"]

#: Step size per unit of radius: the NES paper's 0.01 at eps 0.05 (l∞), used for the l2 step too.
_REL_LR = {"linf": 0.2, "l2": 0.2}
#: The paper's absolute step, for an unbounded radius.
_ABS_LR = {"linf": 0.01, "l2": 0.01}


class NES(Attack):
    """NES (Ilyas, Engstrom, Athalye & Lin, ICML 2018): PGD on an antithetic Gaussian gradient estimate.

    Score-based, l∞ and l2, untargeted and targeted. Maximises the cross-entropy of the true class (untargeted) or
    minimises that of the target (targeted) with projected steps along the NES estimate (see the module docstring).
    Samples stop as soon as a queried point inside the threat set is adversarial; the point of highest loss seen is
    kept for the others. Each iteration costs ``samples + 1`` queries; a sample that cannot afford a whole iteration
    stops.

    Args:
        queries: query budget per sample (the paper's runs cap at 10 000 for the query-limited setting).
        samples: queries per gradient estimate, ``n`` (even: ``n / 2`` antithetic pairs); 50 as in the paper.
        sigma: standard deviation of the search distribution, 0.001 as in the paper.
        lr: initial step size; ``None`` for the papers' step scaled with the radius (module docstring).
        momentum: weight of the previous estimate, 0.9 as in the reference code.
        plateau_length: iterations without improvement of the mean estimation loss before the step is halved (5).
        plateau_drop: factor the step is divided by on a plateau (2).
        min_lr_ratio: the step is never annealed below ``lr / min_lr_ratio`` (200, the reference's 1e-2 / 5e-5).
        loss: ``"ce"`` (cross-entropy, the paper's) or ``"cw"`` (the C&W margin).
    """

    name = "nes"
    norms = ("linf", "l2")
    access = "score"
    budgeted = True
    paper = (
        "Ilyas, Engstrom, Athalye & Lin, Black-box Adversarial Attacks with Limited Queries and Information, ICML 2018"
    )

    def __init__(
        self,
        *,
        queries: int = 10000,
        samples: int = 50,
        sigma: float = 1e-3,
        lr: float | None = None,
        momentum: float = 0.9,
        plateau_length: int = 5,
        plateau_drop: float = 2.0,
        min_lr_ratio: float = 200.0,
        loss: NESLoss = "ce",
    ) -> None:
        self.queries = positive_int("queries", queries)
        self.samples = positive_int("samples", samples)
        if self.samples % 2:
            raise InputError(f"samples must be even (antithetic pairs), got {samples!r}")
        self.sigma = positive_float("sigma", sigma)
        self.lr = None if lr is None else positive_float("lr", lr)
        if isinstance(momentum, bool) or not isinstance(momentum, (int, float)) or not 0.0 <= momentum < 1.0:
            raise InputError(f"momentum must be in [0, 1), got {momentum!r}")
        self.momentum = float(momentum)
        self.plateau_length = positive_int("plateau_length", plateau_length)
        self.plateau_drop = positive_float("plateau_drop", plateau_drop)
        if self.plateau_drop < 1.0:
            raise InputError(f"plateau_drop must be >= 1 (the step is divided by it), got {plateau_drop!r}")
        self.min_lr_ratio = positive_float("min_lr_ratio", min_lr_ratio)
        if self.min_lr_ratio < 1.0:
            raise InputError(f"min_lr_ratio must be >= 1, got {min_lr_ratio!r}")
        if loss not in ("ce", "cw"):
            raise InputError(f"loss must be 'ce' or 'cw', got {loss!r}")
        self.loss: NESLoss = loss

    def step_size(self, threat: LpBall) -> float:
        """The initial step size on ``threat``: ``lr`` if given, else the papers' step for that radius."""
        if self.lr is not None:
            return self.lr
        if math.isinf(threat.eps):
            return _ABS_LR[threat.norm]
        return _REL_LR[threat.norm] * threat.eps

    def run(
        self,
        model: CountingModel,
        x: torch.Tensor,
        criterion: Criterion,
        threat: ThreatModel,
        generator: torch.Generator | None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if not isinstance(threat, LpBall) or threat.norm not in self.norms:
            raise InputError(f"NES needs an l∞ or l2 LpBall threat model, got {threat!r}")
        ledger = model.ledger(self.queries)
        n = x.shape[0]
        best = x.clone()
        if threat.eps == 0:
            return best, ledger.used
        lo, hi = threat.domain
        shape = x.shape[1:]
        best_loss = torch.full((n,), -math.inf, device=x.device, dtype=x.dtype)
        if model.clean_scores is not None:
            best_loss = criterion.loss(model.clean_scores.to(x.dtype), self.loss)
        x_cur = x.clone()
        momentum = torch.zeros_like(x).flatten(1)
        lr0 = self.step_size(threat)
        lr = torch.full((n,), lr0, device=x.device, dtype=x.dtype)
        history = torch.zeros((n, self.plateau_length), device=x.device, dtype=x.dtype)
        filled = torch.zeros(n, dtype=torch.long, device=x.device)
        done = torch.zeros(n, dtype=torch.bool, device=x.device)
        half, cost = self.samples // 2, self.samples + 1
        while True:
            act = ledger.afford((~done).nonzero().squeeze(1), cost)
            if act.numel() == 0:
                break
            a = act.numel()
            x_a, x0 = x_cur[act], x[act]
            u = torch.randn((a, half, *shape), generator=generator, device=x.device, dtype=x.dtype)
            noise = torch.cat([u, -u], dim=1)  # antithetic pairs
            points = (x_a[:, None] + self.sigma * noise).clamp(lo, hi).reshape(a * self.samples, *shape)
            rows = act.repeat_interleave(self.samples)
            crit_rows = criterion.subset(rows)
            scores = ledger.scores(points, rows)
            losses = crit_rows.loss(scores, self.loss).reshape(a, self.samples)
            inside = threat.contains(points, x[rows]) & crit_rows.is_adversarial(scores)
            grad = (losses[:, :, None] * noise.flatten(2)).mean(dim=1) / self.sigma
            grad = self.momentum * momentum[act] + (1.0 - self.momentum) * grad
            momentum[act] = grad
            self._anneal(act, losses.mean(dim=1), history, filled, lr, lr0)
            x_new = threat.project(threat.step(x_a, grad.reshape(x_a.shape), lr[act]), x0)
            crit = criterion.subset(act)
            out = ledger.scores(x_new, act)
            loss_new, hit = crit.loss(out, self.loss), crit.is_adversarial(out)
            x_cur[act] = x_new
            better = hit | (loss_new > best_loss[act])
            best[act[better]] = x_new[better]
            best_loss[act[better]] = loss_new[better]
            done[act[hit]] = True
            # an estimation point already inside the threat set and adversarial is as good as any
            found = inside.reshape(a, self.samples)
            extra = found.any(dim=1) & ~hit
            if bool(extra.any()):
                first = found.float().argmax(dim=1)  # the first hit of each sample
                chosen = points.reshape(a, self.samples, *shape)[torch.arange(a, device=x.device), first]
                best[act[extra]] = chosen[extra]
                done[act[extra]] = True
        return best, ledger.used

    def _anneal(
        self,
        act: torch.Tensor,
        mean_loss: torch.Tensor,
        history: torch.Tensor,
        filled: torch.Tensor,
        lr: torch.Tensor,
        lr0: float,
    ) -> None:
        """Halve the step of samples whose mean estimation loss fell over the last ``plateau_length`` iterations."""
        history[act] = torch.cat([history[act, 1:], mean_loss[:, None]], dim=1)
        filled[act] += 1
        stalled = (filled[act] >= self.plateau_length) & (history[act, -1] < history[act, 0])
        if bool(stalled.any()):
            s = act[stalled]
            lr[s] = (lr[s] / self.plateau_drop).clamp_min(lr0 / self.min_lr_ratio)
            filled[s] = 0
