"""Jacobian-based saliency map attack (JSMA).

Papernot, McDaniel, Jha, Fredrikson, Celik & Swami, "The Limitations of Deep Learning in Adversarial Settings",
IEEE EuroS&P 2016. A targeted l0 attack: at each iteration it computes the forward derivative of the network,
``α_p = ∂F_t/∂x_p`` for the target class ``t`` and ``β_p = Σ_{j≠t} ∂F_j/∂x_p`` for the others, and picks the pair of
features ``(p, q)`` that maximises the saliency ``(α_p + α_q) · |β_p + β_q|`` among pairs with ``α_p + α_q > 0`` and
``β_p + β_q < 0`` (the paper's Algorithm 3, which searches pairs because single features are too strict a
condition). Both features move by ``θ`` (to the top of the domain for ``θ = +1``) and leave the search domain once
saturated. It stops when the target class is predicted or ``γ`` of the features have changed.
"""

from __future__ import annotations

import math

import torch

from bastion.attacks.base import Attack, CountingModel
from bastion.errors import InputError
from bastion.results import Criterion
from bastion.threat import LpBall, ThreatModel


class JSMA(Attack):
    """Jacobian-based saliency map attack (Papernot et al., EuroS&P 2016), l0, targeted.

    Without ``targets`` the attack is made untargeted by targeting, per sample, the most likely wrong class at the
    clean input (a common choice; the paper only defines the targeted attack). The l0 budget is the smaller of
    ``gamma`` (as a fraction of the input features) and the threat's eps (a number of features; ``inf`` leaves
    only ``gamma``).

    The pair search costs D² per sample (D = number of input features). It is done in chunks of samples so that at
    most ``max_pair_elements`` pair scores exist at once, which keeps large inputs within memory; ``candidates``
    restricts the search to the features with the largest ``|α|`` (an approximation, off by default).

    Args:
        theta: change applied to each selected feature, as a fraction of the domain width (+1: set to the top of
            the domain, the paper's default; negative values decrease features).
        gamma: maximum fraction of features changed (0.145 in the paper's MNIST experiments).
        output: differentiate the ``"logits"`` (common practice) or the softmax ``"probs"``.
        candidates: if set, only the ``candidates`` features with the largest ``|α|`` take part in the pair search.
        max_pair_elements: memory budget of the pair search, in scores held at once.
    """

    name = "jsma"
    norms = ("l0",)
    paper = "Papernot et al., The Limitations of Deep Learning in Adversarial Settings, EuroS&P 2016"

    def __init__(
        self,
        *,
        theta: float = 1.0,
        gamma: float = 0.145,
        output: str = "logits",
        candidates: int | None = None,
        max_pair_elements: int = 2**25,
    ) -> None:
        if theta == 0 or not -1.0 <= theta <= 1.0:
            raise InputError(f"theta must be a non-zero fraction of the domain width in [-1, 1], got {theta!r}")
        if not 0.0 < gamma <= 1.0:
            raise InputError(f"gamma must be in (0, 1], got {gamma!r}")
        if output not in ("logits", "probs"):
            raise InputError(f"output must be 'logits' or 'probs', got {output!r}")
        if candidates is not None and candidates < 2:
            raise InputError(f"candidates must be >= 2 or None, got {candidates!r}")
        if max_pair_elements < 1:
            raise InputError(f"max_pair_elements must be >= 1, got {max_pair_elements!r}")
        self.theta = float(theta)
        self.gamma = float(gamma)
        self.output = output
        self.candidates = candidates
        self.max_pair_elements = int(max_pair_elements)

    def run(
        self,
        model: CountingModel,
        x: torch.Tensor,
        criterion: Criterion,
        threat: ThreatModel,
        generator: torch.Generator | None,
    ) -> torch.Tensor:
        if not isinstance(threat, LpBall):
            raise InputError(f"JSMA needs an LpBall('l0', ...) threat model, got {threat!r}")
        lo, hi = threat.domain
        n, dim = x.shape[0], x[0].numel()
        budget = math.floor(self.gamma * dim)
        if math.isfinite(threat.eps):
            budget = min(budget, int(threat.eps))
        targets = criterion.targets
        if targets is None:
            logits = model(x)
            targets = logits.scatter(1, criterion.labels[:, None], -math.inf).argmax(dim=1)
        step = self.theta * (hi - lo)
        x_adv = x.reshape(n, dim).clone()
        # search domain: features that can still move in the direction of theta
        domain = (x_adv < hi) if step > 0 else (x_adv > lo)
        changed = torch.zeros(n, dtype=torch.long, device=x.device)
        active = torch.ones(n, dtype=torch.bool, device=x.device)
        for _ in range(budget // 2 + 1):
            idx = active.nonzero().squeeze(1)
            if idx.numel() == 0:
                break
            alpha, beta, logits = self._derivatives(model, x_adv[idx].reshape((-1, *x.shape[1:])), targets[idx])
            reached = criterion.subset(idx).is_adversarial(logits)  # untargeted: any wrong class will do
            out_of_budget = changed[idx] + 2 > budget
            alive = ~reached & ~out_of_budget
            p, q, ok = self._best_pairs(alpha[alive], beta[alive], domain[idx[alive]])
            stop = torch.ones_like(alive)
            rows = idx[alive]
            stop[alive] = ~ok
            active[idx[stop]] = False
            rows, p, q = rows[ok], p[ok], q[ok]
            for feat in (p, q):
                new = (x_adv[rows, feat] + step).clamp(lo, hi)
                x_adv[rows, feat] = new
                saturated = (new >= hi) if step > 0 else (new <= lo)
                domain[rows, feat] = domain[rows, feat] & ~saturated
            changed[rows] += 2
        return x_adv.reshape(x.shape)

    def _derivatives(
        self, model: CountingModel, x: torch.Tensor, targets: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """α (derivative of the target output) and β (of the sum of the others), flattened, and the logits."""

        def target_score(logits: torch.Tensor) -> torch.Tensor:
            out = logits if self.output == "logits" else logits.softmax(dim=1)
            return out.gather(1, targets[:, None]).squeeze(1)

        def total_score(logits: torch.Tensor) -> torch.Tensor:
            out = logits if self.output == "logits" else logits.softmax(dim=1)
            return out.sum(dim=1)

        logits, _, g_target = model.logits_and_grad(x, target_score)
        _, _, g_total = model.logits_and_grad(x, total_score)
        alpha = g_target.flatten(1)
        return alpha, g_total.flatten(1) - alpha, logits

    def _best_pairs(
        self, alpha: torch.Tensor, beta: torch.Tensor, domain: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Per sample, the pair of searchable features with the largest saliency; ``ok`` is False where none."""
        n, dim = alpha.shape
        sign = 1.0 if self.theta > 0 else -1.0
        # for decreasing features the roles flip: we want the target output to rise as x_p falls
        a, b = sign * alpha, sign * beta
        cols = torch.arange(dim, device=alpha.device).expand(n, dim)
        if self.candidates is not None and self.candidates < dim:
            score = a.abs().masked_fill(~domain, -1.0)
            cols = score.topk(self.candidates, dim=1).indices
            a, b, domain = a.gather(1, cols), b.gather(1, cols), domain.gather(1, cols)
        k = a.shape[1]
        chunk = max(1, self.max_pair_elements // (k * k))
        best_p = torch.zeros(n, dtype=torch.long, device=alpha.device)
        best_q = torch.zeros(n, dtype=torch.long, device=alpha.device)
        ok = torch.zeros(n, dtype=torch.bool, device=alpha.device)
        upper = torch.triu(torch.ones(k, k, dtype=torch.bool, device=alpha.device), diagonal=1)
        for start in range(0, n, chunk):
            sl = slice(start, start + chunk)
            pa = a[sl, :, None] + a[sl, None, :]
            pb = b[sl, :, None] + b[sl, None, :]
            valid = (pa > 0) & (pb < 0) & upper & domain[sl, :, None] & domain[sl, None, :]
            sal = torch.where(valid, pa * pb.abs(), torch.full_like(pa, -1.0)).flatten(1)
            value, flat = sal.max(dim=1)
            ok[sl] = value > 0
            best_p[sl] = cols[sl].gather(1, (flat // k)[:, None]).squeeze(1)
            best_q[sl] = cols[sl].gather(1, (flat % k)[:, None]).squeeze(1)
        return best_p, best_q, ok
